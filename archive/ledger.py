"""The append-only, hash-chained ledger that makes the archive tamper-evident.

Each entry is one line of canonical JSON::

    {"seq": 42, "time": "2026-11-27T15:00:00.123+00:00", "kind": "message_stored",
     "sha256": "...", "size": 10234, ..., "prev": "<hash of entry 41>", "hash": "<hash>"}

``hash`` is the SHA-256 of the entry without its ``hash`` key, serialised with
sorted keys and no spaces (``canonical()``); ``prev`` of entry 1 is 64 zeros.
Changing, removing, inserting or reordering any entry therefore breaks a link,
and rewriting every later entry to hide that is caught by the signed checkpoints:
an entry of kind ``checkpoint`` carries ``head_seq``/``head_hash`` of the entry
just before it and an Ed25519 signature over them, made with
``archive/keys/ledger-signing.key`` and checked with ``ledger-signing.pub``.

Entry kinds written by the archive: ``message_stored`` (sha256, size,
stored_size, new, plus the caller's record fields such as the archive id),
``blob_recovered`` (a blob from an interrupted batch, see archive.store),
``tombstone`` (sha256, reason: the data key was destroyed), ``key_rotated``,
``checkpoint``, ``ledger_repaired``, ``store_compacted`` (segments, records,
freed_bytes: deleted records' bytes removed), ``store_repaired`` (removed_segments:
segments a writer died creating, which held no record, or whose damaged header hid nothing
committed; or repaired_segment, old_header_hex, new_header_hex, records, reason: a damaged
segment header ``coffer archive repair`` rebuilt; see archive.store); other
modules add ``audit``, ``hold_placed``, ``hold_released`` (each naming, by SHA-256, an encrypted
ledger document with its clear text: archive.documents).  The ledger is never erased, so record
fields must be identifiers and hashes, never personal data such as addresses.

Files: ``archive/ledger/<first seq, 12 digits>.jsonl`` segments of at most
``segment_entries`` entries, read in name order to rebuild the whole chain, and
``archive/ledger/.lock``.  Appenders in several processes serialise on an
exclusive ``flock`` of the lock file; each batch is written with one write and
made durable with one fsync before ``append`` returns (group commit).

Torn tail rule: a crash can leave the last line of the last segment without its
newline.  That line was never fsynced, so ``append`` never returned for it and
nothing was acknowledged on its strength.  A writer opening the archive
(``Archive.open`` calls ``repair()``), or else the next appender, truncates it
under the lock and records a ``ledger_repaired`` entry (with the number of bytes
dropped);
``coffer archive verify`` reports such a tail as a warning, not as tampering.  A
malformed line anywhere else is corruption.

RFC 3161 timestamps: ``Ledger(timestamper=...)`` accepts an object with
``token(digest: bytes) -> bytes`` and stores its result base64-encoded as the
checkpoint's ``tsa_token`` (the token covers SHA-256 of the signed payload).  No
network TSA client ships yet: a deployment wires one in; the hook is tested with
a local stand-in only.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from archive.errors import LedgerCorruptError, LedgerError
from archive.keys import fsync_dir, public_key_id

GENESIS = "0" * 64
RESERVED = frozenset({"seq", "time", "kind", "prev", "hash"})
SEGMENT_NAME = re.compile(r"^(\d{12})\.jsonl$")
CHECKPOINT_CONTEXT = b"coffer-ledger-checkpoint-v1\n"
_TAIL_CHUNK = 4096  # first read of a segment's end: a few entries (it doubles as needed)
_TAIL_CHUNK_MAX = 1 << 20


class Timestamper(Protocol):
    """RFC 3161 hook: return a TimeStampToken (DER) over ``digest`` (SHA-256)."""

    def token(self, digest: bytes) -> bytes: ...


# Built once: json.dumps with options builds a new encoder on every call, which cost
# more than the encoding of a small entry (three encodings per entry).  Same output.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                              allow_nan=False)
_LINE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
# Values whose JSON encoding cannot fail (a float can: NaN and infinities are refused).
_PLAIN_TYPES = (str, int, bool, type(None))
_EXACT_PLAIN = frozenset(_PLAIN_TYPES)
_STR_ONLY = frozenset({str})
# The C encoders that JSONEncoder.encode builds again on every call (with a fresh dict
# for its circular-reference check), built once with the same options as _CANONICAL
# and _LINE.  Used only for entries whose fields are plain (_plain): nothing nested,
# so nothing can refer to itself and no check is needed; the output is the same
# (encode() runs this very C encoder; tests/archive/test_ledger.py holds them equal).
# None where json has no C accelerator: the encoders above then do all the work.
_C_CANONICAL = _C_LINE = None
if c_make_encoder is not None:
    _C_CANONICAL = c_make_encoder(None, _CANONICAL.default, encode_basestring_ascii, None,
                                  ":", ",", True, False, False)
    _C_LINE = c_make_encoder(None, _LINE.default, encode_basestring_ascii, None,
                             ":", ",", False, False, True)


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The bytes that are hashed: sorted keys, no whitespace, ASCII only."""
    return _CANONICAL.encode(obj).encode()


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def checkpoint_payload(head_seq: int, head_hash: str) -> bytes:
    """What a checkpoint signs (domain-separated so no other signature can pass)."""
    return CHECKPOINT_CONTEXT + f"{head_seq}\n{head_hash}\n".encode("ascii")


