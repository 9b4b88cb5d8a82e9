"""Archive keys: the AES-256 archive keys (with ids, rotation and OpenPGP escrow)
and the Ed25519 key that signs ledger checkpoints.

Layout of ``archive/keys/`` (the directory is 0700)::

    archive-k1.key          {"version": 1, "id": "k1", "created": ..., "key": base64}  0600
    archive-k2.key          a later key after ``rotate()``                              0600
    current                 the id of the key new blobs are wrapped with ("k2")
    ledger-signing.key      Ed25519 private key, PKCS#8 PEM                            0600
    ledger-signing.pub      its public key, SubjectPublicKeyInfo PEM (give officers a copy)

An archive key never encrypts a message itself: each blob has a fresh random data
key, and the archive key only wraps that data key (archive.store).  Rotation
therefore costs nothing: new blobs are wrapped with the current key and every
old key stays available to unwrap older blobs.  A key file (private material)
that is readable or writable by group or others makes the archive refuse to
start (KeyFileError), as ssh does for its private keys.

Escrow: ``KeyRing.escrow_export`` encrypts every archive key to compliance
officers' OpenPGP keys (python-gnupg driving the real gpg); ``escrow_restore``
writes them back on a rebuilt server.  The ledger signing key is deliberately
not escrowed: whoever holds it can re-sign history.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from archive.errors import EscrowError, KeyFileError

KEY_BYTES = 32  # AES-256
SIGNING_KEY_FILE = "ledger-signing.key"
SIGNING_PUB_FILE = "ledger-signing.pub"
CURRENT_FILE = "current"
_KEY_FILE = re.compile(r"^archive-(k[1-9][0-9]*)\.key$")
_PRIVATE_MODE = 0o600


def write_new_file(path: Path, data: bytes, mode: int = _PRIVATE_MODE) -> None:
    """Create ``path`` exclusively (O_EXCL) with ``mode``, write, fsync file and directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what we asked for
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def fsync_dir(path: Path | str) -> None:
    """Make a directory entry (a create, link, rename or unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_private(path: Path) -> None:
    """Refuse a private key file that group or others may read or write."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: key file is accessible to group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )


@dataclass(frozen=True)
class ArchiveKey:
    id: str
    created: str
    key: bytes

    def __repr__(self) -> str:  # never print key material into a log
        return f"ArchiveKey(id={self.id!r}, created={self.created!r})"


def _key_number(kid: str) -> int:
    return int(kid[1:])


