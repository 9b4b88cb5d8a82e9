"""DKIM signing of outbound mail (RFC 6376 §5; Ed25519 per RFC 8463).

:func:`sign` is pure: message bytes and a key in, signed message bytes out.  It
signs with relaxed/relaxed canonicalization (which survives the header
refolding and trailing-space changes relays make) and never uses ``l=`` (RFC
6376 §8.2: it lets anyone append content under our signature).  From, and the
other fields a reader relies on, are *oversigned*: listed once more than they
occur, so a copy added later breaks the signature instead of being displayed as
signed (RFC 6376 §8.15).

Signing must come after every transformation that changes the body (encryption,
re-encoding), so :class:`DkimSignStage` is the last transform before archive.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gateway.check import headers
from gateway.check.config import SigningKey
from gateway.check.dmarc import from_domains, from_fields
from gateway.errors import CofferError
from gateway.pipeline import MessageContext, StageResult

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

# Signed when present, in this order (RFC 6376 §5.4.1's list, trimmed of fields
# that relays routinely rewrite).
SIGNED = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-disposition",
    "in-reply-to", "references", "list-id", "list-unsubscribe", "list-unsubscribe-post",
)
# Signed once more than they occur (also when absent), so none can be added.
OVERSIGNED = frozenset({"from", "sender", "reply-to", "subject", "to", "cc", "date",
                        "message-id", "content-type"})


class DkimSignError(CofferError):
    """The message or key cannot be used for a DKIM signature."""


def dkimpy_key(key: bytes) -> tuple[bytes, bytes]:
    """A PEM private key (RSA or Ed25519), or dkimpy's base64 Ed25519 seed ->
    (dkimpy signature algorithm, the key in the form dkimpy takes)."""
    if b"-----BEGIN" in key:
        try:
            pk = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise DkimSignError(f"not a usable private key: {exc}") from None
        if isinstance(pk, rsa.RSAPrivateKey):
            # dkimpy reads only PKCS#1 ("BEGIN RSA PRIVATE KEY")
            return b"rsa-sha256", pk.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption())
        if isinstance(pk, ed25519.Ed25519PrivateKey):
            raw = pk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                   serialization.NoEncryption())
            return b"ed25519-sha256", base64.b64encode(raw)
        raise DkimSignError(f"unsupported key type {type(pk).__name__} (use RSA or Ed25519)")
    try:
        if len(base64.b64decode(key.strip(), validate=True)) == 32:
            return b"ed25519-sha256", key.strip()
    except binascii.Error:
        pass
    raise DkimSignError("not a PEM private key nor a base64 Ed25519 seed")


def public_record(key: bytes) -> str:
    """The DNS TXT record value publishing ``key``'s public half (RFC 6376 §3.6.1)."""
    algorithm, pk = dkimpy_key(key)
    if algorithm == b"ed25519-sha256":
        seed = base64.b64decode(pk)
        pub = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(pub).decode()}"  # RFC 8463 §4
    rsa_key = serialization.load_pem_private_key(pk, password=None)
    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def generate_key(algorithm: Algorithm = "rsa-sha256", bits: int = 2048) -> bytes:
    """A new private key as PEM (RSA 2048 by default: RFC 8301 §3.2 wants >= 2048
    for signers; PKCS#8 for Ed25519, which OpenDKIM also reads)."""
    if algorithm == "ed25519-sha256":
        return ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
    return rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())


def headers_to_sign(data: bytes) -> list[bytes]:
    """The h= list: SIGNED fields as often as they occur, OVERSIGNED ones once more."""
    fields, _ = headers.split(data)
    counts: dict[str, int] = {}
    for f in fields:
        counts[f.name] = counts.get(f.name, 0) + 1
    out: list[bytes] = []
    for name in SIGNED:
        n = counts.get(name, 0) + (1 if name in OVERSIGNED else 0)
        out.extend([name.encode()] * n)
    return out


def sign(data: bytes, domain: str, selector: str, key: bytes,
         *, identity: str | None = None) -> bytes:
    """``data`` with a DKIM-Signature field for ``domain``/``selector`` prepended."""
    algorithm, pk = dkimpy_key(key)
    fields, _ = headers.split(data)
    if not any(f.name == "from" for f in fields):
        raise DkimSignError("the message has no From field, which DKIM must sign "
                            "(RFC 6376 §5.4)")
    linesep = b"\r\n" if b"\r\n" in data.split(b"\n", 1)[0] + b"\n" else b"\n"
    try:
        d = dkim.DKIM(data, signature_algorithm=algorithm, linesep=linesep)
        sig: bytes = d.sign(
            selector.encode(), domain.encode(), pk,
            identity=identity.encode() if identity else None,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=headers_to_sign(data),
            length=False,  # never l= (RFC 6376 §8.2)
        )
    except dkim.DKIMException as exc:
        raise DkimSignError(f"cannot sign for {domain}: {exc}") from None
    return sig + data


@dataclass(frozen=True, slots=True)
class LoadedKey:
    selector: str
    key: bytes


class DkimSignStage:
    """Signs mail from our users (submission, or generated locally) with the key of
    its From domain, or of the nearest parent domain that has one."""

    name = "dkim_sign"
    once = True

    def __init__(self, keys: Mapping[str, LoadedKey]) -> None:
        self.keys = {d.lower().rstrip("."): k for d, k in keys.items()}
        for k in self.keys.values():
            dkimpy_key(k.key)  # refuse to start with a key we cannot use

    @classmethod
    def from_config(cls, signing: Mapping[str, SigningKey],
                    resolve: Callable[[Path], Path] = Path) -> DkimSignStage:
        """From CheckConfig.dkim_signing; ``resolve`` maps a configured path to a
        real one (Config.path, which makes it relative to data_dir)."""
        keys: dict[str, LoadedKey] = {}
        for domain, sk in signing.items():
            path = resolve(sk.key_file)
            try:
                keys[domain] = LoadedKey(sk.selector, path.read_bytes())
            except OSError as exc:
                raise DkimSignError(f"DKIM key for {domain}: cannot read {path}: {exc}") from None
        return cls(keys)

    def key_for(self, domain: str) -> tuple[str, LoadedKey] | None:
        labels = domain.lower().rstrip(".").split(".")
        for i in range(len(labels) - 1):
            candidate = ".".join(labels[i:])
            if candidate in self.keys:
                return candidate, self.keys[candidate]
        return None

    async def run(self, ctx: MessageContext) -> StageResult:
        if ctx.envelope.role == "inbound":
            return StageResult(reason="inbound mail is not signed")
        values = from_fields(ctx.data)
        domains = from_domains(values[0]) if len(values) == 1 else []
        if len(set(domains)) != 1 or not domains[0]:
            return StageResult(reason="not signed: no single From domain")
        found = self.key_for(domains[0])
        if found is None:
            return StageResult(reason=f"not signed: no DKIM key for {domains[0]}")
        domain, k = found
        signed = sign(ctx.data, domain, k.selector, k.key)
        return StageResult(data=signed, reason=f"DKIM-signed d={domain} s={k.selector}",
                           facts={"dkim_signed": {"domain": domain, "selector": k.selector}})
