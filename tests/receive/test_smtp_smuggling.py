"""SMTP smuggling (CVE-2023-51764/51765/51766 class): regression tests, raw sockets.

A message may end only with CRLF "." CRLF (RFC 5321 §4.1.1.4).  If we ended it
at ``\\n.\\n`` (or a next hop did), the bytes after it would run as commands: a
second, forged message.  Coffer refuses bare LF and bare CR anywhere in DATA
with one 554 5.5.2 reply after the real end of the data, and spools nothing —
in particular not the smuggled message.
"""

from __future__ import annotations

import pytest
from receive_helpers import Connect, RawClient, StartGateway

from gateway import replies

SMUGGLED = (
    b"MAIL FROM:<ceo@local.example>\r\n"
    b"RCPT TO:<victim@local.example>\r\n"
    b"DATA\r\n"
    b"From: ceo@local.example\r\nSubject: smuggled\r\n\r\nwire the money\r\n"
)
BAD_NEWLINE = str(replies.BAD_NEWLINE)


async def _open_transaction(c: RawClient) -> None:
    assert (await c.line()).startswith("220 ")
    c.send(b"EHLO attacker.example\r\n")
    await c.reply()
    assert await c.cmd("MAIL FROM:<a@ext.example>") == "250 2.1.0 Sender OK"
    assert await c.cmd("RCPT TO:<bob@local.example>") == "250 2.1.5 Recipient OK"
    assert (await c.cmd("DATA")).startswith("354 ")


@pytest.mark.parametrize("fake_end", [
    pytest.param(b"\n.\n", id="LF.LF"),
    pytest.param(b"\r\n.\n", id="CRLF.LF"),
    pytest.param(b"\n.\r\n", id="LF.CRLF"),
    pytest.param(b"\r.\r\n", id="CR.CRLF"),
    pytest.param(b"\r\n.\r", id="CRLF.CR"),
    pytest.param(b"\r.\r", id="CR.CR"),
])
async def test_fake_end_of_data_neither_ends_nor_splits_the_message(
    start_gateway: StartGateway, raw: Connect, fake_end: bytes
) -> None:
    gw = await start_gateway()
    c: RawClient = await raw(gw.port())
    await _open_transaction(c)
    c.send(b"Subject: innocent\r\n\r\nhello" + fake_end + SMUGGLED + b".\r\nQUIT\r\n")
    # Exactly one reply for the whole DATA (the rejection), then QUIT's.
    assert await c.rest() == [BAD_NEWLINE, "221 2.0.0 Bye"]
    assert gw.spooled() == []


async def test_control_real_end_of_data_does_end_the_message(
    start_gateway: StartGateway, raw: Connect
) -> None:
    # The same harness with a real CRLF.CRLF: two messages, proving the test above
    # would see a smuggled transaction if one were executed.
    gw = await start_gateway()
    c: RawClient = await raw(gw.port())
    await _open_transaction(c)
    c.send(b"Subject: innocent\r\n\r\nhello\r\n.\r\n" + SMUGGLED + b".\r\nQUIT\r\n")
    lines = await c.rest()
    assert [x[:3] for x in lines] == ["250", "250", "250", "354", "250", "221"]
    assert len(gw.spooled()) == 2


@pytest.mark.parametrize("body", [
    pytest.param(b"Subject: x\r\n\r\nbare LF here\nmore\r\n", id="bare-LF"),
    pytest.param(b"Subject: x\r\n\r\nbare CR here\rmore\r\n", id="bare-CR"),
    pytest.param(b"Subject: x\n\nall LF\n", id="all-LF-lines"),
    pytest.param(b"Subject: x\r\n\r\nCR before CRLF\r\r\n", id="CR-CRLF"),
])
async def test_bare_cr_or_lf_in_data_is_rejected_554_5_5_2(
    start_gateway: StartGateway, raw: Connect, body: bytes
) -> None:
    gw = await start_gateway()
    c: RawClient = await raw(gw.port())
    await _open_transaction(c)
    c.send(body + b"\r\n.\r\n")  # a CRLF first: "\n.\r\n" would not end the data
    assert await c.line() == BAD_NEWLINE
    # The session goes on: the next, clean transaction is accepted.
    assert await c.cmd("MAIL FROM:<a@ext.example>") == "250 2.1.0 Sender OK"
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    assert (await c.cmd(b"Subject: clean\r\n\r\nok\r\n.\r\n")).startswith("250 ")
    [m] = gw.spooled()
    assert m.data.endswith(b"Subject: clean\r\n\r\nok\r\n")


async def test_bare_lf_after_a_long_line_is_still_caught(
    start_gateway: StartGateway, raw: Connect
) -> None:
    # A line longer than the reader's limit is read in pieces; the LF ending it
    # must still be checked for its CR, and must never end the data.
    gw = await start_gateway()
    c: RawClient = await raw(gw.port())
    await _open_transaction(c)
    c.send(b"Subject: x\r\n\r\n" + b"a" * 5000 + b"\n.\n" + SMUGGLED + b".\r\nQUIT\r\n")
    lines = await c.rest()
    assert lines == [BAD_NEWLINE, "221 2.0.0 Bye"]
    assert gw.spooled() == []


async def test_terminator_split_across_writes_is_recognised(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    c: RawClient = await raw(gw.port())
    await _open_transaction(c)
    for piece in (b"Subject: x\r\n\r\nbody\r", b"\n.", b"\r", b"\n"):
        c.send(piece)
        await c.writer.drain()
    assert (await c.line()).startswith("250 ")
    [m] = gw.spooled()
    assert m.data.endswith(b"\r\n\r\nbody\r\n")
