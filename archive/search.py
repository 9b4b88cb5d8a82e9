"""Run an archive query: metadata filters and full-text hits combined, snippets, audit.

The query tree (archive.query) is compiled into one SQL condition over the
messages table; each full-text sub-tree is answered by the index first and
enters the SQL as "blob id in (hits)".  Snippets are cut from the decrypted
message at query time through ``fetch(sha256) -> bytes``, so no message text is
stored for them.  Every search and view is audited: a row in the metadata
database, then each registered audit hook (the ledger).

Copies (archive.metadata.COPIES): a message the gateway changed is archived twice,
as received and as sent (or as received and decrypted).  An officer's result list
shows it once, as its readable copy (plaintext as received, or decrypted); the
other copy is named by ``linked_id`` in the row (``coffer show ID``) and listed with
``all_copies=True`` (``coffer search --all-copies``).  Holds, exports and dynamic
hold queries (:meth:`Searcher.message_ids`) take every copy: both are evidence.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from sqlalchemy import and_

from archive.errors import ArchiveError
from archive.extract import body_text
from archive.index import Index, tokenize
from archive.metadata import SECONDARY_COPIES, AuditEvent, Message, MessageSummary, Metadata
from archive.query import Node, Term, compile_query, fulltext_terms, parse, to_string

__all__ = [
    "AuditHook", "BlobReader", "Hit", "SearchResult", "Searcher", "audit", "make_snippet",
    "register_audit_hook", "unregister_audit_hook",
]


class BlobReader(Protocol):
    """The slice of the blob store that search needs: plaintext by SHA-256."""

    def get(self, sha256: str) -> bytes: ...


AuditHook = Callable[[AuditEvent], None]
_AUDIT_HOOKS: list[AuditHook] = []


def register_audit_hook(hook: AuditHook) -> None:
    """Called with every audit event after it is in the database (e.g. ledger append)."""
    _AUDIT_HOOKS.append(hook)


def unregister_audit_hook(hook: AuditHook) -> None:
    _AUDIT_HOOKS.remove(hook)


def audit(meta: Metadata, who: str, action: str, *, query: str | None = None,
          result_count: int | None = None, target: str | None = None,
          detail: dict[str, Any] | None = None, clock: Callable[[], datetime] | None = None,
          hooks: Collection[AuditHook] | None = None) -> AuditEvent:
    """Record who did what: database first, then the hooks (ledger)."""
    when = (clock or (lambda: datetime.now(UTC)))()
    event = meta.record_audit(who, action, when=when, query=query, result_count=result_count,
                              target=target, detail=detail)
    for hook in list(_AUDIT_HOOKS if hooks is None else hooks):
        hook(event)
    return event


@dataclass(frozen=True, slots=True)
class Hit:
    message: MessageSummary
    score: float
    snippet: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**self.message.to_json(), "score": round(self.score, 4),
                "snippet": self.snippet}


@dataclass(frozen=True, slots=True)
class SearchResult:
    query: str  # canonical form (archive.query.to_string)
    total: int
    hits: list[Hit]


class Searcher:
    def __init__(self, meta: Metadata, index: Index,
                 fetch: Callable[[str], bytes] | None = None) -> None:
        self.meta = meta
        self.index = index
        self.fetch = fetch

    def _fulltext(self, scores: dict[int, float], scored: bool
                  ) -> Callable[[Node], Collection[int]]:
        def resolve(node: Node) -> Collection[int]:
            hits = self.index.search(node, scored=scored)
            if scored:
                for k, v in hits.items():
                    scores[k] = scores.get(k, 0.0) + v
            return hits.keys()
        return resolve

    def condition(self, query: str | Node, *, scored: bool = False
                  ) -> tuple[Node, Any, dict[int, float]]:
        node = parse(query) if isinstance(query, str) else query
        scores: dict[int, float] = {}
        blobs = self.meta.approx_blobs()

        def ids_condition(column: Any, ids: Collection[int]) -> Any:
            # More than a fifth of the archive: walk by date rather than by id.
            return self.meta.ids_condition(column, ids, dense=len(ids) * 5 > blobs)

        cond = compile_query(node, self._fulltext(scores, scored), ids_condition,
                             self.meta.participant_ids)
        return node, cond, scores

    def search(self, query: str | Node, *, limit: int = 50, offset: int = 0,
               order: Literal["date", "relevance"] = "date",
               snippets: bool = True, all_copies: bool = False) -> SearchResult:
        node, cond, scores = self.condition(query, scored=order == "relevance")
        if not all_copies:
            cond = and_(cond, Message.copy.not_in(sorted(SECONDARY_COPIES)))
        if order == "relevance":
            matched = self.meta.matching_ids(cond)
            matched.sort(key=lambda r: -scores.get(r[1], 0.0))  # stable: newest first on ties
            total = len(matched)
            page = [m for m, _ in matched[offset:offset + limit]]
            rows = self.meta.summaries(ids=page)
        else:
            total = self.meta.count(cond)
            rows = self.meta.summaries(cond, limit=limit, offset=offset)
        terms = fulltext_terms(node)
        hits = [Hit(r, scores.get(r.blob_id, 0.0),
                    self._snippet(r.sha256, terms) if snippets else "") for r in rows]
        return SearchResult(to_string(node), total, hits)

    def message_ids(self, query: str | Node) -> list[int]:
        """Every matching archive id (for holds and exports), newest first, then the
        other copies of those messages (as sent, ciphertext) that did not match."""
        _, cond, _ = self.condition(query)
        return self.meta.with_linked([m for m, _ in self.meta.matching_ids(cond)])

    def _snippet(self, sha256: str, terms: list[Term]) -> str:
        if self.fetch is None:
            return ""
        try:
            raw = self.fetch(sha256)
        except ArchiveError:
            return ""
        return make_snippet(body_text(raw), terms)


def make_snippet(text: str, terms: list[Term], width: int = 160) -> str:
    """About ``width`` characters of ``text`` around the first query term, with the
    terms marked [like this]; the start of the text when no term occurs in it."""
    flat = re.sub(r"[\s\x00-\x1f\x7f-\x9f]+", " ", text).strip()
    words = {t for term in terms for t in tokenize(term.text)}
    prefixes = {tokenize(term.text)[-1] for term in terms if term.prefix and tokenize(term.text)}
    if not flat:
        return ""
    spans: list[tuple[int, int]] = []
    for m in re.finditer(r"[^\W_]+", flat):
        tok = tokenize(m.group())
        if tok and (tok[0] in words or any(tok[0].startswith(p) for p in prefixes)):
            spans.append(m.span())
    start = max(0, spans[0][0] - width // 3) if spans else 0
    end = min(len(flat), start + width)
    out: list[str] = []
    pos = start
    for a, b in spans:
        if a < start or b > end:
            continue
        out.append(flat[pos:a])
        out.append(f"[{flat[a:b]}]")
        pos = b
    out.append(flat[pos:end])
    snippet = "".join(out)
    return ("…" if start > 0 else "") + snippet + ("…" if end < len(flat) else "")
