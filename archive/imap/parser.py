"""IMAP4rev1 command parser (RFC 3501 §9 grammar), pure: bytes in, a :class:`Command` out.

The server hands over one complete command: the command line with every literal
inlined (``{n}\\r\\n`` or LITERAL+ ``{n+}\\r\\n`` followed by exactly *n* octets), the
final CRLF included or not.  Anything that does not match the grammar raises
:class:`ParseError`, which the server answers ``BAD`` with the reason while the
session continues.  Sizes are bounded (literal, nesting depth, list length) so a
hostile client cannot make the parser allocate or recurse without limit.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import date
from typing import Literal

from archive.imap.errors import ParseError

__all__ = [
    "Command",
    "FetchAtt",
    "ParseError",
    "SearchKey",
    "Section",
    "SeqSet",
    "parse_command",
    "parse_seqset",
]

MAX_DEPTH = 32  # nested parentheses in SEARCH / lists
MAX_ITEMS = 1000  # items in one list (fetch attributes, search keys, ID fields)
MAX_LITERAL = 64 * 1024 * 1024

# RFC 3501 §9: atom-specials are ( ) { SP CTL % * " \ ]
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x20)) | {0x7F}
_TAG_RE = re.compile(rb"[\x21-\x7e]+")
_DIGITS_RE = re.compile(rb"[0-9]+")
_LITERAL_RE = re.compile(rb"\{(\d{1,12})(\+?)\}\r\n")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun",
           "jul", "aug", "sep", "oct", "nov", "dec")


# -- results ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeqSet:
    """A sequence set; ``None`` as a bound stands for ``*`` (RFC 3501 §9 seq-number)."""

    ranges: tuple[tuple[int | None, int | None], ...]

    def contains(self, n: int, star: int) -> bool:
        """Whether *n* is in the set when ``*`` is *star* (the largest number in use).

        RFC 3501 §6.4.8: a range ``a:b`` means the same as ``b:a``, and ``559:*``
        always includes the last message even when it is below 559.
        """
        for lo, hi in self.ranges:
            a = star if lo is None else lo
            b = star if hi is None else hi
            if a > b:
                a, b = b, a
            if a <= n <= b:
                return True
        return False

    def __str__(self) -> str:
        def one(v: int | None) -> str:
            return "*" if v is None else str(v)
        return ",".join(one(lo) if lo == hi else f"{one(lo)}:{one(hi)}"
                        for lo, hi in self.ranges)


@dataclass(frozen=True, slots=True)
class Section:
    """``BODY[section]``: a part path, then HEADER / HEADER.FIELDS[.NOT] / TEXT / MIME / ''."""

    part: tuple[int, ...] = ()
    text: str = ""  # "", "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"
    fields: tuple[str, ...] = ()  # as the client wrote them (echoed back)

    def spec(self) -> str:
        """The section as it is echoed in the FETCH response."""
        out = ".".join(str(p) for p in self.part)
        if self.text:
            out = f"{out}.{self.text}" if out else self.text
        if self.text.startswith("HEADER.FIELDS"):
            out += " (" + " ".join(self.fields) + ")"
        return out


@dataclass(frozen=True, slots=True)
class FetchAtt:
    """One FETCH data item (RFC 3501 §6.4.5); ``section`` only for BODY[...] / BINARY."""

    name: str  # FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODY BODYSTRUCTURE UID RFC822
    # RFC822.HEADER RFC822.TEXT BODY[] (name "BODY[]" for any section form)
    section: Section | None = None
    peek: bool = False
    partial: tuple[int, int] | None = None  # (origin, count)


@dataclass(frozen=True, slots=True)
class SearchKey:
    """A SEARCH key (RFC 3501 §6.4.4): ``op`` upper-case, ``args`` per key.

    AND carries a tuple of SearchKey, OR two, NOT one; SEQ/UID carry a SeqSet;
    date keys a ``datetime.date``; LARGER/SMALLER an int; HEADER (name, value);
    string keys one ``str``.
    """

    op: str
    args: tuple[object, ...] = ()


@dataclass(slots=True)
class Command:
    tag: str
    name: str  # upper case; for UID commands "UID FETCH" etc.
    uid: bool = False
    # One generic bag, filled per command (see parse_command's table).
    mailbox: str = ""
    args: list[object] = field(default_factory=list)
    seqset: SeqSet | None = None
    fetch: list[FetchAtt] = field(default_factory=list)
    fetch_macro: bool = False
    search: SearchKey | None = None
    charset: str | None = None
    store_mode: Literal["", "+", "-"] = ""
    store_silent: bool = False
    flags: list[str] = field(default_factory=list)
    status_items: list[str] = field(default_factory=list)


# -- the reader -----------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        if data.endswith(b"\r\n"):
            data = data[:-2]
        self.data = data
        self.pos = 0

    def error(self, reason: str) -> ParseError:
        return ParseError(reason)

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def peek(self) -> int:
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def expect(self, ch: bytes, what: str) -> None:
        if self.data[self.pos:self.pos + len(ch)] != ch:
            raise self.error(f"expected {what}")
        self.pos += len(ch)

    def sp(self) -> None:
        if self.peek() != 0x20:
            raise self.error("expected a space")
        self.pos += 1

    def end(self) -> None:
        if not self.at_end():
            raise self.error("unexpected characters at end of command")

    def atom(self, extra: frozenset[int] = frozenset()) -> bytes:
        start = self.pos
        data = self.data
        while self.pos < len(data) and (data[self.pos] not in _ATOM_SPECIALS
                                        or data[self.pos] in extra):
            self.pos += 1
        if self.pos == start:
            raise self.error("expected an atom")
        return data[start:self.pos]

    def _quoted(self) -> bytes:
        self.pos += 1  # opening DQUOTE
        out = bytearray()
        data = self.data
        while True:
            if self.pos >= len(data):
                raise self.error("unterminated quoted string")
            c = data[self.pos]
            if c == 0x22:
                self.pos += 1
                return bytes(out)
            if c == 0x5C:  # RFC 3501 §4.3: only \" and \\ are escapes
                self.pos += 1
                if self.pos >= len(data) or data[self.pos] not in (0x22, 0x5C):
                    raise self.error("bad escape in quoted string")
                c = data[self.pos]
            elif c in (0x0D, 0x0A, 0x00):
                raise self.error("CR, LF or NUL in quoted string")
            out.append(c)
            self.pos += 1

    def _literal(self) -> bytes:
        m = _LITERAL_RE.match(self.data, self.pos)
        if not m:
            raise self.error("malformed literal")
        n = int(m.group(1))
        if n > MAX_LITERAL:
            raise self.error("literal too large")
        start = m.end()
        if start + n > len(self.data):
            raise self.error("literal shorter than announced")
        self.pos = start + n
        return self.data[start:self.pos]

    def string(self) -> bytes:
        c = self.peek()
        if c == 0x22:
            return self._quoted()
        if c == 0x7B:
            return self._literal()
        raise self.error("expected a string")

    def astring(self) -> bytes:
        c = self.peek()
        if c in (0x22, 0x7B):
            return self.string()
        # RFC 3501 §9: ASTRING-CHAR includes resp-specials "]"
        return self.atom(extra=frozenset(b"]"))

    def nstring_or_nil(self) -> bytes | None:
        if self.peek() in (0x22, 0x7B):
            return self.string()
        a = self.atom()
        if a.upper() != b"NIL":
            raise self.error("expected a string or NIL")
        return None

    def mailbox(self) -> str:
        raw = self.list_mailbox() if self.peek() not in (0x22, 0x7B) else self.string()
        name = _decode_mailbox(raw, self)
        # RFC 3501 §5.1: INBOX is case-insensitive.
        return "INBOX" if name.upper() == "INBOX" else name

    def list_mailbox(self) -> bytes:
        c = self.peek()
        if c in (0x22, 0x7B):
            return self.string()
        # list-char = ATOM-CHAR / list-wildcards / resp-specials
        return self.atom(extra=frozenset(b"%*]"))

    def number(self) -> int:
        # One regex match, not a peek per digit: every pipelined FETCH has a number.
        m = _DIGITS_RE.match(self.data, self.pos)
        if m is None:
            raise self.error("expected a number")
        start, self.pos = m.span()
        if self.pos - start > 10:
            raise self.error("number too large")
        v = int(m.group())
        if v > 0xFFFFFFFF:
            raise self.error("number too large")
        return v

    def nz_number(self) -> int:
        v = self.number()
        if v == 0:
            raise self.error("zero is not a valid message number")
        return v

    def seqset(self) -> SeqSet:
        ranges: list[tuple[int | None, int | None]] = []
        while True:
            lo = self._seq_number()
            hi = lo
            if self.peek() == 0x3A:  # ':'
                self.pos += 1
                hi = self._seq_number()
            ranges.append((lo, hi))
            if len(ranges) > 100_000:
                raise self.error("sequence set too long")
            if self.peek() != 0x2C:
                break
            self.pos += 1
        return SeqSet(tuple(ranges))

    def _seq_number(self) -> int | None:
        if self.peek() == 0x2A:
            self.pos += 1
            return None
        return self.nz_number()

    def paren_list(self, item: str = "atom") -> list[bytes]:
        self.expect(b"(", "(")
        out: list[bytes] = []
        while self.peek() != 0x29:
            if out:
                self.sp()
            if item == "astring":
                out.append(self.astring())
            elif item == "flag":
                out.append(self.flag())
            else:
                out.append(self.atom())
            if len(out) > MAX_ITEMS:
                raise self.error("list too long")
        self.pos += 1
        return out

    def flag(self) -> bytes:
        if self.peek() == 0x5C:  # '\' system flag
            self.pos += 1
            return b"\\" + self.atom()
        return self.atom()


def _decode_mailbox(raw: bytes, r: _Reader) -> str:
    # RFC 3501 §5.1.3: mailbox names are modified UTF-7; we accept UTF-8 too
    # (RFC 6855 semantics) as Dovecot does for 8-bit names.
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise r.error("mailbox name is not valid UTF-8") from None
    return decode_mutf7(text) if "&" in text else text


def decode_mutf7(text: str) -> str:
    """RFC 3501 §5.1.3 modified UTF-7 to str (invalid sequences are left as they are)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c != "&":
            out.append(c)
            i += 1
            continue
        j = text.find("-", i)
        if j < 0:
            out.append(text[i:])
            break
        chunk = text[i + 1:j]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            b64 += "=" * (-len(b64) % 4)
            try:
                out.append(base64.b64decode(b64).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                out.append(text[i:j + 1])
        i = j + 1
    return "".join(out)


def encode_mutf7(text: str) -> str:
    """str to RFC 3501 §5.1.3 modified UTF-7, for mailbox names in LIST/STATUS responses."""
    out: list[str] = []
    buf: list[str] = []

    def flush() -> None:
        if buf:
            b = base64.b64encode("".join(buf).encode("utf-16-be")).decode().rstrip("=")
            out.append("&" + b.replace("/", ",") + "-")
            buf.clear()

    for c in text:
        if 0x20 <= ord(c) <= 0x7E:
            flush()
            out.append("&-" if c == "&" else c)
        else:
            buf.append(c)
    flush()
    return "".join(out)


def parse_seqset(text: str) -> SeqSet:
    r = _Reader(text.encode())
    s = r.seqset()
    r.end()
    return s


# -- commands -------------------------------------------------------------------------

_NO_ARGS = frozenset({
    "CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK", "CLOSE", "UNSELECT", "EXPUNGE",
    "IDLE", "NAMESPACE",
})
_MAILBOX_ONLY = frozenset({"SELECT", "EXAMINE", "CREATE", "DELETE", "SUBSCRIBE",
                           "UNSUBSCRIBE"})


def parse_command(data: bytes) -> Command:
    """Parse one complete command (literals inlined).  Raises :class:`ParseError`."""
    fast = _fast_fetch(data)
    if fast is not None:
        return fast
    r = _Reader(data)
    m = _TAG_RE.match(r.data)
    if not m:
        raise ParseError("missing tag")
    tag_b = m.group(0)
    if any(c in b"(){%*\"\\+" for c in tag_b):
        raise ParseError("invalid tag")
    tag = tag_b.decode("ascii")
    r.pos = m.end()
    try:
        r.sp()
        name = r.atom().decode("ascii").upper()
        cmd = Command(tag=tag, name=name)
        if name == "UID":
            r.sp()
            sub = r.atom().decode("ascii").upper()
            if sub not in ("FETCH", "SEARCH", "STORE", "COPY", "MOVE", "EXPUNGE"):
                raise ParseError(f"unknown UID command {sub}")
            cmd.name = sub
            cmd.uid = True
        _parse_args(r, cmd)
        r.end()
    except ParseError as exc:
        exc.tag = tag
        raise
    return cmd


def _parse_args(r: _Reader, cmd: Command) -> None:
    name = cmd.name
    if name in _NO_ARGS:
        return
    if name in _MAILBOX_ONLY:
        r.sp()
        cmd.mailbox = r.mailbox()
        if name in ("SELECT", "EXAMINE") and r.peek() == 0x20:
            # RFC 4466 select-params (e.g. CONDSTORE): we announce none of them.
            raise ParseError("SELECT parameters are not supported")
        return
    if name == "LOGIN":
        r.sp()
        user = r.astring()
        r.sp()
        pw = r.astring()
        cmd.args = [user, pw]
        return
    if name == "AUTHENTICATE":
        r.sp()
        mech = r.atom().decode("ascii").upper()
        cmd.args = [mech]
        if r.peek() == 0x20:  # RFC 4959 SASL-IR initial response
            r.pos += 1
            cmd.args.append(r.atom(extra=frozenset(b"=")))
        return
    if name in ("LIST", "LSUB"):
        r.sp()
        ref = r.mailbox()
        r.sp()
        pattern = r.list_mailbox()
        cmd.args = [ref, _decode_mailbox(pattern, r)]
        return
    if name == "RENAME":
        r.sp()
        a = r.mailbox()
        r.sp()
        b = r.mailbox()
        cmd.args = [a, b]
        return
    if name == "STATUS":
        r.sp()
        cmd.mailbox = r.mailbox()
        r.sp()
        items = [i.decode("ascii").upper() for i in r.paren_list()]
        for i in items:
            if i not in ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN"):
                raise ParseError(f"unknown STATUS item {i}")
        if not items:
            raise ParseError("empty STATUS item list")
        cmd.status_items = items
        return
    if name == "APPEND":
        # Only the mailbox matters: we refuse APPEND (the archive is immutable).
        r.sp()
        cmd.mailbox = r.mailbox()
        r.pos = len(r.data)
        return
    if name == "ENABLE":
        caps: list[object] = []
        while r.peek() == 0x20:
            r.pos += 1
            caps.append(r.atom().decode("ascii").upper())
        if not caps:
            raise ParseError("ENABLE needs at least one capability")
        cmd.args = caps
        return
    if name == "ID":
        r.sp()
        if r.peek() == 0x28:
            r.pos += 1
            fields: list[object] = []
            while r.peek() != 0x29:
                if fields:
                    r.sp()
                k = r.string()
                r.sp()
                v = r.nstring_or_nil()
                fields.append((k, v))
                if len(fields) > 30:  # RFC 2971 §3.3: at most 30 field-value pairs
                    raise ParseError("too many ID fields")
            r.pos += 1
            cmd.args = fields
        else:
            r.nstring_or_nil()
        return
    if name == "FETCH":
        r.sp()
        cmd.seqset = r.seqset()
        r.sp()
        cmd.fetch, cmd.fetch_macro = _cached_fetch_atts(r)
        return
    if name == "STORE":
        r.sp()
        cmd.seqset = r.seqset()
        r.sp()
        item = r.atom().decode("ascii").upper()
        mode: Literal["", "+", "-"] = ""
        if item[:1] in ("+", "-"):
            mode = "+" if item[0] == "+" else "-"
            item = item[1:]
        if item not in ("FLAGS", "FLAGS.SILENT"):
            raise ParseError(f"unknown STORE item {item}")
        cmd.store_mode = mode
        cmd.store_silent = item.endswith(".SILENT")
        r.sp()
        if r.peek() == 0x28:
            flags = r.paren_list("flag")
        else:
            flags = [r.flag()]
            while r.peek() == 0x20:
                r.pos += 1
                flags.append(r.flag())
        cmd.flags = [f.decode("ascii", "replace") for f in flags]
        return
    if name in ("COPY", "MOVE"):
        r.sp()
        cmd.seqset = r.seqset()
        r.sp()
        cmd.mailbox = r.mailbox()
        return
    if name == "SEARCH":
        _search(r, cmd)
        return
    raise ParseError(f"unknown command {name}")


# -- FETCH ----------------------------------------------------------------------------

_SIMPLE_ATTS = frozenset({
    "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "UID",
    "RFC822", "RFC822.HEADER", "RFC822.TEXT", "BODY",
})
# RFC 3501 §6.4.5 macros.
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}


