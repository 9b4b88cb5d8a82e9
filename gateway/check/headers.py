"""Byte-exact access to a message's header fields (RFC 5322 §2.2).

The checks must read header fields without changing a byte of the message (a
DKIM signature covers them as they are), and the check stage must remove some
(forged Authentication-Results) while leaving every other byte in place.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from email.utils import getaddresses

_SPACE = re.compile(rb"\s")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
# The empty line that ends the header: an LF followed by CRLF or LF (RFC 5322 §2.1;
# a bare LF ends lines too here, as in split() and in dkimpy's parser).
_HEADER_END = re.compile(rb"\n\r?\n")


@dataclass(frozen=True, slots=True)
class Field:
    name: str  # lower-cased
    raw: bytes  # the whole field, folded lines and line endings included

    @property
    def value(self) -> str:
        """The unfolded value (RFC 5322 §2.2.3), leading and trailing space removed."""
        return _value(self.raw)


def _value(raw: bytes) -> str:
    """Field.value of a field's raw bytes."""
    _, _, value = raw.partition(b":")
    # a fold is a line end with more of the field after it: none in a one-line field
    if value.find(b"\n") < len(value) - 1:
        value = _FOLD.sub(b"", value)
    return value.strip().decode("utf-8", "replace")


def header_end(data: bytes) -> int:
    """The offset where the header ends: the start of the empty line after it
    (0 if the message begins with one, ``len(data)`` if it has none).

    ``data[:header_end(data)]`` holds exactly the lines :func:`split` makes fields
    of, and the lines dkimpy's parser reads as the header (it also ends the
    header at the first empty line, splitting lines on CRLF or LF).
    """
    if data[:1] == b"\n" or data[:2] == b"\r\n":
        return 0
    m = _HEADER_END.search(data)
    return len(data) if m is None else m.start() + 1


def header_block(data: bytes) -> bytes:
    """The header lines, without the empty line and the body (see header_end).

    dkimpy's view of a header (lines end at LF).  gateway.mailparse.header_block is
    the email package's view (a lone CR ends a line too; the empty line included),
    for the header-only parses that must match that parser."""
    return _blocks(data)[0]


def lower_header_block(data: bytes) -> bytes:
    """``header_block(data).lower()``: ASCII letters lowered, every offset kept, for
    case-insensitive searches of field names with ``in`` and ``find`` (as a
    case-insensitive bytes pattern folds case: ASCII only)."""
    return _blocks(data)[1]


# The last message's (data, header block, lowered): the check stage asks for the
# header of one message four times in a row (forged Authentication-Results, DKIM,
# ARC, DMARC's From).  One tuple, replaced whole, so threads never see half of one;
# the test is identity (the message is kept alive by the reference here).
_last: tuple[bytes, bytes, bytes] = (b"", b"", b"")


def _blocks(data: bytes) -> tuple[bytes, bytes]:
    global _last
    last = _last
    if last[0] is data:
        return last[1], last[2]
    head = data[:header_end(data)]
    low = head.lower()
    _last = (data, head, low)
    return head, low


def split(data: bytes) -> tuple[list[Field], bytes]:
    """-> (header fields in order, the rest: the empty line and the body).

    A line in the header that is neither a field nor a continuation becomes a
    field with name "" so that it is kept, and so that a continuation after it is
    not glued to the field before.
    """
    # Lines end in LF (a CR before it is part of the line's raw bytes); only the
    # header's lines are looked at (header_end), not every line of the message.
    end = header_end(data)
    fields: list[Field] = []
    start = 0
    while start < end:
        nl = data.find(b"\n", start, end)
        stop = end if nl < 0 else nl + 1
        line = data[start:stop]
        start = stop
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = Field(last.name, last.raw + line)
        else:
            name, colon, _ = line.partition(b":")
            ok = colon and name and _SPACE.search(name.rstrip(b" \t")) is None
            fields.append(Field(name.strip().lower().decode("ascii", "replace") if ok else "",
                                line))
    return fields, data[end:]


