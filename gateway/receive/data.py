"""Reading the DATA of one message (RFC 5321 §4.1.1.4, §4.5.2) from a StreamReader.

Kept apart from the session so it can be tested on its own with any bytes.

The data is taken from the reader in large pieces, not line by line: one
``readuntil(b".\\r\\n")`` returns everything up to the next dot line candidate,
or (LimitOverrunError) whatever is buffered, and the checks run over whole
blocks of lines with ``bytes`` methods (count, replace, split) instead of a
Python loop per line, which cost most of the session's CPU.  The result is the
same as a line-by-line reader's, property-tested in
tests/receive/test_data_reader.py.  Only the public StreamReader API is used, and
nothing after the terminating line is consumed (pipelined commands stay).
"""

from __future__ import annotations

import asyncio
import re

from gateway import replies
from gateway.replies import Reply

TERMINATOR_LINE = b".\r\n"
# A CR followed by anything but LF.  Blocks end in LF, so no CR is ever last
# (where this would miss it); ``\r(?!\n)`` costs a third more.
_BARE_CR = re.compile(rb"\r[^\n]")
_STUFFED = re.compile(rb"\n\.")


def _has_long_line(text: bytes, max_line: int) -> bool:
    """True if a line of ``text`` (LF-separated) has ``max_line`` bytes or more before
    its LF: ``max(map(len, text.split(b"\\n"))) + 1 > max_line``, without a list.

    Each step looks at the next ``max_line`` bytes from the start of a line: with
    no LF among them that line is too long; else every line starting before the
    last LF among them is shorter, and the next step starts after it.
    """
    pos, end = 0, len(text)
    while end - pos >= max_line:
        nl = text.rfind(b"\n", pos, pos + max_line)
        if nl < 0:
            return True
        pos = nl + 1
    return False


class _Lines:
    """Checks and unstuffs the data as it arrives, in blocks of whole lines."""

    def __init__(self, max_line: int, max_size: int) -> None:
        self.max_line = max_line
        self.max_size = max_size
        self.partial = b""  # the start of a line whose LF has not arrived yet
        self.cut = False  # ``partial`` continues an over-long line (its start is gone)
        self.chunks: list[bytes] = []
        self.size = 0
        self.bad_newline = self.too_long = self.too_big = False

    def feed(self, piece: bytes) -> None:
        data = self.partial + piece if self.partial else piece
        nl = data.rfind(b"\n")
        if nl < 0:
            self.partial = data
        else:
            self.partial = data[nl + 1:]
            self._block(data[:nl + 1])
        if len(self.partial) > self.max_line + 1:
            # A line longer than any allowed, still without its LF: too long
            # whatever follows.  Keep only its last byte (a CR the next piece's LF
            # may complete), so a hostile endless line costs no memory.
            if b"\r" in self.partial[:-1]:
                self.bad_newline = True
            self.too_long, self.cut = True, True
            self.partial = self.partial[-1:]
            self.chunks.clear()

    def _block(self, block: bytes) -> None:
        """Lines ending in LF; the first one continues ``partial`` if ``cut``."""
        # RFC 5321 §2.3.8: every line ends in CRLF.  A bare LF or a bare CR
        # anywhere refuses the message (SMTP smuggling, see read_data).  When every
        # CR is followed by an LF (no bare CR), each CR pairs with the LF after it,
        # so there is no bare LF either exactly when there are as many LFs as CRs.
        # (Counting CRLF pairs instead costs twice as much as both of these.)
        if _BARE_CR.search(block) is not None or block.count(b"\n") != block.count(b"\r"):
            self.bad_newline = True
        if self.bad_newline:
            self.chunks.clear()
            return
        # RFC 5321 §4.5.2: remove the transparency dot of every line that has one
        # (looked for first: most messages have none, and the search is cheaper).
        text = block.replace(b"\n.", b"\n") if _STUFFED.search(block) is not None else block
        if text[:1] == b"." and not self.cut:
            text = text[1:]
        self.cut = False
        if len(text) > self.max_line and _has_long_line(text, self.max_line):
            self.too_long = True  # RFC 5321 §4.5.3.1.6: a text line, CRLF included
        self.size += len(text)
        if self.size > self.max_size:
            self.too_big = True
        if self.too_long or self.too_big:
            self.chunks.clear()  # keep reading to the end, but keep nothing
        else:
            self.chunks.append(text)

    def result(self) -> tuple[bytes, Reply | None]:
        if self.bad_newline:
            return b"", replies.BAD_NEWLINE
        if self.too_long:
            return b"", replies.LINE_TOO_LONG
        if self.too_big:
            return b"", replies.MESSAGE_TOO_BIG
        return b"".join(self.chunks), None


async def read_data(
    reader: asyncio.StreamReader, *, max_line: int, max_size: int
) -> tuple[bytes, Reply | None]:
    """Read DATA up to CRLF.CRLF; (message, None) or (b"", the error reply).

    RFC 5321 §4.1.1.4: the data ends with the sequence CRLF "." CRLF and
    nothing else.  Every line must end in CRLF: a bare LF or a bare CR
    anywhere rejects the whole message (554 5.5.2, as Postfix's
    smtpd_forbid_bare_newline = reject) so that no ``\\n.\\n``,
    ``\\r\\n.\\n``, ``\\n.\\r\\n`` or ``\\r.\\r\\n`` can end a message here
    that a next hop would end somewhere else (SMTP smuggling).  After an
    error the data is still read to its real end, and only one reply is
    sent, so a smuggled command is never executed.

    The reader's limit (``max_line + 1`` in the session) only sizes the pieces.
    """
    lines = _Lines(max_line, max_size)
    tail = b"\r\n"  # the stream's last two bytes so far: the DATA command's CRLF
    while True:
        try:
            piece = await reader.readuntil(TERMINATOR_LINE)
        except asyncio.LimitOverrunError as exc:
            # No ".\r\n" within the limit: take what is buffered before it (or all
            # but a possible start of one) and look again.
            piece = await reader.read(exc.consumed)
            lines.feed(piece)
            tail = (tail + piece[-2:])[-2:]
            continue
        # ".\r\n" ends the data only as a whole line after a CRLF-ended one.
        if (tail + piece[-5:-3])[-2:] == b"\r\n":
            lines.feed(piece[:-len(TERMINATOR_LINE)])
            return lines.result()
        lines.feed(piece)
        tail = piece[-2:]
