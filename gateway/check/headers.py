"""Byte-exact access to a message's header fields (RFC 5322 §2.2).

The checks must read header fields without changing a byte of the message (a
DKIM signature covers them as they are), and the check stage must remove some
(forged Authentication-Results) while leaving every other byte in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(rb"[^\n]*\n|[^\n]+")


@dataclass(frozen=True, slots=True)
class Field:
    name: str  # lower-cased
    raw: bytes  # the whole field, folded lines and line endings included

    @property
    def value(self) -> str:
        """The unfolded value (RFC 5322 §2.2.3), leading and trailing space removed."""
        _, _, value = self.raw.partition(b":")
        unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", value).strip()
        return unfolded.decode("utf-8", "replace")


def split(data: bytes) -> tuple[list[Field], bytes]:
    """-> (header fields in order, the rest: the empty line and the body).

    A line in the header that is neither a field nor a continuation becomes a
    field with name "" so that it is kept, and so that a continuation after it is
    not glued to the field before.
    """
    fields: list[Field] = []
    pos = 0
    for m in _LINE.finditer(data):
        line = m.group()
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = Field(last.name, last.raw + line)
        else:
            name, colon, _ = line.partition(b":")
            ok = colon and name and not re.search(rb"[\s]", name.rstrip(b" \t"))
            fields.append(Field(name.strip().lower().decode("ascii", "replace") if ok else "",
                                line))
        pos = m.end()
    return fields, data[pos:]


def join(fields: list[Field], rest: bytes) -> bytes:
    return b"".join(f.raw for f in fields) + rest