def values(data: bytes, name: str) -> list[str]:
    """The unfolded value of each field named ``name`` (lower case), in order.

    The same as ``[f.value for f in split(data)[0] if f.name == name]`` without
    making a Field of every line (DMARC reads only From): a field named so is
    a line starting with the name, optional SP/HT and a colon (split() refuses
    other white space before the colon), with the continuation lines after it.
    The lines are found with ``find`` on the lower-cased header (ASCII case, as a
    case-insensitive bytes pattern folds it): a multi-line case-insensitive regular
    expression cost 6 µs on a bench message's header, this 1.
    """
    head, low = _blocks(data)  # bytes.lower changes ASCII letters only: offsets are kept
    key = name.lower().encode("ascii")
    needle = b"\n" + key
    out: list[str] = []
    start = 0 if low.startswith(key) else low.find(needle) + 1 or -1
    while start >= 0:
        j = start + len(key)
        while low[j:j + 1] in (b" ", b"\t"):
            j += 1
        if low[j:j + 1] == b":":
            nl = head.find(b"\n", start)
            while nl >= 0 and head[nl + 1:nl + 2] in (b" ", b"\t"):
                nl = head.find(b"\n", nl + 1)
            out.append(_value(head[start:len(head) if nl < 0 else nl + 1]))
        start = low.find(needle, start) + 1 or -1
    return out


def join(fields: list[Field], rest: bytes) -> bytes:
    return b"".join(f.raw for f in fields) + rest


# Address lists worth remembering: the same From and To values come back message after
# message (a sender's mail, a list's posts); longer values are parsed every time so the
# cache stays small (at most CACHED_ADDRESSES x MAX_CACHED_VALUE characters).
CACHED_ADDRESSES = 2048
MAX_CACHED_VALUE = 512

# What addresses() answers for a list it will not read: the same sign as the stdlib's
# strict mode gives (an empty name and an empty address).
UNREADABLE: list[tuple[str, str]] = [("", "")]

# CPython's later patch releases (and Debian's 3.11.2, which backports it) give
# getaddresses a strict mode, on by default, for CVE-2023-27043; older ones have only the
# lenient parser.  Coffer always asks for the lenient one and applies its own check
# (_ambiguous), so a message gets the same DMARC domain and the same spam symbols on
# every interpreter.
_LENIENT: dict[str, bool] = (
    {"strict": False} if "strict" in inspect.signature(getaddresses).parameters else {})


def getaddresses_lenient(values: list[str]) -> list[tuple[str, str]]:
    """``email.utils.getaddresses`` in its lenient mode on every interpreter (see
    _LENIENT), with none of :func:`addresses`' checks: for readers that must only be
    deterministic (the archive's participants fallback), not safe against spoofing."""
    return getaddresses(values, **_LENIENT)


def addresses(values: list[str]) -> list[tuple[str, str]]:
    """(display name, address) of each address in the header field ``values``, or
    UNREADABLE when a value is malformed so that its addresses are ambiguous.

    The stdlib's lenient parser reads ``alice@example.org)<bob@example.com>`` as an
    address in example.org, which a mail client would not show (CVE-2023-27043): a
    value whose quotes or comments do not balance, or with an "@" outside quoted
    strings and comments that did not become part of an address, is refused whole.
    Remembered for short values: the stdlib parser costs 6-9 µs for one plain address,
    and the checks parse the From field twice (DMARC, spam heuristics).
    """
    if sum(map(len, values)) > MAX_CACHED_VALUE:
        return _parse(tuple(values))
    return list(_remembered(tuple(values)))


@functools.lru_cache(maxsize=CACHED_ADDRESSES)
def _remembered(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    return tuple(_parse(values))


def _parse(values: tuple[str, ...]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for value in values:
        found = getaddresses([value], **_LENIENT)
        if _ambiguous(value, sum("@" in a for _, a in found)):
            return list(UNREADABLE)
        out.extend(found)
    return out


def _ambiguous(value: str, parsed_ats: int) -> bool:
    """Do quoted strings or comments not balance in ``value``, or does it hold another
    number of "@" outside them than ``parsed_ats``, the addresses with one the parser
    found?  (RFC 5322 §3.2.4 quoted-string, §3.2.2 comment with quoted-pair: a comment
    may nest, and a '"' inside one is ordinary text.)"""
    depth = 0
    quoted = escaped = False
    ats = 0
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == "(":
            depth += 1
        elif ch == ")":
            if not depth:
                return True
            depth -= 1
        elif depth:
            continue
        elif ch == '"':
            quoted = True
        elif ch == "@":
            ats += 1
    return quoted or depth > 0 or ats != parsed_ats
