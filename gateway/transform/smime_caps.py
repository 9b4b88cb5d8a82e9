"""S/MIME capabilities: what a correspondent can decrypt, and what Coffer sends them.

A correspondent announces the algorithms it can decrypt in the SMIMECapabilities
signed attribute of the mail it signs (RFC 8551 §2.5.2), most preferred first;
RFC 8551 §2.7.1 says to keep the list of a verified signature with its signing
time and to replace it only with the list of a later signature.  An operator may
also set it (``coffer keys import CERT --capabilities aes256-gcm,aes256-cbc``).

What is sent, per message (:func:`choose`):

* **Content encryption**: AES-256-GCM in authEnveloped-data (RFC 5083, RFC 5084)
  when every recipient's list names AES-GCM; otherwise AES-256-CBC in
  enveloped-data (RFC 3565).  One content-encryption key serves all recipients, so
  the cipher must be one all of them read (RFC 8551 §2.7.3).  RFC 8551 §2.7 makes
  AES-128-GCM and AES-256-GCM a MUST for S/MIME 4.0 agents, so a list naming either
  size means the agent reads AES-256-GCM.  GCM is preferred over a CBC entry
  listed before it: both are in the list (RFC 8551 §2.7.1.1 asks for the first
  entry only as a SHOULD), and only GCM authenticates the content.
* **Unknown capabilities**: AES-256-CBC.  RFC 8551 §2.7.1.2 (unknown capabilities,
  unknown S/MIME version) recommends AES-256-GCM and, for an agent that chooses not
  to, a CBC cipher; Coffer chooses not to: the agents still in use include S/MIME
  3.2 ones (RFC 5751 §2.7: AES-CBC, no GCM), e.g. gpgsm 2.2 (Debian 12), which
  cannot read authEnveloped-data at all.  Unreadable mail is not safer mail.
* **Key transport**, per recipient (each RecipientInfo has its own algorithm):
  RSAES-OAEP (RFC 3560; RFC 8551 §2.3 SHOULD+) with SHA-256 and MGF1-SHA-256
  (RFC 3560 §2.1 rSAES-OAEP-SHA256-Identifier): every decryptor here that reads
  OAEP at all (openssl cms, and so Coffer's own inbound path) reads SHA-256, and
  OAEP's default SHA-1 is no better supported by them.  Only a list that names
  key-encipherment algorithms (RFC 8551 §2.5.2 allows it) and names rsaEncryption
  but not rsaesOAEP gets RSAES-PKCS1-v1_5 (RFC 8551 §2.3 MUST): that is how an
  operator serves a gpgsm 2.2 user (``--capabilities aes256-cbc,rsaes-pkcs1v15``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.transform.errors import KeyStoreError

# Our names for the capabilities we act on, and the names openssl 3 prints for
# their OIDs (asn1parse prints a short name, or the dotted OID it has no name for).
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "aes256-gcm": ("aes-256-gcm", "id-aes256-GCM", "2.16.840.1.101.3.4.1.46"),
    "aes192-gcm": ("aes-192-gcm", "id-aes192-GCM", "2.16.840.1.101.3.4.1.26"),
    "aes128-gcm": ("aes-128-gcm", "id-aes128-GCM", "2.16.840.1.101.3.4.1.6"),
    "chacha20-poly1305": ("1.2.840.113549.1.9.16.3.18",),  # RFC 8103
    "aes256-cbc": ("aes-256-cbc", "2.16.840.1.101.3.4.1.42"),
    "aes192-cbc": ("aes-192-cbc", "2.16.840.1.101.3.4.1.22"),
    "aes128-cbc": ("aes-128-cbc", "2.16.840.1.101.3.4.1.2"),
    "des-ede3-cbc": ("des-ede3-cbc", "1.2.840.113549.3.7"),
    "rc2-cbc": ("rc2-cbc", "1.2.840.113549.3.2"),
    "des-cbc": ("des-cbc", "1.3.14.3.2.7"),
    "rsaes-oaep": ("rsaesOaep", "1.2.840.113549.1.1.7"),
    "rsaes-pkcs1v15": ("rsaEncryption", "1.2.840.113549.1.1.1"),
}
_BY_OPENSSL = {n: token for token, names in CAPABILITIES.items() for n in names}
GCM = frozenset({"aes256-gcm", "aes192-gcm", "aes128-gcm"})
KEY_TRANSPORT = frozenset({"rsaes-oaep", "rsaes-pkcs1v15"})

# RFC 8551 §2.7.1: signing times beyond any reasonable clock skew are refused.
MAX_CLOCK_SKEW_S = 12 * 3600


def parse_list(text: str) -> list[str]:
    """An operator's comma-separated list, checked against the names we know."""
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in CAPABILITIES]
    if unknown or not items:
        raise KeyStoreError(
            f"unknown S/MIME capabilities: {', '.join(unknown) or '(empty list)'}; "
            f"known: {', '.join(CAPABILITIES)}")
    return list(dict.fromkeys(items))


