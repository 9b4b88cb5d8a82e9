"""``coffer archive import PATH``: bring an organisation's history into the archive.

Sources (found by looking at PATH):

* an mbox file (its first line starts with ``From ``; RFC 4155): messages are
  split at ``From `` lines that follow an empty line (or start the file); the
  ``From `` line itself is the mbox envelope, not part of the message.
  Quoted ``>From `` lines are unquoted the mboxrd way (one ``>`` removed from
  ``^>+From ``), which also undoes mboxo quoting of ``From `` lines; the one
  empty line mbox puts between messages is removed.
* a Maildir (a directory with ``cur/`` or ``new/``): every file in cur and new.
* a directory of ``.eml`` files (searched recursively; ``.mbox`` files found
  there are read as mbox too; other files are skipped, counted).
* a single ``.eml`` file.

Messages are stored exactly as found (the bytes of the file, or of the mbox
slice after unquoting) through Archive.put_many and Metadata.add_messages in
batches (source ``import:PATH``, direction ``imported``), then indexed.

Idempotent: a message whose (SHA-256, source) pair is already in the database
is skipped, so importing the same PATH twice stores nothing new (no blob, no
row, no ledger entry).  The same bytes imported from another PATH, or received
over SMTP, are one blob with another message row (single instance).

A file that cannot be read, or content that is not a message (no header field
before the first empty line), is reported with its file (and mbox line) and
skipped; the import goes on and exits 1 with the count of failures.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from archive.extract import extract
from archive.facade import Archive
from archive.index import Index, Indexer
from archive.metadata import Message, MessageRecord, Metadata

__all__ = ["ImportFailure", "ImportReport", "Item", "import_path", "iter_source"]

_FROM_LINE = re.compile(rb"^From ")
_QUOTED_FROM = re.compile(rb"^>(>*From )", re.MULTILINE)
# RFC 5322 §2.2: a header field name is printable ASCII except ":" then ":".
_HEADER_LINE = re.compile(rb"^[!-9;-~]+[ \t]*:")


@dataclass(frozen=True, slots=True)
class Item:
    """One message found in the source, or the reason it could not be read."""

    where: str  # file, or file:line for mbox
    data: bytes | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ImportFailure:
    where: str
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"type": "failure", "where": self.where, "error": self.error}


@dataclass
class ImportReport:
    source: str
    found: int = 0
    stored: int = 0  # new message rows
    new_blobs: int = 0
    duplicates: int = 0  # already imported from this source
    skipped_files: int = 0  # not .eml / .mbox in a directory
    indexed: int = 0
    bytes: int = 0
    failures: list[ImportFailure] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"type": "summary", "source": self.source, "found": self.found,
                "stored": self.stored, "new_blobs": self.new_blobs,
                "duplicates": self.duplicates, "skipped_files": self.skipped_files,
                "indexed": self.indexed, "bytes": self.bytes, "failed": len(self.failures)}


def looks_like_message(data: bytes) -> bool:
    """At least one header field before the body (RFC 5322 §2.1)."""
    first = data.lstrip(b"\r\n")[:1000]
    return bool(first) and _HEADER_LINE.match(first) is not None


def split_mbox(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number of the ``From `` line, message bytes) for each message of an mbox."""
    lines = data.splitlines(keepends=True)
    start: int | None = None
    body: list[bytes] = []

    def finish() -> bytes:
        # RFC 4155: an empty line separates a message from the next From line.
        if body and body[-1] in (b"\n", b"\r\n"):
            body.pop()
        return _QUOTED_FROM.sub(rb"\1", b"".join(body))

    prev_blank = True
    for n, line in enumerate(lines, 1):
        if prev_blank and _FROM_LINE.match(line):
            if start is not None:
                yield start, finish()
            start, body = n, []
        elif start is not None:
            body.append(line)
        prev_blank = line in (b"\n", b"\r\n")
    if start is not None:
        yield start, finish()


def _read(path: Path) -> bytes | str:
    try:
        return path.read_bytes()
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"


def _mbox_items(path: Path) -> Iterator[Item]:
    data = _read(path)
    if isinstance(data, str):
        yield Item(str(path), None, data)
        return
    if not _FROM_LINE.match(data):
        yield Item(str(path), None, "not an mbox file (it does not start with a From line)")
        return
    for line, msg in split_mbox(data):
        where = f"{path}:{line}"
        if looks_like_message(msg):
            yield Item(where, msg)
        else:
            yield Item(where, None, "not a message (no header field before the body)")


