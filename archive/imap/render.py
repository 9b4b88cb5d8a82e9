"""FETCH data from raw RFC 5322 bytes, pure: ENVELOPE, BODYSTRUCTURE, BODY[section].

The archive keeps each message's exact original bytes.  IMAP serves messages
with CRLF line ends (RFC 3501 §2.3.1.1 / RFC 5322 §2.1), so every bare LF is
served as CRLF — always, and the same way for RFC822.SIZE, BODY[] and every
section, so that RFC822.SIZE is exactly the length of BODY[] (what Dovecot does
for Maildir files with LF line ends).  Structure follows Dovecot's parser
(``message-parser.c``, ``imap-bodystructure.c``, ``imap-envelope.c``) where RFC 3501
leaves room: sizes and line counts exclude the CRLF that belongs to the next
boundary (RFC 2046 §5.1.1), a line count is the number of LF octets, addresses
without a domain get ``MISSING_DOMAIN``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from archive.imap.parser import Section

__all__ = [
    "ParsedMessage",
    "Part",
    "body_section",
    "bodystructure",
    "envelope",
    "imap_string",
    "parse_message",
    "to_crlf",
]

MAX_PARTS = 10_000  # Dovecot's default mime_max_parts is unlimited; bound the work anyway
MAX_NESTING = 100  # Dovecot: message_max_nesting... we stop descending past this depth
MAX_BOUNDARY = 80
_BARE_LF = re.compile(rb"(?<!\r)\n")


def to_crlf(raw: bytes) -> bytes:
    """Serve bare LF as CRLF (RFC 5322 §2.3: CR and LF only together).

    NUL is not allowed in an IMAP literal (RFC 3501 §4.3; only BINARY's literal8 may
    carry it): like Dovecot we serve it as 0x80.
    """
    if b"\x00" in raw:
        raw = raw.replace(b"\x00", b"\x80")
    lfs = raw.count(b"\n")
    if lfs == 0 or lfs == raw.count(b"\r\n"):
        return raw
    return _BARE_LF.sub(b"\r\n", raw)


# -- IMAP string forms ----------------------------------------------------------------


def imap_string(value: bytes | str | None) -> bytes:
    """NIL, a quoted string, or a literal for 8-bit / CR / LF content (RFC 3501 §4.3)."""
    if value is None:
        return b"NIL"
    b = value.encode("utf-8") if isinstance(value, str) else value
    if any(c >= 0x80 or c in (0x0D, 0x0A, 0x00) for c in b):
        return b"{%d}\r\n%s" % (len(b), b)
    return b'"' + b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def string_for_humans(b: bytes) -> bytes:
    """Dovecot's ``imap_append_string_for_humans`` (subjects and display names).

    Whitespace runs (SP, TAB, CR, LF) become one space and are trimmed at both ends,
    NUL becomes 0x80; anything that needed changing, or needs escaping, or is 8-bit, is
    sent as a literal, otherwise as a plain quoted string.
    """
    modify = False
    last_lwsp = True
    for c in b:
        if c in (0x0D, 0x0A, 0x09, 0x20):
            if c != 0x20 or last_lwsp:
                modify = True
            last_lwsp = True
        else:
            if c == 0 or c in (0x22, 0x5C) or c >= 0x80:
                modify = True
            last_lwsp = False
    if b and last_lwsp:
        modify = True
    if not modify:
        return b'"' + b + b'"'
    out = b" ".join(re.split(rb"[ \t\r\n]+", b.replace(b"\x00", b"\x80"))).strip(b" ")
    if not out:
        return b'""'
    return b"{%d}\r\n%s" % (len(out), out)


def _nstring(value: bytes | None) -> bytes:
    return b"NIL" if value is None else imap_string(value)


# -- headers -------------------------------------------------------------------------


@dataclass(slots=True)
class Header:
    """A header block: (name, raw field bytes incl. folding and CRLF) in order."""

    fields: list[tuple[bytes, bytes]]

    def get_all(self, name: bytes) -> list[bytes]:
        lname = name.lower()
        return [_field_value(raw) for n, raw in self.fields if n.lower() == lname]

    def get_raw(self, name: bytes, last: bool = False) -> bytes | None:
        lname = name.lower()
        found = None
        for n, raw in self.fields:
            if n.lower() == lname:
                found = _raw_value(raw)
                if not last:
                    break
        return found

    def get(self, name: bytes) -> bytes | None:
        """The first field's unfolded value, whitespace-trimmed, or None."""
        lname = name.lower()
        for n, raw in self.fields:
            if n.lower() == lname:
                return _field_value(raw)
        return None


