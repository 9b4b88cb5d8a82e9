"""Full-text search: one small interface, three engines.

    Index (protocol)
    ├── archive.index.fts5.Fts5Index          SQLite FTS5, contentless (embedded default)
    ├── archive.index.whoosh_index.WhooshIndex whoosh (pure Python)
    └── archive.index.pg.PgIndex              PostgreSQL tsvector + GIN (shared by nodes)

A document is one blob (content-addressed, so a document id never changes
meaning): its subject, body text, attachment text, attachment names and the
header participants.  Envelope-only facts (Bcc, MAIL FROM) are metadata, not
full text.  Engines keep index terms, never the text itself: snippets are cut
from the decrypted message at query time (archive.search).

``search`` takes a full-text query tree (``archive.query`` Term / And / Or, see
:func:`archive.query.is_fulltext`) and returns ``{document id: score}``, higher
scores better.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from archive.errors import ArchiveError
from archive.extract import Extracted, Limits, extract

if TYPE_CHECKING:
    from archive.metadata import Metadata
    from archive.query import Node

__all__ = ["FIELDS", "FullTextError", "Index", "IndexDoc", "Indexer", "open_index", "tokenize"]

FIELDS = ("subject", "body", "attachment", "filename", "participants")


class FullTextError(ArchiveError):
    """The full-text index cannot be opened, written or queried."""


@dataclass(frozen=True, slots=True)
class IndexDoc:
    doc_id: int  # the blob id in the metadata database
    subject: str = ""
    body: str = ""
    attachment: str = ""  # extracted attachment text
    filename: str = ""  # attachment names, one per line
    participants: str = ""  # header names and addresses
    # The blob's SHA-256 ("": not known).  An id the index already holds with the same
    # blob is not added again; with another blob (or not known), the new document
    # replaces the old one: a metadata database that lost its newest rows (a power
    # loss, an older copy restored) hands their blob ids out again, to other messages,
    # while the index file kept the lost ones' documents.
    sha256: str = ""

    @classmethod
    def from_extracted(cls, doc_id: int, ex: Extracted, sha256: str = "") -> IndexDoc:
        return cls(doc_id, ex.subject, ex.body, ex.attachment_text(), ex.attachment_names(),
                   ex.participants_text(), sha256)

    def field(self, name: str) -> str:
        return str(getattr(self, name))


class Index(Protocol):
    name: str

    def add(self, docs: Iterable[IndexDoc]) -> int:
        """Index a batch (one transaction); how many ids are new to the index.

        An id already present with the same blob (IndexDoc.sha256) is left as it is;
        with another blob, or one not known, its document is replaced: the id names
        the new document only, and every later search answers for it."""

    def delete(self, ids: Iterable[int]) -> None:
        """Remove documents (expiry): their ids never match again."""

    def search(self, query: Node, *, scored: bool = True) -> dict[int, float]:
        """Ids of the documents matching a full-text query tree, with scores
        (all 0.0 when not ``scored``: much cheaper when results are sorted by date)."""

    def count(self) -> int:
        """Documents in the index."""

    def optimize(self) -> None:
        """Merge segments; slow, for quiet hours."""

    def clear(self) -> None:
        """Remove every document (before a rebuild)."""

    def close(self) -> None: ...


# Tokens as SQLite's unicode61 tokenizer with remove_diacritics 2 sees them:
# runs of letters and digits, case-folded, accents removed; "_" separates.
_TOKEN = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    folded = text.casefold()
    if not folded.isascii():  # most mail is ASCII: skip the per-character work
        folded = unicodedata.normalize("NFKD", folded)
        folded = "".join(c for c in folded if not unicodedata.combining(c))
    return _TOKEN.findall(folded)


def open_index(engine: str, *, data_dir: Path | None = None, meta: Metadata | None = None
               ) -> Index:
    """Open the named engine: "fts5" or "whoosh" under DATA_DIR/archive/index/, "pg" in
    the PostgreSQL database of ``meta``."""
    if engine == "fts5":
        from archive.index.fts5 import Fts5Index

        if data_dir is None:
            raise FullTextError("the fts5 index needs a data directory")
        return Fts5Index(Path(data_dir) / "archive" / "index" / "fts5.db")
    if engine == "whoosh":
        from archive.index.whoosh_index import WhooshIndex

        if data_dir is None:
            raise FullTextError("the whoosh index needs a data directory")
        return WhooshIndex(Path(data_dir) / "archive" / "index" / "whoosh")
    if engine == "pg":
        from archive.index.pg import PgIndex

        if meta is None or meta.dialect != "postgresql":
            raise FullTextError("the pg index needs a PostgreSQL metadata database")
        return PgIndex(meta.engine)
    raise FullTextError(f"unknown full-text engine {engine!r} (fts5, whoosh, pg)")


Fetch = Callable[[str], bytes]


class Indexer:
    """Moves blobs from "stored" to "indexed", off the SMTP path, in batches."""

    def __init__(self, meta: Metadata, index: Index, fetch: Fetch,
                 limits: Limits | None = None, clock: Callable[[], datetime] | None = None
                 ) -> None:
        self.meta = meta
        self.index = index
        self.fetch = fetch
        self.limits = limits
        self.clock = clock or (lambda: datetime.now(UTC))

    def docs(self, blobs: Iterable[tuple[int, str]]) -> list[IndexDoc]:
        out = []
        for blob_id, sha256 in blobs:
            try:
                raw = self.fetch(sha256)
            except ArchiveError:
                continue  # shredded or missing: verify reports it, the index skips it
            out.append(IndexDoc.from_extracted(blob_id, extract(raw, self.limits), sha256))
        return out

    def run_once(self, batch: int = 500) -> int:
        """Index one batch of waiting blobs; return how many were taken."""
        pending = self.meta.unindexed(batch)
        if not pending:
            return 0
        self.index.add(self.docs(pending))
        self.meta.mark_indexed([b for b, _ in pending], self.clock())
        return len(pending)

    def run(self, batch: int = 500, progress: Callable[[int], None] | None = None) -> int:
        total = 0
        while n := self.run_once(batch):
            total += n
            if progress:
                progress(total)
        return total

    def rebuild(self, batch: int = 500, progress: Callable[[int], None] | None = None) -> int:
        """Empty the index and index every live blob again, from the store alone."""
        self.index.clear()
        total = 0
        chunk: list[tuple[int, str]] = []
        for item in self.meta.all_blobs():
            chunk.append(item)
            if len(chunk) >= batch:
                total += self._rebuild_chunk(chunk)
                chunk = []
                if progress:
                    progress(total)
        if chunk:
            total += self._rebuild_chunk(chunk)
            if progress:
                progress(total)
        return total

    def _rebuild_chunk(self, chunk: list[tuple[int, str]]) -> int:
        self.index.add(self.docs(chunk))
        self.meta.mark_indexed([b for b, _ in chunk], self.clock())
        return len(chunk)
