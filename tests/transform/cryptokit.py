"""Helpers of the encryption-gateway tests (and bench/crypto.py): real keys made by
real gpg and cryptography, and a way to run the transform stage on one message.

Each OpenPGP identity lives in its own GnuPG home, so ``gpg --decrypt`` with a
recipient's home proves the message is for that recipient.  GnuPG homes live
under a short /tmp path: gpg-agent's socket path is limited to 107 bytes.
Imported by name (``from cryptokit import ...``), not as ``conftest``: every
test directory has a conftest module and the names would collide.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.envelope import Envelope
from gateway.pipeline import MessageContext, StageResult
from gateway.transform.config import CryptoConfig
from gateway.transform.encrypt_stage import EncryptStage
from gateway.transform.keystore import KeyStore

ORG_PASS = "org-secret"
P12_PASS = b"p12-pass"
CORPUS_ENV = "COFFER_CORPUS"


def corpus_dir() -> Path | None:
    env = os.environ.get(CORPUS_ENV)
    if env:
        return Path(env)
    p = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
    return p if p.exists() else None


def gpg(home: Path, *args: str, input: bytes | None = None, check: bool = True,
        passphrase: str | None = None) -> subprocess.CompletedProcess[bytes]:
    cmd = ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--status-fd", "2"]
    if passphrase is not None:
        cmd += ["--pinentry-mode", "loopback", "--passphrase", passphrase]
    r = subprocess.run([*cmd, *args], input=input, capture_output=True, timeout=60, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"gpg {args} failed: {r.stderr.decode(errors='replace')}")
    return r


def kill_agent(home: Path) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True,
                   check=False, timeout=20)


def fast_agent(home: Path) -> None:
    """Tests only: the cheapest S2K the agent allows, so unlocking the passphrase-
    protected test key costs milliseconds instead of a calibrated ~100 ms of CPU per
    fresh agent (much more on a loaded machine)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    (home / "gpg-agent.conf").write_text("s2k-count 65536\n")


@dataclass
class PgpId:
    address: str
    home: Path
    fingerprint: str
    public: bytes
    secret: bytes = b""


@dataclass
class SmimeId:
    address: str
    cert: x509.Certificate
    key: rsa.RSAPrivateKey
    cert_pem: Path
    key_pem: Path


@dataclass
class Identities:
    root: Path
    pgp: dict[str, PgpId] = field(default_factory=dict)
    smime: dict[str, SmimeId] = field(default_factory=dict)
    ca: SmimeId | None = None
    org_p12: Path | None = None
    crl: Path | None = None
    homes: list[Path] = field(default_factory=list)


def _pgp_identity(ids: Identities, name: str, address: str, *, passphrase: str = "",
                  expire: str = "never", faked: str | None = None) -> PgpId:
    home = Path(tempfile.mkdtemp(prefix="g", dir=ids.root))
    home.chmod(0o700)
    fast_agent(home)
    ids.homes.append(home)
    extra = ["--faked-system-time", faked] if faked else []
    gpg(home, *extra, "--quick-gen-key", f"{name} <{address}>", "future-default", "default",
        expire, passphrase=passphrase)
    out = gpg(home, "--with-colons", "--list-keys", address).stdout.decode()
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    public = gpg(home, "--armor", "--export", fpr).stdout
    secret = gpg(home, "--armor", "--export-secret-keys", fpr, passphrase=passphrase).stdout
    pid = PgpId(address, home, fpr, public, secret)
    ids.pgp[address] = pid
    return pid


def _name(cn: str, email: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if email:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    return x509.Name(attrs)


def _smime_identity(ids: Identities, address: str, *, ca: SmimeId | None,
                    not_after: dt.datetime | None = None) -> SmimeId:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(address, address))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=400))
         .not_valid_after(not_after or now + dt.timedelta(days=365)))
    if ca is None:
        b = b.issuer_name(_name(address, address)).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True)
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        cert = b.sign(key, hashes.SHA256())
    else:
        b = b.issuer_name(ca.cert.subject).add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(address)]), critical=False)
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                            critical=False)
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        cert = b.sign(ca.key, hashes.SHA256())
    d = ids.root / "x509"
    d.mkdir(exist_ok=True)
    cert_pem = d / f"{address}.crt"
    key_pem = d / f"{address}.key"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key_pem.chmod(0o600)
    sid = SmimeId(address, cert, key, cert_pem, key_pem)
    if ca is not None:
        ids.smime[address] = sid
    return sid