def segment_name(first_seq: int) -> str:
    return f"{first_seq:012d}.jsonl"


@dataclass(frozen=True)
class LedgerEntry:
    seq: int
    time: str
    kind: str
    prev: str
    hash: str
    fields: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "kind": self.kind, **self.fields,
                "prev": self.prev, "hash": self.hash}


@dataclass(frozen=True, slots=True)
class _Head:
    """The chain's head as this process last wrote or read it, and the last segment's
    file as it was then: valid while that file is unchanged and no later one exists."""

    seq: int
    hash: str
    seg: tuple[int, Path]
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, seq: int, hash_: str, seg: tuple[int, Path], st: os.stat_result) -> _Head:
        return cls(seq, hash_, seg, st.st_ino, st.st_size, st.st_mtime_ns)

    def now(self) -> _Head | None:
        """The head now, if this tells it cheaply, else None (read the directory).

        Every appender (any process) writes under the lock, only ever by appending
        whole lines to the last segment (a repair truncates only a torn line, never a
        complete one) or by creating the segment that starts at the next seq (seal, a
        full segment).  So: the same file with the same size and mtime holds the same
        head; the same file grown holds, after our size, only the whole lines other
        appenders added, the last of them the head.  A torn line, another file, or a
        next segment: None.  A stat or two and a short read instead of listing the
        directory and reading the segment's tail.
        """
        path = self.seg[1]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_ino != self.ino or st.st_size < self.size:
                return None
            head = self
            if st.st_size > self.size:
                added = os.pread(fd, st.st_size - self.size, self.size)
                if len(added) != st.st_size - self.size or not added.endswith(b"\n"):
                    return None  # a torn line: the full path repairs it
                start = added.rfind(b"\n", 0, len(added) - 1) + 1
                entry = _parse_json(added[start:-1], path, None)
                head = _Head.of(int(entry["seq"]), str(entry["hash"]), self.seg, st)
            elif st.st_mtime_ns != self.mtime_ns:
                return None
        finally:
            os.close(fd)
        if head.seg[0] == head.seq + 1:
            return head  # the last segment is the empty one the next entry goes into
        if os.path.exists(path.with_name(segment_name(head.seq + 1))):
            return None
        return head


@dataclass(frozen=True)
class RawLine:
    """One line as stored, for verification: ``complete`` is False for a torn tail."""

    segment: Path
    lineno: int
    data: bytes
    complete: bool


def segments(path: Path) -> list[tuple[int, Path]]:
    """(first seq from the name, path) of every segment, in chain order."""
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), path / n) for n in names if (m := SEGMENT_NAME.match(n))]
    return sorted(found)