def _file_item(path: Path) -> Item:
    data = _read(path)
    if isinstance(data, str):
        return Item(str(path), None, data)
    if not looks_like_message(data):
        return Item(str(path), None, "not a message (no header field before the body)")
    return Item(str(path), data)


def is_maildir(path: Path) -> bool:
    return path.is_dir() and ((path / "cur").is_dir() or (path / "new").is_dir())


def iter_source(path: Path, on_skip: Callable[[Path], None] | None = None) -> Iterator[Item]:
    """Every message under ``path`` (see the module docstring for what is recognised)."""
    if path.is_file():
        head = _read(path)
        if (path.suffix.lower() != ".eml" and isinstance(head, bytes)
                and _FROM_LINE.match(head[:5])):
            yield from _mbox_items(path)
        else:
            yield _file_item(path)
        return
    if is_maildir(path):
        for sub in ("new", "cur"):
            d = path / sub
            if d.is_dir():
                for f in sorted(d.iterdir()):
                    if f.is_file() and not f.name.startswith("."):
                        yield _file_item(f)
        return
    if not path.is_dir():
        yield Item(str(path), None, "no such file or directory")
        return
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            f = Path(root) / name
            suffix = f.suffix.lower()
            if suffix == ".eml":
                yield _file_item(f)
            elif suffix == ".mbox":
                yield from _mbox_items(f)
            elif on_skip is not None:
                on_skip(f)


def _already(meta: Metadata, source: str, shas: list[str]) -> set[str]:
    with meta.session() as s:
        return set(s.scalars(select(Message.sha256).where(
            Message.source == source, Message.sha256.in_(sorted(set(shas))))))


def import_path(meta: Metadata, archive: Archive, index: Index | None, path: Path, *,
                batch: int = 500, retention: str | None = None,
                clock: Callable[[], datetime] | None = None,
                progress: Callable[[ImportReport], None] | None = None,
                on_failure: Callable[[ImportFailure], None] | None = None) -> ImportReport:
    """Import everything under ``path``; ``index``: index the new blobs at the end.

    ``retention``: a period ("7y", "90d" ...) counted from each message's Date
    (else the import time); None keeps imported messages forever.
    """
    from gateway.archive_stage import retention_end

    clock = clock or (lambda: datetime.now(UTC))
    source = f"import:{path.resolve()}"[:255]
    report = ImportReport(source)
    pending: list[tuple[bytes, str]] = []

    def skip(_: Path) -> None:
        report.skipped_files += 1

    def flush() -> None:
        if not pending:
            return
        shas = [hashlib.sha256(d).hexdigest() for d, _ in pending]
        done = _already(meta, source, shas)
        datas: list[bytes] = []
        recs: list[MessageRecord] = []
        now = clock()
        for (data, _where), sha in zip(pending, shas, strict=True):
            if sha in done:
                report.duplicates += 1
                continue
            done.add(sha)  # the same bytes twice in one source: one row
            ex = extract(data)
            received = now
            recs.append(MessageRecord(
                sha256=sha, extracted=ex, received_at=received, direction="imported",
                source=source, state="imported",
                retention_until=retention_end(ex.date or received, retention)))
            datas.append(data)
        pending.clear()
        if not datas:
            return
        refs = archive.put_many(datas, [{"import": True}] * len(datas))
        meta.add_messages(recs)
        report.stored += len(recs)
        report.new_blobs += sum(1 for r in refs if r.new)
        report.bytes += sum(len(d) for d in datas)

    for item in iter_source(path, skip):
        if item.data is None:
            failure = ImportFailure(item.where, item.error or "unreadable")
            report.failures.append(failure)
            if on_failure is not None:
                on_failure(failure)
            continue
        report.found += 1
        pending.append((item.data, item.where))
        if len(pending) >= batch:
            flush()
            if progress is not None:
                progress(report)
    flush()
    if progress is not None:
        progress(report)
    if index is not None:
        report.indexed = Indexer(meta, index, archive.get, clock=clock).run(batch)
    return report