@dataclass(frozen=True, slots=True)
class Plan:
    """How one message is enveloped."""

    cipher: str  # "aes-256-gcm" or "aes-256-cbc" (openssl's names)
    oaep: tuple[bool, ...]  # per recipient, in the order given

    @property
    def smime_type(self) -> str:
        # RFC 8551 §3.2.2: authEnveloped-data for AEAD ciphers (RFC 5083).
        return "authEnveloped-data" if self.cipher.endswith("gcm") else "enveloped-data"


def wants_oaep(caps: Sequence[str] | None) -> bool:
    """RSAES-OAEP unless the list names key transport, and not OAEP (module doc)."""
    if not caps or not KEY_TRANSPORT.intersection(caps):
        return True
    return "rsaes-oaep" in caps


def choose(per_recipient: Sequence[Sequence[str] | None]) -> Plan:
    """The cipher every recipient reads, and each recipient's key transport."""
    gcm = bool(per_recipient) and all(caps and GCM.intersection(caps) for caps in per_recipient)
    return Plan("aes-256-gcm" if gcm else "aes-256-cbc",
                tuple(wants_oaep(caps) for caps in per_recipient))


# -- reading them from `openssl cms -cmsout -print` --------------------------------
_CAPS_ATTR = re.compile(r"^\s*object: S/MIME Capabilities \(1\.2\.840\.113549\.1\.9\.15\)\s*$")
_TIME_ATTR = re.compile(r"^\s*object: signingTime \(1\.2\.840\.113549\.1\.9\.5\)\s*$")
_ASN1_LINE = re.compile(r"^\s*\d+:d=(\d+)\s+hl=\d+\s+l=\s*\d+\s+(?:prim|cons):\s*(\S+)\s*:?(.*)$")
_TIME_VALUE = re.compile(r"^\s*(?:UTCTIME|GENERALIZEDTIME):(.+?)\s*$")


@dataclass(frozen=True, slots=True)
class Announced:
    capabilities: list[str]  # ours where known, else openssl's name, in the sender's order
    signing_time: datetime | None


def _time(text: str) -> datetime | None:
    try:
        return datetime.strptime(" ".join(text.split()), "%b %d %H:%M:%S %Y GMT").replace(
            tzinfo=UTC)
    except ValueError:
        return None


def _capability_oids(lines: Iterable[str]) -> list[str]:
    """The capabilityID of each SMIMECapability: the OBJECTs at depth 2 of the
    asn1parse dump (deeper ones are parameters, e.g. OAEP's hash)."""
    out: list[str] = []
    started = False
    for line in lines:
        m = _ASN1_LINE.match(line)
        if not m:
            if started:
                break
            continue
        started = True
        if m.group(1) == "2" and m.group(2) == "OBJECT":
            name = m.group(3).strip()
            out.append(_BY_OPENSSL.get(name, name))
    return out


def parse_print(printed: str) -> Announced | None:
    """SMIMECapabilities and signingTime from ``openssl cms -cmsout -print`` output: the
    first of each among the signerInfos (mail has one signer; ``-signer`` reports the
    first certificate too).  None when no capabilities are announced."""
    lines = printed.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "signerInfos:")
    except StopIteration:
        return None
    caps: list[str] | None = None
    when: datetime | None = None
    for i in range(start, len(lines)):
        if caps is None and _CAPS_ATTR.match(lines[i]):
            caps = _capability_oids(lines[i + 1:])
        elif when is None and _TIME_ATTR.match(lines[i]):
            for follow in lines[i + 1:i + 4]:
                if m := _TIME_VALUE.match(follow):
                    when = _time(m.group(1))
                    break
        if caps is not None and when is not None:
            break
    if caps is None:
        return None
    return Announced(list(dict.fromkeys(caps)), when)


__all__ = ["CAPABILITIES", "GCM", "MAX_CLOCK_SKEW_S", "Announced", "Plan", "choose",
           "parse_list", "parse_print", "wants_oaep"]