def _raw_value(raw: bytes) -> bytes:
    """The value as written, folding kept, leading space and the final CRLF removed."""
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    if value.endswith(b"\r\n"):
        value = value[:-2]
    elif value.endswith(b"\n"):
        value = value[:-1]
    return value.lstrip(b" \t")


def _field_value(raw: bytes) -> bytes:
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    # RFC 5322 §2.2.3: unfolding removes the CRLF before folding whitespace.
    return value.replace(b"\r\n", b"").replace(b"\n", b"").strip(b" \t\r")


def _parse_header(block: bytes) -> Header:
    fields: list[tuple[bytes, bytes]] = []
    pos = 0
    n = len(block)
    while pos < n:
        eol = block.find(b"\n", pos)
        end = n if eol < 0 else eol + 1
        line = block[pos:end]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        else:
            colon = line.find(b":")
            name = line[:colon].rstrip(b" \t") if colon > 0 else b""
            fields.append((name, line))
        pos = end
    return Header(fields)


# -- the MIME tree --------------------------------------------------------------------


@dataclass(slots=True)
class Part:
    """One MIME entity; offsets index into the CRLF-normalised message bytes."""

    hstart: int
    bstart: int  # header ends (blank line included) / body starts
    end: int
    header: Header
    ctype: str  # lower case, for decisions
    csub: str
    params: list[tuple[bytes, bytes]]  # as written, before RFC 2231 merging
    has_ctype: bool
    raw_type: bytes = b"text"  # as written: Dovecot echoes the message's case
    raw_sub: bytes = b"plain"
    header_complete: bool = True  # a blank line ended the header
    outer_end: int | None = None  # where the enclosing message/rfc822 part ends, if not here
    children: list[Part] = field(default_factory=list)
    message: Part | None = None  # the embedded message of message/rfc822
    lines: int = 0

    @property
    def is_multipart(self) -> bool:
        return self.ctype == "multipart"

    @property
    def is_message(self) -> bool:
        return self.ctype == "message" and self.csub == "rfc822"


@dataclass(slots=True)
class ParsedMessage:
    data: bytes  # CRLF form: what BODY[] serves
    root: Part
    _env: bytes | None = None
    _bs: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.data)


def parse_message(raw: bytes) -> ParsedMessage:
    data = to_crlf(raw)
    parser = _MimeParser(data)
    root, _ = parser.entity(0, [], "text", "plain", 0)
    return ParsedMessage(data, root)


@dataclass(slots=True)
class _Hit:
    """A boundary line: where it starts, whose boundary (stack index), closing or not."""

    line: int
    index: int
    closing: bool
    after: int  # first octet after the boundary line