def make_identities(ids: Identities) -> None:
    """Every test identity, made with the real gpg and cryptography."""
    _pgp_identity(ids, "Corp Signer", "signer@corp.test", passphrase=ORG_PASS)
    _pgp_identity(ids, "Bob", "bob@partner.test")
    _pgp_identity(ids, "Carol", "carol@partner.test")
    _pgp_identity(ids, "Old", "expired@partner.test", expire="1d",
                  faked="20200101T000000!")
    rev = _pgp_identity(ids, "Gone", "revoked@partner.test")
    revcert = (rev.home / "openpgp-revocs.d" / f"{rev.fingerprint}.rev").read_bytes()
    # gpg guards the stored certificate with a leading ':'; remove it to use it.
    gpg(rev.home, "--import", input=revcert.replace(b":-----BEGIN", b"-----BEGIN"))
    rev.public = gpg(rev.home, "--armor", "--export", rev.fingerprint).stdout
    ca = _smime_identity(ids, "ca@ca.test", ca=None)
    ids.ca = ca
    _smime_identity(ids, "dave@smime.test", ca=ca)
    _smime_identity(ids, "erin@smime.test", ca=ca)
    _smime_identity(ids, "old@smime.test", ca=ca,
                    not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    frank = _smime_identity(ids, "frank@smime.test", ca=ca)
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
           .last_update(now - dt.timedelta(days=1)).next_update(now + dt.timedelta(days=7))
           .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                    .serial_number(frank.cert.serial_number)
                                    .revocation_date(now - dt.timedelta(hours=1)).build())
           .sign(ca.key, hashes.SHA256()))
    ids.crl = ids.root / "ca.crl"
    ids.crl.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    org = _smime_identity(ids, "signer@corp.test", ca=ca)
    ids.org_p12 = ids.root / "org.p12"
    ids.org_p12.write_bytes(pkcs12.serialize_key_and_certificates(
        b"org", org.key, org.cert, [ca.cert],
        serialization.BestAvailableEncryption(P12_PASS)))


def crypto_config(data_dir: Path, **kw: object) -> CryptoConfig:
    return CryptoConfig.model_validate({"keys_dir": data_dir / "keys",
                                        "passphrase_file": data_dir / "passphrase", **kw})


def populate(store: KeyStore, ids: Identities) -> None:
    store.import_bytes(ids.pgp["signer@corp.test"].secret, bind="corp.test")
    for addr in ("bob@partner.test", "carol@partner.test", "expired@partner.test",
                 "revoked@partner.test"):
        store.import_bytes(ids.pgp[addr].public)
    for addr in ("dave@smime.test", "erin@smime.test", "old@smime.test", "frank@smime.test"):
        store.import_file(ids.smime[addr].cert_pem)
    assert ids.org_p12 is not None and ids.crl is not None
    store.import_file(ids.org_p12, password=P12_PASS)  # brings the CA certificate along
    store.import_file(ids.crl)  # revokes frank's certificate



def message(subject: str = "Quarterly numbers", to: str = "bob@partner.test",
            body: bytes = b"The secret figure is 42.\r\n") -> bytes:
    return (
        b"From: Signer <signer@corp.test>\r\n"
        b"To: " + to.encode() + b"\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <m1@corp.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n" + body
    )


def ctx_for(data: bytes, rcpts: list[str], actions: list[dict[str, Any]],
            sender: str = "signer@corp.test", direction: str = "outbound") -> MessageContext:
    """A message as the transform stage sees it, with the decide stage's actions."""
    return MessageContext(
        envelope=Envelope(mail_from=sender, rcpt_to=rcpts), data=data,
        facts={"decide": {"actions": actions, "direction": direction}}, qid="q1")


async def run_stage(store: KeyStore, data_dir: Path, ctx: MessageContext,
                    **cfg: Any) -> StageResult:
    return await EncryptStage(store, crypto_config(data_dir, **cfg)).run(ctx)