class KeyRing:
    """The archive keys and the ledger signing key in one directory.

    ``KeyRing(path)`` only locates the directory; ``load()`` reads every key file
    (checking permissions) and ``create()`` makes a first archive key and the
    signing key when they do not exist yet.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: dict[str, ArchiveKey] = {}
        self._current: str | None = None
        self._signer: Ed25519PrivateKey | None = None
        self._stamp: tuple[int, int] | None = None
        self._need_signer = True

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, create: bool = False, need_signer: bool = True) -> KeyRing:
        """Load the key ring; ``need_signer=False`` (verify) tolerates a missing signing key."""
        ring = cls(path)
        if create:
            ring.create()
        ring.load(need_signer=need_signer)
        return ring

    def exists(self) -> bool:
        return (self.path / CURRENT_FILE).exists()

    def create(self) -> None:
        """First run: a 0700 directory, archive key k1 and the Ed25519 signing key."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._locked():
            sign_path, pub_path = self.path / SIGNING_KEY_FILE, self.path / SIGNING_PUB_FILE
            if not sign_path.exists():
                if (self.path / CURRENT_FILE).exists():
                    # Not a first run: a new key would silently re-sign history.
                    raise KeyFileError(
                        f"{sign_path}: ledger signing key missing; restore it from backup "
                        "(a new key cannot vouch for the existing checkpoints)"
                    )
                signer = Ed25519PrivateKey.generate()
                pem = signer.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                # First run only; a .pub left by a crash right here is replaced below.
                with contextlib.suppress(FileNotFoundError):
                    pub_path.unlink()
                write_new_file(sign_path, pem)
            if not pub_path.exists():
                check_private(sign_path)
                signer_any = serialization.load_pem_private_key(sign_path.read_bytes(), None)
                if not isinstance(signer_any, Ed25519PrivateKey):
                    raise KeyFileError(f"{sign_path}: not an Ed25519 private key")
                write_new_file(pub_path, signer_any.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ), 0o644)
            if not (self.path / CURRENT_FILE).exists():
                kid = self._new_archive_key()
                self._set_current(kid)

    def load(self, *, need_signer: bool = True) -> None:
        if not self.path.is_dir():
            raise KeyFileError(f"{self.path}: archive key directory not found")
        keys: dict[str, ArchiveKey] = {}
        try:
            names = sorted(os.listdir(self.path))
        except OSError as exc:
            raise KeyFileError(f"{self.path}: cannot list keys ({exc.strerror})") from None
        for entry in names:
            m = _KEY_FILE.match(entry)
            if m:
                keys[m.group(1)] = self._read_key(self.path / entry, m.group(1))
        cur_path = self.path / CURRENT_FILE
        try:
            stamp = _stamp(cur_path)
            current = cur_path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise KeyFileError(f"{cur_path}: missing (no current archive key)") from None
        if current not in keys:
            raise KeyFileError(f"{cur_path}: names key {current!r}, which has no key file")
        sign_path = self.path / SIGNING_KEY_FILE
        self._need_signer = need_signer
        if not need_signer and not sign_path.exists():
            self._keys, self._current, self._signer = keys, current, None
            self._stamp = stamp
            return
        check_private(sign_path)
        try:
            signer = serialization.load_pem_private_key(sign_path.read_bytes(), password=None)
        except ValueError as exc:
            raise KeyFileError(f"{sign_path}: not a PEM private key ({exc})") from None
        if not isinstance(signer, Ed25519PrivateKey):
            raise KeyFileError(f"{sign_path}: not an Ed25519 private key")
        self._keys, self._current, self._signer = keys, current, signer
        self._stamp = stamp

    def refresh(self) -> None:
        """Reload if another process rotated the key (one stat when nothing changed)."""
        try:
            changed = _stamp(self.path / CURRENT_FILE) != self._stamp
        except FileNotFoundError:
            changed = True
        if changed:
            self.load(need_signer=self._need_signer)

    @staticmethod
    def _read_key(path: Path, kid: str) -> ArchiveKey:
        check_private(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
        try:
            doc = json.loads(raw)
            key = base64.b64decode(doc["key"], validate=True)
            ak = ArchiveKey(id=str(doc["id"]), created=str(doc["created"]), key=key)
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"{path}: malformed archive key file ({exc})") from None
        if ak.id != kid or len(ak.key) != KEY_BYTES:
            raise KeyFileError(f"{path}: key id or length does not match the file name")
        return ak

    # -- archive keys ------------------------------------------------------------

    @property
    def current(self) -> ArchiveKey:
        if self._current is None:
            raise KeyFileError(f"{self.path}: keys not loaded")
        return self._keys[self._current]

    def get(self, kid: str) -> ArchiveKey:
        if kid not in self._keys:
            self.refresh()  # perhaps another process rotated since we loaded
        try:
            return self._keys[kid]
        except KeyError:
            raise KeyFileError(
                f"archive key {kid!r} not found in {self.path} (restore it from escrow)"
            ) from None

    def ids(self) -> list[str]:
        return sorted(self._keys, key=_key_number)

    def rotate(self) -> ArchiveKey:
        """Make a new archive key current.  Old keys stay, so old blobs still open."""
        with self._locked():
            kid = self._new_archive_key()
            self._set_current(kid)
        self.load()
        return self.current

    def _new_archive_key(self) -> str:
        existing = [_key_number(m.group(1)) for e in os.listdir(self.path)
                    if (m := _KEY_FILE.match(e))]
        kid = f"k{max(existing, default=0) + 1}"
        doc = {
            "version": 1, "id": kid, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "key": base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii"),
        }
        write_new_file(self.path / f"archive-{kid}.key", json.dumps(doc).encode() + b"\n")
        return kid

    def _set_current(self, kid: str) -> None:
        # Atomic replace: a reader sees the old or the new id, never a torn one.
        tmp = self.path / f"{CURRENT_FILE}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        write_new_file(tmp, kid.encode("ascii") + b"\n", 0o644)
        os.replace(tmp, self.path / CURRENT_FILE)
        fsync_dir(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise key creation and rotation between processes."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- ledger signing ----------------------------------------------------------

    @property
    def signer(self) -> Ed25519PrivateKey:
        if self._signer is None:
            raise KeyFileError(f"{self.path}: keys not loaded")
        return self._signer

    # -- escrow ------------------------------------------------------------------

    def escrow_export(self, recipients: list[str], gnupghome: Path | None = None) -> str:
        """Every archive key, as one ASCII-armoured OpenPGP message to ``recipients``.

        The officer decrypts it with ``gpg --decrypt`` and gets the JSON key files
        back; with them (and the store) any blob can be opened even if this
        server's key directory is lost.
        """
        import gnupg  # imported here: only escrow needs gpg on the machine

        if not recipients:
            raise EscrowError("escrow needs at least one recipient OpenPGP key")
        bundle = {
            "version": 1, "kind": "coffer-archive-key-escrow", "current": self.current.id,
            "keys": [
                {"id": k.id, "created": k.created,
                 "key": base64.b64encode(k.key).decode("ascii")}
                for k in (self._keys[i] for i in self.ids())
            ],
        }
        try:
            gpg = gnupg.GPG(gnupghome=str(gnupghome) if gnupghome else None)
        except (OSError, ValueError) as exc:
            raise EscrowError(f"cannot run gpg: {exc}") from None
        # always_trust: the officer's key is named explicitly by fingerprint by the
        # operator; the local web of trust has no say in that choice.
        result = gpg.encrypt(
            json.dumps(bundle), recipients, armor=True, always_trust=True
        )
        if not result.ok:
            raise EscrowError(
                f"gpg could not encrypt to {', '.join(recipients)}: {result.status}"
            )
        return str(result)


def escrow_restore(path: Path, armored: str, gnupghome: Path | None = None) -> list[str]:
    """Write the archive keys from an escrow message back into key directory ``path``.

    Decrypting needs an officer's secret key in ``gnupghome``.  Existing key
    files are never overwritten: an existing key must be identical to the
    escrowed one, else this refuses (two different keys under one id).  The
    ledger signing key is not escrowed (whoever holds it could re-sign history):
    restore it from an ordinary backup.  Returns the ids written.
    """
    import gnupg

    try:
        gpg = gnupg.GPG(gnupghome=str(gnupghome) if gnupghome else None)
    except (OSError, ValueError) as exc:
        raise EscrowError(f"cannot run gpg: {exc}") from None
    result = gpg.decrypt(armored)
    if not result.ok:
        raise EscrowError(f"gpg could not decrypt the escrow message: {result.status}")
    try:
        bundle = json.loads(result.data)
        if bundle.get("kind") != "coffer-archive-key-escrow":
            raise ValueError("not a Coffer key escrow bundle")
        keys = [(str(k["id"]), str(k["created"]), base64.b64decode(k["key"], validate=True))
                for k in bundle["keys"]]
        current = str(bundle["current"])
    except (ValueError, KeyError, TypeError) as exc:
        raise EscrowError(f"malformed escrow bundle ({exc})") from None
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    ring = KeyRing(path)
    written: list[str] = []
    with ring._locked():
        for kid, created, key in keys:
            if not re.fullmatch(r"k[1-9][0-9]*", kid) or len(key) != KEY_BYTES:
                raise EscrowError(f"escrow bundle: invalid key {kid!r}")
            file = path / f"archive-{kid}.key"
            if file.exists():
                if KeyRing._read_key(file, kid).key != key:
                    raise EscrowError(f"{file}: exists with a different key; not overwriting")
                continue
            doc = {"version": 1, "id": kid, "created": created,
                   "key": base64.b64encode(key).decode("ascii")}
            write_new_file(file, json.dumps(doc).encode() + b"\n")
            written.append(kid)
        if not (path / CURRENT_FILE).exists():
            ring._set_current(current)
    return written


def _stamp(path: Path) -> tuple[int, int]:
    """Identity of the ``current`` file: it is replaced by rename on every rotation."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"{path}: ledger public key not found") from None
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def public_key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name for a signing key: first 16 hex digits of SHA-256(raw)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def verify_signature(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
