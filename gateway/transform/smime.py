"""S/MIME (RFC 8551): enveloping with openssl, signing with cryptography, verifying with openssl.

* **Encryption**: ``openssl cms -encrypt`` (OpenSSL 3), because cryptography's
  ``PKCS7EnvelopeBuilder`` offers neither AES-GCM (RFC 5083 authEnveloped-data)
  nor RSAES-OAEP key transport.  Which cipher and which key transport each
  recipient gets is decided in :mod:`gateway.transform.smime_caps`.
* **Signing**: ``PKCS7SignatureBuilder`` (SHA-256), detached (multipart/signed,
  §3.5.3) or opaque (signed-data, §3.5.2).
* **Decryption**: ``pkcs7_decrypt_der``; what it cannot open (authEnveloped-data
  with AES-GCM, RSAES-OAEP key transport) goes to ``openssl cms -decrypt``.
* **Verification**: cryptography has no public API to verify a CMS signature, so
  inbound signatures are checked by ``openssl cms -verify`` (a subprocess), not by
  hand-written ASN.1; the signer's SMIMECapabilities are read from ``openssl cms
  -cmsout -print``.

Content is passed in binary mode (``-binary``, ``PKCS7Options.Binary``): the MIME
entity is already in canonical CRLF form and must come out of decryption byte for
byte.  openssl is run without a shell, its inputs in files of a private (0700)
temporary directory; any failure is a ToolError (the stage's tempfail), never
plaintext.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.transform import mime, smime_caps
from gateway.transform.errors import MimeError, ToolError

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# RFC 3560 §2.1 rSAES-OAEP-SHA256-Identifier: SHA-256 and MGF1 with SHA-256, empty
# label (smime_caps explains why not the SHA-1 default).
OAEP_KEYOPTS = ("rsa_padding_mode:oaep", "rsa_oaep_md:sha256", "rsa_mgf1_md:sha256")


def cert_addresses(cert: x509.Certificate) -> list[str]:
    """The e-mail addresses a certificate is for (SAN rfc822Name, else subject E=)."""
    out: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        out = [a.lower() for a in san.value.get_values_for_type(x509.RFC822Name)]
    except x509.ExtensionNotFound:
        pass
    if not out:
        out = [str(a.value).lower()
               for a in cert.subject.get_attributes_for_oid(x509.NameOID.EMAIL_ADDRESS)]
    return out


def cert_problem(cert: x509.Certificate, use: str, now: datetime | None = None) -> str | None:
    """Why ``cert`` must not be used for ``use`` ("encrypt" or "sign"), or None."""
    now = now or datetime.now(UTC)
    if now < cert.not_valid_before_utc:
        return "not yet valid"
    if now > cert.not_valid_after_utc:
        return "expired"
    key = cert.public_key()
    if use == "encrypt" and not isinstance(key, rsa.RSAPublicKey):
        return "not an RSA key (Coffer encrypts to RSA certificates only)"
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        # RFC 8550 §4.4.2: keyEncipherment for key transport, digitalSignature to sign.
        if use == "encrypt" and not ku.key_encipherment:
            return "key usage does not allow key encipherment"
        if use == "sign" and not ku.digital_signature:
            return "key usage does not allow signatures"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.EMAIL_PROTECTION not in eku and \
                ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
            return "extended key usage does not include e-mail protection"
    except x509.ExtensionNotFound:
        pass
    return None


def encrypt(entity: bytes, recipients: Sequence[x509.Certificate], plan: smime_caps.Plan,
            *, openssl: str = "openssl", timeout: float = 120.0) -> bytes:
    """CMS (auth)enveloped-data (DER) of ``entity`` for ``recipients`` as ``plan`` says."""
    if len(plan.oaep) != len(recipients) or not recipients:
        raise ToolError("S/MIME encryption: recipients and plan do not match")
    with tempfile.TemporaryDirectory(prefix="coffer-cms-") as tmp:
        t = Path(tmp)
        (t / "in").write_bytes(entity)
        args = [openssl, "cms", "-encrypt", "-binary", f"-{plan.cipher}", "-outform", "DER",
                "-in", str(t / "in"), "-out", str(t / "out")]
        for i, (cert, oaep) in enumerate(zip(recipients, plan.oaep, strict=True)):
            pem = t / f"r{i}.pem"
            pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            args += ["-recip", str(pem)]
            if oaep:
                # -keyopt applies to the -recip before it: this RecipientInfo only.
                for opt in OAEP_KEYOPTS:
                    args += ["-keyopt", opt]
        r = _run_openssl(args, timeout)
        if r.returncode != 0:
            raise ToolError("openssl cms -encrypt failed: "
                            + r.stderr.decode("utf-8", "replace").strip()[:300])
        try:
            der = (t / "out").read_bytes()
        except OSError as exc:
            raise ToolError(f"openssl cms -encrypt wrote no output: {exc.strerror}") from None
    # Whatever openssl wrote must be the CMS type we asked for: never pass on anything
    # else (e.g. a broken tool echoing its input).
    want = mime.AUTH_ENVELOPED_DATA if plan.cipher.endswith("gcm") else mime.ENVELOPED_DATA
    try:
        got = mime.cms_content_type(der)
    except MimeError:
        got = "no CMS structure"
    if got != want:
        raise ToolError(f"openssl cms -encrypt produced {got}, not {want}")
    return der


def sign(entity: bytes, cert: x509.Certificate, key: SigningKey, *, detached: bool) -> bytes:
    """CMS signed-data (DER) over ``entity`` with SHA-256."""
    options = [pkcs7.PKCS7Options.Binary]
    if detached:
        options.append(pkcs7.PKCS7Options.DetachedSignature)
    try:
        return (pkcs7.PKCS7SignatureBuilder().set_data(entity)
                .add_signer(cert, key, hashes.SHA256())
                .sign(serialization.Encoding.DER, options))
    except (ValueError, TypeError) as exc:
        raise ToolError(f"S/MIME signing failed: {exc}") from None


def decrypt(der: bytes, cert: x509.Certificate, key: rsa.RSAPrivateKey, *,
            key_pem: Path | None = None, passphrase: str | None = None,
            openssl: str = "openssl", timeout: float = 120.0) -> bytes:
    """The content of an enveloped-data (cryptography) or authEnveloped-data (openssl)."""
    if mime.cms_content_type(der) == mime.AUTH_ENVELOPED_DATA:
        if key_pem is None:
            raise ToolError("authEnveloped-data needs openssl and the key file")
        return _openssl_decrypt(der, cert, key_pem, passphrase, openssl, timeout)
    try:
        # No options: the content comes back as stored (Text would strip a header).
        return pkcs7.pkcs7_decrypt_der(der, cert, key, [])
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        if key_pem is None:
            raise ToolError(f"S/MIME decryption failed: {exc}") from None
    # What cryptography cannot open (e.g. RSAES-OAEP key transport), openssl can.
    return _openssl_decrypt(der, cert, key_pem, passphrase, openssl, timeout)


def _run_openssl(args: list[str], timeout: float, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(args, capture_output=True, timeout=timeout, check=False, env=env)
    except FileNotFoundError:
        raise ToolError(f"cannot run {args[0]}: not found") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolError(f"{args[0]} failed: {exc}") from None


def _openssl_decrypt(der: bytes, cert: x509.Certificate, key_pem: Path,
                     passphrase: str | None, openssl: str, timeout: float) -> bytes:
    with tempfile.TemporaryDirectory(prefix="coffer-cms-") as tmp:
        t = Path(tmp)
        (t / "in.der").write_bytes(der)
        (t / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        args = [openssl, "cms", "-decrypt", "-binary", "-inform", "DER", "-in",
                str(t / "in.der"), "-recip", str(t / "cert.pem"), "-inkey", str(key_pem),
                "-out", str(t / "out")]
        env = dict(os.environ)
        if passphrase:
            # The passphrase goes through the environment, never the command line (ps).
            env["COFFER_KEY_PASS"] = passphrase
            args += ["-passin", "env:COFFER_KEY_PASS"]
        r = _run_openssl(args, timeout, env)
        if r.returncode != 0:
            raise ToolError("openssl cms -decrypt failed: "
                            + r.stderr.decode("utf-8", "replace").strip()[:300])
        return (t / "out").read_bytes()


def verify(message: bytes, *, openssl: str = "openssl", trust_anchors: Path | None = None,
           attime: int | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Facts about an S/MIME signed message, from ``openssl cms -verify``.

    ``valid``: the signature matches the content; ``trusted``: the signer's chain
    also ends in ``trust_anchors`` (checked at ``attime`` if given)."""
    with tempfile.TemporaryDirectory(prefix="coffer-cms-") as tmp:
        t = Path(tmp)
        (t / "in.eml").write_bytes(message)
        base = [openssl, "cms", "-verify", "-inform", "SMIME", "-in",
                str(t / "in.eml"), "-out", os.devnull, "-signer", str(t / "signer.pem"),
                "-purpose", "any"]
        if attime is not None:
            base += ["-attime", str(int(attime))]
        trusted = False
        error = ""
        valid = False
        # RFC 8551 §3.1.1: text is signed in canonical CRLF form.  openssl's default
        # (text) mode canonicalises as a sender should have; -binary takes the bytes
        # as they are (how we sign).  A signature that holds in either is the signer's.
        for mode in ([], ["-binary"]):
            if trust_anchors is not None:
                r = _run_openssl([*base, *mode, "-CAfile", str(trust_anchors)], timeout)
                trusted = r.returncode == 0
                if trusted:
                    valid, error = True, ""
                    break
                error = r.stderr.decode("utf-8", "replace").strip()[:300]
            # Signature integrity alone, whoever the signer is.
            r = _run_openssl([*base, *mode, "-noverify"], timeout)
            if r.returncode == 0:
                valid = True
                break
            error = error or r.stderr.decode("utf-8", "replace").strip()[:300]
        facts: dict[str, Any] = {"method": "smime", "valid": valid, "trusted": trusted}
        if error:
            facts["error"] = error
        signer = t / "signer.pem"
        if valid and signer.exists():
            certs = x509.load_pem_x509_certificates(signer.read_bytes())
            if certs:
                facts["signer"] = certs[0].subject.rfc4514_string()
                facts["addresses"] = cert_addresses(certs[0])
                facts["fingerprint"] = certs[0].fingerprint(hashes.SHA256()).hex()
                # RFC 8551 §2.7.1: capabilities only from a signature that verified.
                announced = _announced(t / "in.eml", openssl, timeout)
                if announced is not None:
                    facts["capabilities"] = announced.capabilities
                    if announced.signing_time is not None:
                        facts["signing_time"] = announced.signing_time.strftime(
                            "%Y-%m-%dT%H:%M:%SZ")
        return facts


def _announced(message: Path, openssl: str, timeout: float) -> smime_caps.Announced | None:
    """The signer's SMIMECapabilities and signingTime (signed attributes), as openssl
    prints them; None if it announces none or openssl cannot print the structure."""
    r = _run_openssl([openssl, "cms", "-cmsout", "-print", "-noout", "-inform", "SMIME",
                      "-in", str(message)], timeout)
    if r.returncode != 0:
        return None
    return smime_caps.parse_print(r.stdout.decode("utf-8", "replace"))


__all__ = ["cert_addresses", "cert_problem", "decrypt", "encrypt", "sign", "verify"]
