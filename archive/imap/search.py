"""SEARCH evaluation (RFC 3501 §6.4.4), pure: keys over message metadata and raw bytes.

TEXT and BODY go to the backend's full-text hook when it has one (the archive's
index); otherwise, and for header keys, messages are parsed here.  String matching
is case-insensitive substring matching on decoded text (RFC 2047 encoded-words in
headers, transfer encodings and charsets in bodies), as Dovecot does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import quopri
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from email.utils import parsedate_to_datetime

from archive.imap.backend import MessageInfo
from archive.imap.parser import SearchKey, SeqSet
from archive.imap.render import ParsedMessage, Part

__all__ = ["SearchTarget", "evaluate", "text_keys"]

Loader = Callable[[int], ParsedMessage]  # uid -> parsed message


@dataclass(slots=True)
class SearchTarget:
    seq: int
    info: MessageInfo


def text_keys(key: SearchKey) -> Iterator[tuple[str, bool]]:
    """Every (string, body_only) of TEXT / BODY keys in the tree."""
    if key.op in ("TEXT", "BODY"):
        yield str(key.args[0]), key.op == "BODY"
    for a in key.args:
        if isinstance(a, SearchKey):
            yield from text_keys(a)


_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_EW_GAP = re.compile(rb"(\?=)[ \t\r\n]+(=\?)")


def _charset_decode(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset.split("*", 1)[0], "replace")
    except LookupError:  # unknown charset: keep what is readable, like Dovecot
        return data.decode("utf-8", "replace")


def _decode_header(value: bytes) -> str:
    """RFC 2047 encoded-words, leniently (bad padding, unknown charsets), as Dovecot."""
    value = _EW_GAP.sub(rb"\1\2", value)  # RFC 2047 §6.2: white space between words goes

    def word(m: re.Match[bytes]) -> bytes:
        charset = m.group(1).decode("ascii", "replace")
        text = m.group(3)
        if m.group(2) in b"bB":
            text = text.rstrip(b"=")
            try:
                raw = base64.b64decode(text + b"=" * (-len(text) % 4))
            except (binascii.Error, ValueError):
                return m.group(0)
        else:
            raw = quopri.decodestring(text.replace(b"_", b" "), header=True)
        return _charset_decode(raw, charset).encode("utf-8")

    return _ENCODED_WORD.sub(word, value).decode("utf-8", "replace")


def _decode_body(msg: ParsedMessage, part: Part) -> str:
    body = msg.data[part.bstart:part.end]
    value = part.header.get(b"content-transfer-encoding") or b"7bit"
    m = re.match(rb"\s*([^\s;()/]*)", value)
    cte = m.group(1).lower() if m else b""
    if cte == b"base64":
        with contextlib.suppress(binascii.Error, ValueError):
            body = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/]", b"", body) + b"==",
                                    validate=False)
    elif cte == b"quoted-printable":
        body = quopri.decodestring(body)
    elif cte not in (b"7bit", b"8bit", b"binary"):
        return ""  # Dovecot's message-decoder skips a body of unknown encoding
    charset = "us-ascii"
    for k, v in part.params:
        if k.lower() == b"charset":
            charset = v.decode("ascii", "replace")
    return _charset_decode(body, "utf-8" if charset.lower() == "us-ascii" else charset)


def _header_text(part: Part) -> str:
    return " ".join(f"{n.decode('latin-1')}: {_decode_header(raw.split(b':', 1)[-1])}"
                    for n, raw in part.header.fields)


def _body_texts(msg: ParsedMessage, part: Part, out: list[str]) -> None:
    """Every part's decoded text; a message/rfc822 part's headers count as its body."""
    if part.is_multipart:
        for child in part.children:
            _body_texts(msg, child, out)
    elif part.message is not None:
        out.append(_header_text(part.message))
        _body_texts(msg, part.message, out)
    else:
        out.append(_decode_body(msg, part))


def _fold(s: str) -> str:
    return " ".join(s.split()).casefold()


class _Evaluator:
    def __init__(self, targets: Sequence[SearchTarget], loader: Loader,
                 text_hits: dict[tuple[str, bool], set[int]]) -> None:
        self.max_seq = len(targets)
        self.max_uid = targets[-1].info.uid if targets else 0
        self.loader = loader
        self.text_hits = text_hits
        self._parsed: dict[int, ParsedMessage] = {}
        self._texts: dict[int, tuple[str, str]] = {}

    def parsed(self, uid: int) -> ParsedMessage:
        m = self._parsed.get(uid)
        if m is None:
            m = self._parsed[uid] = self.loader(uid)
        return m

    def header_text(self, uid: int, name: str) -> list[str]:
        h = self.parsed(uid).root.header
        return [_decode_header(v) for v in h.get_all(name.encode("ascii", "replace"))]

    def full_text(self, uid: int) -> tuple[str, str]:
        """(decoded header text, decoded body text), casefolded."""
        cached = self._texts.get(uid)
        if cached is not None:
            return cached
        m = self.parsed(uid)
        bodies: list[str] = []
        _body_texts(m, m.root, bodies)
        out = (_fold(_header_text(m.root)), _fold("\n".join(bodies)))
        self._texts[uid] = out
        return out

    def match(self, key: SearchKey, t: SearchTarget) -> bool:
        op = key.op
        info = t.info
        if op == "AND":
            return all(self.match(k, t) for k in key.args if isinstance(k, SearchKey))
        if op == "OR":
            a, b = key.args
            assert isinstance(a, SearchKey) and isinstance(b, SearchKey)
            return self.match(a, t) or self.match(b, t)
        if op == "NOT":
            (a,) = key.args
            assert isinstance(a, SearchKey)
            return not self.match(a, t)
        if op == "ALL":
            return True
        if op == "SEQ":
            s = key.args[0]
            assert isinstance(s, SeqSet)
            return s.contains(t.seq, self.max_seq)
        if op == "UID":
            s = key.args[0]
            assert isinstance(s, SeqSet)
            return s.contains(info.uid, self.max_uid)
        # System flags: \Answered, \Deleted, \Draft and \Recent are never set in a
        # read-only archive; \Seen and \Flagged are the user's private state.
        if op in ("SEEN", "FLAGGED"):
            return f"\\{op.capitalize()}" in info.flags
        if op in ("UNSEEN", "UNFLAGGED"):
            return f"\\{op[2:].capitalize()}" not in info.flags
        if op in ("ANSWERED", "DELETED", "DRAFT", "RECENT", "NEW", "KEYWORD"):
            return False
        if op in ("UNANSWERED", "UNDELETED", "UNDRAFT", "OLD", "UNKEYWORD"):
            return True
        if op in ("LARGER", "SMALLER"):
            n = key.args[0]
            assert isinstance(n, int)
            return info.size > n if op == "LARGER" else info.size < n
        if op in ("BEFORE", "ON", "SINCE"):
            d = key.args[0]
            assert isinstance(d, date)
            # RFC 3501 §6.4.4: internal date, disregarding time and timezone.
            return _cmp_date(op, info.internaldate.date(), d)
        if op in ("SENTBEFORE", "SENTON", "SENTSINCE"):
            d = key.args[0]
            assert isinstance(d, date)
            return _cmp_date(op[4:], self.sent_date(info.uid, info.internaldate.date()), d)
        if op in ("FROM", "TO", "CC", "BCC", "SUBJECT"):
            needle = _fold(str(key.args[0]))
            return any(needle in _fold(v) for v in self.header_text(info.uid, op.lower()))
        if op == "HEADER":
            name, value = key.args
            needle = _fold(str(value))
            values = self.header_text(info.uid, str(name))
            # RFC 3501: HEADER name "" matches every message that has the field.
            return bool(values) if not needle else any(needle in _fold(v) for v in values)
        if op in ("TEXT", "BODY"):
            q = str(key.args[0])
            body_only = op == "BODY"
            hits = self.text_hits.get((q, body_only))
            if hits is not None:
                return info.uid in hits
            needle = _fold(q)
            head, body = self.full_text(info.uid)
            return needle in body or (not body_only and needle in head)
        raise ValueError(f"unknown search key {op}")

    def sent_date(self, uid: int, internal: date) -> date:
        # Dovecot: a missing or unparsable Date: counts as the epoch (so SENTBEFORE
        # matches it), as do dates past 2037 (its parser's 32-bit range); a date
        # before 1970 gives way to the internal date.
        epoch = date(1970, 1, 1)
        h = self.parsed(uid).root.header.get(b"date")
        if h is None:
            return epoch
        try:
            d = parsedate_to_datetime(h.decode("ascii", "replace")).date()
        except (TypeError, ValueError, IndexError, OverflowError):
            return epoch
        if d < epoch:
            return internal
        return d if d.year <= 2037 else epoch


def _cmp_date(op: str, have: date, want: date) -> bool:
    if op == "BEFORE":
        return have < want
    if op == "ON":
        return have == want
    return have >= want  # SINCE


def evaluate(key: SearchKey, targets: Sequence[SearchTarget], loader: Loader,
             text_hits: dict[tuple[str, bool], set[int]] | None = None) -> list[SearchTarget]:
    """The targets matching *key*, in order.

    *text_hits* holds the UIDs the full-text index found for TEXT / BODY strings,
    keyed by (string, body_only); strings not in it are matched by scanning.
    """
    ev = _Evaluator(targets, loader, text_hits or {})
    return [t for t in targets if ev.match(key, t)]