def read_lines(path: Path, segs: list[tuple[int, Path]] | None = None) -> Iterator[RawLine]:
    """Every line of every segment (of ``segs``, if given) in order; the last may be torn."""
    for _first, seg in segments(path) if segs is None else segs:
        with open(seg, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                complete = line.endswith(b"\n")
                yield RawLine(seg, lineno, line.rstrip(b"\n"), complete)
                if not complete:
                    # A line without its newline was the end of the file when read; a
                    # writer may finish it meanwhile, and reading on would yield its
                    # remainder as a line of its own.
                    break


class Ledger:
    """Appends entries to ``path`` (``archive/ledger``), one batch per fsync."""

    def __init__(
        self,
        path: Path,
        *,
        signer: Ed25519PrivateKey | None = None,
        segment_entries: int = 10000,
        checkpoint_every: int = 1000,
        clock: Callable[[], datetime] | None = None,
        timestamper: Timestamper | None = None,
    ) -> None:
        if segment_entries < 1 or checkpoint_every < 1:
            raise ValueError("segment_entries and checkpoint_every must be >= 1")
        self.path = path
        self.signer = signer
        self.segment_entries = segment_entries
        self.checkpoint_every = checkpoint_every
        self.clock = clock or (lambda: datetime.now(UTC))
        self.timestamper = timestamper
        self.repaired_bytes = 0  # torn-tail bytes this process truncated (for logs/tests)
        self.repaired_bytes_pending = 0
        self._head: _Head | None = None  # read and written under the lock only
        path.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._lock = _FileLock(path / ".lock")

    # -- public API --------------------------------------------------------------

    def append(self, kind: str, **fields: Any) -> LedgerEntry:
        return self.append_many([(kind, fields)])[0]

    def append_many(self, items: Sequence[tuple[str, Mapping[str, Any]]], *,
                    checked: bool = False) -> list[LedgerEntry]:
        """Append a batch atomically with respect to other appenders; durable on return.

        A checkpoint is added after the batch whenever it crosses a multiple of
        ``checkpoint_every`` (when a signing key is configured).  ``checked``: the
        caller has already passed every item through :meth:`check_fields` (the
        archive checks a batch's records before storing any blob).
        """
        if not checked:
            for kind, fields in items:
                self.check_fields(kind, fields)
        with self._locked():
            written, first = self._append_locked(items)
        # Only the caller's entries: not a ledger_repaired before, nor a checkpoint after.
        return written[first:first + len(items)]

    def checkpoint(self) -> LedgerEntry:
        """Sign the current head now (e.g. at shutdown, or before a verify)."""
        if self.signer is None:
            raise LedgerError(f"{self.path}: no signing key, cannot write a checkpoint")
        with self._locked():
            return self._append_locked([], force_checkpoint=True)[0][-1]

    def seal(self, *, close: bool = True) -> bool:
        """Sign the head and (``close``) close the segment, so it can be copied to WORM
        storage.

        A cluster node calls this periodically (gateway.service): its closed
        segments are mirrored to S3 under Object Lock, where every other node's
        ``coffer archive verify`` reads them.  The next entry starts a new segment
        (an empty file named for it is created now: archive.ledger reuses an empty
        last segment).  False, and nothing written, when nothing was appended since
        the last seal.  Without ``close`` only the checkpoint is written (a single
        node: no unsigned tail after a quiet minute).
        """
        if self.signer is None:
            raise LedgerError(f"{self.path}: no signing key, cannot seal the ledger")
        with self._locked():
            seq, _hash, seg = self._tail(repair=True)
            if seg is None or seq == 0 or seg[1].stat().st_size == 0:
                return False  # empty, or sealed and nothing since
            line, _torn = _last_line(seg[1])
            last_kind = _parse_json(line, seg[1], None).get("kind") if line else None
            signed = last_kind == "checkpoint" and not self.repaired_bytes_pending
            if not signed:
                seq = self._append_locked([], force_checkpoint=True)[0][-1].seq
            if not close:
                return not signed
            self._head = None
            fd = os.open(self.path / segment_name(seq + 1),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            os.close(fd)
            fsync_dir(self.path)
        return True

    def repair(self) -> int:
        """Truncate a torn last line now and record it; returns the bytes dropped."""
        with self._locked():
            self._tail(repair=True)
            dropped = self.repaired_bytes_pending
            if dropped:
                self._append_locked([])
        return dropped

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last entry; (0, GENESIS) for an empty ledger."""
        with self._locked():
            seq, h, _ = self._tail(repair=False)
            return seq, h

    def entries(self) -> Iterator[LedgerEntry]:
        """Parse every complete entry in order (no verification: see archive.verify)."""
        for raw in read_lines(self.path):
            if not raw.complete:
                return
            yield parse_entry(raw)

    def entries_since(self, since: datetime, *,
                      containing: bytes | None = None) -> Iterator[LedgerEntry]:
        """The complete entries appended at or after ``since``, in order.

        Reads only the segments that can hold them: from the last one whose first
        entry is older than ``since`` (entry times follow the chain: each append
        stamps the clock under the lock).  A ledger sealed into many segments
        answers "what is new" without reading its history.  ``containing``: only the
        entries whose stored line holds these bytes (the others are not parsed: a
        lookup of one identifier costs a byte search per line, not a JSON parse).
        """
        segs = segments(self.path)
        start = 0
        for i in range(len(segs) - 1, -1, -1):
            first = _first_time(segs[i][1])
            if first is not None and first < since:
                start = i
                break
        for n, (_first, seg) in enumerate(segs[start:]):
            # A single node never closes its segment: in the first one, skip to the
            # tail by a binary search over byte offsets instead of parsing it all.
            offset = _offset_before(seg, since) if n == 0 else 0
            with open(seg, "rb") as fh:
                fh.seek(offset)
                for line in fh:
                    if not line.endswith(b"\n"):
                        return  # a torn tail: not an entry (yet)
                    if containing is not None and containing not in line:
                        continue
                    entry = parse_entry(RawLine(seg, 0, line.rstrip(b"\n"), True))
                    if _entry_time(entry.time) >= since:
                        yield entry

    # -- internals ---------------------------------------------------------------

    @staticmethod
    def check_fields(kind: str, fields: Mapping[str, Any]) -> None:
        """Refuse reserved names and values JSON cannot represent exactly."""
        if not kind or not isinstance(kind, str):
            raise LedgerError("a ledger entry needs a kind")
        bad = RESERVED.intersection(fields)
        if bad:
            raise LedgerError(f"ledger entry fields may not be named {sorted(bad)}")
        if _plain(fields):
            return  # encodes whatever the strings hold: no need to try
        try:
            canonical(fields)
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"{kind} entry: fields must be JSON values ({exc})") from None

    def _locked(self) -> _FileLock:
        return self._lock

    def close(self) -> None:
        """Close the lock file (the next append opens it again)."""
        self._lock.close()

    def _append_locked(
        self, items: Sequence[tuple[str, Mapping[str, Any]]], *, force_checkpoint: bool = False
    ) -> tuple[list[LedgerEntry], int]:
        """Write the batch; returns (all entries written, index of the first of ``items``)."""
        seq, prev, seg = self._tail(repair=True)
        now = self.clock().isoformat(timespec="milliseconds")
        first_item = 0
        if self.repaired_bytes_pending:
            first_item = 1
            items = [("ledger_repaired", {"truncated_bytes": self.repaired_bytes_pending}),
                     *items]
            self.repaired_bytes += self.repaired_bytes_pending
            self.repaired_bytes_pending = 0
        out: list[LedgerEntry] = []
        lines: list[bytes] = []
        first_seq = seq + 1
        for kind, fields in items:
            seq += 1
            e, line = self._make(seq, now, kind, dict(fields), prev)
            out.append(e)
            lines.append(line)
            prev = e.hash
        crossed = (seq // self.checkpoint_every) > ((first_seq - 1) // self.checkpoint_every)
        if self.signer is not None and (force_checkpoint or (items and crossed)):
            seq += 1
            e, line = self._make(seq, now, "checkpoint", self._sign(seq - 1, prev), prev)
            out.append(e)
            lines.append(line)
        self._head = None  # unknown until the write has gone through
        written = self._write(out, lines, seg)
        if written is not None and out:
            self._head = _Head.of(out[-1].seq, out[-1].hash, *written)
        return out, first_item

    def _make(self, seq: int, now: str, kind: str, fields: dict[str, Any],
              prev: str) -> tuple[LedgerEntry, bytes]:
        """The entry and its line in the segment (newline included)."""
        body = {"seq": seq, "time": now, "kind": kind, **fields, "prev": prev}
        if _C_CANONICAL is None or _C_LINE is None or not RESERVED.isdisjoint(fields) \
                or not _plain(fields):
            entry = LedgerEntry(seq=seq, time=now, kind=kind, prev=prev,
                                hash=entry_hash(body), fields=fields)
            return entry, _LINE.encode(entry.as_dict()).encode() + b"\n"
        # The common case, with the encoders built once.  The line is as_dict() encoded:
        # the body's keys in the same order, then "hash" (never among the fields).
        hash_ = hashlib.sha256("".join(_C_CANONICAL(body, 0)).encode()).hexdigest()
        line = "".join(_C_LINE(body, 0))[:-1] + ',"hash":"' + hash_ + '"}\n'
        return (LedgerEntry(seq=seq, time=now, kind=kind, prev=prev, hash=hash_, fields=fields),
                line.encode())

    def _sign(self, head_seq: int, head_hash: str) -> dict[str, Any]:
        assert self.signer is not None
        payload = checkpoint_payload(head_seq, head_hash)
        fields: dict[str, Any] = {
            "head_seq": head_seq, "head_hash": head_hash,
            "key_id": public_key_id(self.signer.public_key()),
            "signature": base64.b64encode(self.signer.sign(payload)).decode("ascii"),
        }
        if self.timestamper is not None:
            token = self.timestamper.token(hashlib.sha256(payload).digest())
            fields["tsa_token"] = base64.b64encode(token).decode("ascii")
        return fields

    def _tail(self, *, repair: bool) -> tuple[int, str, tuple[int, Path] | None]:
        """(seq, hash) of the last complete entry and the last segment (first, path).

        With ``repair`` (lock held, about to write) a torn final line is
        truncated; see the module docstring for why that is safe.
        """
        head = self._head.now() if self._head is not None else None
        self._head = head
        if head is not None:
            return head.seq, head.hash, head.seg
        segs = segments(self.path)
        while segs:
            first, seg = segs[-1]
            st = seg.stat()  # before the read: whatever is appended later makes it stale
            line, torn = _last_line(seg)
            if torn and repair:
                size = seg.stat().st_size
                keep = size - torn
                with open(seg, "r+b") as fh:
                    fh.truncate(keep)
                    os.fsync(fh.fileno())
                self.repaired_bytes_pending += torn
            if line is None:
                if len(segs) == 1:
                    return 0, GENESIS, (first, seg)
                # An empty last segment (crash right after creating it): the head is
                # in the previous one; the empty file is reused by the next write.
                prev_seq, prev_hash, _ = self._tail_of(segs[-2][1])
                return prev_seq, prev_hash, (first, seg)
            entry = _parse_json(line, seg, None)
            seq, hash_ = int(entry["seq"]), str(entry["hash"])
            if not torn:
                self._head = _Head.of(seq, hash_, (first, seg), st)
            return seq, hash_, (first, seg)
        return 0, GENESIS, None

    @staticmethod
    def _tail_of(seg: Path) -> tuple[int, str, None]:
        line, _torn = _last_line(seg)
        if line is None:
            raise LedgerCorruptError(f"{seg}: empty segment in the middle of the ledger")
        entry = _parse_json(line, seg, None)
        return int(entry["seq"]), str(entry["hash"]), None

    def _write(self, entries: list[LedgerEntry], lines: list[bytes],
               seg: tuple[int, Path] | None
               ) -> tuple[tuple[int, Path], os.stat_result] | None:
        """Write entries (``lines``: each one's line) into the right segments; one fsync
        per touched segment.

        Returns the last segment written and its file's state after the write."""
        i = 0
        last: tuple[tuple[int, Path], os.stat_result] | None = None
        while i < len(entries):
            seq = entries[i].seq
            if seg is None or seq - seg[0] >= self.segment_entries:
                seg = (seq, self.path / segment_name(seq))
            room = self.segment_entries - (seq - seg[0])
            chunk = entries[i:i + room]
            data = b"".join(lines[i:i + room])
            created = not seg[1].exists()
            fd = os.open(seg[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
                last = seg, os.fstat(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path)
            i += len(chunk)
        return last


class _FileLock:
    """flock on ledger/.lock (between processes) plus a thread lock (within one).

    The lock file stays open between batches (an open and a close less per append).
    A forked child opens its own: a flock belongs to the open file description, which
    a child shares with its parent, so the inherited one would not keep them apart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.thread_lock = threading.Lock()
        self.fd = -1
        self.pid = 0
        self._closer: weakref.finalize[[int], _FileLock] | None = None

    def __enter__(self) -> None:
        self.thread_lock.acquire()
        try:
            if self.pid != os.getpid():
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
                self.pid = os.getpid()
                # A Ledger nobody closes (a report reading entries) still gives it back.
                self._closer = weakref.finalize(self, os.close, self.fd)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self.thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.thread_lock.release()

    def close(self) -> None:
        with self.thread_lock:
            if self._closer is not None:
                self._closer()  # in a forked child: its own copy of the parent's fd
            self.fd, self.pid, self._closer = -1, 0, None


def _plain(fields: Mapping[str, Any]) -> bool:
    """String keys and string, int, bool or None values: JSON for certain (pure)."""
    # Exactly those types, the usual case, tested in C (a generator of isinstance calls
    # cost as much as encoding the entry); subclasses (an IntEnum) take the long way.
    if _EXACT_PLAIN.issuperset(map(type, fields.values())) \
            and _STR_ONLY.issuperset(map(type, fields)):
        return True
    return all(type(k) is str and isinstance(v, _PLAIN_TYPES) for k, v in fields.items())


def _last_line(seg: Path) -> tuple[bytes | None, int]:
    """(last complete line or None, length of a torn tail after it)."""
    with open(seg, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        pos, buf, chunk = size, b"", _TAIL_CHUNK
        while pos > 0:
            step = min(chunk, pos)
            chunk = min(chunk * 2, _TAIL_CHUNK_MAX)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            # Need the newline ending the last complete line and the one before it.
            if buf.count(b"\n") >= 2 or pos == 0:
                break
    nl = buf.rfind(b"\n")
    if nl < 0:
        return None, len(buf)
    torn = len(buf) - nl - 1
    start = buf.rfind(b"\n", 0, nl) + 1
    return buf[start:nl], torn


def _entry_time(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


_SCAN = 64 * 1024  # below this distance the tail is read, not searched


def _offset_before(seg: Path, since: datetime) -> int:
    """A line start in ``seg`` at or before the first entry at or after ``since``: the
    line there is older (or it is 0).  Entry times follow the file (see entries_since)."""
    with open(seg, "rb") as fh:
        lo, hi = 0, fh.seek(0, os.SEEK_END)
        while hi - lo > _SCAN:
            mid = (lo + hi) // 2
            fh.seek(mid)
            fh.readline()  # the rest of the line mid falls in
            pos = fh.tell()
            line = fh.readline()
            if pos >= hi or not line.endswith(b"\n"):
                hi = mid
                continue
            try:
                t = _entry_time(_parse_json(line.rstrip(b"\n"), seg, None)["time"])
            except (LedgerCorruptError, ValueError):
                return lo  # a damaged line: read from here, and let parsing say so
            if t < since:
                lo = pos
            else:
                hi = mid
        return lo


def _first_time(seg: Path) -> datetime | None:
    """The time of a segment's first entry (None: empty, torn or unreadable)."""
    try:
        with open(seg, "rb") as fh:
            line = fh.readline()
    except OSError:
        return None
    if not line.endswith(b"\n"):
        return None
    try:
        return _entry_time(_parse_json(line.rstrip(b"\n"), seg, 1)["time"])
    except (LedgerCorruptError, ValueError):
        return None


def _parse_json(line: bytes, seg: Path, lineno: int | None) -> dict[str, Any]:
    where = f"{seg}:{lineno}" if lineno else f"{seg} (last line)"
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise LedgerCorruptError(f"{where}: not a JSON ledger entry ({exc})") from None
    if not isinstance(obj, dict):
        raise LedgerCorruptError(f"{where}: not a JSON object")
    for key, typ in (("seq", int), ("hash", str), ("prev", str), ("kind", str), ("time", str)):
        if not isinstance(obj.get(key), typ):
            raise LedgerCorruptError(f"{where}: missing or invalid {key!r}")
    return obj


def parse_entry(raw: RawLine) -> LedgerEntry:
    obj = _parse_json(raw.data, raw.segment, raw.lineno)
    fields = {k: v for k, v in obj.items() if k not in RESERVED}
    return LedgerEntry(seq=obj["seq"], time=obj["time"], kind=obj["kind"], prev=obj["prev"],
                       hash=obj["hash"], fields=fields)
