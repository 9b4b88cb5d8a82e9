"""The DATA reader on any bytes (hypothesis), fed through a real asyncio.StreamReader.

Properties:
* a client's dot-stuffed message comes back byte for byte, and what follows
  the terminator (pipelined commands) stays in the reader;
* for *any* bytes, the data ends exactly after the first CRLF "." CRLF (the
  DATA command's CRLF counting as the first CRLF), never elsewhere; and the
  message is refused with 554 5.5.2 exactly when it holds a bare CR or LF.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import replies
from gateway.receive.data import read_data


def _stuff(lines: list[bytes]) -> bytes:
    # RFC 5321 §4.5.2, the client's side: double a leading dot.
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)


async def _read(stream: bytes, *, max_line: int = 1000,
                max_size: int = 10**7) -> tuple[bytes, replies.Reply | None, bytes]:
    reader = asyncio.StreamReader(limit=max_line + 1)
    reader.feed_data(stream)
    reader.feed_eof()
    data, problem = await read_data(reader, max_line=max_line, max_size=max_size)
    return data, problem, await reader.read()


def _run(
    coro: Coroutine[Any, Any, tuple[bytes, replies.Reply | None, bytes]],
) -> tuple[bytes, replies.Reply | None, bytes]:
    return asyncio.run(coro)


line_text = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(line_text, max_size=30), tail=st.binary(max_size=50))
def test_stuffed_message_round_trips_and_tail_stays(lines: list[bytes], tail: bytes) -> None:
    body = b"".join(x + b"\r\n" for x in lines)
    data, problem, rest = _run(_read(_stuff(lines) + b".\r\n" + tail))
    assert problem is None
    assert data == body
    assert rest == tail


dangerous = st.lists(
    st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", b"\r\n.", b".\r", b"\n.", b"xyz"]),
    max_size=40,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(junk=dangerous, tail=st.binary(max_size=20), max_line=st.sampled_from([8, 30, 1000]))
def test_data_ends_only_at_the_first_crlf_dot_crlf(junk: bytes, tail: bytes,
                                                     max_line: int) -> None:
    stream = junk + b"\r\n.\r\n" + tail
    virtual = b"\r\n" + stream  # the DATA command line ended with CRLF
    end = virtual.find(b"\r\n.\r\n")
    message = virtual[2 : end + 2]  # with the CRLF that ends its last line
    bare = b"\r" in message.replace(b"\r\n", b"") or b"\n" in message.replace(b"\r\n", b"")
    data, problem, rest = _run(_read(stream, max_line=max_line))
    assert rest == virtual[end + 5 :]
    assert (problem == replies.BAD_NEWLINE) == bare
    if problem is None:
        assert data == b"".join(
            (x[1:] if x.startswith(b".") else x) + b"\r\n"
            for x in message.split(b"\r\n")[:-1]
        )


def test_size_limit_counts_unstuffed_bytes() -> None:
    exact = b"a" * 8 + b"\r\n"  # 10 bytes
    assert _run(_read(b".." + exact[1:] + b".\r\n", max_size=10))[:2] == (b"." + exact[1:], None)
    assert _run(_read(exact + b"b\r\n.\r\n", max_size=10))[1] == replies.MESSAGE_TOO_BIG


def test_bare_newline_wins_over_other_problems() -> None:
    stream = b"x" * 50 + b"\r\n" + b"bare\nlf\r\n" + b".\r\n"
    assert _run(_read(stream, max_line=20, max_size=10))[1] == replies.BAD_NEWLINE
