"""The write-once blob store: content addressed, compressed, encrypted at rest.

A message's exact bytes are stored once, under the SHA-256 of those bytes::

    archive/store/ab/<sha256>                      the blob (ciphertext)
    archive/store/ab/<sha256>.<dkid>.key           its wrapped data key
    archive/store/journal/<pid>-<rand>.journal     batches being written (see below)

One level of fan-out (256 directories, as git's objects/ab/): a second level
(ab/cd, 65,536 directories) made a fresh store 1.4-2x slower here, because for the
first ~100k messages nearly every blob creates and fsyncs a new directory; one
level keeps 10 million messages at ~80k entries per directory, which ext4 and
XFS index without trouble.

Blob file (all integers big-endian)::

    "CFRB" | version (1 byte, = 1) | dkid (8 bytes) | nonce (12 bytes) | ciphertext+tag

The plaintext is zstd-compressed, then sealed with AES-256-GCM (NIST SP 800-38D)
under a fresh random 256-bit data key; the associated data is the 25-byte header
followed by the 32-byte SHA-256, so a blob copied to another name, or given
another header, fails to decrypt.  ``dkid`` is a random id naming the data key
file, so racing writers of the same content never contend for one key file.

Key file::

    "CFRK" | version (1) | len(kid) (1) | archive key id | nonce (12) | wrapped key (48)

The data key is wrapped with AES-256-GCM under the archive key ``kid`` (keys.py);
the associated data is the key file header, the SHA-256 and the dkid.  Destroying
the key file is crypto-shredding: the blob is ciphertext nobody can open, and
it can be deleted later (or never).  Wrapping with GCM rather than AES-KW
(RFC 3394) lets the wrapped key be bound to the blob it belongs to.

Write path (``write_many``, group commit): new blobs are listed in a journal file
(fsynced, held under flock while the batch runs); each blob and key file is
created with O_EXCL, the blob under a temporary name; all files are fsynced
together (a thread pool lets ext4 commit many fsyncs in one journal transaction);
each blob is then hard-linked to its final name (``link`` fails if the name
exists, so an existing blob is never overwritten) and the directories fsynced;
then the caller's ledger append runs; then the journal is removed.  A crash at
any point leaves either nothing, or a journal naming what may be half-done:
``recover()`` (run when a writer opens the archive) finishes it, and
``coffer archive verify`` reports it as a warning, not as tampering.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from archive.errors import (
    ArchiveError,
    BlobIntegrityError,
    BlobNotFoundError,
    BlobShreddedError,
    KeyFileError,
)
from archive.keys import ArchiveKey, KeyRing, fsync_dir

BLOB_MAGIC = b"CFRB"
KEY_MAGIC = b"CFRK"
VERSION = 1
DKID_BYTES = 8
NONCE_BYTES = 12
HEADER_LEN = len(BLOB_MAGIC) + 1 + DKID_BYTES + NONCE_BYTES
JOURNAL_DIR = "journal"
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
BLOB_NAME = re.compile(r"^([0-9a-f]{64})$")
KEY_NAME = re.compile(r"^([0-9a-f]{64})\.([0-9a-f]{16})\.key$")
TMP_NAME = re.compile(r"^([0-9a-f]{64})\.([0-9a-f]{16})\.tmp$")
FANOUT = re.compile(r"^[0-9a-f]{2}$")
MAX_BATCH = 256  # messages per write_many chunk (one journal, one fsync round)


@dataclass(frozen=True)
class BlobRef:
    """What ``put`` tells the caller: ``new`` is False when the bytes were already stored."""

    sha256: str
    size: int
    stored_size: int
    new: bool


@dataclass(frozen=True)
class Sealed:
    dkid: str
    blob: bytes
    key_file: bytes


@dataclass(frozen=True)
class BlobHeader:
    version: int
    dkid: str
    nonce: bytes


@dataclass(frozen=True)
class KeyFile:
    version: int
    kid: str
    nonce: bytes
    wrapped: bytes
    header: bytes


# -- pure format functions ------------------------------------------------------------


def check_sha(sha256: str) -> str:
    if not SHA_RE.match(sha256):
        raise ArchiveError(f"{sha256!r} is not a lower-case hex SHA-256")
    return sha256


def seal(sha256: str, plaintext_z: bytes, archive_key: ArchiveKey) -> Sealed:
    """Encrypt already-compressed bytes under a fresh data key wrapped by ``archive_key``."""
    sha_raw = bytes.fromhex(sha256)
    dkid = secrets.token_bytes(DKID_BYTES)
    data_key = AESGCM.generate_key(bit_length=256)
    # NIST SP 800-38D §8.2.2: a random 96-bit nonce; each data key encrypts one
    # message only, so nonce reuse under a key is impossible.
    nonce = secrets.token_bytes(NONCE_BYTES)
    header = BLOB_MAGIC + bytes([VERSION]) + dkid + nonce
    blob = header + AESGCM(data_key).encrypt(nonce, plaintext_z, header + sha_raw)
    kid = archive_key.id.encode("ascii")
    knonce = secrets.token_bytes(NONCE_BYTES)
    kheader = KEY_MAGIC + bytes([VERSION, len(kid)]) + kid
    wrapped = AESGCM(archive_key.key).encrypt(knonce, data_key, kheader + sha_raw + dkid)
    return Sealed(dkid=dkid.hex(), blob=blob, key_file=kheader + knonce + wrapped)


def parse_header(blob: bytes) -> BlobHeader:
    if len(blob) < HEADER_LEN + 16 or blob[:4] != BLOB_MAGIC:
        raise BlobIntegrityError("not a Coffer blob (bad magic or too short)")
    if blob[4] != VERSION:
        raise BlobIntegrityError(f"unsupported blob format version {blob[4]}")
    return BlobHeader(version=blob[4], dkid=blob[5:5 + DKID_BYTES].hex(),
                      nonce=blob[5 + DKID_BYTES:HEADER_LEN])


def parse_key_file(data: bytes) -> KeyFile:
    if len(data) < 6 or data[:4] != KEY_MAGIC:
        raise BlobIntegrityError("not a Coffer data key file (bad magic)")
    if data[4] != VERSION:
        raise BlobIntegrityError(f"unsupported key file version {data[4]}")
    n = data[5]
    end = 6 + n
    if len(data) != end + NONCE_BYTES + 48:
        raise BlobIntegrityError("data key file has the wrong length")
    return KeyFile(version=data[4], kid=data[6:end].decode("ascii", "replace"),
                   nonce=data[end:end + NONCE_BYTES], wrapped=data[end + NONCE_BYTES:],
                   header=data[:end])


def unseal(sha256: str, blob: bytes, key_data: bytes, keyring: KeyRing) -> bytes:
    """Decrypt a blob to its compressed plaintext; raise BlobIntegrityError on any doubt."""
    sha_raw = bytes.fromhex(sha256)
    head = parse_header(blob)
    kf = parse_key_file(key_data)
    archive_key = keyring.get(kf.kid)
    try:
        data_key = AESGCM(archive_key.key).decrypt(
            kf.nonce, kf.wrapped, kf.header + sha_raw + bytes.fromhex(head.dkid)
        )
    except InvalidTag:
        raise BlobIntegrityError(
            f"blob {sha256}: its data key does not unwrap (key file altered or misplaced)"
        ) from None
    try:
        return AESGCM(data_key).decrypt(head.nonce, blob[HEADER_LEN:],
                                        blob[:HEADER_LEN] + sha_raw)
    except InvalidTag:
        raise BlobIntegrityError(
            f"blob {sha256}: authentication failed (ciphertext altered, or blob renamed)"
        ) from None


# -- the store ------------------------------------------------------------------------


@dataclass
class _Pending:
    """One new blob of a batch; paths are plain strings (pathlib is slow in this loop)."""

    index: int
    sha256: str
    size: int
    sealed: Sealed
    dir: str
    blob: str
    key: str
    tmp: str


@dataclass(frozen=True)
class Recovered:
    """A blob found linked from an interrupted batch: it needs a ledger entry."""

    sha256: str
    stored_size: int
    journal: str


class ZstdContexts:
    """Per-thread zstd contexts (they are not thread-safe), shared by every blob store."""

    level: int
    _local: threading.local

    def _cctx(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_checksum=False)
        return c

    def _dctx(self) -> zstandard.ZstdDecompressor:
        d: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d


class BlobStore(ZstdContexts):
    """Blob files under ``root`` (``archive/store``); see the module docstring."""

    def __init__(self, root: Path, keyring: KeyRing | None, *, level: int = 3,
                 fsync_threads: int = 16) -> None:
        self.root = root
        self.keyring = keyring
        self.level = level
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=fsync_threads,
                                        thread_name_prefix="coffer-fsync")
        self._root_s = str(root)
        self._known_dirs: set[str] = set()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- paths --

    def _dir_s(self, sha256: str) -> str:
        return f"{self._root_s}/{sha256[0:2]}"

    def dir_for(self, sha256: str) -> Path:
        return self.root / sha256[0:2]

    def blob_path(self, sha256: str) -> Path:
        return self.dir_for(check_sha(sha256)) / sha256

    def key_path(self, sha256: str, dkid: str) -> Path:
        return self.dir_for(sha256) / f"{sha256}.{dkid}.key"

    def tmp_path(self, sha256: str, dkid: str) -> Path:
        return self.dir_for(sha256) / f"{sha256}.{dkid}.tmp"

    # -- reading --

    def exists(self, sha256: str) -> bool:
        return self.blob_path(sha256).exists()

    def read(self, sha256: str) -> bytes:
        """The original bytes: decrypt, decompress, and check the SHA-256."""
        keyring = self._need_keys()
        path = self.blob_path(sha256)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFoundError(f"no blob {sha256} in {self.root}") from None
        head = parse_header(blob)
        try:
            key_data = self.key_path(sha256, head.dkid).read_bytes()
        except FileNotFoundError:
            raise BlobShreddedError(
                f"blob {sha256} cannot be opened: its data key was destroyed "
                "(crypto-shredded; the ledger shows whether by expiry or tampering)"
            ) from None
        compressed = unseal(sha256, blob, key_data, keyring)
        try:
            plain = self._dctx().decompress(compressed)
        except zstandard.ZstdError as exc:
            raise BlobIntegrityError(f"blob {sha256}: does not decompress ({exc})") from None
        if hashlib.sha256(plain).hexdigest() != sha256:
            raise BlobIntegrityError(f"blob {sha256}: content does not match its SHA-256")
        return plain

    def data_key_present(self, sha256: str) -> bool:
        """For an existing blob: is its data key file still there (not shredded)?"""
        try:
            with open(self.blob_path(sha256), "rb") as fh:
                head = parse_header(fh.read(HEADER_LEN + 16))
        except FileNotFoundError:
            return False
        return self.key_path(sha256, head.dkid).exists()

    # -- writing --

    def write_many(
        self, datas: Sequence[bytes],
        after: Callable[[int, list[BlobRef]], object] | None = None,
    ) -> list[BlobRef]:
        """Store each message once, in chunks of at most MAX_BATCH.

        ``after(start, refs)`` runs for each chunk (``refs`` are for
        ``datas[start:start + len(refs)]``) once the chunk is durable and before its
        journal is removed: the facade appends the ledger entries there.
        """
        refs: list[BlobRef] = []
        for start in range(0, len(datas), MAX_BATCH):
            chunk = datas[start:start + MAX_BATCH]
            refs.extend(self._write_chunk(
                chunk, None if after is None else functools.partial(after, start)))
        return refs

    def _write_chunk(self, datas: Sequence[bytes],
                     after: Callable[[list[BlobRef]], object] | None) -> list[BlobRef]:
        keyring = self._need_keys()
        keyring.refresh()  # another process may have rotated the archive key
        archive_key = keyring.current
        refs: list[BlobRef | None] = [None] * len(datas)
        pending: list[_Pending] = []
        seen: dict[str, int] = {}
        shas = [hashlib.sha256(data).hexdigest() for data in datas]
        # An existing blob may have been linked by a concurrent writer that has not
        # fsynced its directory yet: fsync it before we acknowledge it too.
        sync_dirs: set[str] = set()
        for i, (data, sha) in enumerate(zip(datas, shas, strict=True)):
            if sha in seen:  # the same bytes twice in one batch: stored once
                continue  # filled in below from the first occurrence
            seen[sha] = i
            d = self._dir_s(sha)
            blob_s = f"{d}/{sha}"
            if os.path.exists(blob_s):
                if not self.data_key_present(sha):
                    raise BlobShreddedError(
                        f"blob {sha} was crypto-shredded; the same bytes cannot be stored "
                        "again until the blob file itself is deleted"
                    )
                refs[i] = BlobRef(sha, len(data), os.stat(blob_s).st_size, False)
                sync_dirs.add(d)
                continue
            sealed = seal(sha, self._cctx().compress(data), archive_key)
            stem = f"{blob_s}.{sealed.dkid}"
            pending.append(_Pending(i, sha, len(data), sealed, d, blob_s, stem + ".key",
                                    stem + ".tmp"))
        journal = self._write_blobs(pending) if pending else None
        ok = False
        try:
            for p, new in zip(pending, self._pool.map(self._link, pending), strict=True):
                refs[p.index] = BlobRef(p.sha256, p.size, len(p.sealed.blob), new)
            for i, sha in enumerate(shas):
                if refs[i] is None:
                    r = refs[seen[sha]]
                    assert r is not None
                    refs[i] = BlobRef(r.sha256, r.size, r.stored_size, False)
            done = [r for r in refs if r is not None]
            self._fsync_dirs(sync_dirs | {p.dir for p in pending})
            if after is not None:
                after(done)
            ok = True
        finally:
            if journal is not None:
                if ok:
                    self._end_journal(*journal)
                else:
                    # Blobs may be linked without their ledger entries: keep the
                    # journal (now unlocked, hence stale) for recover() to finish.
                    os.close(journal[1])
        return done

    def _write_blobs(self, pending: list[_Pending]) -> tuple[Path, int]:
        # The journal is durable before the first file of the batch exists, so a
        # crash (or power loss) can never leave a file that no journal explains.
        journal = self._begin_journal(pending)
        try:
            # Files are written and fsynced in parallel: ext4 folds concurrent fsyncs
            # into one journal commit, which is what makes group commit pay off.
            created = [d for ds in self._pool.map(self._write_one, pending) for d in ds]
            # A new directory's entry lives in its parent: fsync the store root.
            self._fsync_dirs({os.path.dirname(d) for d in created})
        except BaseException:
            # Nothing is linked yet: remove what this batch created, then its journal.
            for p in pending:
                for path in (p.key, p.tmp):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
            self._end_journal(*journal)
            raise
        return journal

    def _write_one(self, p: _Pending) -> list[str]:
        created = self._ensure_dir(p.dir)
        for path, data, mode in ((p.key, p.sealed.key_file, 0o400),
                                 (p.tmp, p.sealed.blob, 0o440)):
            fd = _create(path, data, mode)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return created

    def _link(self, p: _Pending) -> bool:
        """Give the blob its final name; False if another writer got there first."""
        try:
            os.link(p.tmp, p.blob)
            new = True
        except FileExistsError:
            new = False
            os.unlink(p.key)
        os.unlink(p.tmp)
        return new

    def _ensure_dir(self, d: str) -> list[str]:
        """Create the fan-out directory ``d``; returns it if it is new."""
        if d in self._known_dirs:
            return []
        created: list[str] = []
        try:
            os.mkdir(d, 0o750)
            created.append(d)
        except FileExistsError:
            pass
        self._known_dirs.add(d)
        return created

    def _fsync_dirs(self, dirs: set[str]) -> None:
        list(self._pool.map(fsync_dir, sorted(dirs)))

    # -- the batch journal --

    def journal_dir(self) -> Path:
        return self.root / JOURNAL_DIR

    def _begin_journal(self, pending: list[_Pending]) -> tuple[Path, int]:
        jdir = self.journal_dir()
        if str(jdir) not in self._known_dirs:
            jdir.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._known_dirs.add(str(jdir))
        name = f"{os.getpid()}-{secrets.token_hex(6)}"
        tmp, final = jdir / f"{name}.tmp", jdir / f"{name}.journal"
        body = b"".join(json.dumps({"sha256": p.sha256, "dkid": p.sealed.dkid}).encode()
                        + b"\n" for p in pending)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            # Locked before it gets its real name, so recovery never sees it unlocked
            # while this writer lives.
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, body)
            os.fsync(fd)
            os.rename(tmp, final)
            fsync_dir(jdir)
        except BaseException:
            os.close(fd)
            raise
        return final, fd

    @staticmethod
    def _end_journal(path: Path, fd: int) -> None:
        # Not fsynced: if the removal is lost in a crash, recovery re-reads a
        # finished journal and at most writes a redundant blob_recovered entry.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)

    def journals(self) -> Iterator[tuple[Path, bool, list[tuple[str, str]]]]:
        """(path, stale, [(sha256, dkid)]) for each journal; stale = its writer is gone.

        Read-only (verify): the lock is only probed, with a shared lock.
        """
        for path in self._journal_paths():
            opened = _lock_journal(path, fcntl.LOCK_SH)
            if opened is None:
                yield path, False, _read_journal(path)
                continue
            fd, items = opened
            os.close(fd)
            yield path, True, items

    def _journal_paths(self) -> list[Path]:
        jdir = self.journal_dir()
        try:
            names = sorted(os.listdir(jdir))
        except FileNotFoundError:
            return []
        return [jdir / n for n in names if n.endswith((".journal", ".tmp"))]

    def recover(self, append: Callable[[list[Recovered]], object]) -> list[Recovered]:
        """Finish batches whose writer died: ledger what was linked, remove the rest.

        Each stale journal is locked exclusively while it is recovered, so two
        processes opening the archive at once never both finish the same batch.
        """
        found: list[Recovered] = []
        for path in self._journal_paths():
            opened = _lock_journal(path, fcntl.LOCK_EX)
            if opened is None:
                continue  # a live writer's batch, or another process is recovering it
            fd, items = opened
            try:
                if os.fstat(fd).st_nlink == 0:
                    continue  # finished by another process between listdir and lock
                batch = self._recover_items(path.name, items)
                if batch:
                    append(batch)
                path.unlink()
                found.extend(batch)
            finally:
                os.close(fd)
        return found

    def _recover_items(self, journal: str, items: list[tuple[str, str]]) -> list[Recovered]:
        batch: list[Recovered] = []
        for sha, dkid in items:
            with contextlib.suppress(FileNotFoundError):
                self.tmp_path(sha, dkid).unlink()
            blob = self.blob_path(sha)
            try:
                with open(blob, "rb") as fh:
                    head = parse_header(fh.read(HEADER_LEN + 16))
                ours = head.dkid == dkid
                size = blob.stat().st_size
            except (FileNotFoundError, BlobIntegrityError):
                ours, size = False, 0
            if ours:
                batch.append(Recovered(sha, size, journal))
            else:  # never linked, or another writer's blob won: our key is an orphan
                with contextlib.suppress(FileNotFoundError):
                    self.key_path(sha, dkid).unlink()
        return batch

    # -- shredding and deletion --

    def shred(self, sha256: str) -> int:
        """Destroy every data key file of a blob; returns how many were removed."""
        d = self.dir_for(check_sha(sha256))
        removed = 0
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return 0
        for name in names:
            m = KEY_NAME.match(name)
            if m and m.group(1) == sha256:
                (d / name).unlink()
                removed += 1
        if removed:
            fsync_dir(d)
        return removed

    def delete(self, sha256: str) -> bool:
        """Remove a blob file (only after shredding: the caller checks references)."""
        path = self.blob_path(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    # -- helpers --

    def _need_keys(self) -> KeyRing:
        if self.keyring is None:
            raise KeyFileError(f"{self.root}: no archive keys loaded (ciphertext-only mode)")
        return self.keyring



def _create(path: str, data: bytes, mode: int) -> int:
    """Create exclusively and write; the caller fsyncs (in parallel) and closes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lock_journal(path: Path, how: int) -> tuple[int, list[tuple[str, str]]] | None:
    """Lock a journal without waiting: (fd, items) if its writer is gone, else None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd, _read_journal(path)


_DKID = re.compile(r"^[0-9a-f]{16}$")


def _read_journal(path: Path) -> list[tuple[str, str]]:
    if not path.name.endswith(".journal"):
        return []  # a .tmp journal was never renamed: nothing of it was linked
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    items: list[tuple[str, str]] = []
    for line in data.splitlines():
        try:
            obj = json.loads(line)
            sha, dkid = str(obj["sha256"]), str(obj["dkid"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn journal line: that blob was never linked
        if SHA_RE.match(sha) and _DKID.match(dkid):
            items.append((sha, dkid))
    return items
