"""Certificates for the DANE tests, made by the real ``openssl``: a self-signed leaf (what
DANE-EE publishers often run) and chains from a private CA (for DANE-TA), with the TLSA
data that matches them."""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from stspeers import StsCa, openssl


def der(pem: Path) -> bytes:
    """The first certificate of a PEM file, DER-encoded."""
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def spki_sha256(pem: Path) -> bytes:
    """TLSA "x 1 1" data: the SHA-256 of the certificate's SubjectPublicKeyInfo."""
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def cert_sha256(pem: Path) -> bytes:
    """TLSA "x 0 1" data: the SHA-256 of the whole certificate."""
    return hashlib.sha256(der(pem)).digest()


@dataclass(frozen=True)
class Served:
    """A certificate chain a server presents: the leaf first, then what it sends with it."""

    chain: tuple[Path, ...]
    key: Path

    @property
    def leaf(self) -> Path:
        return self.chain[0]

    def ders(self) -> list[bytes]:
        return [der(p) for p in self.chain]

    def context(self) -> ssl.SSLContext:
        bundle = self.key.with_suffix(".chain.pem")
        bundle.write_text("".join(p.read_text() for p in self.chain))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(bundle, self.key)
        return ctx


def self_signed(tmp: Path, name: str) -> Served:
    """A self-signed certificate for ``name`` (no CA anyone trusts)."""
    tmp.mkdir(parents=True, exist_ok=True)
    crt, key = tmp / f"{name}.self.pem", tmp / f"{name}.self.key"
    if not crt.exists():
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2",
                "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}", cwd=tmp)
    return Served((crt,), key)


def from_ca(ca: StsCa, *names: str) -> Served:
    """A leaf for ``names`` signed by ``ca``, served with the CA certificate
    (RFC 7672 §3.2.1: a DANE-TA server sends its trust anchor in the chain)."""
    crt, key = ca.leaf(*names)
    return Served((crt, ca.ca_pem), key)


def issued_by(issuer: Served, tmp: Path, name: str) -> Served:
    """A leaf for ``name`` signed with ``issuer``'s key (a leaf, not a CA), sent with
    ``issuer``'s chain: what the holder of any certificate under a CA could forge."""
    tmp.mkdir(parents=True, exist_ok=True)
    key, csr, crt = (tmp / f"{name}.forged.{s}" for s in ("key", "csr", "pem"))
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=tmp)
    ext = tmp / f"{name}.forged.ext"
    ext.write_text(f"subjectAltName=DNS:{name}\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(issuer.leaf), "-CAkey",
            str(issuer.key), "-CAcreateserial", "-days", "2", "-sha256", "-extfile",
            str(ext), "-out", str(crt), cwd=tmp)
    return Served((crt, *issuer.chain), key)


def expired_from_ca(ca: StsCa, tmp: Path, name: str) -> Served:
    """A leaf for ``name`` signed by ``ca`` and sent with it, whose validity ends a day
    before it begins (``-days -1``): expired from the moment it is made."""
    tmp.mkdir(parents=True, exist_ok=True)
    key, csr, crt = (tmp / f"{name}.expired.{s}" for s in ("key", "csr", "pem"))
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=tmp)
    ext = tmp / f"{name}.expired.ext"
    ext.write_text(f"subjectAltName=DNS:{name}\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.ca_pem), "-CAkey",
            str(ca.dir / "ca.key"), "-CAcreateserial", "-days", "-1", "-sha256", "-extfile",
            str(ext), "-out", str(crt), cwd=tmp)
    return Served((crt, ca.ca_pem), key)
