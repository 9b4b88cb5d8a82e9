"""The write-once blob store: content addressed, compressed, encrypted, in pack segments.

A message's exact bytes are stored once, under the SHA-256 of those bytes, as a
*record* appended to a *segment* (formats: archive.pack)::

    archive/store/.lock                    taken for appends, key table changes, compaction
    archive/store/packs/<name>.pack        records, append-only, never rewritten
    archive/store/packs/<name>.keys        their wrapped data keys
    archive/store/packs/<name>.ack         how far its records are acknowledged

Why segments: one file per blob (and one per data key) cost four files, four
fsyncs and their directory fsyncs per message, and a 4 KiB block per small file
(issues #2, #3, #7).  A batch now costs one append to a segment and one to its key
table, fsynced together (group commit), plus a directory fsync when a segment is
created.

Properties, and how they are kept:

* **Content addressed, single instance.**  Before appending, the writer looks the
  SHA-256 up in the index of every segment (refreshed under the store lock, so
  two processes never both append the same bytes) and drops repeats inside the
  batch.  A record found in another writer's not yet acknowledged batch has that
  segment fsynced before we acknowledge it too.
* **Encrypted per message.**  zstd, then AES-256-GCM under a fresh data key per
  record; the associated data is the record header, which holds the SHA-256.
* **Write-once.**  A segment is created exclusively (O_EXCL) by one writer, which
  holds an exclusive flock on it while it appends; nobody else ever writes it.
  Its files get their headers under temporary names and are renamed into place
  (.pack last), so no segment is ever seen, or left by a crash, without them.
  Each writer thread has its own segment, so batches in a segment are in order.
  A segment full (SEGMENT_BYTES or SEGMENT_RECORDS) is closed and a new one made.
* **Crypto-shredding per message.**  Data keys are not in the immutable segment
  but in its key table: appended to by the writer, and on shred replaced whole
  (new file, fsync, rename, directory fsync) without the destroyed key.
  ``delete`` (after expiry) adds a "deleted" mark in the same way; ``compact``
  later writes the segment's live records to a new segment (which names the old
  one in its header), fsyncs it, and removes the old one.
* **Self-describing.**  The index from SHA-256 to (segment, offset, length) is
  built from the files alone by reading each record header (kept in memory and
  extended as segments grow), and each ``.ack`` says how far its segment's
  records are in the ledger.  verify needs no database.

Write path (``write_many``, group commit): seal every new message; under the store
lock append the records to the thread's segment and the keys to its key table;
fsync both (in parallel: ext4 folds them into one journal commit); run the
caller's ledger append; then append the new acknowledged length to the ``.ack``
(not fsynced: after a power loss the ledger says the rest).  A crash (kill -9,
power loss) leaves either a torn tail (bytes after the last whole record, never
acknowledged) or whole records after the acknowledged length whose ledger
entries may be missing.  ``recover()`` (run when a writer opens the archive)
records the latter as ``blob_recovered``, truncates the torn tail (the only
change ever made to a segment's bytes, and only to bytes no fsync covered), and
drops key entries that lost their record; ``coffer archive verify`` reports
both as warnings, never as tampering.

Shredding rewrites a whole key table (up to SEGMENT_RECORDS entries of ~74
bytes), so expiry destroys keys with ``shred_many``/``delete_many``: one rewrite
per segment for a whole run.  A backup copies each segment up to the last record
its ledger prefix names (reports.backup).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from archive.blob import (
    SHA_RE,
    BlobRef,
    Recovered,
    ZstdContexts,
    check_sha,
)
from archive.errors import (
    ArchiveError,
    BlobIntegrityError,
    BlobNotFoundError,
    BlobShreddedError,
    KeyFileError,
)
from archive.keys import KeyRing, fsync_dir
from archive.pack import (
    KEYTABLE_HEADER,
    MIN_SEGMENT_HEADER,
    RECORD_HEADER_LEN,
    RECORD_MAGIC,
    VERSION,
    FormatError,
    KeyTable,
    Sealed,
    dead_entry,
    encode_ack,
    encode_segment_header,
    parse_record_header,
    record_fields,
    seal,
    unseal,
)
from archive.segment import (
    KeyTables,
    Location,
    Scan,
    read_acked,
    read_segment_header,
    replace_file,
    scan,
    write_all,
)

__all__ = ["SHA_RE", "BlobRef", "BlobStore", "HeaderRepair", "Location", "Recovered",
           "check_sha"]

PACK_DIR = "packs"
LOCK_FILE = ".lock"
MAX_BATCH = 256  # messages per write_many chunk (one fsync round)
SEGMENT_BYTES = 64 << 20
# Bounds the key table, which a shred rewrites whole (~110 bytes per entry).
SEGMENT_RECORDS = 8192
PACK_MODE = 0o440
MUTABLE_MODE = 0o640
SEGMENT_FILE = re.compile(r"^([0-9a-f]{16}-[0-9a-f]{8})\.(pack|keys|ack)$")
# How long the packs directory must have been unchanged for a listing of it to be
# reused (_segment_names_now): well above any file system's timestamp granularity.
_DIR_SETTLE_NS = 5 * 10**9


@dataclass
class SegmentState:
    """What this process knows of one segment."""

    name: str
    header_len: int
    supersedes: list[str]
    acked: int  # end of the acknowledged records (the .ack log)
    end: int  # end of the records scanned so far
    records: list[Location] = field(default_factory=list)
    dkids: set[str] = field(default_factory=set)  # key table entries are named by dkid
    # No writer holds it any more (its flock is free): it never gets another record,
    # so refresh() no longer opens it (only a compaction's removal changes it now).
    final: bool = False
    # Where the records stop framing (bytes altered, or lost to a power loss): nothing
    # from there on is ever cut as a torn tail (recover).
    corrupt_at: int | None = None
    # Why its segment header does not parse, if it does not (see _settle_damaged): the
    # records are then framed from the first record header found after it.
    damaged: str = ""


@dataclass
class _Writer:
    """A segment this process appends to (one thread at a time)."""

    name: str
    fd: int  # the .pack, flocked exclusively for as long as we write it
    kfd: int
    kino: int
    ifd: int
    size: int
    count: int = 0
    closed: bool = False


class BlobStore(ZstdContexts):
    """Pack segments under ``root`` (``archive/store``); see the module docstring."""

    def __init__(self, root: Path, keyring: KeyRing | None, *, level: int = 3,
                 fsync_threads: int = 4) -> None:
        self.root = root
        self.packs = root / PACK_DIR
        self.keyring = keyring
        self.level = level
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=fsync_threads,
                                        thread_name_prefix="coffer-fsync")
        self._mutex = threading.RLock()  # the in-memory index, and the store lock's owner
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._segs: dict[str, SegmentState] = {}
        self._where: dict[str, list[Location]] = {}
        self._keys = KeyTables(self.packs)
        self._free: list[_Writer] = []
        # Segments this process is writing: their records are indexed as they are
        # written (_append), so refresh() has nothing to look at in them.
        self._mine: set[str] = set()
        self._loaded = False
        # (the packs directory's stat, its segment names): see _segment_names_now.
        self._listing: tuple[tuple[int, int, int, int], list[str]] | None = None
        self._refreshed: list[str] | None = None  # the listing refresh() last went through

    def close(self) -> None:
        with self._mutex:
            for w in self._free:
                self._close_writer(w)
            self._free.clear()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
        self._pool.shutdown(wait=True)

    # -- the index --------------------------------------------------------------------

    def segment_names(self) -> list[str]:
        try:
            names = os.listdir(self.packs)
        except FileNotFoundError:
            return []
        return sorted(m.group(1) for n in names
                      if (m := SEGMENT_FILE.match(n)) and m.group(2) == "pack")

    def _segment_names_now(self) -> list[str]:
        """segment_names(), listed again only if the directory changed since a listing.

        Every batch refreshes the index, and listing the directory (and matching each
        name) cost more than the rest of a refresh; a stat tells whether any file was
        created, removed or renamed there since (each sets the directory's mtime and
        ctime).  Timestamps are coarse (a clock tick, or a second or two on some file
        systems): a listing is kept only if the directory had not changed for
        _DIR_SETTLE_NS before it, so a later change cannot carry the same timestamp.
        The stat comes before the listing: a change in between shows next time.
        """
        try:
            st = os.stat(self.packs)
        except FileNotFoundError:
            self._listing = None
            return []
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        if self._listing is not None and self._listing[0] == stamp:
            return self._listing[1]
        names = self.segment_names()
        settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _DIR_SETTLE_NS
        self._listing = (stamp, names) if settled else None
        return names

    def refresh(self) -> None:
        """Bring the index up to date with every segment (others' appends, compactions)."""
        with self._mutex:
            names = self._segment_names_now()
            if names is not self._refreshed:  # else no segment was removed since
                for gone in set(self._segs) - set(names):
                    self._drop_segment(gone)
                self._refreshed = names
            segs = self._segs
            for name in names:
                # A final segment never changes; ours are indexed as we write them.
                seg = segs.get(name)
                if seg is None or not (seg.final or name in self._mine):
                    self._refresh_segment(name)
            self._loaded = True

    def _refresh_segment(self, name: str) -> None:
        seg = self._segs.get(name)
        if seg is not None and seg.final:
            return
        try:
            fd = os.open(self.packs / f"{name}.pack", os.O_RDONLY)
        except FileNotFoundError:
            if seg is not None:
                self._drop_segment(name)
            return
        try:
            if seg is None:
                damaged = ""
                try:
                    head = read_segment_header(fd)
                except FormatError as exc:
                    head, damaged = ([], _first_record(fd)), str(exc)
                if head is None:
                    return  # being created
                supersedes, hlen = head
                acked = read_acked(self.packs / f"{name}.ack", hlen)
                seg = SegmentState(name, hlen, supersedes, acked, hlen, damaged=damaged)
                self._segs[name] = seg
            if os.fstat(fd).st_size > seg.end:
                found = scan(fd, name, seg.end)
                grew = found.end > seg.end
                self._add_records(seg, found.records, found.end)
                if grew:
                    return  # being written now, most likely: look again next time
            # Not grown since we last looked: is its writer gone?  A writer holds an
            # exclusive flock from before the header is written until it closes the
            # segment for good (a compaction's segment is whole from birth); once free,
            # it is free for ever.  Scanned again after the probe, so a record written
            # just before the writer closed is not missed.
            if _flock_free(fd):
                found = scan(fd, name, seg.end)
                self._add_records(seg, found.records, found.end)
                # Only now: a running writer's last bytes may be read half written.
                seg.corrupt_at = found.corrupt_at
                seg.final = True
        finally:
            os.close(fd)

    def _add_records(self, seg: SegmentState, records: list[Location], end: int) -> None:
        for loc in records:
            self._where.setdefault(loc.sha256, []).append(loc)
            seg.dkids.add(loc.dkid)
        seg.records.extend(records)
        seg.end = end

    def _drop_segment(self, name: str) -> None:
        seg = self._segs.pop(name, None)
        self._keys.forget(name)
        if seg is None:
            return
        for loc in seg.records:
            locs = self._where.get(loc.sha256, [])
            if loc in locs:
                locs.remove(loc)
            if not locs:
                self._where.pop(loc.sha256, None)

    def damaged_segments(self) -> dict[str, str]:
        """Segments in the index whose header does not parse: name -> why."""
        with self._mutex:
            self._ensure_loaded()
            return {n: s.damaged for n, s in sorted(self._segs.items()) if s.damaged}

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.refresh()

    def _superseded(self) -> set[str]:
        return {old for s in self._segs.values() for old in s.supersedes}

    def _state(self, sha256: str) -> tuple[str, Location | None]:
        """("live" | "shredded" | "absent", the record) from the index as it is now."""
        shredded: Location | None = None
        superseded = self._superseded() if len(self._where.get(sha256, ())) > 1 else set()
        for loc in self._where.get(sha256, ()):
            if loc.segment in superseded:
                continue
            table = self._keys.get(loc.segment)
            if loc.dkid in table.dead:
                continue
            if loc.dkid in table.keys:
                return "live", loc
            if self._unacknowledged(loc):
                # Written, but its key never was: a batch cut short (ENOSPC between the
                # record and its key, or a writer still between the two).  Nobody was
                # told it is stored, so it is no shred: the bytes may be stored again.
                continue
            shredded = loc
        return ("shredded", shredded) if shredded else ("absent", None)

    def _unacknowledged(self, loc: Location) -> bool:
        """Is ``loc`` past its segment's acknowledged end?  The end is read again from
        the .ack log (this is the rare keyless case) so that a stale view of another
        writer's segment never passes a real shred off as a cut-short write."""
        seg = self._segs.get(loc.segment)
        if seg is None:
            return False
        if loc.offset >= seg.acked:
            seg.acked = max(seg.acked, read_acked(self.packs / f"{loc.segment}.ack",
                                                  seg.header_len))
        return loc.offset >= seg.acked

    def locate(self, sha256: str) -> tuple[str, Location | None]:
        """Like ``_state``, refreshing the index first if the blob is not live in it."""
        check_sha(sha256)
        with self._mutex:
            self._ensure_loaded()
            st = self._state(sha256)
            if st[0] != "live":
                self.refresh()
                st = self._state(sha256)
            return st

    # -- reading ----------------------------------------------------------------------

    def exists(self, sha256: str) -> bool:
        """True while the record exists (live or shredded), False once deleted."""
        return self.locate(sha256)[0] != "absent"

    def data_key_present(self, sha256: str) -> bool:
        return self.locate(sha256)[0] == "live"

    def read(self, sha256: str) -> bytes:
        """The original bytes: decrypt, decompress, and check the SHA-256."""
        self._need_keys()
        for attempt in (1, 2):
            state, loc = self.locate(sha256)
            if state == "absent" or loc is None:
                raise BlobNotFoundError(f"no blob {sha256} in {self.root}")
            if state == "shredded":
                raise BlobShreddedError(
                    f"blob {sha256} cannot be opened: its data key was destroyed "
                    "(crypto-shredded; the ledger shows whether by expiry or tampering)")
            try:
                record = self.read_record(loc)
            except FileNotFoundError:
                if attempt == 2:
                    raise BlobNotFoundError(f"no blob {sha256} in {self.root}") from None
                self.refresh()  # compacted by another process meanwhile
                continue
            with self._mutex:  # the key table cache is shared by the threads
                table = self._keys.get(loc.segment)
            return self.open_record(record, table, sha256)
        raise AssertionError("unreachable")

    def read_record(self, loc: Location) -> bytes:
        fd = os.open(os.path.join(self.packs, f"{loc.segment}.pack"), os.O_RDONLY)
        try:
            record = os.pread(fd, loc.length, loc.offset)
        finally:
            os.close(fd)
        if len(record) != loc.length:
            raise BlobIntegrityError(f"blob {loc.sha256}: record truncated")
        return record

    def open_record(self, record: bytes, table: KeyTable, sha256: str) -> bytes:
        """Decrypt, decompress and hash-check one record with its segment's key table."""
        keyring = self._need_keys()
        head = parse_record_header(record)
        if head.sha256 != sha256:
            raise BlobIntegrityError(f"blob {sha256}: the record is labelled {head.sha256}")
        key = table.keys.get(head.dkid)
        if key is None:
            raise BlobShreddedError(f"blob {sha256} cannot be opened: its data key was destroyed")
        compressed = unseal(record, key, keyring)
        try:
            plain = self._dctx().decompress(compressed)
        except zstandard.ZstdError as exc:
            raise BlobIntegrityError(f"blob {sha256}: does not decompress ({exc})") from None
        if hashlib.sha256(plain).hexdigest() != sha256:
            raise BlobIntegrityError(f"blob {sha256}: content does not match its SHA-256")
        return plain

    # -- writing ----------------------------------------------------------------------

    def write_many(
        self, datas: Sequence[bytes],
        after: Callable[[int, list[BlobRef]], object] | None = None,
    ) -> list[BlobRef]:
        """Store each message once, in chunks of at most MAX_BATCH.

        ``after(start, refs)`` runs for each chunk (``refs`` are for
        ``datas[start:start + len(refs)]``) once the chunk is durable and before its
        records are listed as acknowledged: the facade appends the ledger entries there.
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
        shas = [hashlib.sha256(d).hexdigest() for d in datas]
        first: dict[str, int] = {}
        for i, sha in enumerate(shas):
            first.setdefault(sha, i)
        with self._mutex:
            self._ensure_loaded()
            known = {sha: self._state(sha)[0] for sha in first}
        def seal_one(sha: str) -> Sealed:
            return seal(sha, self._cctx().compress(datas[first[sha]]), archive_key)

        # Compress and encrypt outside the lock (the expensive part).
        sealed = {sha: seal_one(sha) for sha in first if known[sha] == "absent"}
        writer = self._take_writer()
        try:
            writer, new, sync = self._append(writer, shas, sealed, seal_one)
        except BaseException:
            # Refused before writing (a shredded blob): the segment is still good.
            # (A failed write has already retired the segment it wrote to.)
            if writer is not None and not writer.closed:
                self._give_back(writer)
            raise
        try:
            self._fsync_batch(writer, sync)
            refs = [BlobRef(sha, len(d), new[sha].length if sha in new and first[sha] == i
                            else self._stored_size(sha), sha in new and first[sha] == i)
                    for i, (sha, d) in enumerate(zip(shas, datas, strict=True))]
            if after is not None:
                after(refs)
        except BaseException:
            # Records may be durable without their ledger entries: this segment is
            # never appended to again, and recover() finishes the batch.
            self._retire(writer)
            raise
        self._acknowledge(writer, [new[s] for s in sorted(new, key=lambda s: new[s].offset)])
        self._give_back(writer)
        return refs

    def _stored_size(self, sha256: str) -> int:
        with self._mutex:
            loc = self._state(sha256)[1]
        return loc.length if loc else 0

    def _append(self, w: _Writer | None, shas: list[str], sealed: dict[str, Sealed],
                seal_one: Callable[[str], Sealed],
                ) -> tuple[_Writer | None, dict[str, Location], set[str]]:
        """Under the store lock: re-check, append records and keys; returns the writer
        used, the new records and the other segments to fsync before acknowledging."""
        with self._store_lock():
            self.refresh()  # what other processes appended since we looked
            sync: set[str] = set()
            todo: list[Sealed] = []
            for sha in dict.fromkeys(shas):
                state, loc = self._state(sha)
                if state == "shredded":
                    raise BlobShreddedError(
                        f"blob {sha} was crypto-shredded; the same bytes cannot be stored "
                        "again until it is deleted")
                if state == "live" and loc is not None:
                    seg = self._segs.get(loc.segment)
                    if seg is not None and loc.offset >= seg.acked:
                        sync.add(loc.segment)  # not acknowledged by its writer yet
                    continue
                # (Not sealed yet if it was deleted by another process meanwhile.)
                todo.append(sealed.get(sha) or seal_one(sha))
            if not todo:
                return w, {}, sync
            w = self._writer_with_room(w, sum(len(s.record) for s in todo), len(todo))
            try:
                self._write_records(w, todo, seal_one)
            except BaseException:
                self._retire(w)  # a write may have been cut short: never append here again
                raise
            new: dict[str, Location] = {}
            start = pos = w.size
            for s in todo:
                new[s.sha256] = Location(w.name, pos, len(s.record), s.sha256, s.dkid)
                pos += len(s.record)
            w.size, w.count = pos, w.count + len(todo)
            seg = self._segs.get(w.name)
            if seg is not None and seg.end == start:
                # Our own segment (nobody else appends to it): index what we just wrote
                # without reading it back.
                self._add_records(seg, list(new.values()), pos)
            else:
                self._refresh_segment(w.name)  # new to the index: header and .ack too
            return w, new, sync

    def _write_records(self, w: _Writer, todo: list[Sealed],
                       seal_one: Callable[[str], Sealed]) -> None:
        seg = self._segs.get(w.name)
        taken = set(seg.dkids) if seg else set()
        for i, s in enumerate(todo):
            # Key table entries are named by dkid: two random 64-bit ids meeting in
            # one segment (~1e-12 per full segment) get the second sealed again.
            while s.dkid in taken:
                s = todo[i] = seal_one(s.sha256)
            taken.add(s.dkid)
        self._reopen_keys(w)
        write_all(w.fd, b"".join(s.record for s in todo))
        write_all(w.kfd, b"".join(s.key_entry for s in todo))

    def _fsync_batch(self, w: _Writer | None, others: set[str]) -> None:
        jobs: list[Callable[[], None]] = []
        if w is not None:
            jobs += [functools.partial(os.fsync, w.fd), functools.partial(os.fsync, w.kfd)]
        for name in sorted(others - {w.name if w else ""}):
            for ext in ("pack", "keys"):
                jobs.append(functools.partial(_fsync_path, self.packs / f"{name}.{ext}"))
        if not jobs:
            return
        # In parallel, this thread doing one of them: a pool hand-off less per batch.
        futures = [self._pool.submit(j) for j in jobs[1:]]
        try:
            jobs[0]()
        finally:
            for f in futures:
                f.result()

    def _acknowledge(self, w: _Writer | None, locs: list[Location]) -> None:
        if locs and w is not None:
            write_all(w.ifd, encode_ack(locs[-1].offset + locs[-1].length))
            with self._mutex:
                seg = self._segs.get(w.name)
                if seg is not None:
                    seg.acked = max(seg.acked, locs[-1].offset + locs[-1].length)

    # -- writer segments --

    def _take_writer(self) -> _Writer | None:
        with self._mutex:
            return self._free.pop() if self._free else None

    def _give_back(self, w: _Writer | None) -> None:
        if w is None:
            return
        with self._mutex:
            self._free.append(w)

    def _retire(self, w: _Writer | None) -> None:
        if w is not None:
            self._close_writer(w)

    def _writer_with_room(self, w: _Writer | None, nbytes: int, n: int) -> _Writer:
        """``w`` if it can take the batch, else a new segment (under the store lock)."""
        if w is not None and (w.count == 0 or (w.size + nbytes <= SEGMENT_BYTES
                                               and w.count + n <= SEGMENT_RECORDS)):
            return w
        new = self._new_writer()
        if w is not None:
            self._close_writer(w)  # full: closed, and never appended to again
        return new

    def _new_writer(self) -> _Writer:
        """A new segment, whole before it has its name (called under the store lock).

        Its three files are made under temporary names, given their headers and fsynced,
        then renamed into place, the .pack last: its name is the commit point, as for a
        compaction.  A kill -9 or power loss at any moment thus leaves a whole segment,
        or ``.tmp`` files and a .keys/.ack without their .pack, which recover() removes;
        never a named segment without its headers (verify reported an empty .keys as an
        altered key table, and the next writer's recover() could not open it).  The
        flock goes with the inode through the rename.
        """
        self.packs.mkdir(parents=True, exist_ok=True, mode=0o750)
        name, header = self._unused_name(), encode_segment_header()
        finals = [self.packs / f"{name}{ext}" for ext in (".pack", ".keys", ".ack")]
        token = secrets.token_hex(4)
        temps = [p.with_name(f"{p.name}.{token}.tmp") for p in finals]
        fds: list[int] = []
        placed: list[Path] = []
        try:
            fd = os.open(temps[0], os.O_RDWR | os.O_CREAT | os.O_EXCL, PACK_MODE)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # The key table and index change after the segment is closed (shred,
            # recovery): owner-writable.  The .pack never does: read-only from birth.
            for tmp in temps[1:]:
                fds.append(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND,
                                   MUTABLE_MODE))
            kfd, ifd = fds[1], fds[2]
            write_all(fd, header)
            write_all(kfd, KEYTABLE_HEADER)
            for f in fds:
                os.fsync(f)
            for i in (1, 2, 0):  # the .pack last
                os.rename(temps[i], finals[i])
                placed.append(finals[i])
            fsync_dir(self.packs)  # before any record: an fsynced record has its name
        except OSError:
            # A full disk (or any failure) before the segment held a record: it must not
            # stay as files without their headers, which verify reports as altered.
            for f in fds:
                with contextlib.suppress(OSError):
                    os.close(f)
            for path in [*placed, *temps]:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        self._mine.add(name)
        return _Writer(name, fd, kfd, os.fstat(kfd).st_ino, ifd, len(header))

    def _unused_name(self) -> str:
        """A segment name no file has.  Renames replace, so O_EXCL on the temporary
        names does not prove it; every segment is made under the store lock, so a
        check here is enough (a clash of time and 32 random bits is unlikely anyway)."""
        while True:
            name = f"{time.time_ns():016x}-{secrets.token_hex(4)}"
            if not any(os.path.lexists(self.packs / f"{name}.{ext}")
                       for ext in ("pack", "keys", "ack")):
                return name

    def _reopen_keys(self, w: _Writer) -> None:
        """A shred replaced our key table (rename): append to the new file."""
        path = self.packs / f"{w.name}.keys"
        if os.stat(path).st_ino != w.kino:
            os.close(w.kfd)
            w.kfd = os.open(path, os.O_WRONLY | os.O_APPEND)
            w.kino = os.fstat(w.kfd).st_ino

    def _close_writer(self, w: _Writer) -> None:
        if w.closed:
            return
        w.closed = True
        self._mine.discard(w.name)
        with contextlib.suppress(OSError):
            os.fsync(w.ifd)  # so the next open needs no ledger to know what was acknowledged
        for fd in (w.ifd, w.kfd, w.fd):  # closing the .pack releases its flock last
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the store lock --

    @contextlib.contextmanager
    def _store_lock(self) -> Iterator[None]:
        """flock on ``.lock`` (other processes) inside the mutex (other threads)."""
        with self._mutex:
            if self._lock_depth == 0:
                if self._lock_fd is None:
                    self.root.mkdir(parents=True, exist_ok=True, mode=0o750)
                    self._lock_fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- shredding, deletion and compaction -------------------------------------------

    def shred(self, sha256: str) -> int:
        """Destroy every data key of a blob; returns how many were destroyed."""
        return self.shred_many([sha256])

    def shred_many(self, shas: Sequence[str]) -> int:
        """Destroy every data key of these blobs: one key table rewrite per segment."""
        return self._rewrite_keys({check_sha(s) for s in shas}, mark_dead=False)

    def delete(self, sha256: str) -> bool:
        """Mark a blob's records deleted (destroying any key left); compaction later
        removes their bytes.  The caller has checked that nothing references it."""
        return self.delete_many([sha256]) > 0

    def delete_many(self, shas: Sequence[str]) -> int:
        """``delete`` for many blobs, one key table rewrite per segment; returns the
        number of records marked."""
        return self._rewrite_keys({check_sha(s) for s in shas}, mark_dead=True)

    def _rewrite_keys(self, shas: set[str], *, mark_dead: bool) -> int:
        changed = 0
        with self._store_lock():
            self.refresh()
            by_segment: dict[str, list[Location]] = {}
            for sha in sorted(shas):
                for loc in self._where.get(sha, ()):
                    by_segment.setdefault(loc.segment, []).append(loc)
            for name, locs in sorted(by_segment.items()):
                self._keys.forget(name)  # read it fresh, under the lock
                table = self._keys.get(name)
                drop = {loc.dkid for loc in locs} & set(table.keys)
                marks = [dead_entry(loc.dkid) for loc in locs
                         if mark_dead and loc.dkid not in table.dead]
                if not drop and not marks:
                    continue
                replace_file(self.packs / f"{name}.keys", table.encode(drop) + b"".join(marks),
                             MUTABLE_MODE)
                self._keys.forget(name)
                changed += len(marks) if mark_dead else len(drop)
        return changed

    def compact(self, progress: Callable[[int, int], None] | None = None) -> CompactResult:
        """Rewrite each closed segment holding deleted records without them."""
        result = CompactResult()
        with self._store_lock():
            self.refresh()
            names = sorted(self._segs)
        for i, name in enumerate(names, 1):
            if progress:
                progress(i, len(names))
            with self._store_lock():
                self._compact_one(name, result)
        return result

    def _compact_one(self, name: str, result: CompactResult) -> None:
        self.refresh()
        seg = self._segs.get(name)
        if seg is None or seg.damaged or seg.corrupt_at is not None:
            # Rewriting it would drop the bytes that no longer frame, which may hold
            # committed records a backup can still restore (_settle_damaged).
            return
        table = self._keys.get(name)
        dead = [r for r in seg.records if r.dkid in table.dead]
        if not dead:
            return
        with _try_flock(self.packs / f"{name}.pack") as free:
            if not free:
                return  # a live writer's segment: next time
            live = [r for r in seg.records if r.dkid not in table.dead]
            result.removed_records += len(dead)
            result.freed_bytes += sum(r.length for r in dead)
            if live:
                self._write_compacted(name, live, table)
            for ext in ("pack", "keys", "ack"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.packs / f"{name}.{ext}")
            fsync_dir(self.packs)
            result.segments += 1
            self.refresh()

    def _write_compacted(self, old: str, live: list[Location], table: KeyTable) -> None:
        name = f"{time.time_ns():016x}-{secrets.token_hex(4)}"
        header = encode_segment_header([old])
        keep = {r.dkid for r in live}
        keys = KeyTable(keys={k: e for k, e in table.keys.items() if k in keep})
        body = bytearray(header)
        with open(self.packs / f"{old}.pack", "rb") as fh:
            for r in live:
                body += os.pread(fh.fileno(), r.length, r.offset)
        # Key table and index first; the .pack's rename is the commit point (recover
        # removes a superseded segment, or a half-made compaction's leftovers).
        replace_file(self.packs / f"{name}.keys", keys.encode(), MUTABLE_MODE)
        replace_file(self.packs / f"{name}.ack", encode_ack(len(body)), MUTABLE_MODE)
        replace_file(self.packs / f"{name}.pack", bytes(body), PACK_MODE)

    # -- recovery ---------------------------------------------------------------------

    def recover(self, append: Callable[[list[Recovered]], object],
                known: Callable[[], Collection[str]] | None = None,
                repaired: Callable[..., object] | None = None,
                live: Callable[[], Collection[str]] | None = None) -> list[Recovered]:
        """Finish what dead writers left: ledger their unacknowledged records, cut torn
        tails, finish compactions, remove segments a writer died creating and damaged
        ones that hold nothing committed (named in ``repaired(segments, reason=...,
        dropped_records=...)`` first).  ``known()`` gives the SHA-256s the ledger
        already lists, ``live()`` those it lists and has not tombstoned (each read only
        if some segment needs it)."""
        found: list[Recovered] = []
        if not self.packs.is_dir():
            return found
        with self._store_lock():
            self._finish_compactions()
            self.refresh()
            self._remove_stillborn(repaired)
            self._settle_damaged(known, live, repaired)
            ledgered: Collection[str] | None = None
            for name in sorted(self._segs):
                seg = self._segs[name]
                with _try_flock(self.packs / f"{name}.pack") as free:
                    if not free:
                        continue  # a live writer (maybe in this process)
                    seg.acked = read_acked(self.packs / f"{name}.ack", seg.header_len)
                    tail = [r for r in seg.records if r.offset >= seg.acked]
                    table = self._keys.get(name)
                    tail = self._cut_keyless(name, seg, tail, table)
                    torn = self._torn(name, seg)
                    if not tail and not torn:
                        continue
                    if tail and ledgered is None:
                        ledgered = set(known()) if known else set()
                    assert ledgered is not None or not tail
                    batch = [Recovered(r.sha256, r.length, f"{name}.pack") for r in tail
                             if r.dkid in table.keys
                             and r.sha256 not in (ledgered or ())]
                    if batch:
                        append(batch)
                        found.extend(batch)
                    self._seal_tail(name, seg, tail, torn, table)
        return found

    def _cut_keyless(self, name: str, seg: SegmentState, tail: list[Location],
                     table: KeyTable) -> list[Location]:
        """Forget unacknowledged records whose key never reached the key table.

        A batch writes its records, then their keys in the same order (_write_records);
        a writer killed between the two leaves records nobody can read and nobody was
        told about.  Kept, they would look crypto-shredded and refuse the same bytes for
        ever; so the segment ends before the first of them, and the torn-tail cut
        removes them from the file (their later keys, if any, become orphans)."""
        keyless = [r.offset for r in tail if r.dkid not in table.keys]
        if not keyless:
            return tail
        cut = min(keyless)
        for loc in [r for r in seg.records if r.offset >= cut]:
            locs = self._where.get(loc.sha256, [])
            if loc in locs:
                locs.remove(loc)
            if not locs:
                self._where.pop(loc.sha256, None)
        seg.records = [r for r in seg.records if r.offset < cut]
        seg.end = cut
        return [r for r in tail if r.offset < cut]

    def _torn(self, name: str, seg: SegmentState) -> int:
        """Bytes after the last whole record that a crash left (cut by _seal_tail).

        Nothing where the records stop framing, or before the acknowledged end: those
        bytes are altered or damaged, not torn, and the records after them (committed,
        in the ledger) must stay for verify to report and a backup to restore, never
        be cut off with them."""
        if seg.corrupt_at is not None or seg.end < seg.acked:
            return 0
        try:
            return os.stat(self.packs / f"{name}.pack").st_size - seg.end
        except FileNotFoundError:
            return 0

    def _seal_tail(self, name: str, seg: SegmentState, tail: list[Location], torn: int,
                   table: KeyTable) -> None:
        """Acknowledge ``tail`` in the index, cut ``torn`` bytes, drop orphaned keys."""
        if torn:
            # Never acknowledged (the batch's fsync had not returned): safe to cut.
            path = self.packs / f"{name}.pack"
            os.chmod(path, PACK_MODE | 0o200)
            try:
                with open(path, "r+b") as fh:
                    fh.truncate(seg.end)
                    os.fsync(fh.fileno())
            finally:
                os.chmod(path, PACK_MODE)
        if tail:
            with open(self.packs / f"{name}.ack", "ab") as fh:
                fh.write(encode_ack(seg.end))
                os.fsync(fh.fileno())
            seg.acked = seg.end
        present = {r.dkid for r in seg.records}
        orphans = {k for k in table.keys if k not in present}
        if orphans or table.torn:
            replace_file(self.packs / f"{name}.keys", table.encode(orphans), MUTABLE_MODE)
            self._keys.forget(name)

    def _remove_stillborn(self, repaired: Callable[[list[str]], object] | None) -> None:
        """Remove the segments whose writer died creating them (see stillborn()): they
        hold no record, and their missing headers made verify report an altered key
        table and recover() fail on it.  Writers since _new_writer name a segment only
        once whole; these are left by older versions (or a power loss that kept a
        rename but not the bytes before it)."""
        dead: list[str] = []
        for name in self._segment_names_now():
            seg = self._segs.get(name)
            if seg is not None and seg.records:
                continue  # the usual case, known from the index without a look at the files
            with _try_flock(self.packs / f"{name}.pack") as free:
                if free and stillborn(self.packs, name):
                    dead.append(name)
        if not dead:
            return
        if repaired is not None:
            repaired(dead)  # in the ledger before the files go
        for name in dead:
            self._drop_segment(name)
            for ext in ("pack", "keys", "ack"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.packs / f"{name}.{ext}")
        fsync_dir(self.packs)

    def _settle_damaged(self, known: Callable[[], Collection[str]] | None,
                        live: Callable[[], Collection[str]] | None,
                        repaired: Callable[..., object] | None) -> None:
        """Remove a segment whose header is damaged if it can hold nothing committed.

        Our writers fsync a segment's header before its name exists (_new_writer), so
        after a kill -9 a header always parses; a power loss on a file system that does
        not keep what fsync wrote (no journal, a lying disk cache) can still leave a
        named .pack whose first block is garbage or zeros.  Such a segment is removed,
        as an unfinished one is, only if no record framed in it is in the ledger and
        every blob the ledger lists as live is found in another segment: then whatever
        the unreadable bytes held was never acknowledged (the ledger append precedes
        the SMTP reply).  Otherwise it stays, read as far as its records frame, so the
        store opens and mail goes on into new segments, and verify reports it as
        ``segment_header_damaged`` with the messages concerned, for an operator to
        restore it from a backup.  Without ``known`` and ``live`` nothing is removed."""
        damaged = [n for n, seg in sorted(self._segs.items()) if seg.damaged]
        if not damaged or known is None or live is None:
            return
        ledgered, current = set(known()), set(live())
        for name in damaged:
            seg = self._segs[name]
            framed = sorted({r.sha256 for r in seg.records})
            if ledgered.intersection(framed) or any(
                    not any(loc.segment != name for loc in self._where.get(sha, ()))
                    for sha in current):
                continue
            with _try_flock(self.packs / f"{name}.pack") as free:
                if not free:
                    continue
                if repaired is not None:
                    repaired([name], reason=f"segment header unreadable ({seg.damaged}); "
                             "no record in it is in the ledger and every live blob is "
                             "stored elsewhere", dropped_records=framed)
                self._drop_segment(name)
                for ext in ("pack", "keys", "ack"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.packs / f"{name}.{ext}")
            fsync_dir(self.packs)

    def _finish_compactions(self) -> None:
        """Remove segments a finished compaction superseded, and half-made leftovers."""
        try:
            names = os.listdir(self.packs)
        except FileNotFoundError:
            return
        changed = False
        packs = {m.group(1) for n in names if (m := SEGMENT_FILE.match(n)) and m.group(2) == "pack"}
        for n in names:
            m = SEGMENT_FILE.match(n)
            if n.endswith(".tmp") or (m and m.group(1) not in packs):
                os.unlink(self.packs / n)  # never committed (no .pack by that name)
                changed = True
        for name in packs:
            try:
                fd = os.open(self.packs / f"{name}.pack", os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                head = read_segment_header(fd)
            except FormatError:
                head = None  # a damaged header names nothing (see _settle_damaged)
            finally:
                os.close(fd)
            for old in head[0] if head else []:
                for ext in ("pack", "keys", "ack"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.packs / f"{old}.{ext}")
                        changed = True
        if changed:
            fsync_dir(self.packs)

    # -- rebuilding a damaged segment header (coffer archive repair) ------------------

    def repair_header(self, name: str, *, dry_run: bool = False,
                      commit: Callable[[HeaderRepair], object] | None = None) -> HeaderRepair:
        """Rewrite the header of segment ``name`` if the segment proves what it was.

        A writer's segment starts with exactly ``encode_segment_header()`` (7 bytes:
        magic, version, no superseded name) and its first record right after it
        (_new_writer).  So if a record that authenticates starts at byte 7, the header
        was those 7 bytes and nothing else: a compaction's header names the segments
        it superseded and is longer, and a record is never moved.  The first record's
        AEAD covers its header, length included (archive.pack), so each authenticated
        record also proves where the next one starts; every record must frame to the
        end of the file and every one whose data key is in the key table must decrypt.
        Records whose data key was destroyed (expiry) cannot be decrypted by anyone;
        they are counted, and need not be: the header does not depend on them.

        Refused (``repairable`` False, nothing changed) otherwise, and while a writer
        holds the segment's flock.  Else, unless ``dry_run``: the whole segment with
        the new header is written under a temporary name and fsynced, ``commit(plan)``
        runs (the ledger entry: the old header bytes are evidence), then the new file
        is renamed over the old one and the directory fsynced.  The records keep their
        offsets, so every index, .ack and reader stays right; a crash before the rename
        leaves a ``.tmp`` file the next recover() removes, and the damage as it was.
        """
        path = self.packs / f"{name}.pack"
        with self._store_lock():
            self.refresh()
            if name not in self._segs:
                return HeaderRepair(name, False, "no such segment in the store")
            with _try_flock(path) as free:
                if not free:
                    return HeaderRepair(
                        name, False, "a writer holds the segment (its flock): it may still "
                        "be appending; stop the gateway (or let the writer close the segment) "
                        "and run repair again")
                fd = os.open(path, os.O_RDONLY)
                try:
                    plan = self._plan_header(name, fd)
                    if plan.repairable and not dry_run:
                        self._rewrite_header(path, fd, plan, commit)
                finally:
                    os.close(fd)
            if plan.done:
                self._segs[name].damaged = ""
        return plan

    def _plan_header(self, name: str, fd: int) -> HeaderRepair:
        """Can segment ``name`` (open as ``fd``, its flock held) have its header rebuilt?"""
        old = os.pread(fd, MIN_SEGMENT_HEADER, 0)
        new = encode_segment_header()
        try:
            head = read_segment_header(fd)
        except FormatError as exc:
            damage = str(exc)
        else:
            # Read from the file, not the index: another repair may have run meanwhile.
            return HeaderRepair(name, False, "its segment header parses"
                                + (": nothing to repair" if head is not None
                                   else " in part (a writer is creating it)"), old)

        def refuse(why: str) -> HeaderRepair:
            return HeaderRepair(name, False, f"header unreadable ({damage}); {why}", old, new)

        size = os.fstat(fd).st_size
        first = _first_record(fd)
        if first >= size:
            return refuse("no record header parses in it, so nothing shows what it held: "
                          "restore it from a backup")
        if first != MIN_SEGMENT_HEADER:
            return refuse(
                f"its first record that parses starts at byte {first}, not at byte "
                f"{MIN_SEGMENT_HEADER} where a writer's first record starts: the bytes "
                "before it were a longer header (a compaction's output, which names the "
                "segments it superseded; nothing in the segment proves those names) or "
                "records the damage reached: restore it from a backup")
        found = scan(fd, name, MIN_SEGMENT_HEADER)
        if found.corrupt_at is not None:
            return refuse(f"its records stop framing at byte {found.corrupt_at} "
                          f"({found.corrupt}): restore it from a backup")
        if found.end != size:
            return refuse(f"{size - found.end} bytes after its last whole record (byte "
                          f"{found.end}) do not frame: restore it from a backup")
        self._keys.forget(name)
        try:
            table = self._keys.get(name)
        except BlobIntegrityError as exc:
            return refuse(f"its key table cannot be read ({exc}), so no record "
                          "authenticates")
        if found.records[0].dkid not in table.keys:
            return refuse(f"the data key of its first record (blob {found.records[0].sha256}) "
                          "was destroyed, so nothing authenticates the record at byte "
                          f"{MIN_SEGMENT_HEADER}: restore it from a backup")
        checked = 0
        for r in found.records:
            if r.dkid not in table.keys:
                continue
            try:
                self.open_record(self.read_record(r), table, r.sha256)
            except ArchiveError as exc:
                return refuse(f"the record at byte {r.offset} (blob {r.sha256}) does not "
                              f"authenticate with the key table ({exc}): restore it from "
                              "a backup")
            checked += 1
        keyless = len(found.records) - checked
        return HeaderRepair(
            name, True,
            f"header unreadable ({damage}); its first record starts at byte "
            f"{MIN_SEGMENT_HEADER}, right after a writer's {MIN_SEGMENT_HEADER}-byte header "
            f"(which supersedes nothing), and its {len(found.records)} record(s) frame to the "
            f"end of the file; {checked} authenticate with its key table"
            + (f" ({keyless} more had their data key destroyed)" if keyless else "")
            + f": the header was {new.hex()}",
            old, new, records=len(found.records), authenticated=checked)

    def _rewrite_header(self, path: Path, fd: int, plan: HeaderRepair,
                        commit: Callable[[HeaderRepair], object] | None) -> None:
        """Give segment ``path`` (open as ``fd``) ``plan.new_header``: a new file under a
        temporary name, fsynced, ``commit``, rename over, fsync the directory.  Never
        edited in place: a crash leaves the old file or the new one, never a mix."""
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PACK_MODE)
        try:
            try:
                write_all(out, plan.new_header)
                pos, size = len(plan.new_header), os.fstat(fd).st_size
                while pos < size:
                    chunk = os.pread(fd, min(_COPY_CHUNK, size - pos), pos)
                    if not chunk:
                        raise ArchiveError(f"{path}: shrank while being copied")
                    write_all(out, chunk)
                    pos += len(chunk)
                os.fsync(out)
            finally:
                os.close(out)
            if commit is not None:
                commit(plan)  # in the ledger before the old header bytes are gone
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_dir(self.packs)
        plan.done = True

    # -- reading segments whole (verify, backup) --------------------------------------

    def inspect(self, name: str) -> SegmentView:
        """One segment as it is on disk, read in the order that keeps a running
        writer's batches consistent: .ack, then key table, then records (the
        segment header never changes)."""
        fd = os.open(self.packs / f"{name}.pack", os.O_RDONLY)
        damaged = ""
        try:
            live_writer = not _flock_free(fd)
            try:
                head = read_segment_header(fd)
            except FormatError as exc:  # framed from its first record (_first_record)
                head, damaged = ([], _first_record(fd)), str(exc)
            if head is None or (not live_writer and os.fstat(fd).st_size == head[1]
                                and stillborn(self.packs, name)):
                # Being created (by a writer older than _new_writer's renames), or its
                # writer died doing so.
                return SegmentView(name, [], 0, 0, KeyTable(), "", Scan(), live_writer,
                                   stillborn=not live_writer)
            supersedes, hlen = head
            acked = read_acked(self.packs / f"{name}.ack", hlen)
            self._keys.forget(name)
            table_error = ""
            try:
                table = self._keys.get(name)
            except BlobIntegrityError as exc:
                table, table_error = KeyTable(), str(exc)
            found = scan(fd, name, hlen)
        finally:
            os.close(fd)
        return SegmentView(name, supersedes, hlen, acked, table, table_error, found, live_writer,
                           damaged=damaged)

    # -- helpers --

    def _need_keys(self) -> KeyRing:
        if self.keyring is None:
            raise KeyFileError(f"{self.root}: no archive keys loaded (ciphertext-only mode)")
        return self.keyring


@dataclass
class SegmentView:
    name: str
    supersedes: list[str]
    header_len: int
    acked: int  # from the .ack log, read before the key table and the records
    keys: KeyTable
    keys_error: str
    scan: Scan
    live_writer: bool
    stillborn: bool = False  # its writer died creating it: no record (see stillborn())
    damaged: str = ""  # why its header does not parse (see BlobStore._settle_damaged)


@dataclass
class HeaderRepair:
    """What ``BlobStore.repair_header`` found for one segment, and whether it acted."""

    segment: str
    repairable: bool
    reason: str  # why the header can be rebuilt exactly, or why not
    old_header: bytes = b""  # the segment's first 7 bytes as they were
    new_header: bytes = b""
    records: int = 0
    authenticated: int = 0
    done: bool = False  # the new header is in place


@dataclass
class CompactResult:
    segments: int = 0
    removed_records: int = 0
    freed_bytes: int = 0


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stillborn(packs: Path, name: str) -> bool:
    """Did the segment's writer die creating it, before its headers were whole?

    Its .pack holds only part of a segment header, or a header and no record while
    its .keys lacks the key table header (missing, empty or cut short).  No record
    is written before both headers are fsynced, so such a segment never held one.
    Any other bytes are not ours to judge: verify reports them.
    """
    try:
        fd = os.open(packs / f"{name}.pack", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        head = read_segment_header(fd)
    except FormatError:
        return False
    finally:
        os.close(fd)
    if head is None:
        return True
    if size != head[1]:
        return False
    try:
        keys = (packs / f"{name}.keys").read_bytes()
    except FileNotFoundError:
        keys = b""
    return len(keys) < len(KEYTABLE_HEADER) and KEYTABLE_HEADER.startswith(keys)


_FIND_WINDOW = 1 << 20
_COPY_CHUNK = 1 << 20


def _first_record(fd: int) -> int:
    """Where the first record of a segment with a damaged header starts: the first
    place a record header parses, past any segment header (a writer's is 7 bytes);
    the file's size if none does.  A record is authenticated when it is read (its
    AEAD covers its header), so a false match can make a read fail, never lie."""
    size = os.fstat(fd).st_size
    pos = MIN_SEGMENT_HEADER
    while pos < size:
        window = os.pread(fd, _FIND_WINDOW + RECORD_HEADER_LEN, pos)
        at = window.find(RECORD_MAGIC + bytes([VERSION]))
        while 0 <= at < _FIND_WINDOW:
            try:
                record_fields(window, at)
            except FormatError:
                at = window.find(RECORD_MAGIC + bytes([VERSION]), at + 1)
                continue
            return pos + at
        pos += _FIND_WINDOW
    return size


def _flock_free(fd: int) -> bool:
    """Is no writer holding this segment? (a shared probe, released at once)"""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


@contextlib.contextmanager
def _try_flock(path: Path) -> Iterator[bool]:
    """Hold the segment's exclusive lock if its writer is gone (yields False if not)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
