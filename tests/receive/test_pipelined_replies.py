"""Replies to a pipelined group are written together (RFC 2920 §3.2), never late.

The server may hold replies back while the client's next command is already
buffered, but must send them before it waits for the client: a reply is never
held when the next command is incomplete, held replies come before a closing
421, and the client sees exactly the same replies, in the same order, as from a
server that writes each at once.
"""

from __future__ import annotations

import asyncio

import pytest
from receive_helpers import Connect, RawClient, StartGateway

from gateway.receive import session

GROUP = (b"MAIL FROM:<a@ext.example>\r\nRCPT TO:<bob@local.example>\r\n"
         b"RCPT TO:<x@ext.example>\r\nDATA\r\n")
GROUP_REPLIES = ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK",
                 "550 5.7.1 Relay access denied", "354 End data with <CR><LF>.<CR><LF>"]


async def _ready(c: RawClient) -> None:
    await c.line()
    await c.cmd("EHLO client.example")


async def test_a_pipelined_group_is_answered_in_one_write(
    start_gateway: StartGateway, raw: Connect, writes: list[bytes]
) -> None:
    gw = await start_gateway()
    c = await raw(gw.port())
    await _ready(c)
    before = len(writes)
    c.send(GROUP)
    assert [await c.line() for _ in range(4)] == GROUP_REPLIES
    assert writes[before:] == ["".join(f"{r}\r\n" for r in GROUP_REPLIES).encode()]
    c.send(b"Subject: p\r\n\r\nbody\r\n.\r\n")
    assert (await c.line()).startswith("250 2.0.0 OK: queued as ")


async def test_a_reply_is_not_held_while_the_next_command_is_incomplete(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    c = await raw(gw.port())
    await _ready(c)
    # The server must not wait for the rest of RCPT before answering MAIL.
    c.send(b"MAIL FROM:<a@ext.example>\r\nRCPT TO:<bob@loc")
    assert await asyncio.wait_for(c.line(), 5) == "250 2.1.0 Sender OK"
    c.send(b"al.example>\r\n")
    assert await c.line() == "250 2.1.5 Recipient OK"


async def test_held_replies_come_before_a_closing_421(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    c = await raw(gw.port())
    await _ready(c)
    c.send(b"MAIL FROM:<a@ext.example>\r\nRCPT TO:<bob@local.example>\r\n"
           b"GET / HTTP/1.0\r\n")
    assert await c.rest() == ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK",
                              "421 4.7.0 This is an SMTP server, closing connection"]


SCRIPT = (
    b"NOOP\r\nRSET\r\nMAIL FROM:<a@ext.example>\r\nMAIL FROM:<b@ext.example>\r\n"
    b"RCPT TO:<bob@local.example>\r\nRCPT TO:<bad address>\r\nRCPT TO:<x@ext.example>\r\n"
    b"RCPT TO:<bob@local.example> FOO=1\r\nBOGUS\r\nRSET\r\nRCPT TO:<bob@local.example>\r\n"
    b"MAIL FROM:<a@ext.example> SIZE=10\r\nRCPT TO:<bob@local.example>\r\nDATA\r\n"
)


async def _replies(start_gateway: StartGateway, raw: Connect) -> list[str]:
    gw = await start_gateway()
    c = await raw(gw.port())
    await _ready(c)
    c.send(SCRIPT)
    lines = [await c.line() for _ in range(SCRIPT.count(b"\r\n"))]
    c.send(b"Subject: s\r\n\r\nbody\r\n.\r\nNOOP\r\nRSET\r\nQUIT\r\n")
    rest = await c.rest()
    return lines + [line.split(" queued as ")[0] for line in rest]


async def test_the_replies_are_those_of_a_server_that_holds_none(
    start_gateway: StartGateway, raw: Connect, writes: list[bytes],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    held = await _replies(start_gateway, raw)
    held_writes = len(writes)
    monkeypatch.setattr(session, "HOLDABLE", frozenset())
    writes.clear()
    plain = await _replies(start_gateway, raw)
    assert held == plain
    assert len(plain) == 18
    assert held_writes < len(writes)  # and holding did write less often
