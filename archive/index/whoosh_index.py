"""whoosh engine (the client's named choice), via the Whoosh-Reloaded fork.

whoosh 2.7.4 (2016) does not import under ``-W error`` on Python 3.11: its
modules hold invalid escape sequences (SyntaxWarning); Whoosh-Reloaded 2.7.5 is
the maintained fork of the same code with those fixed, and installs the same
``whoosh`` package.  Fields are indexed, not stored (only the id is stored), and
tokenized like SQLite's unicode61 (letters and digits, case- and accent-folded)
so the three engines answer the same queries the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from whoosh import index as windex
from whoosh import query as wq
from whoosh.analysis import CharsetFilter, LowercaseFilter, RegexTokenizer
from whoosh.fields import ID, TEXT, Schema
from whoosh.support.charset import accent_map

from archive.index import FIELDS, FullTextError, IndexDoc
from archive.query import And, Node, Or, Term, split_and

_ANALYZER = RegexTokenizer(r"[^\W_]+") | LowercaseFilter() | CharsetFilter(accent_map)

_FIELD_MAP: dict[str, tuple[str, ...]] = {
    "text": FIELDS,
    "subject": ("subject",),
    "body": ("body",),
    "attachment": ("attachment", "filename"),
    "filename": ("filename",),
}


def _schema() -> Schema:
    return Schema(id=ID(stored=True, unique=True),
                  **{f: TEXT(analyzer=_ANALYZER, phrase=True) for f in FIELDS})


def whoosh_query(node: Node) -> Any:
    if isinstance(node, Term):
        # The field analyzer, so query words are folded exactly as indexed words were.
        tokens = [t.text for t in _ANALYZER(node.text)]
        alternatives = []
        for fld in _FIELD_MAP[node.field]:
            if len(tokens) == 1:
                q = wq.Prefix(fld, tokens[0]) if node.prefix else wq.Term(fld, tokens[0])
            else:
                q = wq.Phrase(fld, tokens)
            alternatives.append(q)
        return alternatives[0] if len(alternatives) == 1 else wq.Or(alternatives)
    if isinstance(node, And):
        positive, negative = split_and(node)
        return wq.And([whoosh_query(n) for n in positive]
                      + [wq.Not(whoosh_query(n)) for n in negative])
    if isinstance(node, Or):
        return wq.Or([whoosh_query(n) for n in node.items])
    raise FullTextError(f"not a full-text query: {node!r}")


class WhooshIndex:
    name = "whoosh"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            if windex.exists_in(str(self.path)):
                self.ix = windex.open_dir(str(self.path))
            else:
                self.ix = windex.create_in(str(self.path), _schema())
        except Exception as exc:
            raise FullTextError(f"{self.path}: cannot open the whoosh index: {exc}") from exc

    def _present(self, ids: list[str]) -> set[str]:
        with self.ix.searcher() as s:
            return {i for i in ids if s.document_number(id=i) is not None}

    def add(self, docs: Iterable[IndexDoc]) -> int:
        batch = list(docs)
        present = self._present([str(d.doc_id) for d in batch])
        writer = self.ix.writer(limitmb=128)
        added = 0
        try:
            done: set[str] = set()
            for doc in batch:
                key = str(doc.doc_id)
                if key in done:
                    continue  # a repeated id: the first one, as the other engines
                done.add(key)
                fields = {f: doc.field(f) for f in FIELDS}
                if key in present:
                    # The id may have been handed out again (IndexDoc.sha256); whoosh
                    # keeps no blob hash, so the new document always replaces the old.
                    writer.update_document(id=key, **fields)
                else:
                    writer.add_document(id=key, **fields)
                    added += 1
        except Exception:
            writer.cancel()
            raise
        writer.commit()
        return added

    def delete(self, ids: Iterable[int]) -> None:
        writer = self.ix.writer()
        for i in ids:
            writer.delete_by_term("id", str(i))
        writer.commit()

    def search(self, query: Node, *, scored: bool = True) -> dict[int, float]:
        q = whoosh_query(query)
        with self.ix.searcher() as s:
            hits = s.search(q, limit=None, scored=scored)
            return {int(hit["id"]): float(hit.score or 0.0) for hit in hits}

    def count(self) -> int:
        return int(self.ix.doc_count())

    def optimize(self) -> None:
        self.ix.optimize()

    def clear(self) -> None:
        self.ix.close()
        self.ix = windex.create_in(str(self.path), _schema())

    def close(self) -> None:
        self.ix.close()
