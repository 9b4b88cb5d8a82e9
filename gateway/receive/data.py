"""Reading the DATA of one message (RFC 5321 §4.1.1.4, §4.5.2) from a StreamReader.

Kept apart from the session so it can be tested on its own with any bytes.
The reader's limit must be at least ``max_line + 1``: longer lines arrive in
pieces (LimitOverrunError) and are rejected, but still read to their end.
"""

from __future__ import annotations

import asyncio

from gateway import replies
from gateway.replies import Reply


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
    """
    limit = max_size
    chunks: list[bytes] = []
    size = 0
    bad_newline = too_long = too_big = False
    prev_crlf = True  # the DATA command line ended the previous line
    in_long_line = False  # inside a line longer than the reader's limit
    long_tail_cr = False
    while True:
        try:
            line: bytes = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            # A piece of a line longer than the limit (it holds no LF).  A CR
            # it ends with is bare unless the next piece starts with LF.
            piece = await reader.read(exc.consumed)
            if long_tail_cr or b"\r" in piece[:-1]:
                bad_newline = True
            too_long, in_long_line, prev_crlf = True, True, False
            long_tail_cr = piece.endswith(b"\r")
            chunks.clear()
            continue
        if in_long_line:  # the end of an over-long line: never a terminator
            in_long_line = False
            crlf = line.endswith(b"\r\n") or (line == b"\n" and long_tail_cr)
            if not crlf or b"\r" in line[:-2] or (long_tail_cr and line != b"\n"):
                bad_newline = True
            prev_crlf, long_tail_cr = crlf, False
            continue
        if prev_crlf and line == b".\r\n":
            break
        crlf = line.endswith(b"\r\n")
        end = len(line) - (2 if crlf else 1)
        if not crlf or line.find(b"\r", 0, end) != -1:
            bad_newline = True  # bare LF ends this line, or a bare CR inside it
        prev_crlf = crlf
        if line[:1] == b".":
            line = line[1:]  # RFC 5321 §4.5.2: remove the transparency dot
        if len(line) > max_line:  # RFC 5321 §4.5.3.1.6 text line incl. CRLF
            too_long = True
        size += len(line)
        if size > limit:
            too_big = True
        if bad_newline or too_long or too_big:
            chunks.clear()  # keep reading to the end, but keep nothing
        else:
            chunks.append(line)
    if bad_newline:
        return b"", replies.BAD_NEWLINE
    if too_long:
        return b"", replies.LINE_TOO_LONG
    if too_big:
        return b"", replies.MESSAGE_TOO_BIG
    return b"".join(chunks), None