# Parsed attribute lists by their text: a client pipelining one FETCH per message
# (mbsync) sends the same few lists thousands of times.  FetchAtt is frozen, so the
# cached items are shared; each command gets its own list.
_FETCH_ATTS_CACHE: dict[bytes, tuple[tuple[FetchAtt, ...], bool]] = {}
_FETCH_ATTS_CACHE_SIZE = 256


def _cached_fetch_atts(r: _Reader) -> tuple[list[FetchAtt], bool]:
    text = r.data[r.pos:]
    hit = _FETCH_ATTS_CACHE.get(text)
    if hit is not None:
        r.pos = len(r.data)
        return list(hit[0]), hit[1]
    atts, macro = _fetch_atts(r)
    if r.at_end() and len(text) <= 1024:  # only a whole, valid rest of the command
        if len(_FETCH_ATTS_CACHE) >= _FETCH_ATTS_CACHE_SIZE:
            _FETCH_ATTS_CACHE.clear()
        _FETCH_ATTS_CACHE[text] = (tuple(atts), macro)
    return atts, macro


# The shape mbsync pipelines once per message: a plain tag, one message number or
# range (nonzero, nine digits at most: always valid), and an attribute list parsed
# before.  Anything else takes the full parser, which gives the same result.
_FAST_FETCH_RE = re.compile(
    rb"([A-Za-z0-9.]{1,64}) (UID )?FETCH ([1-9][0-9]{0,8})(?::([1-9][0-9]{0,8}))? "
    rb"([^\r\n]+)(?:\r\n)?\Z", re.IGNORECASE)


