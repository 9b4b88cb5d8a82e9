"""File I/O for pack segments (format: archive.pack): scanning, key tables, indexes.

Readers never lock: a segment and its index only grow, and a key table is
either appended to or replaced whole by a rename, so whatever a reader sees is
a consistent prefix.  The store (archive.store) does the writing and locking.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from archive.keys import fsync_dir
from archive.pack import (
    KEYTABLE_HEADER,
    RECORD_HEADER_LEN,
    FormatError,
    KeyTable,
    parse_acks,
    parse_key_entries,
    parse_key_table,
    parse_segment_header,
    record_fields,
)

_HEAD_PROBE = 4096  # enough for any segment header a writer or compaction makes
# Bytes read at once by scan(): a few of the usual records, a short copy.
_SCAN_WINDOW = 32 << 10


@dataclass(frozen=True, slots=True)
class Location:
    """Where one record is: ``length`` counts the whole record, header included."""

    segment: str
    offset: int
    length: int
    sha256: str
    dkid: str


@dataclass
class Scan:
    """What a segment holds, from ``start`` on."""

    records: list[Location] = field(default_factory=list)
    end: int = 0  # end of the last whole record
    size: int = 0  # the file size when scanned
    corrupt_at: int | None = None  # a record header that does not parse
    corrupt: str = ""

    @property
    def torn(self) -> int:
        """Bytes after the last whole record (a write cut short), unless corrupt."""
        return 0 if self.corrupt_at is not None else self.size - self.end


def read_segment_header(fd: int) -> tuple[list[str], int] | None:
    """(superseded names, header length), None while the header is still being written."""
    return parse_segment_header(os.pread(fd, _HEAD_PROBE, 0))


def scan(fd: int, name: str, start: int) -> Scan:
    """The whole records from ``start`` (a record boundary) to the end of the file.

    The file is read in windows of up to _SCAN_WINDOW bytes, each record header taken
    from the window holding it (another writer's batch, a few receipts and messages of
    a few kB, is one read instead of one per record); a header past the window is read
    with the window that starts at it.
    """
    size = os.fstat(fd).st_size
    out = Scan(end=start, size=size)
    records = out.records
    pos = start
    window, base = b"", start  # window holds the file's bytes from base on
    while pos + RECORD_HEADER_LEN <= size:
        at = pos - base
        if at + RECORD_HEADER_LEN > len(window):
            window, base, at = os.pread(fd, min(_SCAN_WINDOW, size - pos), pos), pos, 0
        try:
            sha, dkid, total = record_fields(window, at)
        except FormatError as exc:
            out.corrupt_at, out.corrupt = pos, str(exc)
            break
        if pos + total > size:
            break  # the last record is incomplete: being written, or torn by a crash
        records.append(Location(name, pos, total, sha, dkid))
        pos += total
    out.end = pos
    return out


def read_acked(path: Path, header_len: int) -> int:
    """How far the segment's records are acknowledged (its .ack log's last entry)."""
    try:
        acks = parse_acks(path.read_bytes())
    except FileNotFoundError:
        acks = []
    return acks[-1] if acks else header_len


def ack_on_boundary(acked: int, records: list[Location], header_len: int) -> bool:
    """Does the acknowledged length end exactly after a record the segment holds?"""
    return acked == header_len or any(r.offset + r.length == acked for r in records)


class KeyTables:
    """Parsed key tables, re-read only when a file changed: appended bytes are parsed
    incrementally, a replaced file (another inode) is parsed again."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._cache: dict[str, tuple[int, int, KeyTable]] = {}  # name -> (ino, parsed, table)

    def get(self, name: str) -> KeyTable:
        """The key table of segment ``name``; an empty one if the file is missing."""
        path = os.path.join(self.dir, f"{name}.keys")
        cached = self._cache.get(name)
        if cached is not None:
            # The common case (every read checks its key): one stat, no open.  A shred by
            # any process replaces the file (a new inode: the new file exists before the
            # old one is unlinked), an append grows it; either misses this test.
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self._cache.pop(name, None)
                return KeyTable()
            if cached[0] == st.st_ino and cached[1] == st.st_size and not cached[2].torn:
                return cached[2]
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._cache.pop(name, None)
            return KeyTable()
        try:
            st = os.fstat(fd)
            cached = self._cache.get(name)
            if cached is not None and cached[0] == st.st_ino and cached[1] <= st.st_size:
                ino, parsed, table = cached
                if parsed == st.st_size and not table.torn:
                    return table
                data = os.pread(fd, st.st_size - parsed, parsed)
                end = parse_key_entries(data, 0, table)
                self._cache[name] = (ino, parsed + end, table)
                return table
            data = os.pread(fd, st.st_size, 0)
        finally:
            os.close(fd)
        table = parse_key_table(data)
        self._cache[name] = (st.st_ino, len(data) - table.torn, table)
        return table

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)


def replace_file(path: Path, data: bytes, mode: int = 0o440) -> None:
    """Atomically give ``path`` new content: write a new file, fsync, rename, fsync dir."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def empty_key_table() -> bytes:
    return KEYTABLE_HEADER
