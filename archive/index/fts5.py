"""SQLite FTS5 engine: the embedded default.

The table is contentless (``content=''``): SQLite keeps the inverted index (terms,
positions, per-column sizes for bm25) but not the text, so the index file holds as
little of the message as a word index can.  Document ids are the rowids.

Deleting from a contentless table needs ``contentless_delete=1`` (SQLite 3.43+).
On older SQLite the index records deleted rowids in a ``deleted`` table and
excludes them from every search; their terms stay until ``coffer archive reindex``
rebuilds the index from the store.  Replacing a document there (an id handed out
again for another blob, see IndexDoc.sha256) cannot reuse its rowid: the new
document goes in under a fresh negative rowid, the ``moved`` table maps it back to
the id, and the old rowid is recorded as deleted.  ``present`` keeps each id's blob
SHA-256, so adding the same blob again is a no-op.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from archive.index import FullTextError, IndexDoc
from archive.query import And, Node, Or, Term, split_and

_COLUMNS = ("subject", "body", "attachment", "filename", "participants")
# bm25 weights per column, in _COLUMNS order: a hit in the subject counts most.
_WEIGHTS = "10.0, 1.0, 0.5, 2.0, 2.0"
_FIELD_COLUMNS = {
    "text": "",
    "subject": "subject : ",
    "body": "body : ",
    "attachment": "{attachment filename} : ",
    "filename": "filename : ",
}


def _has_contentless_delete() -> bool:
    return sqlite3.sqlite_version_info >= (3, 43, 0)


def match_expression(node: Node) -> str:
    """The FTS5 MATCH string for a full-text query tree.

    Every term is a quoted FTS5 string, so the user's text is never read as FTS5
    syntax; FTS5 tokenizes it with the table's tokenizer (a multi-token string is
    a phrase).
    """
    if isinstance(node, Term):
        quoted = '"' + node.text.replace('"', '""') + '"'
        return _FIELD_COLUMNS[node.field] + quoted + (" *" if node.prefix else "")
    if isinstance(node, Or):
        return "(" + " OR ".join(match_expression(n) for n in node.items) + ")"
    if isinstance(node, And):
        positive, negative = split_and(node)
        expr = "(" + " AND ".join(match_expression(n) for n in positive) + ")"
        for n in negative:  # FTS5's NOT is binary: "a NOT b"
            expr = f"({expr} NOT {match_expression(n)})"
        return expr
    raise FullTextError(f"not a full-text query: {node!r}")


def _enter_wal(db: sqlite3.Connection, patience: float = 10.0) -> None:
    """Switch to WAL, waiting out another process doing the same to a new file.

    Every worker process opens the index at start-up; on a fresh file the switch
    takes an exclusive lock and SQLite reports "database is locked" at once, without
    its busy handler, to those that lose the race.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Fts5Index:
    name = "fts5"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA busy_timeout=10000")
            _enter_wal(self.db)
            # FULL, as the metadata database: the metadata marks a batch indexed after
            # this commit, so an index that could lose a committed batch to a power loss
            # would leave those messages unsearchable with nothing left to re-index them.
            self.db.execute("PRAGMA synchronous=FULL")
            self._create()
        except sqlite3.Error as exc:
            raise FullTextError(f"{path}: cannot open the FTS5 index: {exc}") from exc
        self.contentless_delete = bool(self.db.execute(
            "SELECT value FROM meta WHERE key='contentless_delete'").fetchone()[0] == "1")

    def _create(self) -> None:
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE name='docs'").fetchone():
            self._upgrade()
            return
        delete = _has_contentless_delete()
        options = ", contentless_delete=1" if delete else ""
        with self.db:
            # Every worker process opens the index at start-up: take the write lock
            # before looking again, so only the first creates the tables.
            self.db.execute("BEGIN IMMEDIATE")
            if self.db.execute("SELECT 1 FROM sqlite_master WHERE name='docs'").fetchone():
                return
            self.db.execute(
                f"CREATE VIRTUAL TABLE docs USING fts5({', '.join(_COLUMNS)}, content=''"
                f"{options}, tokenize='unicode61 remove_diacritics 2')")
            # Which ids are in the index, and of which blob (FTS5 cannot answer that for
            # contentless rows).
            self.db.execute("CREATE TABLE present (id INTEGER PRIMARY KEY, sha256 TEXT)")
            self.db.execute("CREATE TABLE deleted (id INTEGER PRIMARY KEY)")  # rowids
            self.db.execute("CREATE TABLE moved (id INTEGER PRIMARY KEY, "
                            "rowid_now INTEGER UNIQUE NOT NULL)")
            self.db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            self.db.execute("INSERT INTO meta VALUES ('contentless_delete', ?)",
                            ("1" if delete else "0",))

    def _upgrade(self) -> None:
        """An index file from before blob hashes: ``present.sha256`` (NULL: not known,
        so the next document under that id replaces it) and ``moved``."""
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE name='moved'").fetchone():
            return
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")  # other processes open it at the same time
            if self.db.execute("SELECT 1 FROM sqlite_master WHERE name='moved'").fetchone():
                return
            self.db.execute("ALTER TABLE present ADD COLUMN sha256 TEXT")
            self.db.execute("CREATE TABLE moved (id INTEGER PRIMARY KEY, "
                            "rowid_now INTEGER UNIQUE NOT NULL)")

    def add(self, docs: Iterable[IndexDoc]) -> int:
        # One query for the ids already present and one executemany per table: the
        # batch's documents are inserted in the same order as one at a time.
        batch: dict[int, IndexDoc] = {}
        for doc in docs:
            batch.setdefault(doc.doc_id, doc)  # a repeated id: the first one, as before
        if not batch:
            return 0
        try:
            with self.db:
                self.db.execute("BEGIN")
                # id -> its blob, or None where it must be replaced: not known, or
                # deleted (older SQLite keeps a deleted id in ``present``).
                present: dict[int, str | None] = {
                    i: None if gone else sha for i, sha, gone in self.db.execute(
                        "SELECT p.id, p.sha256, coalesce(m.rowid_now, p.id) IN "
                        "(SELECT id FROM deleted) FROM present p LEFT JOIN moved m "
                        "ON m.id = p.id WHERE p.id IN (SELECT value FROM json_each(?))",
                        (json.dumps(list(batch)),))}
                new = [d for i, d in batch.items() if i not in present]
                self._insert(new, [d.doc_id for d in new])
                self.db.executemany("INSERT INTO present VALUES (?, ?)",
                                    [(d.doc_id, d.sha256 or None) for d in new])
                # Same id, same blob: the same document.  Else the id was handed out
                # again (IndexDoc.sha256): the new document replaces the old one.
                self._replace([d for i, d in batch.items() if i in present
                               and not (d.sha256 and d.sha256 == present[i])])
        except sqlite3.Error as exc:
            raise FullTextError(f"{self.path}: cannot add to the index: {exc}") from exc
        return len(new)

    def _insert(self, docs: list[IndexDoc], rowids: list[int]) -> None:
        self.db.executemany(
            "INSERT INTO docs(rowid, subject, body, attachment, filename, "
            "participants) VALUES (?, ?, ?, ?, ?, ?)",
            [(r, d.subject, d.body, d.attachment, d.filename, d.participants)
             for r, d in zip(rowids, docs, strict=True)])

    def _replace(self, docs: list[IndexDoc]) -> None:
        """Put ``docs`` in place of the documents their ids have (in the open transaction)."""
        if not docs:
            return
        if self.contentless_delete:
            self.db.executemany("DELETE FROM docs WHERE rowid=?", [(d.doc_id,) for d in docs])
            self._insert(docs, [d.doc_id for d in docs])
        else:
            # The old terms cannot be taken out: hide their rowid, use a new one.
            low = int(self.db.execute("SELECT min(0, coalesce(min(rowid_now), 0)) FROM moved"
                                      ).fetchone()[0])
            rowids = [low - n for n in range(1, len(docs) + 1)]
            self.db.executemany("INSERT OR IGNORE INTO deleted VALUES (?)",
                                [(self._rowid(d.doc_id),) for d in docs])
            self._insert(docs, rowids)
            self.db.executemany("INSERT OR REPLACE INTO moved VALUES (?, ?)",
                                [(d.doc_id, r) for d, r in zip(docs, rowids, strict=True)])
        self.db.executemany("UPDATE present SET sha256=? WHERE id=?",
                            [(d.sha256 or None, d.doc_id) for d in docs])

    def _rowid(self, doc_id: int) -> int:
        """Where the terms of ``doc_id``'s document are now."""
        row = self.db.execute("SELECT rowid_now FROM moved WHERE id=?", (doc_id,)).fetchone()
        return doc_id if row is None else int(row[0])

    def delete(self, ids: Iterable[int]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            for i in ids:
                if self.contentless_delete:
                    self.db.execute("DELETE FROM docs WHERE rowid=?", (i,))
                    self.db.execute("DELETE FROM present WHERE id=?", (i,))
                else:
                    self.db.execute("INSERT OR IGNORE INTO deleted VALUES (?)",
                                    (self._rowid(i),))

    def search(self, query: Node, *, scored: bool = True) -> dict[int, float]:
        expr = match_expression(query)
        score = f", bm25(docs, {_WEIGHTS})" if scored else ""
        sql = f"SELECT rowid{score} FROM docs WHERE docs MATCH ?"
        if not self.contentless_delete:
            sql += " AND rowid NOT IN (SELECT id FROM deleted)"
        try:
            rows = self.db.execute(sql, (expr,)).fetchall()
            if any(r[0] < 0 for r in rows):  # replaced documents (see _replace)
                rows = self._moved_back(rows)
            if not scored:
                return dict.fromkeys([r[0] for r in rows], 0.0)
            # bm25 is lower-is-better; the interface wants higher-is-better.
            return {r: -s for r, s in rows}
        except sqlite3.Error as exc:
            raise FullTextError(f"full-text query {expr!r} failed: {exc}") from exc

    def _moved_back(self, rows: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        ids = dict(self.db.execute(
            "SELECT rowid_now, id FROM moved WHERE rowid_now IN "
            "(SELECT value FROM json_each(?))", (json.dumps([r[0] for r in rows if r[0] < 0]),)))
        return [(ids[r[0]], *r[1:]) if r[0] < 0 else r for r in rows if r[0] in ids or r[0] >= 0]

    def count(self) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM present p LEFT JOIN moved m ON m.id = p.id "
            "WHERE coalesce(m.rowid_now, p.id) NOT IN (SELECT id FROM deleted)").fetchone()
        return int(row[0])

    def optimize(self) -> None:
        self.db.execute("INSERT INTO docs(docs) VALUES ('optimize')")

    def clear(self) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO docs(docs) VALUES ('delete-all')")
            self.db.execute("DELETE FROM present")
            self.db.execute("DELETE FROM deleted")
            self.db.execute("DELETE FROM moved")

    def close(self) -> None:
        self.db.close()