def _fast_fetch(data: bytes) -> Command | None:
    m = _FAST_FETCH_RE.match(data)
    if m is None:
        return None
    hit = _FETCH_ATTS_CACHE.get(m.group(5))
    if hit is None:
        return None
    lo = int(m.group(3))
    hi = lo if m.group(4) is None else int(m.group(4))
    return Command(tag=m.group(1).decode("ascii"), name="FETCH", uid=m.group(2) is not None,
                   seqset=SeqSet(((lo, hi),)), fetch=list(hit[0]), fetch_macro=hit[1])


def _fetch_atts(r: _Reader) -> tuple[list[FetchAtt], bool]:
    if r.peek() == 0x28:
        r.pos += 1
        out: list[FetchAtt] = []
        while r.peek() != 0x29:
            if out:
                r.sp()
            out.append(_fetch_att(r))
            if len(out) > MAX_ITEMS:
                raise ParseError("too many FETCH attributes")
        r.pos += 1
        if not out:
            raise ParseError("empty FETCH attribute list")
        return out, False
    save = r.pos
    head = r.atom().decode("ascii", "replace").upper()
    if head in _MACROS:
        return [FetchAtt(n) for n in _MACROS[head]], True
    r.pos = save
    return [_fetch_att(r)], False


def _fetch_att(r: _Reader) -> FetchAtt:
    # The atom stops at '[' only because we split it ourselves.
    start = r.pos
    data = r.data
    while r.pos < len(data) and data[r.pos] not in _ATOM_SPECIALS and data[r.pos] != 0x5B:
        r.pos += 1
    name = data[start:r.pos].decode("ascii", "replace").upper()
    if not name:
        raise ParseError("expected a FETCH attribute")
    if r.peek() != 0x5B:
        if name in _SIMPLE_ATTS:
            return FetchAtt(name)
        if name == "RFC822.PEEK":
            raise ParseError("unknown FETCH attribute RFC822.PEEK")
        raise ParseError(f"unknown FETCH attribute {name}")
    if name not in ("BODY", "BODY.PEEK"):
        raise ParseError(f"unknown FETCH attribute {name}[")
    r.pos += 1
    section = _section(r)
    r.expect(b"]", "]")
    partial = None
    if r.peek() == 0x3C:  # '<'
        r.pos += 1
        origin = r.number()
        r.expect(b".", ". in partial")
        count = r.nz_number()
        r.expect(b">", ">")
        partial = (origin, count)
    return FetchAtt("BODY[]", section=section, peek=name == "BODY.PEEK", partial=partial)