class _MimeParser:
    """A streaming MIME parser with a boundary stack, as Dovecot's message-parser.c.

    A boundary line closes the innermost part whose boundary it matches, and every
    part nested inside that one (RFC 2046 §5.1.2); boundaries are checked innermost
    first, so a child re-using its parent's boundary owns the lines (Dovecot does so).
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.budget = MAX_PARTS

    def scan(self, pos: int, stack: list[bytes]) -> _Hit | None:
        data = self.data
        if not stack:
            return None
        n = len(data)
        while pos <= n:
            if data.startswith(b"--", pos):
                # Dovecot: the longest boundary that the line starts with; between
                # equal ones the innermost ("--ab" belongs to "ab", not to "a").
                best = -1
                for idx in range(len(stack) - 1, -1, -1):
                    b = stack[idx]
                    if data.startswith(b, pos + 2) and (
                            best < 0 or len(b) > len(stack[best])):
                        best = idx
                if best >= 0:
                    b = stack[best]
                    eol = data.find(b"\n", pos)
                    after = n if eol < 0 else eol + 1
                    closing = data.startswith(b"--", pos + 2 + len(b))
                    return _Hit(pos, best, closing, after)
            nxt = data.find(b"\n--", pos)
            if nxt < 0:
                return None
            pos = nxt + 1
        return None

    @staticmethod
    def _end_before(hit: _Hit | None, start: int, end: int) -> int:
        if hit is None:
            return end
        # RFC 2046 §5.1.1: the CRLF preceding the boundary line belongs to the boundary.
        e = hit.line
        if e - 2 >= start and e >= 2:
            e -= 2
        return max(start, e)

    def entity(self, start: int, stack: list[bytes], dtype: str, dsub: str,
               depth: int, embedded: bool = False) -> tuple[Part, _Hit | None]:
        data = self.data
        n = len(data)
        hit_in_header = self.scan(start, stack) if stack else None
        limit = n if hit_in_header is None else hit_in_header.line
        bstart, complete = _find_header_end(data, start, limit)
        # A boundary line inside the header ends the part there, and the CRLF before
        # it is the boundary's (RFC 2046 §5.1.1; Dovecot): no body.
        cut = hit_in_header if hit_in_header is not None and not complete else None
        if cut is not None:
            bstart = max(start, cut.line - 2)
        header = _parse_header(data[start:bstart])
        ct = header.get(b"content-type")
        raw_type, raw_sub = dtype.encode(), dsub.encode()
        params: list[tuple[bytes, bytes]] = []
        has_ctype = False
        if ct is not None:
            has_ctype = True
            parsed = _parse_content_type(ct)
            # Dovecot: an unparsable Content-Type gives an empty type and subtype.
            raw_type, raw_sub, params = parsed if parsed is not None else (b"", b"", [])
        part = Part(start, bstart, n, header, raw_type.decode("ascii", "replace").lower(),
                    raw_sub.decode("ascii", "replace").lower(), params, has_ctype,
                    raw_type, raw_sub, header_complete=complete)
        csub = part.csub
        self.budget -= 1
        deep = self.budget <= 0 or depth >= MAX_NESTING
        boundary = _param(params, b"boundary") if part.is_multipart else None
        if boundary is not None:
            # RFC 2046 §5.1.1 allows 70 characters; Dovecot compares at most 80.
            boundary = boundary[:MAX_BOUNDARY]
        hit: _Hit | None
        free = bstart  # where the text that may end in the boundary's CRLF starts
        if cut is not None:
            part.end = bstart
            part.lines = 0
            if embedded:  # the message/rfc822 part still counts that CRLF (Dovecot)
                part.outer_end = cut.line
            return part, cut
        if boundary and not deep:
            child_type = ("message", "rfc822") if csub == "digest" else ("text", "plain")
            inner = [*stack, boundary]
            me = len(stack)
            hit = self.scan(bstart, inner)
            if hit is not None and hit.index < me and hit.line == bstart and complete \
                    and bstart - start >= 4 and data.startswith(b"\r\n\r\n", bstart - 4):
                if embedded:
                    part.outer_end = bstart
                bstart = free = part.bstart = bstart - 2  # as for a leaf, below
            while hit is not None and hit.index == me and not hit.closing:
                child, hit = self.entity(hit.after, inner, *child_type, depth + 1)
                part.children.append(child)
            if hit is not None and hit.index == me:  # closing: the epilogue follows
                free = hit.after
                hit = self.scan(hit.after, stack)
        elif part.is_message and not deep:
            # Dovecot parses a message/rfc822 body as a message whatever its encoding.
            part.message, hit = self.entity(bstart, stack, "text", "plain", depth + 1,
                                            embedded=True)
        else:
            hit = self.scan(bstart, stack)
            if hit is not None and hit.line == bstart and complete and bstart - start >= 4 \
                    and data.startswith(b"\r\n\r\n", bstart - 4):
                # An empty body right before a parent's boundary: the blank line's CRLF
                # is the boundary's, the header keeps one (Dovecot's MIME header size).
                if embedded:  # the message/rfc822 part still counts it (Dovecot)
                    part.outer_end = bstart
                bstart = free = part.bstart = bstart - 2
        if part.message is not None:
            inner_end = part.message.outer_end
            part.end = part.message.end if inner_end is None else inner_end
        elif part.children and free == bstart:
            part.end = part.children[-1].end
        else:
            part.end = self._end_before(hit, free, n)
        part.lines = data.count(b"\n", bstart, part.end)
        return part, hit


def _find_header_end(data: bytes, start: int, end: int) -> tuple[int, bool]:
    """Where the body starts, and whether a blank line ended the header."""
    if data.startswith(b"\r\n", start) and start + 2 <= end:
        return start + 2, True
    i = data.find(b"\r\n\r\n", start, end)
    return (end, False) if i < 0 else (i + 4, True)


# RFC 2045 §5.1 tokens; RFC 822 comments in parentheses are skipped.
_TSPECIALS = frozenset(b'()<>@,;:\\"/[]?=')


def _skip_cfws(s: bytes, i: int) -> int:
    n = len(s)
    while i < n:
        c = s[i]
        if c in b" \t\r\n":
            i += 1
        elif c == 0x28:
            depth = 0
            while i < n:
                if s[i] == 0x5C:
                    i += 2
                    continue
                if s[i] == 0x28:
                    depth += 1
                elif s[i] == 0x29:
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        else:
            break
    return i


def _token(s: bytes, i: int) -> tuple[bytes, int]:
    j = i
    while j < len(s) and s[j] > 0x20 and s[j] not in _TSPECIALS and s[j] != 0x7F:
        j += 1
    return s[i:j], j


def _quoted(s: bytes, i: int) -> tuple[bytes, int]:
    out = bytearray()
    i += 1
    while i < len(s):
        c = s[i]
        if c == 0x5C and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
            continue
        if c == 0x22:
            return bytes(out), i + 1
        out.append(c)
        i += 1
    return bytes(out), i


def _parse_params(s: bytes, i: int) -> list[tuple[bytes, bytes]]:
    params: list[tuple[bytes, bytes]] = []
    while True:
        i = _skip_cfws(s, i)
        if i >= len(s) or s[i] != 0x3B:
            break
        i = _skip_cfws(s, i + 1)
        name, i = _token(s, i)
        i = _skip_cfws(s, i)
        if not name or i >= len(s) or s[i] != 0x3D:
            break
        i = _skip_cfws(s, i + 1)
        if i < len(s) and s[i] == 0x22:
            value, i = _quoted(s, i)
        elif i < len(s) and s[i] == 0x3D:
            # Dovecot's workaround for name==?utf-8?b?...?=: an unquoted value that
            # starts with "=" runs to ';' or white space.
            j = i
            while j < len(s) and s[j] not in b"; \t\r\n":
                j += 1
            value, i = s[i:j], j
        else:
            value, i = _token(s, i)
        params.append((name, value))
        i = _skip_cfws(s, i)
        if i < len(s) and s[i] != 0x3B:
            # Dovecot: junk after a value (a missing ";") is skipped up to the next ";".
            while i < len(s) and s[i] != 0x3B:
                i = _quoted(s, i)[1] if s[i] == 0x22 else i + 1
    return params


def _parse_content_type(value: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    i = _skip_cfws(value, 0)
    t, i = _token(value, i)
    i = _skip_cfws(value, i)
    if not t or i >= len(value) or value[i] != 0x2F:
        return None
    i = _skip_cfws(value, i + 1)
    sub, i = _token(value, i)
    if not sub:
        return None
    # Dovecot: anything but ";" after the subtype makes the whole field invalid.
    i = _skip_cfws(value, i)
    if i < len(value) and value[i] != 0x3B:
        return None
    return t, sub, _parse_params(value, i)


def _param(params: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in params:
        if k.lower() == name:
            return v
    return None


# -- ENVELOPE -------------------------------------------------------------------------


@dataclass(slots=True)
class Address:
    name: bytes | None
    route: bytes | None
    mailbox: bytes | None
    host: bytes | None

    def render(self) -> bytes:
        name = b"NIL" if self.name is None else string_for_humans(self.name)
        return b"(" + b" ".join([name] + [_nstring(v) for v in (self.route, self.mailbox,
                                                                  self.host)]) + b")"


class _AddrTokens:
    """RFC 5322 §3.4 lexer: atoms (dots included, like Dovecot's atom-or-dot), quoted
    strings, comments, domain literals and the specials < > @ , ; :."""

    def __init__(self, s: bytes) -> None:
        self.toks: list[tuple[str, bytes]] = []
        i, n = 0, len(s)
        while i < n:
            c = s[i]
            if c in b" \t\r\n":
                i += 1
            elif c == 0x28:
                start = i
                i = _skip_cfws(s, i)
                self.toks.append(("comment", s[start + 1:max(start + 1, i - 1)]))
            elif c == 0x22:
                v, i = _quoted(s, i)
                self.toks.append(("quoted", v))
            elif c == 0x5B:  # domain literal
                j = s.find(b"]", i)
                j = n - 1 if j < 0 else j
                self.toks.append(("atom", s[i:j + 1]))
                i = j + 1
            elif c in b"<>@,;:":
                self.toks.append(("special", bytes([c])))
                i += 1
            else:
                j = i
                while j < n and s[j] not in b' \t\r\n()<>@,;:[]"':
                    j += 1
                self.toks.append(("atom", s[i:j]))
                i = j


def parse_addresses(value: bytes) -> list[Address]:
    """An address-list in Dovecot's ENVELOPE form, groups as start/end markers."""
    toks = _AddrTokens(value).toks
    out: list[Address] = []
    i, n = 0, len(toks)
    in_group = False
    while i < n:
        kind, v = toks[i]
        if kind == "special" and v == b",":
            if i == 0 or toks[i - 1] == ("special", b","):
                # Dovecot: an empty element of the list is an address with nothing in it.
                out.append(Address(None, None, b"MISSING_MAILBOX", b"MISSING_DOMAIN"))
            i += 1
            continue
        if kind == "special" and v == b";" and in_group:
            out.append(Address(None, None, None, None))  # RFC 3501 §7.4.2 group end
            in_group = False
            i += 1
            continue
        # One address: up to the next ',' (or ';' closing a group) outside <...>.
        j = i
        angle: tuple[int, int] | None = None
        group = False
        broken = False
        while j < n:
            kind, v = toks[j]
            if kind == "special" and (v == b"," or (v == b";" and in_group)):
                break
            at_seen = any(t == ("special", b"@") for t in toks[i:j])
            if kind == "special" and v == b":" and angle is None:
                if in_group or at_seen:
                    broken = True
                else:
                    group = True
                break
            if kind == "special" and v == b"<":
                if at_seen or angle is not None:
                    broken = True
                    break
                k = j + 1
                while k < n and toks[k] != ("special", b">"):
                    k += 1
                angle = (j + 1, k)
                j = k + 1
                continue
            j += 1
        if broken:
            # Dovecot keeps the address read so far and gives up on the rest of the list.
            if any(k in ("atom", "quoted") for k, _ in toks[i:j]):
                out.append(_addr_spec(toks[i:j], None, in_angle=False))
            if in_group:
                out.append(Address(None, None, None, None))
            return out
        seg = toks[i:j]
        words = [v for k, v in (seg if angle is None else toks[i:angle[0] - 1])
                 if k in ("atom", "quoted")]
        comments = [v for k, v in seg if k == "comment"]
        if group:
            out.append(Address(None, None, b" ".join(words), None))
            in_group = True
            i = j + 1
            continue
        if angle is not None:
            name = b" ".join(words) or (comments[-1] if comments else b"")
            out.append(_addr_spec(toks[angle[0]:angle[1]], name or None, in_angle=True))
        elif any(k in ("atom", "quoted") for k, _ in seg):
            name = comments[-1] if comments else b""
            out.append(_addr_spec(seg, name or None, in_angle=False))
        i = j
    if in_group:
        out.append(Address(None, None, None, None))
    return out


def _addr_spec(toks: list[tuple[str, bytes]], name: bytes | None,
               in_angle: bool) -> Address:
    """An addr-spec as Dovecot's message-address.c reads it, errors included."""
    route: bytes | None = None
    toks = [t for t in toks if t[0] != "comment"]
    # RFC 5322 §4.4 obs-route: "@a,@b:" before the addr-spec.
    if toks and toks[0] == ("special", b"@"):
        for k, (kind, v) in enumerate(toks):
            if kind == "special" and v == b":":
                route = b"".join(t[1] for t in toks[:k])
                toks = toks[k + 1:]
                break
    at = next((k for k, t in enumerate(toks) if t == ("special", b"@")), None)
    local_toks = toks if at is None else toks[:at]
    words = [t for t in local_toks if t[0] in ("atom", "quoted")]
    if len(words) > 1 or any(t[0] == "special" for t in local_toks):
        if in_angle:  # "<Undisclosed Recipients>": the first word, then a syntax error
            return Address(name, route, _local_piece(words[0]) if words else
                           b"MISSING_MAILBOX", b"SYNTAX_ERROR")
        # "Mary Smith" with no address: a display name and nothing else
        phrase = b" ".join(v for _, v in words)
        return Address(phrase or name, route, b"MISSING_MAILBOX", b"MISSING_DOMAIN")
    local = _local_piece(words[0]) if words else b""
    # The domain is the dot-atom after "@" (comments and spaces around dots dropped);
    # Dovecot ignores any further word.
    host = b""
    if at is not None:
        for kind, v in toks[at + 1:]:
            if kind != "atom" or (host and not host.endswith(b".") and not v.startswith(b".")):
                break
            host += v
    return Address(name, route, local or b"MISSING_MAILBOX", host or b"MISSING_DOMAIN")


def _local_piece(t: tuple[str, bytes]) -> bytes:
    kind, v = t
    if kind == "quoted" and (not v or any(c in b' "\\()<>@,;:[]' for c in v)):
        return b'"' + v.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return v


def _addr_list(values: list[bytes]) -> bytes:
    # Dovecot: every occurrence of an address field adds to the list.
    addrs = [a for v in values for a in parse_addresses(v)]
    if not addrs:
        return b"NIL"
    return b"(" + b"".join(a.render() for a in addrs) + b")"


def _envelope_of(header: Header) -> bytes:
    def nv(name: bytes) -> bytes:
        v = header.get_raw(name, last=True)
        # Dovecot: the last occurrence wins; folding CRLFs removed, the whitespace after them kept.
        return b"NIL" if v is None else imap_string(v.replace(b"\r\n", b"").replace(b"\n", b""))

    subject = header.get_raw(b"subject", last=True)
    from_s = _addr_list(header.get_all(b"from"))
    sender = header.get_all(b"sender")
    reply_to = header.get_all(b"reply-to")
    # RFC 3501 §7.4.2: sender and reply-to default to from.
    parts = [
        nv(b"date"), b"NIL" if subject is None else string_for_humans(subject), from_s,
        _addr_list(sender) if sender else from_s,
        _addr_list(reply_to) if reply_to else from_s,
        _addr_list(header.get_all(b"to")), _addr_list(header.get_all(b"cc")),
        _addr_list(header.get_all(b"bcc")), nv(b"in-reply-to"), nv(b"message-id"),
    ]
    return b"(" + b" ".join(parts) + b")"


def envelope(msg: ParsedMessage) -> bytes:
    if msg._env is None:
        msg._env = _envelope_of(msg.root.header)
    return msg._env


# -- BODYSTRUCTURE --------------------------------------------------------------------


def rfc2231_merge(params: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """RFC 2231 §3-4 as Dovecot's rfc2231-parser.c: plain parameters first, in order,
    then the starred ones sorted by name with their continuations joined (the name keeps
    one ``*`` when any piece was extended); the values are not decoded."""
    plain: list[tuple[bytes, bytes]] = []
    starred: dict[bytes, list[tuple[int, bool, bytes]]] = {}
    for k, v in params:
        star = k.find(b"*")
        if star < 0:
            plain.append((k, v))
            continue
        name, rest = k[:star], k[star + 1:]
        if rest == b"":
            starred.setdefault(name, []).append((-1, True, v))
            continue
        ext = rest.endswith(b"*")
        digits = rest[:-1] if ext else rest
        if not digits.isdigit():
            plain.append((k, v))
            continue
        starred.setdefault(name, []).append((int(digits), ext, v))
    out = list(plain)
    for name in sorted(starred):
        pieces = sorted(starred[name])
        if pieces[0][0] == -1:
            out.append((name + b"*", pieces[0][2]))
            continue
        value = b""
        extended = False
        for expect, (idx, ext, v) in enumerate(pieces):
            if idx != expect:  # a gap ends the value (duplicates / missing pieces)
                break
            value += v
            extended |= ext
        out.append((name + (b"*" if extended else b""), value))
    return out


def _param_list(params: list[tuple[bytes, bytes]]) -> bytes:
    if not params:
        return b"NIL"
    return b"(" + b" ".join(imap_string(k) + b" " + imap_string(v) for k, v in params) + b")"


def _cte(header: Header) -> bytes:
    """Dovecot: the encoding as written if it is one token, else "7bit"."""
    v = header.get(b"content-transfer-encoding")
    if v is None:
        return b"7bit"
    i = _skip_cfws(v, 0)
    tok, i = _token(v, i)
    if not tok or _skip_cfws(v, i) != len(v):
        return b"7bit"
    return tok


def _disposition(header: Header) -> bytes:
    v = header.get(b"content-disposition")
    if v is None:
        return b"NIL"
    i = _skip_cfws(v, 0)
    kind, i = _token(v, i)
    if not kind:
        return b'("" NIL)'
    return b"(" + imap_string(kind) + b" " + _param_list(rfc2231_merge(_parse_params(v, i))) \
        + b")"


def _language(header: Header) -> bytes:
    v = header.get(b"content-language")
    if v is None:
        return b"NIL"
    langs = [x.strip() for x in re.split(rb"[,\s]+", v) if x.strip()]
    if not langs:
        return b"NIL"
    return b"(" + b" ".join(imap_string(x) for x in langs) + b")"


def _struct(msg: ParsedMessage, part: Part, extended: bool) -> bytes:
    h = part.header
    if part.is_multipart:
        kids = b"".join(_struct(msg, c, extended) for c in part.children)
        if not kids:
            # Dovecot answers an empty multipart as one empty text/plain child.
            kids = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'
            if extended:
                kids = kids[:-1] + b" NIL NIL NIL NIL)"
        out = b"(" + kids + b" " + imap_string(part.raw_sub)
        if extended:
            out += b" " + b" ".join((_param_list(rfc2231_merge(part.params)), _disposition(h),
                                     _language(h), _nstring(h.get(b"content-location"))))
        return out + b")"
    params = rfc2231_merge(part.params)
    if part.ctype == "text" and _param(params, b"charset") is None:
        # Dovecot: a text part without a charset is us-ascii (RFC 2045 §5.2).
        params = [*params, (b"charset", b"us-ascii")]
    enc = _cte(h)
    fields = [
        # Dovecot writes message/rfc822 in lower case, other types as the message has them.
        *((b'"message"', b'"rfc822"') if part.is_message else (
            imap_string(part.raw_type), imap_string(part.raw_sub))), _param_list(params),
        _nstring(h.get(b"content-id")), _nstring(h.get(b"content-description")),
        imap_string(enc),
        str(part.end - part.bstart).encode(),
    ]
    if part.ctype == "text" and part.csub:
        fields.append(str(part.lines).encode())
    elif part.is_message and part.message is not None:
        fields.append(_envelope_of(part.message.header))
        fields.append(_struct(msg, part.message, extended))
        fields.append(str(part.lines).encode())
    if extended:
        fields += [_nstring(h.get(b"content-md5")), _disposition(h), _language(h),
                   _nstring(h.get(b"content-location"))]
    return b"(" + b" ".join(fields) + b")"


def bodystructure(msg: ParsedMessage, extended: bool = True) -> bytes:
    if not extended:
        return _struct(msg, msg.root, False)
    if msg._bs is None:
        msg._bs = _struct(msg, msg.root, True)
    return msg._bs


# -- BODY[section] --------------------------------------------------------------------


def _child(node: Part, n: int) -> Part | None:
    """Part *n* below *node* (RFC 3501 §6.4.5): the parts of a multipart; below a
    message/rfc822 part, those of the message it holds (its body being part 1 when it
    is not multipart); below any other part, part 1 is itself (as Dovecot)."""
    if node.is_message and node.message is not None:
        inner = node.message
        if inner.is_multipart:
            return inner.children[n - 1] if 0 < n <= len(inner.children) else None
        return inner if n == 1 else None
    if node.is_multipart:
        return node.children[n - 1] if 0 < n <= len(node.children) else None
    # Dovecot: below a leaf part, part 1 is the part itself.
    return node if n == 1 else None


def body_section(msg: ParsedMessage, section: Section) -> bytes | None:
    """The octets of ``BODY[section]`` (before any <partial>), or None if there is none."""
    data = msg.data
    node: Part | None = msg.root
    for k, n in enumerate(section.part):
        if node is None:
            return None
        if k == 0:  # the top level: its own body is part 1 unless it is multipart
            root = msg.root
            node = (root.children[n - 1] if 0 < n <= len(root.children) else None) \
                if root.is_multipart else (root if n == 1 else None)
        elif node is msg.root and not node.is_message:
            return None  # Dovecot: a single-part message has no part 1.1
        else:
            node = _child(node, n)
    if node is None:
        return None
    text = section.text
    if section.part and text == "":
        return data[node.bstart:node.end]
    if text == "MIME":
        return data[node.hstart:node.bstart]
    target = node
    if section.part:
        if not node.is_message or node.message is None:
            return None
        target = node.message
    if text == "HEADER":
        return data[target.hstart:target.bstart]
    if text == "TEXT":
        return data[target.bstart:target.end]
    if text.startswith("HEADER.FIELDS"):
        wanted = {f.lower().encode() for f in section.fields}
        keep = text == "HEADER.FIELDS"
        lines = [raw for name, raw in target.header.fields
                 if (name.lower() in wanted) == keep]
        out = b"".join(raw if raw.endswith(b"\n") else raw + b"\r\n" for raw in lines)
        # Dovecot: FIELDS always ends with a blank line; FIELDS.NOT (a filter over the
        # header as it is) only when the message had one.
        return out + b"\r\n" if keep or target.header_complete else out
    return data[target.hstart:target.end]
