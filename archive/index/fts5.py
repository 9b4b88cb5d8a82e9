"""SQLite FTS5 engine: the embedded default.

The table is contentless (``content=''``): SQLite keeps the inverted index (terms,
positions, per-column sizes for bm25) but not the text, so the index file holds as
little of the message as a word index can.  Document ids are the rowids.

Deleting from a contentless table needs ``contentless_delete=1`` (SQLite 3.43+).
On older SQLite the index records deleted ids in a ``deleted`` table and excludes
them from every search; their terms stay until ``coffer archive reindex``
rebuilds the index from the store.
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
            # Which ids are in the index (FTS5 cannot answer that for contentless rows).
            self.db.execute("CREATE TABLE present (id INTEGER PRIMARY KEY)")
            self.db.execute("CREATE TABLE deleted (id INTEGER PRIMARY KEY)")
            self.db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            self.db.execute("INSERT INTO meta VALUES ('contentless_delete', ?)",
                            ("1" if delete else "0",))

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
                present = {row[0] for row in self.db.execute(
                    "SELECT id FROM present WHERE id IN (SELECT value FROM json_each(?))",
                    (json.dumps(list(batch)),))}
                # Same id, same content: blobs are content-addressed.
                new = [d for i, d in batch.items() if i not in present]
                self.db.executemany(
                    "INSERT INTO docs(rowid, subject, body, attachment, filename, "
                    "participants) VALUES (?, ?, ?, ?, ?, ?)",
                    [(d.doc_id, d.subject, d.body, d.attachment, d.filename, d.participants)
                     for d in new])
                self.db.executemany("INSERT INTO present VALUES (?)",
                                    [(d.doc_id,) for d in new])
        except sqlite3.Error as exc:
            raise FullTextError(f"{self.path}: cannot add to the index: {exc}") from exc
        return len(new)

    def delete(self, ids: Iterable[int]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            for i in ids:
                if self.contentless_delete:
                    self.db.execute("DELETE FROM docs WHERE rowid=?", (i,))
                    self.db.execute("DELETE FROM present WHERE id=?", (i,))
                else:
                    self.db.execute("INSERT OR IGNORE INTO deleted VALUES (?)", (i,))

    def search(self, query: Node, *, scored: bool = True) -> dict[int, float]:
        expr = match_expression(query)
        score = f", bm25(docs, {_WEIGHTS})" if scored else ""
        sql = f"SELECT rowid{score} FROM docs WHERE docs MATCH ?"
        if not self.contentless_delete:
            sql += " AND rowid NOT IN (SELECT id FROM deleted)"
        try:
            rows = self.db.execute(sql, (expr,)).fetchall()
            if not scored:
                return dict.fromkeys([r[0] for r in rows], 0.0)
            # bm25 is lower-is-better; the interface wants higher-is-better.
            return {r: -s for r, s in rows}
        except sqlite3.Error as exc:
            raise FullTextError(f"full-text query {expr!r} failed: {exc}") from exc

    def count(self) -> int:
        row = self.db.execute(
            "SELECT (SELECT count(*) FROM present) - "
            "(SELECT count(*) FROM deleted WHERE id IN (SELECT id FROM present))").fetchone()
        return int(row[0])

    def optimize(self) -> None:
        self.db.execute("INSERT INTO docs(docs) VALUES ('optimize')")

    def clear(self) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO docs(docs) VALUES ('delete-all')")
            self.db.execute("DELETE FROM present")
            self.db.execute("DELETE FROM deleted")

    def close(self) -> None:
        self.db.close()