def _section(r: _Reader) -> Section:
    parts: list[int] = []
    data = r.data
    while 0x30 <= r.peek() <= 0x39:
        parts.append(r.nz_number())
        if len(parts) > MAX_DEPTH:
            raise ParseError("section part path too deep")
        if r.peek() == 0x2E:
            r.pos += 1
            continue
        break
    if r.peek() == 0x5D:
        if parts and data[r.pos - 1] == 0x2E:
            raise ParseError("section ends with a dot")
        return Section(tuple(parts))
    start = r.pos
    while r.pos < len(data) and data[r.pos] not in b" ]":
        r.pos += 1
    text = data[start:r.pos].decode("ascii", "replace").upper()
    if text in ("HEADER", "TEXT"):
        return Section(tuple(parts), text)
    if text == "MIME":
        if not parts:
            raise ParseError("MIME needs a part number")
        return Section(tuple(parts), text)
    if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        r.sp()
        fields = [f.decode("ascii", "replace") for f in r.paren_list("astring")]
        if not fields:
            raise ParseError("empty header field list")
        return Section(tuple(parts), text, tuple(fields))
    raise ParseError(f"invalid section {text!r}")


# -- SEARCH ---------------------------------------------------------------------------

_FLAG_KEYS = frozenset({
    "ALL", "ANSWERED", "DELETED", "DRAFT", "FLAGGED", "NEW", "OLD", "RECENT", "SEEN",
    "UNANSWERED", "UNDELETED", "UNDRAFT", "UNFLAGGED", "UNSEEN",
})
_STRING_KEYS = frozenset({"BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"})
_DATE_KEYS = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})
SUPPORTED_CHARSETS = ("US-ASCII", "UTF-8")


