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
from gateway.receive.data import _has_long_line, read_data


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


async def _read_in_pieces(stream: bytes, cuts: list[int], *, max_line: int,
                          max_size: int) -> tuple[bytes, replies.Reply | None, bytes]:
    """As _read, but the bytes arrive in pieces, the reader waiting between them."""
    reader = asyncio.StreamReader(limit=max_line + 1)

    async def feed() -> None:
        start = 0
        for cut in [*sorted(set(cuts)), len(stream)]:
            if cut > start:
                reader.feed_data(stream[start:cut])
                start = cut
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.ensure_future(feed())
    data, problem = await read_data(reader, max_line=max_line, max_size=max_size)
    await feeder
    return data, problem, await reader.read()


@settings(max_examples=300, deadline=None)
@given(junk=dangerous, tail=st.binary(max_size=20), max_line=st.sampled_from([4, 8, 30, 1000]),
       max_size=st.sampled_from([5, 40, 10**7]),
       cuts=st.lists(st.integers(min_value=1, max_value=200), max_size=12))
def test_pieces_of_any_size_read_as_the_whole(junk: bytes, tail: bytes, max_line: int,
                                              max_size: int, cuts: list[int]) -> None:
    # Where the network splits the stream changes nothing: the same message, the
    # same problem, the same bytes left for the next command.
    stream = junk + b"\r\n.\r\n" + tail
    expected = _line_by_line(stream, max_line=max_line, max_size=max_size)
    assert _run(_read(stream, max_line=max_line, max_size=max_size)) == expected
    assert _run(_read_in_pieces(stream, cuts, max_line=max_line, max_size=max_size)) == expected


def _line_by_line(stream: bytes, *, max_line: int,
                  max_size: int) -> tuple[bytes, replies.Reply | None, bytes]:
    """The reference: RFC 5321's rules applied one LF-ended line at a time."""
    virtual = b"\r\n" + stream
    end = virtual.find(b"\r\n.\r\n")
    lines = [x + b"\n" for x in virtual[2 : end + 2].split(b"\n")[:-1]]
    rest = virtual[end + 5 :]
    if any(not x.endswith(b"\r\n") or b"\r" in x[:-2] for x in lines):
        return b"", replies.BAD_NEWLINE, rest
    text = [x[1:] if x.startswith(b".") else x for x in lines]
    if any(len(x) > max_line for x in text):
        return b"", replies.LINE_TOO_LONG, rest
    if sum(map(len, text)) > max_size:
        return b"", replies.MESSAGE_TOO_BIG, rest
    return b"".join(text), None, rest


@settings(max_examples=500, deadline=None)
@given(text=st.lists(st.sampled_from([b"\n", b"a", b"bb", b"\r\n", b"x" * 7]), max_size=60)
       .map(b"".join), max_line=st.integers(min_value=0, max_value=12))
def test_long_line_search_is_the_longest_line_rule(text: bytes, max_line: int) -> None:
    # The reader's shortcut against the rule it replaced: some line, CRLF included
    # (its LF counted as one more byte), is longer than max_line.
    assert _has_long_line(text, max_line) == (max(map(len, text.split(b"\n"))) + 1 > max_line)
