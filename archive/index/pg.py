"""PostgreSQL full-text engine: tsvector + GIN, in the shared metadata database.

Used with the PostgreSQL backend so every gateway node searches one index.  The
table holds only tsvectors (lexemes and positions), never the text.  Text is
tokenized here in Python (archive.index.tokenize, as SQLite's unicode61 does) and
written as a tsvector literal, so the three engines agree on what a word is; the
PostgreSQL parser would, for instance, keep "alice@example.com" as one token.

Fields are told apart by tsvector weights (one GIN index answers field queries):
A subject, B body, C attachment text, D attachment names; header participants have
their own column for bare-word searches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, text

from archive.index import FullTextError, IndexDoc, tokenize
from archive.query import And, Node, Or, Term, split_and

_QUERY_WEIGHTS = {"text": "", "subject": "A", "body": "B", "attachment": "CD", "filename": "D"}
# PostgreSQL limits (docs §8.11.1): positions 1..16383, 256 positions per lexeme,
# lexemes < 2 KiB, a tsvector < 1 MiB.  Longer documents are cut, not refused.
_MAX_POS = 16383
_MAX_POSITIONS = 256
_MAX_TOKENS = 100_000
_MAX_TOKEN_LEN = 200


def _lexeme(token: str) -> str:
    return "'" + token.replace("\\", "\\\\").replace("'", "''") + "'"


def tsvector_literal(fields: Iterable[tuple[str, str]]) -> str:
    """A tsvector literal of (weight, text) pairs; positions run on across fields."""
    positions: dict[str, list[str]] = {}
    pos = 0
    count = 0
    for weight, content in fields:
        for token in tokenize(content):
            pos += 1
            count += 1
            if count > _MAX_TOKENS:
                break
            if len(token) > _MAX_TOKEN_LEN:
                continue
            slots = positions.setdefault(token, [])
            if len(slots) < _MAX_POSITIONS:
                slots.append(f"{min(pos, _MAX_POS)}{weight if weight != 'D' else ''}")
        pos += 10  # a gap so a phrase never spans two fields
    return " ".join(f"{_lexeme(t)}:{','.join(p)}" for t, p in positions.items())


def tsquery_literal(term: Term) -> str:
    weights = _QUERY_WEIGHTS[term.field]
    tokens = tokenize(term.text)
    parts = [f"{_lexeme(t)}:{weights}" if weights else _lexeme(t) for t in tokens]
    if term.prefix and parts:
        parts[-1] = f"{_lexeme(tokens[-1])}:*{weights}"
    return " <-> ".join(parts) or "''"


class PgIndex:
    name = "pg"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        try:
            with engine.begin() as c:
                # Several nodes start at once: CREATE ... IF NOT EXISTS is not atomic
                # against a concurrent create (both pass the check, one fails on the
                # catalog's unique index), so one node creates, the others wait.
                c.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
                          {"k": "coffer-archive-fts"})
                c.execute(text(
                    "CREATE TABLE IF NOT EXISTS fts_docs (doc_id BIGINT PRIMARY KEY, "
                    "tsv tsvector NOT NULL, people tsvector NOT NULL)"))
                c.execute(text("CREATE INDEX IF NOT EXISTS fts_docs_tsv ON fts_docs "
                               "USING gin (tsv)"))
                c.execute(text("CREATE INDEX IF NOT EXISTS fts_docs_people ON fts_docs "
                               "USING gin (people)"))
        except Exception as exc:
            raise FullTextError(f"cannot create the PostgreSQL full-text table: {exc}") from exc

    def add(self, docs: Iterable[IndexDoc]) -> int:
        batch: dict[int, IndexDoc] = {}
        for doc in docs:
            batch.setdefault(doc.doc_id, doc)  # a repeated id: the first one
        rows = [{
            "id": d.doc_id,
            "tsv": tsvector_literal([("A", d.subject), ("B", d.body), ("C", d.attachment),
                                     ("D", d.filename)]),
            "people": tsvector_literal([("D", d.participants)]),
        } for d in batch.values()]
        if not rows:
            return 0
        with self.engine.begin() as c:
            present = set(c.scalars(text("SELECT doc_id FROM fts_docs WHERE doc_id = ANY(:ids)"),
                                    {"ids": [r["id"] for r in rows]}))
            # An id already present gets the new document unless it is the same one
            # (IndexDoc.sha256: ids can be handed out again; the vectors tell here).
            c.execute(text(
                "INSERT INTO fts_docs (doc_id, tsv, people) VALUES "
                "(:id, CAST(:tsv AS tsvector), CAST(:people AS tsvector)) "
                "ON CONFLICT (doc_id) DO UPDATE SET tsv = EXCLUDED.tsv, people = EXCLUDED.people "
                "WHERE fts_docs.tsv IS DISTINCT FROM EXCLUDED.tsv "
                "OR fts_docs.people IS DISTINCT FROM EXCLUDED.people"), rows)
            # GIN's fast-update list is scanned linearly by every search and makes
            # the planner fall back to a sequential scan (detoasting every vector):
            # merge it now, in bulk, off the search path.
            c.execute(text("SELECT gin_clean_pending_list('fts_docs_tsv'::regclass), "
                           "gin_clean_pending_list('fts_docs_people'::regclass)"))
        return len(batch.keys() - present)

    def delete(self, ids: Iterable[int]) -> None:
        with self.engine.begin() as c:
            c.execute(text("DELETE FROM fts_docs WHERE doc_id = ANY(:ids)"),
                      {"ids": list(ids)})

    def _condition(self, node: Node, params: dict[str, Any]) -> str:
        if isinstance(node, Term):
            name = f"q{len(params)}"
            params[name] = tsquery_literal(node)
            if node.field == "text":
                return (f"(tsv @@ CAST(:{name} AS tsquery) "
                        f"OR people @@ CAST(:{name} AS tsquery))")
            return f"tsv @@ CAST(:{name} AS tsquery)"
        if isinstance(node, Or):
            return "(" + " OR ".join(self._condition(n, params) for n in node.items) + ")"
        if isinstance(node, And):
            positive, negative = split_and(node)
            return "(" + " AND ".join(
                [self._condition(n, params) for n in positive]
                + [f"NOT {self._condition(n, params)}" for n in negative]) + ")"
        raise FullTextError(f"not a full-text query: {node!r}")

    def search(self, query: Node, *, scored: bool = True) -> dict[int, float]:
        params: dict[str, Any] = {}
        where = self._condition(query, params)
        # Rank against every term at once, without field weights.
        rank = " || ".join(f"CAST(:{p} AS tsquery)" for p in params)
        score = f"ts_rank(tsv, {rank})" if scored else "0.0"
        sql = f"SELECT doc_id, {score} FROM fts_docs WHERE {where}"
        with self.engine.connect() as c:
            return {int(r[0]): float(r[1]) for r in c.execute(text(sql), params)}

    def count(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(text("SELECT count(*) FROM fts_docs")).scalar_one())

    def optimize(self) -> None:
        with self.engine.connect() as c:
            c.execution_options(isolation_level="AUTOCOMMIT").execute(
                text("VACUUM ANALYZE fts_docs"))

    def clear(self) -> None:
        with self.engine.begin() as c:
            c.execute(text("TRUNCATE fts_docs"))

    def close(self) -> None:
        """The engine belongs to the metadata database, which closes it."""