def _search(r: _Reader, cmd: Command) -> None:
    r.sp()
    save = r.pos
    head = r.atom().decode("ascii", "replace").upper() if r.peek() not in (0x28, 0x22) else ""
    charset = "US-ASCII"
    if head == "CHARSET":
        r.sp()
        charset = r.astring().decode("ascii", "replace").upper()
        cmd.charset = charset
        r.sp()
    else:
        r.pos = save
    keys: list[SearchKey] = []
    while True:
        keys.append(_search_key(r, charset, 0))
        if len(keys) > MAX_ITEMS:
            raise ParseError("too many SEARCH keys")
        if r.peek() != 0x20:
            break
        r.pos += 1
    cmd.search = keys[0] if len(keys) == 1 else SearchKey("AND", tuple(keys))


def _search_string(r: _Reader, charset: str) -> str:
    raw = r.astring()
    if charset not in SUPPORTED_CHARSETS:
        return raw.decode("latin-1")  # the server answers NO [BADCHARSET] before using it
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("search string is not valid UTF-8") from None


def _search_date(r: _Reader) -> date:
    # RFC 3501 §9 date = date-text / DQUOTE date-text DQUOTE; date-text = d-MON-yyyy
    text = (r.string() if r.peek() == 0x22 else r.atom()).decode("ascii", "replace")
    m = re.fullmatch(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})", text)
    if not m or m.group(2).lower() not in _MONTHS:
        raise ParseError(f"invalid date {text!r}")
    try:
        return date(int(m.group(3)), _MONTHS.index(m.group(2).lower()) + 1, int(m.group(1)))
    except ValueError:
        raise ParseError(f"invalid date {text!r}") from None


