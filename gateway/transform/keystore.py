"""The key store: whose keys Coffer encrypts to, and the organisation's own keys.

Layout under ``crypto.keys_dir`` (relative to the data directory)::

    keys/
      gnupg/              GnuPG home: OpenPGP public keys, and the organisation's
                          secret keys (gpg keeps them passphrase-protected)
      certs/<id>.pem      X.509 certificates (recipients' and our own); id = SHA-256
      certs/<id>.caps.json  the certificate holder's S/MIME capabilities: set by the
                          operator (``import --capabilities``) or learned from a
                          signed message it sent (RFC 8551 §2.7.1)
      crls/<id>.pem       CRLs, each verified against its issuer's certificate here
      private/<id>.pem    our S/MIME private keys from PKCS#12, PKCS#8 encrypted with
                          crypto.passphrase_file's passphrase, mode 0600
      bindings.json       {key id: [address or domain, ...]} from ``import --for``

A recipient is looked up by envelope address: keys whose user ids /
certificates name the address, or that were bound to it with ``--for``; if
there are none, keys bound to its domain (a partner's gateway key).  Expired,
revoked, disabled or otherwise unusable keys are never returned for use: they
come back as *reasons* so a bounce can name them.

Private key files must not be readable by group or others: :meth:`KeyStore.check_permissions`
runs at start and refuses to go on otherwise (like ssh does).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from gateway.envelope import domain_of
from gateway.transform import smime, smime_caps
from gateway.transform.config import CryptoConfig
from gateway.transform.errors import KeyStoreError, ToolError
from gateway.transform.pgp import Gpg, PgpKey

_UID_ADDR = re.compile(r"<([^<>\s]+@[^<>\s]+)>\s*$")


def uid_address(uid: str) -> str:
    m = _UID_ADDR.search(uid)
    if m:
        return m.group(1).lower()
    uid = uid.strip()
    return uid.lower() if "@" in uid and " " not in uid else ""


def _iso(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ts else None


@dataclass(slots=True)
class KeyInfo:
    kind: Literal["pgp", "x509"]
    id: str
    addresses: list[str]
    bound_to: list[str]
    created: str | None
    expires: str | None
    problem: str | None  # None: usable
    private: bool
    subject: str = ""
    capabilities: Capabilities | None = None  # x509 only

    @property
    def status(self) -> str:
        return self.problem or "ok"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind, "id": self.id, "addresses": self.addresses,
            "bound_to": self.bound_to, "created": self.created, "expires": self.expires,
            "status": self.status, "private": self.private, "subject": self.subject}
        if self.kind == "x509":
            caps = self.capabilities
            d["capabilities"] = caps.capabilities if caps else []
            d["capabilities_source"] = caps.describe() if caps else UNKNOWN_CAPABILITIES
        return d


# RFC 8551 §2.7.1.2: nothing known about the recipient (smime_caps explains the choice).
UNKNOWN_CAPABILITIES = "unknown: AES-256-CBC and RSAES-OAEP are used"


@dataclass(slots=True)
class Capabilities:
    """What a certificate's holder can decrypt, most preferred first."""

    capabilities: list[str]
    source: Literal["operator", "signed message"]
    recorded: str
    signing_time: str | None = None  # of the signed message they came from

    def describe(self) -> str:
        if self.source == "operator":
            return f"set by the operator {self.recorded}"
        return f"from a signed message of {self.signing_time or '?'} (recorded {self.recorded})"

    def to_json(self) -> dict[str, Any]:
        return {"capabilities": self.capabilities, "source": self.source,
                "recorded": self.recorded, "signing_time": self.signing_time}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Capabilities:
        source = d.get("source")
        if source not in ("operator", "signed message"):
            raise ValueError(f"unknown source {source!r}")
        caps = d.get("capabilities")
        if not isinstance(caps, list):
            raise ValueError("capabilities is not a list")
        return cls([str(c) for c in caps], source, str(d.get("recorded", "")),
                   str(d["signing_time"]) if d.get("signing_time") else None)


@dataclass(slots=True)
class Lookup:
    """Keys usable for one recipient, and why others were not used."""

    pgp: list[str] = field(default_factory=list)  # fingerprints
    smime: list[x509.Certificate] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)  # "pgp 0123…: expired"


@dataclass(slots=True)
class SmimeIdentity:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    key_path: Path


