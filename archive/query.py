"""The one query language of the archive (CLI search, IMAP SEARCH, holds, reports, exports).

Grammar (``OR`` binds looser than ``AND``; juxtaposition is ``AND``)::

    query    := or_expr EOF
    or_expr  := and_expr ("OR" and_expr)*
    and_expr := unary (["AND"] unary)*
    unary    := ("NOT" | "-") unary | primary
    primary  := "(" or_expr ")" | FIELD ":" value | value
    value    := WORD | "quoted phrase"             (WORD* is a prefix search)

Fields::

    from: to: cc: bcc: participant:   address match: "a@b.example" exact, "@b.example"
                                      that domain, anything else a substring of the
                                      address or display name (bcc: is the envelope)
    subject: body: attachment:        full-text (attachment: text and names)
    filename:                         full-text over attachment names
    message-id:                       exact Message-ID (angle brackets optional)
    has:attachment
    date:2024-01..2024-06             YYYY, YYYY-MM or YYYY-MM-DD; "A..B", "A..", "..B"
    before:X / after:X                strictly before the start / from the end of period X
    size:>1M                          > >= < <= =, bare means >=; units K M G (1024)
    direction:inbound|outbound|internal|journal
    spf: dkim: dmarc:                 authentication verdict, e.g. spf:fail
    rule:NAME                         a policy rule that matched the message
    hold:CASE                         covered by the legal hold CASE

Bare words and phrases search every full-text field.  ``AND``, ``OR`` and ``NOT``
are operators only in upper case.  All dates are UTC.  A mistake raises
:class:`QueryError` with the 1-based column where it was found.

The parser is pure.  :func:`compile_query` turns the tree into a SQLAlchemy
condition over :class:`archive.metadata.Message`; full-text sub-trees are handed to
a resolver (the full-text index) that returns the matching blob ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from archive.errors import ArchiveError

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

__all__ = [
    "Address", "And", "DateRange", "Direction", "Has", "Hold", "MessageId", "Node", "Not",
    "Or", "QueryError", "Rule", "Size", "Term", "Verdict", "compile_query",
    "fulltext_terms", "is_fulltext", "parse", "split_and", "to_string",
]


class QueryError(ArchiveError):
    """A malformed query; ``column`` is 1-based."""

    def __init__(self, message: str, column: int, query: str = "") -> None:
        self.message = message
        self.column = column
        self.query = query
        super().__init__(f"query error at column {column}: {message}")

    def pointer(self) -> str:
        """The query with a caret under the column at fault, for terminals."""
        return f"{self.query}\n{' ' * (self.column - 1)}^"


# -- the tree ------------------------------------------------------------------

FullTextField = Literal["text", "subject", "body", "attachment", "filename"]


@dataclass(frozen=True, slots=True)
class Term:
    """A full-text match.  ``field`` "text" means any full-text field."""

    field: FullTextField
    text: str
    phrase: bool = False
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Address:
    role: Literal["from", "to", "cc", "bcc", "participant"]
    value: str


@dataclass(frozen=True, slots=True)
class DateRange:
    start: datetime | None  # inclusive
    end: datetime | None  # exclusive
    source: str = ""


@dataclass(frozen=True, slots=True)
class Size:
    op: Literal[">", ">=", "<", "<=", "="]
    value: int


@dataclass(frozen=True, slots=True)
class Has:
    what: Literal["attachment"]


@dataclass(frozen=True, slots=True)
class Direction:
    value: str


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: Literal["spf", "dkim", "dmarc"]
    result: str


@dataclass(frozen=True, slots=True)
class Rule:
    name: str


@dataclass(frozen=True, slots=True)
class Hold:
    case: str


@dataclass(frozen=True, slots=True)
class MessageId:
    value: str


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    item: Node


Node = (Term | Address | DateRange | Size | Has | Direction | Verdict | Rule | Hold
        | MessageId | And | Or | Not)

DIRECTIONS = frozenset({"inbound", "outbound", "internal", "journal"})
# RFC 8601 §2.7.1 (dkim), §2.7.2 (spf, RFC 7208 §2.6), §2.7.1 of RFC 7489 for dmarc.
VERDICTS: dict[str, frozenset[str]] = {
    "spf": frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror",
                      "policy"}),
    "dkim": frozenset({"pass", "fail", "neutral", "none", "policy", "temperror", "permerror"}),
    "dmarc": frozenset({"pass", "fail", "none", "temperror", "permerror", "bestguesspass"}),
}
_FIELDS = frozenset({
    "from", "to", "cc", "bcc", "participant", "subject", "body", "attachment", "filename",
    "message-id", "has", "date", "before", "after", "size", "direction", "spf", "dkim",
    "dmarc", "rule", "hold",
})


# -- tokens --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: Literal["(", ")", "AND", "OR", "NOT", "-", "word", "field", "end"]
    text: str
    column: int  # 1-based
    quoted: bool = False
    value_column: int = 0  # for "field": where the value starts


_FIELD_RE = re.compile(r"([A-Za-z][A-Za-z-]*):")


def _read_value(q: str, i: int) -> tuple[str, bool, int]:
    """Read a bare word or a quoted string at ``i``; return (text, quoted, next index)."""
    if i < len(q) and q[i] == '"':
        out: list[str] = []
        j = i + 1
        while j < len(q):
            ch = q[j]
            if ch == "\\" and j + 1 < len(q):
                out.append(q[j + 1])
                j += 2
                continue
            if ch == '"':
                return "".join(out), True, j + 1
            out.append(ch)
            j += 1
        raise QueryError("unterminated quoted phrase", i + 1, q)
    j = i
    while j < len(q) and not q[j].isspace() and q[j] not in '()"':
        j += 1
    return q[i:j], False, j


def _tokens(q: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i = 0
    while i < len(q):
        ch = q[i]
        if ch.isspace():
            i += 1
            continue
        if ch in "()":
            toks.append(_Tok(ch, ch, i + 1))  # type: ignore[arg-type]
            i += 1
            continue
        if ch == "-" and i + 1 < len(q) and not q[i + 1].isspace() and (
            not toks or toks[-1].kind in ("(", "AND", "OR", "NOT", "-", "word", "field", ")")
        ):
            toks.append(_Tok("-", "-", i + 1))
            i += 1
            continue
        m = _FIELD_RE.match(q, i)
        if m and ch != '"':
            name = m.group(1).lower()
            if name not in _FIELDS:
                raise QueryError(f"unknown field {m.group(1)!r}:", i + 1, q)
            start = m.end()
            if start >= len(q) or q[start].isspace() or q[start] in "()":
                raise QueryError(f"{name}: needs a value", start + 1, q)
            text, quoted, j = _read_value(q, start)
            toks.append(_Tok("field", name, i + 1, quoted, start + 1))
            toks.append(_Tok("word", text, start + 1, quoted))
            i = j
            continue
        text, quoted, j = _read_value(q, i)
        if not quoted and text in ("AND", "OR", "NOT"):
            toks.append(_Tok(text, text, i + 1))  # type: ignore[arg-type]
        else:
            toks.append(_Tok("word", text, i + 1, quoted))
        i = j
    toks.append(_Tok("end", "", len(q) + 1))
    return toks


# -- parser --------------------------------------------------------------------


def parse(query: str) -> Node:
    """Parse ``query`` into a tree; raise :class:`QueryError` pointing at the mistake."""
    toks = _tokens(query)
    if toks[0].kind == "end":
        raise QueryError("empty query", 1, query)
    p = _Parser(query, toks)
    node = p.or_expr()
    tok = p.peek()
    if tok.kind == ")":
        raise QueryError("unbalanced ')'", tok.column, query)
    if tok.kind != "end":  # pragma: no cover - every other token starts a unary
        raise QueryError(f"unexpected {tok.text!r}", tok.column, query)
    return node


class _Parser:
    def __init__(self, query: str, toks: list[_Tok]) -> None:
        self.q = query
        self.toks = toks
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def error(self, message: str, column: int) -> QueryError:
        return QueryError(message, column, self.q)

    def or_expr(self) -> Node:
        items = [self.and_expr()]
        while self.peek().kind == "OR":
            self.take()
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def and_expr(self) -> Node:
        items = [self.unary()]
        while True:
            tok = self.peek()
            if tok.kind == "AND":
                self.take()
                items.append(self.unary())
            elif tok.kind in ("(", "NOT", "-", "word", "field"):
                items.append(self.unary())
            else:
                break
        return items[0] if len(items) == 1 else And(tuple(items))

    def unary(self) -> Node:
        tok = self.peek()
        if tok.kind in ("NOT", "-"):
            self.take()
            return Not(self.unary())
        return self.primary()

    def primary(self) -> Node:
        tok = self.take()
        if tok.kind == "(":
            node = self.or_expr()
            close = self.take()
            if close.kind != ")":
                raise self.error("'(' is never closed", tok.column)
            return node
        if tok.kind == "field":
            value = self.take()
            return self.field(tok.text, value.text, value.quoted, value.column)
        if tok.kind == "word":
            return self.word("text", tok.text, tok.quoted, tok.column)
        if tok.kind == "end":
            raise self.error("expected a search term", tok.column)
        if tok.kind == ")":
            raise self.error("expected a search term before ')'", tok.column)
        raise self.error(f"expected a search term, found {tok.text}", tok.column)

    def word(self, field: FullTextField, text: str, quoted: bool, column: int) -> Node:
        prefix = not quoted and text.endswith("*") and len(text) > 1
        if prefix:
            text = text[:-1]
        if not re.search(r"[^\W_]", text):
            raise self.error("nothing searchable in this term", column)
        return Term(field, text, phrase=quoted, prefix=prefix)

    def field(self, name: str, value: str, quoted: bool, column: int) -> Node:
        lower = value.lower()
        if name in ("subject", "body", "attachment", "filename"):
            return self.word(name, value, quoted, column)  # type: ignore[arg-type]
        if name in ("from", "to", "cc", "bcc", "participant"):
            if not value.strip():
                raise self.error(f"{name}: needs an address", column)
            return Address(name, lower.strip())  # type: ignore[arg-type]
        if name == "message-id":
            return MessageId(value.strip().removeprefix("<").removesuffix(">"))
        if name == "has":
            if lower in ("attachment", "attachments"):
                return Has("attachment")
            raise self.error(f"has: knows only 'attachment', not {value!r}", column)
        if name == "date":
            return self._date_range(value, column)
        if name in ("before", "after"):
            start, end = self._period(value, column)
            if name == "before":
                return DateRange(None, start, f"before:{value}")
            return DateRange(end, None, f"after:{value}")
        if name == "size":
            return self._size(value, column)
        if name == "direction":
            if lower not in DIRECTIONS:
                raise self.error(
                    f"direction: is one of {', '.join(sorted(DIRECTIONS))}, not {value!r}", column)
            return Direction(lower)
        if name in VERDICTS:
            if lower not in VERDICTS[name]:
                raise self.error(
                    f"{name}: is one of {', '.join(sorted(VERDICTS[name]))}, not {value!r}",
                    column)
            return Verdict(name, lower)  # type: ignore[arg-type]
        if name == "rule":
            return Rule(value)
        if name == "hold":
            return Hold(value)
        raise self.error(f"unknown field {name!r}", column)  # pragma: no cover

    def _period(self, text: str, column: int) -> tuple[datetime, datetime]:
        m = re.fullmatch(r"(\d{4})(?:-(\d{1,2})(?:-(\d{1,2}))?)?", text)
        if not m:
            raise self.error(f"expected a date YYYY, YYYY-MM or YYYY-MM-DD, not {text!r}",
                             column)
        year = int(m.group(1))
        month = int(m.group(2) or 1)
        day = int(m.group(3) or 1)
        try:
            start = datetime(year, month, day, tzinfo=UTC)
        except ValueError as exc:
            raise self.error(f"{text!r} is not a date ({exc})", column) from None
        if m.group(3):
            end = datetime.fromordinal(start.toordinal() + 1).replace(tzinfo=UTC)
        elif m.group(2):
            end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        else:
            end = datetime(year + 1, 1, 1, tzinfo=UTC)
        return start, end

    def _date_range(self, value: str, column: int) -> DateRange:
        if ".." not in value:
            first, last = self._period(value, column)
            return DateRange(first, last, f"date:{value}")
        left, _, right = value.partition("..")
        if not left and not right:
            raise self.error("date: range needs at least one end", column)
        start: datetime | None = self._period(left, column)[0] if left else None
        end: datetime | None = (self._period(right, column + len(left) + 2)[1] if right
                                else None)
        if start and end and start >= end:
            raise self.error("date: range ends before it starts", column)
        return DateRange(start, end, f"date:{value}")

    def _size(self, value: str, column: int) -> Size:
        m = re.fullmatch(r"(>=|<=|>|<|=)?(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?", value)
        if not m:
            raise self.error(f"expected a size like >1M, <=500K or 2048, not {value!r}", column)
        mult = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(3).lower()]
        op = m.group(1) or ">="
        return Size(op, int(float(m.group(2)) * mult))  # type: ignore[arg-type]


# -- helpers over trees ----------------------------------------------------------------


def is_fulltext(node: Node) -> bool:
    """True when the whole sub-tree can be answered by the full-text index alone.

    Full-text trees are Terms combined by Or and And, where an And may also hold
    negated full-text trees ("a AND NOT b") as long as it holds a positive one:
    an index can subtract from a set it found, not list everything else.
    """
    if isinstance(node, Term):
        return True
    if isinstance(node, Or):
        return all(is_fulltext(n) for n in node.items)
    if isinstance(node, And):
        positive = [n for n in node.items if not isinstance(n, Not)]
        negative = [n.item for n in node.items if isinstance(n, Not)]
        return bool(positive) and all(is_fulltext(n) for n in positive + negative)
    return False


def split_and(node: And) -> tuple[list[Node], list[Node]]:
    """The positive items of a full-text And, and the items under its NOTs."""
    return ([n for n in node.items if not isinstance(n, Not)],
            [n.item for n in node.items if isinstance(n, Not)])


def fulltext_terms(node: Node) -> list[Term]:
    """The positive full-text terms (not under a NOT), e.g. to highlight snippets."""
    if isinstance(node, Term):
        return [node]
    if isinstance(node, And | Or):
        return [t for n in node.items for t in fulltext_terms(n)]
    return []


def _quote(text: str) -> str:
    if text and re.fullmatch(r"[^\s()\"]+", text) and text not in ("AND", "OR", "NOT"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_string(node: Node) -> str:
    """A canonical query string that parses back to the same tree."""
    if isinstance(node, Term):
        value = '"' + node.text.replace("\\", "\\\\").replace('"', '\\"') + '"' if (
            node.phrase) else _quote(node.text) + ("*" if node.prefix else "")
        return value if node.field == "text" else f"{node.field}:{value}"
    if isinstance(node, Address):
        return f"{node.role}:{_quote(node.value)}"
    if isinstance(node, MessageId):
        return f"message-id:{_quote(node.value)}"
    if isinstance(node, Has):
        return f"has:{node.what}"
    if isinstance(node, DateRange):
        return node.source
    if isinstance(node, Size):
        return f"size:{node.op}{node.value}"
    if isinstance(node, Direction):
        return f"direction:{node.value}"
    if isinstance(node, Verdict):
        return f"{node.kind}:{node.result}"
    if isinstance(node, Rule):
        return f"rule:{_quote(node.name)}"
    if isinstance(node, Hold):
        return f"hold:{_quote(node.case)}"
    if isinstance(node, Not):
        return f"NOT {_paren(node.item)}"
    if isinstance(node, And):
        return " AND ".join(_paren(n) for n in node.items)
    return " OR ".join(_paren(n) for n in node.items)


def _paren(node: Node) -> str:
    return f"({to_string(node)})" if isinstance(node, And | Or) else to_string(node)


# -- compiler to SQL -------------------------------------------------------------

FullTextResolver = Callable[[Node], Collection[int]]
IdsCondition = Callable[[Any, Collection[int]], "ColumnElement[bool]"]
ParticipantResolver = Callable[[Collection[str], str], Collection[int]]

_ROLES: dict[str, tuple[str, ...]] = {
    "from": ("from",), "to": ("to",), "cc": ("cc",), "bcc": ("bcc",),
    "participant": ("from", "sender", "reply_to", "to", "cc", "bcc", "envelope_from",
                    "envelope_to"),
}


def compile_query(node: Node, fulltext: FullTextResolver, ids_condition: IdsCondition,
                  participants: ParticipantResolver | None = None
                  ) -> ColumnElement[bool]:
    """A SQLAlchemy condition over ``archive.metadata.Message`` equivalent to ``node``.

    Each maximal full-text sub-tree goes to ``fulltext`` once (it returns the
    matching blob ids); ``ids_condition(column, ids)`` renders "column in ids" for
    the backend (see :meth:`archive.metadata.Metadata.ids_condition`).  Address
    terms go to ``participants`` (message ids) when given, so a substring scan runs
    once rather than in both the count and the page query; otherwise they become
    sub-queries.  Every condition is NULL-free, so NOT means "everything else".
    """
    from sqlalchemy import and_, not_, or_, select

    from archive import metadata as m

    def go(n: Node) -> ColumnElement[bool]:
        if is_fulltext(n):
            return ids_condition(m.Message.blob_id, fulltext(n))
        if isinstance(n, And | Or):
            text = [i for i in n.items if is_fulltext(i)]
            if isinstance(n, And) and text:  # "a NOT b": the index subtracts b itself
                text += [i for i in n.items if isinstance(i, Not) and is_fulltext(i.item)]
            rest = [go(i) for i in n.items if not any(i is t for t in text)]
            if text:  # one index query for all the full-text siblings
                merged = text[0] if len(text) == 1 else type(n)(tuple(text))
                rest.insert(0, ids_condition(m.Message.blob_id, fulltext(merged)))
            return and_(*rest) if isinstance(n, And) else or_(*rest)
        if isinstance(n, Not):
            return not_(go(n.item))
        if isinstance(n, Address):
            if participants is not None:
                return ids_condition(m.Message.id, participants(_ROLES[n.role], n.value))
            return m.address_condition(_ROLES[n.role], n.value)
        if isinstance(n, MessageId):
            return m.Message.message_id == n.value
        if isinstance(n, DateRange):
            parts = []
            if n.start is not None:
                parts.append(m.Message.date >= n.start)
            if n.end is not None:
                parts.append(m.Message.date < n.end)
            return and_(*parts)
        if isinstance(n, Size):
            col = m.Message.size
            return {">": col > n.value, ">=": col >= n.value, "<": col < n.value,
                    "<=": col <= n.value, "=": col == n.value}[n.op]
        if isinstance(n, Has):
            return m.Message.attachment_count > 0
        if isinstance(n, Direction):
            return m.Message.direction == n.value
        if isinstance(n, Verdict):
            return {"spf": m.Message.spf, "dkim": m.Message.dkim,
                    "dmarc": m.Message.dmarc}[n.kind] == n.result
        if isinstance(n, Rule):
            return m.Message.id.in_(select(m.RuleHit.message_pk).where(m.RuleHit.rule == n.name))
        if isinstance(n, Hold):
            return m.Message.id.in_(
                select(m.HoldItem.message_pk).join(m.Hold, m.Hold.id == m.HoldItem.hold_id)
                .where(m.Hold.case == n.case))
        raise TypeError(f"not a query node: {n!r}")  # pragma: no cover

    return go(node)