def _search_key(r: _Reader, charset: str, depth: int) -> SearchKey:
    if depth > MAX_DEPTH:
        raise ParseError("SEARCH nested too deeply")
    c = r.peek()
    if c == 0x28:
        r.pos += 1
        keys: list[SearchKey] = []
        while True:
            keys.append(_search_key(r, charset, depth + 1))
            if len(keys) > MAX_ITEMS:
                raise ParseError("too many SEARCH keys")
            if r.peek() == 0x29:
                r.pos += 1
                break
            r.sp()
        return keys[0] if len(keys) == 1 else SearchKey("AND", tuple(keys))
    if 0x30 <= c <= 0x39 or c == 0x2A:
        return SearchKey("SEQ", (r.seqset(),))
    if c < 0:
        raise ParseError("missing SEARCH key")
    word = r.atom().decode("ascii", "replace").upper()
    if word in _FLAG_KEYS:
        return SearchKey(word)
    if word in _STRING_KEYS:
        r.sp()
        return SearchKey(word, (_search_string(r, charset),))
    if word in _DATE_KEYS:
        r.sp()
        return SearchKey(word, (_search_date(r),))
    if word in ("LARGER", "SMALLER"):
        r.sp()
        return SearchKey(word, (r.number(),))
    if word in ("KEYWORD", "UNKEYWORD"):
        r.sp()
        return SearchKey(word, (r.flag().decode("ascii", "replace"),))
    if word == "HEADER":
        r.sp()
        fname = r.astring().decode("ascii", "replace")
        r.sp()
        return SearchKey(word, (fname, _search_string(r, charset)))
    if word == "UID":
        r.sp()
        return SearchKey("UID", (r.seqset(),))
    if word == "NOT":
        r.sp()
        return SearchKey("NOT", (_search_key(r, charset, depth + 1),))
    if word == "OR":
        r.sp()
        a = _search_key(r, charset, depth + 1)
        r.sp()
        b = _search_key(r, charset, depth + 1)
        return SearchKey("OR", (a, b))
    raise ParseError(f"unknown SEARCH key {word}")