def read_passphrase(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise KeyStoreError(f"{path}: passphrase file is readable by group or others "
                                f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot read passphrase file: {exc.strerror}") from None


class KeyStore:
    def __init__(self, root: Path, *, gpg: Gpg, passphrase: str | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.root = root
        self.gpg = gpg
        self.passphrase = passphrase
        self._clock = clock or (lambda: datetime.now(UTC))
        self._certs: dict[str, x509.Certificate] | None = None
        self._crls: list[x509.CertificateRevocationList] | None = None
        self._ids: tuple[tuple[tuple[str, int], ...], list[SmimeIdentity]] | None = None

    @classmethod
    def open(cls, data_dir: Path, cfg: CryptoConfig, *, check: bool = True) -> KeyStore:
        root = cfg.keys_dir if cfg.keys_dir.is_absolute() else data_dir / cfg.keys_dir
        pf = cfg.passphrase_file
        if pf is not None and not pf.is_absolute():
            pf = data_dir / pf
        passphrase = read_passphrase(pf)
        gpg = Gpg(root / "gnupg", binary=cfg.gpg_binary, workers=cfg.gpg_workers,
                  passphrase=passphrase)
        store = cls(root, gpg=gpg, passphrase=passphrase)
        if check:
            store.check_permissions()
        return store

    def close(self) -> None:
        self.gpg.close()

    # -- files -------------------------------------------------------------------
    @property
    def certs_dir(self) -> Path:
        return self.root / "certs"

    @property
    def private_dir(self) -> Path:
        return self.root / "private"

    def check_permissions(self) -> None:
        """Refuse private key material that group or others can read."""
        for d in (self.private_dir, self.root / "gnupg" / "private-keys-v1.d"):
            if not d.exists():
                continue
            for p in [d, *d.iterdir()]:
                mode = p.stat().st_mode
                if mode & 0o077:
                    raise KeyStoreError(
                        f"{p}: private key material is readable by group or others "
                        f"(mode {stat.S_IMODE(mode):o}); chmod {'700' if p.is_dir() else '600'}"
                        " it")

    def _bindings(self) -> dict[str, list[str]]:
        try:
            data = json.loads((self.root / "bindings.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise KeyStoreError(f"{self.root / 'bindings.json'}: unreadable: {exc}") from None
        return {str(k): [str(v) for v in vs] for k, vs in data.items()}

    def _save_bindings(self, b: dict[str, list[str]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "bindings.json.tmp"
        tmp.write_text(json.dumps(b, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.root / "bindings.json")

    def _bind(self, key_id: str, target: str | None) -> None:
        if not target:
            return
        b = self._bindings()
        targets = b.setdefault(key_id, [])
        if target.lower() not in targets:
            targets.append(target.lower())
        self._save_bindings(b)

    def _write_private(self, path: Path, data: bytes) -> None:
        self.private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def certificates(self) -> dict[str, x509.Certificate]:
        if self._certs is None:
            certs: dict[str, x509.Certificate] = {}
            if self.certs_dir.exists():
                for p in sorted(self.certs_dir.glob("*.pem")):
                    certs[p.stem] = x509.load_pem_x509_certificate(p.read_bytes())
            self._certs = certs
        return self._certs

    # -- import ------------------------------------------------------------------
    def import_bytes(self, data: bytes, *, name: str = "<data>", bind: str | None = None,
                     password: bytes | None = None,
                     capabilities: list[str] | None = None) -> list[str]:
        """Import OpenPGP keys, an X.509 certificate (PEM/DER) or a PKCS#12 file;
        returns the key ids.  ``bind`` assigns the keys to an address or domain;
        ``capabilities`` (smime_caps names) are recorded for the certificates."""
        head = data.lstrip()[:64]
        ids: list[str]
        if head.startswith(b"-----BEGIN PGP") or (data[:1] and data[0] & 0x80 and
                                                  not data.startswith(b"\x30")):
            if capabilities is not None:
                raise KeyStoreError(f"{name}: S/MIME capabilities are for X.509 "
                                    "certificates, not OpenPGP keys")
            ids = self.gpg.import_keys(data)
        elif head.startswith(b"-----BEGIN CERTIFICATE"):
            ids = [self._add_cert(c) for c in x509.load_pem_x509_certificates(data)]
        elif head.startswith(b"-----BEGIN X509 CRL"):
            ids = [self._add_crl(x509.load_pem_x509_crl(data), name)]
        elif data.startswith(b"\x30"):
            try:
                ids = [self._add_cert(x509.load_der_x509_certificate(data))]
            except ValueError:
                try:
                    crl = x509.load_der_x509_crl(data)
                except ValueError:
                    ids = self._import_pkcs12(data, name, password)
                else:
                    ids = [self._add_crl(crl, name)]
        else:
            raise KeyStoreError(f"{name}: neither OpenPGP keys, an X.509 certificate nor PKCS#12")
        for key_id in ids:
            self._bind(key_id, bind)
            if capabilities is not None and key_id in self.certificates():
                self.set_capabilities(key_id, capabilities)
        return ids

    def import_file(self, path: Path, *, bind: str | None = None,
                    password: bytes | None = None,
                    capabilities: list[str] | None = None) -> list[str]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyStoreError(f"{path}: {exc.strerror}") from None
        return self.import_bytes(data, name=str(path), bind=bind, password=password,
                                 capabilities=capabilities)

    # -- S/MIME capabilities -----------------------------------------------------------
    def _caps_path(self, key_id: str) -> Path:
        return self.certs_dir / f"{key_id}.caps.json"

    def capabilities(self, key_id: str) -> Capabilities | None:
        """The recorded capabilities of a certificate; None if nothing is known."""
        path = self._caps_path(key_id)
        try:
            return Capabilities.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise KeyStoreError(f"{path}: unreadable: {exc}") from None

    def cert_capabilities(self, cert: x509.Certificate) -> list[str] | None:
        caps = self.capabilities(cert.fingerprint(hashes.SHA256()).hex())
        return caps.capabilities if caps else None

    def _save_capabilities(self, key_id: str, caps: Capabilities) -> None:
        path = self._caps_path(key_id)
        # Worker processes may record at once: each writes its own file, then renames.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(caps.to_json(), indent=1), encoding="utf-8")
        os.replace(tmp, path)

    def set_capabilities(self, key_id: str, capabilities: list[str]) -> None:
        """The operator's word: kept until the operator changes it."""
        if key_id not in self.certificates():
            raise KeyStoreError(f"no certificate with id {key_id}")
        self._save_capabilities(key_id, Capabilities(
            list(capabilities), "operator", _iso(self._clock()) or ""))

    def learn_capabilities(self, key_id: str, capabilities: list[str],
                           signing_time: datetime | None) -> str:
        """Record what a verified signed message announced (RFC 8551 §2.7.1): only for
        a certificate we hold, only with a signing time later than the stored one and
        not in the future; never over the operator's setting.  Returns what was done."""
        if key_id not in self.certificates():
            return "not recorded: the signer's certificate is not in the key store"
        if signing_time is None:
            return "not recorded: the signature has no signing time"
        now = self._clock()
        if (signing_time - now).total_seconds() > smime_caps.MAX_CLOCK_SKEW_S:
            return "not recorded: signing time in the future"
        old = self.capabilities(key_id)
        if old is not None and old.source == "operator":
            return "not recorded: set by the operator"
        stamp = _iso(signing_time)
        if old is not None and old.signing_time and stamp and stamp <= old.signing_time:
            return "not recorded: not newer than the recorded list"
        self._save_capabilities(key_id, Capabilities(
            list(capabilities), "signed message", _iso(now) or "", stamp))
        return "recorded"

    def _add_cert(self, cert: x509.Certificate) -> str:
        key_id = cert.fingerprint(hashes.SHA256()).hex()
        self.certs_dir.mkdir(parents=True, exist_ok=True)
        (self.certs_dir / f"{key_id}.pem").write_bytes(
            cert.public_bytes(serialization.Encoding.PEM))
        self._certs = None
        return key_id

    @property
    def crls_dir(self) -> Path:
        return self.root / "crls"

    def _add_crl(self, crl: x509.CertificateRevocationList, name: str) -> str:
        """Keep a CRL whose signature an issuer certificate in the store verifies
        (RFC 5280 §6.3): an unverifiable CRL could revoke anyone."""
        issuers = [c for c in self.certificates().values() if c.subject == crl.issuer]
        if not any(_crl_signed_by(crl, c) for c in issuers):
            raise KeyStoreError(f"{name}: CRL of {crl.issuer.rfc4514_string()}: import the "
                                "issuing CA certificate first (the CRL's signature must verify)")
        key_id = crl.fingerprint(hashes.SHA256()).hex()
        self.crls_dir.mkdir(parents=True, exist_ok=True)
        (self.crls_dir / f"{key_id}.pem").write_bytes(
            crl.public_bytes(serialization.Encoding.PEM))
        self._crls = None
        return key_id

    def crls(self) -> list[x509.CertificateRevocationList]:
        if self._crls is None:
            self._crls = [x509.load_pem_x509_crl(p.read_bytes())
                          for p in sorted(self.crls_dir.glob("*.pem"))] \
                if self.crls_dir.exists() else []
        return self._crls

    def revoked(self, cert: x509.Certificate) -> bool:
        """Listed in a CRL of its issuer that we hold (RFC 5280 §5.3)."""
        return any(crl.issuer == cert.issuer and
                   crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
                   for crl in self.crls())

    def cert_problem(self, cert: x509.Certificate, use: str, now: datetime) -> str | None:
        if _is_ca(cert):
            return "CA certificate (not an end entity)"
        if self.revoked(cert):
            return "revoked"
        return smime.cert_problem(cert, use, now)

    def _import_pkcs12(self, data: bytes, name: str, password: bytes | None) -> list[str]:
        try:
            with warnings.catch_warnings():
                # Files from older tools are BER, not DER: cryptography warns and reads
                # them anyway, which is what we want.
                warnings.simplefilter("ignore", UserWarning)
                key, cert, extra = pkcs12.load_key_and_certificates(data, password)
        except ValueError as exc:
            raise KeyStoreError(f"{name}: not a readable PKCS#12 file (wrong password?): "
                                f"{exc}") from None
        if cert is None:
            raise KeyStoreError(f"{name}: PKCS#12 file without a certificate")
        key_id = self._add_cert(cert)
        for c in extra or []:
            self._add_cert(c)  # the chain, so the archive can show who issued it
        if key is not None:
            if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                raise KeyStoreError(f"{name}: only RSA and EC private keys are supported")
            if not self.passphrase:
                raise KeyStoreError(
                    f"{name}: a private key is stored encrypted: set crypto.passphrase_file")
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(self.passphrase.encode()))
            self._write_private(self.private_dir / f"{key_id}.pem", pem)
        return [key_id]

    # -- listing -------------------------------------------------------------------
    def list_keys(self) -> list[KeyInfo]:
        bindings = self._bindings()
        now = self._clock()
        out: list[KeyInfo] = []
        secret = {k.fingerprint for k in self.gpg.list_keys(secret=True)} \
            if (self.root / "gnupg").exists() else set()
        pgp_keys = self.gpg.list_keys() if (self.root / "gnupg").exists() else []
        for k in pgp_keys:
            addrs = sorted({a for a in (uid_address(u) for u in k.uids) if a})
            out.append(KeyInfo(
                "pgp", k.fingerprint, addrs, bindings.get(k.fingerprint, []),
                _iso(datetime.fromtimestamp(k.created, UTC)) if k.created else None,
                _iso(datetime.fromtimestamp(k.expires, UTC)) if k.expires else None,
                self._pgp_problem(k, now), k.fingerprint in secret,
                subject=k.uids[0] if k.uids else ""))
        for key_id, cert in self.certificates().items():
            out.append(KeyInfo(
                "x509", key_id, cert_addrs(cert), bindings.get(key_id, []),
                _iso(cert.not_valid_before_utc), _iso(cert.not_valid_after_utc),
                self.cert_problem(cert, "encrypt", now),
                (self.private_dir / f"{key_id}.pem").exists(),
                subject=cert.subject.rfc4514_string(), capabilities=self.capabilities(key_id)))
        return out

    @staticmethod
    def _pgp_problem(k: PgpKey, now: datetime) -> str | None:
        if k.expires and k.expires <= now.timestamp() and k.validity not in ("r",):
            return "expired"
        return k.problem

    def find(self, query: str) -> list[KeyInfo]:
        """Keys by id (or unique id prefix), address, or domain."""
        q = query.lower()
        keys = self.list_keys()
        by_id = [k for k in keys if k.id.lower() == q] or \
            [k for k in keys if len(q) >= 8 and k.id.lower().startswith(q)]
        if by_id:
            return by_id
        return [k for k in keys if q in k.addresses or q in k.bound_to
                or ("@" not in q and any(domain_of(a) == q for a in k.addresses))]

    def remove(self, key_id: str) -> KeyInfo:
        matches = [k for k in self.list_keys() if k.id.lower() == key_id.lower()]
        if not matches:
            raise KeyStoreError(f"no key with id {key_id}")
        k = matches[0]
        if k.kind == "pgp":
            self.gpg.delete(k.id)
        else:
            with contextlib.suppress(FileNotFoundError):
                (self.private_dir / f"{k.id}.pem").unlink()
            with contextlib.suppress(FileNotFoundError):
                self._caps_path(k.id).unlink()
            (self.certs_dir / f"{k.id}.pem").unlink()
            self._certs = None
        b = self._bindings()
        if b.pop(k.id, None) is not None:
            self._save_bindings(b)
        return k

    # -- lookups for the stage -------------------------------------------------------
    def _candidates(self, address: str, keys: list[KeyInfo]) -> list[KeyInfo]:
        a = address.lower()
        exact = [k for k in keys if a in k.addresses or a in k.bound_to]
        if exact:
            return exact
        dom = domain_of(address)
        return [k for k in keys if dom and dom in k.bound_to]

    def lookup(self, address: str) -> Lookup:
        """Usable encryption keys for a recipient (newest first per method)."""
        res = Lookup()
        certs = self.certificates()
        cands = sorted(self._candidates(address, self.list_keys()),
                       key=lambda k: k.created or "", reverse=True)
        for k in cands:
            if k.problem:
                res.unusable.append(f"{k.kind} {k.id[:16]}: {k.problem}")
            elif k.kind == "pgp":
                res.pgp.append(k.id)
            else:
                res.smime.append(certs[k.id])
        # One key per method is enough; the newest wins (a re-keyed correspondent).
        res.pgp, res.smime = res.pgp[:1], res.smime[:1]
        return res

    def pgp_signer(self, address: str) -> str | None:
        now = self._clock()
        cands = self._candidates(address, [k for k in self.list_keys() if k.kind == "pgp"
                                           and k.private])
        secret = {k.fingerprint: k for k in self.gpg.list_keys(secret=True)}
        for k in cands:
            sk = secret.get(k.id)
            if sk and "S" in sk.caps and not self._pgp_problem(sk, now):
                return k.id
        return None

    def smime_identities(self) -> list[SmimeIdentity]:
        """Every certificate we hold a private key for (decryption tries each)."""
        out: list[SmimeIdentity] = []
        if not self.private_dir.exists():
            return out
        # Opening an encrypted key runs its KDF (deliberately slow): keep them open
        # until a file changes.
        paths = sorted(self.private_dir.glob("*.pem"))
        stamp = tuple((p.name, p.stat().st_mtime_ns) for p in paths)
        if self._ids is not None and self._ids[0] == stamp:
            return list(self._ids[1])
        certs = self.certificates()
        for p in paths:
            cert = certs.get(p.stem)
            if cert is None:
                continue
            if not self.passphrase:
                raise KeyStoreError("S/MIME private keys need crypto.passphrase_file")
            try:
                key = serialization.load_pem_private_key(p.read_bytes(),
                                                         self.passphrase.encode())
            except (ValueError, TypeError) as exc:
                raise KeyStoreError(f"{p}: cannot open private key: {exc}") from None
            if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
                out.append(SmimeIdentity(cert, key, p))
        self._ids = (stamp, out)
        return list(out)

    def smime_signer(self, address: str) -> SmimeIdentity | None:
        now = self._clock()
        ids = self.smime_identities()
        keys = self.list_keys()
        wanted = {k.id for k in self._candidates(address, keys)}
        for ident in ids:
            if ident.cert.fingerprint(hashes.SHA256()).hex() in wanted and \
                    not self.cert_problem(ident.cert, "sign", now):
                return ident
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return False
    return crl.is_signature_valid(key)


def cert_addrs(cert: x509.Certificate) -> list[str]:
    return sorted(set(smime.cert_addresses(cert)))


__all__ = ["Capabilities", "KeyInfo", "KeyStore", "KeyStoreError", "Lookup", "SmimeIdentity",
           "ToolError", "read_passphrase", "uid_address"]
