"""DANE for SMTP (RFC 7672): TLSA records against the certificates a next hop sent.

Pure logic, no I/O: the TLSA lookup lives in ``gateway/deliver/mx.py``, the
STARTTLS session (which hands over the chain) in ``gateway/deliver/smtp.py``, and
the decision of which MX hosts are DANE-protected in ``gateway/deliver/deliverer.py``.

- :func:`usable` keeps the records SMTP can use (RFC 7672 §3.1.3: DANE-TA(2) and
  DANE-EE(3) only; selectors and matching types that RFC 6698/7218 define);
- :func:`host_policy` turns one MX host's TLSA records into what the session must do;
- :func:`verify` judges a certificate chain (DER, leaf first) against the usable
  records: ``None`` when the peer is authenticated, else the reason why not.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PSS, PKCS1v15

from gateway.deliver.mta_sts import mx_matches

# RFC 7218 §2.1 acronyms of the certificate usages.
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
# RFC 7218 §2.2, §2.3: selectors and matching types.
CERT, SPKI = 0, 1
FULL, SHA2_256, SHA2_512 = 0, 1, 2

_DIGESTS = {SHA2_256: hashlib.sha256, SHA2_512: hashlib.sha512}


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:  # presentation format, as in a zone file (RFC 6698 §2.2)
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True, slots=True)
class TlsaAnswer:
    """What the TLSA lookup of one MX host gave: ``records`` (possibly none), and
    whether the answer was DNSSEC-validated (the resolver's AD bit)."""

    records: tuple[Tlsa, ...]
    secure: bool


Mode = Literal["dane", "encrypt"]


@dataclass(frozen=True, slots=True)
class HostPolicy:
    """How to talk to one DANE-protected MX host.

    ``dane``: STARTTLS, and the chain must match one of ``records``.
    ``encrypt``: STARTTLS is mandatory but the certificate is not checked (RFC 7672
    §2.2: secure TLSA records that are all unusable).
    """

    mode: Mode
    records: tuple[Tlsa, ...]
    # RFC 7672 §3.2.2: the names a DANE-TA certificate may carry (the MX host name,
    # its CNAME expansion, the next-hop domain); () is the MX host name alone.
    names: tuple[str, ...] = ()
    # Every record of the secure answer, usable or not: what the domain published
    # (the policy-string of a TLS report, RFC 8460 §4.4).
    published: tuple[Tlsa, ...] = ()


def usable(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    """The records an SMTP client can use.

    RFC 7672 §3.1.3: PKIX-TA(0) and PKIX-EE(1) are not for SMTP (there is no agreed
    set of trust anchors) and are treated as unusable; so are selectors and matching
    types RFC 6698 §2.1.2, §2.1.3 do not define.  A digest of the wrong length for
    its type cannot match anything and is dropped as well (RFC 7671 §10.1.4 asks
    clients to ignore malformed records rather than fail the whole RRset).
    """
    out = []
    for r in records:
        if r.usage not in (DANE_TA, DANE_EE) or r.selector not in (CERT, SPKI):
            continue
        digest = _DIGESTS.get(r.mtype)
        if r.mtype != FULL and (digest is None or len(r.data) != digest().digest_size):
            continue
        out.append(r)
    return tuple(out)


def host_policy(answer: TlsaAnswer) -> HostPolicy | None:
    """What one MX host's TLSA records ask of the session, or None when DANE does
    not apply to it (RFC 7672 §2.2: an insecure answer, or no TLSA records, and the
    host gets what non-DANE hosts get).

    Only for a host whose MX and address records were secure.  A failed lookup has
    no answer: RFC 7672 §2.1.1, such a host must not be used (the failure may be an
    attacker's doing), which the caller decides.
    """
    if not answer.secure or not answer.records:
        return None
    records = usable(answer.records)
    # RFC 7672 §2.2: "TLSA records present but unusable" -> mandatory TLS,
    # no authentication.
    return HostPolicy("dane" if records else "encrypt", records, published=answer.records)


def tlsa_name(host: str, port: int) -> str:
    """RFC 7672 §2.2.3 / RFC 6698 §3: ``_<port>._tcp.<MX host>``."""
    return f"_{port}._tcp.{host.rstrip('.')}"


# -- matching --------------------------------------------------------------------------

def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    """RFC 6698 §2.1.2: the full certificate (0) or its SubjectPublicKeyInfo (1)."""
    if selector == CERT:
        return der
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def matches(record: Tlsa, cert: x509.Certificate, der: bytes) -> bool:
    """RFC 6698 §2.1.3: the selected content itself (0) or its SHA-256 (1) / SHA-512 (2)."""
    content = _selected(cert, der, record.selector)
    digest = _DIGESTS.get(record.mtype)
    value = content if digest is None else digest(content).digest()
    return value == record.data


def verify(
    records: Sequence[Tlsa], chain: Sequence[bytes], names: Sequence[str],
    now: datetime.datetime | None = None,
) -> str | None:
    """None when ``chain`` (DER certificates as the server sent them, leaf first)
    is authenticated by one of the usable ``records`` for a server known by
    ``names`` (its reference identifiers, RFC 7672 §3.2.2: any one will do); else
    why not."""
    if not chain:
        return "the server sent no certificate"
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        return f"unreadable certificate: {exc}"
    leaf = certs[0]
    # RFC 7672 §3.1.1: DANE-EE(3) matches the leaf alone; its name and validity
    # dates are not checked (the DNS record is the authority).
    for record in records:
        if record.usage == DANE_EE and matches(record, leaf, chain[0]):
            return None
    ta_records = [r for r in records if r.usage == DANE_TA]
    if not ta_records:
        return "certificate matches no DANE-EE TLSA record"
    why = _verify_ta(ta_records, certs, chain, names,
                     now or datetime.datetime.now(datetime.UTC))
    return why or None


def _verify_ta(
    records: Sequence[Tlsa], certs: Sequence[x509.Certificate], chain: Sequence[bytes],
    names: Sequence[str], now: datetime.datetime,
) -> str:
    """Why the chain is not authenticated by the DANE-TA(2) ``records``; '' when it is."""
    # RFC 7672 §3.1.2: the trust anchor is a certificate the server sends in its
    # chain, or (a "2 1 0" record, RFC 7671 §5.2.2) a public key that signed the
    # topmost certificate it sends.  The leaf itself is not a trust anchor.
    anchor = next((i for i in range(1, len(certs))
                   if any(matches(r, certs[i], chain[i]) for r in records)), None)
    if anchor is None:
        anchor = _key_anchor(records, certs)
        if anchor is None:
            return "no certificate in the chain matches a DANE-TA TLSA record"
    # Each certificate below the anchor must be signed by the one after it (the one
    # below a key anchor was checked against the key by _key_anchor).
    for i in range(min(anchor, len(certs) - 1)):
        try:
            certs[i].verify_directly_issued_by(certs[i + 1])
        except (ValueError, TypeError, InvalidSignature) as exc:
            return f"chain broken below the trust anchor at depth {i}: {exc or 'bad signature'}"
    # RFC 7672 §3.1.2: with DANE-TA the usual PKIX checks apply below the anchor:
    # validity dates, intermediates that are CAs, and the server name.
    for i in range(anchor):
        # The two ways out of the validity period are told apart: an expired
        # certificate is its own TLS-RPT result type (RFC 8460 §4.3.1).
        if now > certs[i].not_valid_after_utc:
            return (f"certificate at depth {i} expired on "
                    f"{certs[i].not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
        if now < certs[i].not_valid_before_utc:
            return (f"certificate at depth {i} is not yet valid (from "
                    f"{certs[i].not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC)")
    for i in range(1, anchor):
        # RFC 5280 §4.2.1.9, §4.2.1.3: only a CA may issue certificates, else any
        # holder of a leaf under the trust anchor could mint one for our MX host.
        if not _is_ca(certs[i]):
            return f"certificate at depth {i} is not a CA but issued the one below it"
    if not any(name_matches(certs[0], name) for name in names):
        return f"certificate is not valid for {', '.join(names)}"
    return ""


def _key_anchor(records: Sequence[Tlsa], certs: Sequence[x509.Certificate]) -> int | None:
    """Where a "2 1 0" record's public key sits above the chain: ``len(certs)`` when
    the topmost certificate sent is signed by it, else None.  Only the topmost: a
    server that sends its trust anchor's certificate is matched by that certificate,
    and one below it signed by the key would be a second path the chain does not
    show."""
    top = certs[-1]
    own = _selected(top, b"", SPKI)
    for record in records:
        # The top's own key is not above it (a self-signed leaf is no trust anchor).
        if (record.selector, record.mtype) != (SPKI, FULL) or record.data == own:
            continue
        try:
            key = serialization.load_der_public_key(record.data)
        except (ValueError, TypeError):  # not a key: the record is unusable
            continue
        if _signed_by(top, key):
            return len(certs)
    return None


def _signed_by(cert: x509.Certificate, key: object) -> bool:
    """Whether ``key`` made ``cert``'s signature (RFC 5280 §4.1.1.3)."""
    params = cert.signature_algorithm_parameters
    data, sig = cert.tbs_certificate_bytes, cert.signature
    try:
        if isinstance(key, rsa.RSAPublicKey) and isinstance(params, (PKCS1v15, PSS)):
            hash_alg = cert.signature_hash_algorithm
            if hash_alg is None:
                return False
            key.verify(sig, data, params, hash_alg)
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(params, ec.ECDSA):
            key.verify(sig, data, params)
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(sig, data)
        else:
            return False
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True  # no key usage: any use is allowed (RFC 5280 §4.2.1.3)


def name_matches(cert: x509.Certificate, name: str) -> bool:
    """RFC 7672 §3.2.3 (RFC 6125 §6.4): a DNS-ID in subjectAltName equals the name,
    or is a wildcard for exactly its first label; the CN counts only when the
    certificate has no DNS-ID."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        ids = [str(d) for d in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        ids = []
    if not ids:
        ids = [str(a.value) for a in cert.subject.get_attributes_for_oid(
            x509.oid.NameOID.COMMON_NAME)]
    # The wildcard rule is MTA-STS's mx pattern rule (RFC 8461 §4.1 follows RFC 6125 too).
    return any(mx_matches(i, name) for i in ids)
