"""Limits and the replies they give (issue 2 item 3), over real sockets."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from receive_helpers import Connect, Gateway, RawClient, StartGateway

from gateway.config import Config
from gateway.queue.spool import Spool
from gateway.receive import start_listeners
from gateway.runner import Runner

NO_TLS = [{"name": "inbound", "address": "127.0.0.1:0", "tls": "none"}]


async def _ready(gw: Gateway, raw: Connect, *, ehlo: bool = True) -> RawClient:
    c: RawClient = await raw(gw.port())
    assert (await c.line()).startswith("220 ")
    if ehlo:
        c.send(b"EHLO client.example\r\n")
        await c.reply()
    return c


async def test_declared_size_over_maximum_is_552_5_3_4(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(limits={"max_message_size": 4096}, listeners=NO_TLS)
    c = await _ready(gw, raw)
    assert (await c.cmd("MAIL FROM:<a@ext.example> SIZE=4097")).startswith("552 5.3.4 ")
    assert await c.cmd("MAIL FROM:<a@ext.example> SIZE=4096") == "250 2.1.0 Sender OK"


async def test_data_over_maximum_is_552_5_3_4_and_not_spooled(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(limits={"max_message_size": 4096}, listeners=NO_TLS)
    c = await _ready(gw, raw)
    await c.cmd("MAIL FROM:<a@ext.example>")
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    c.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 78 + b"\r\n") * 60)
    c.send(b".\r\n")
    assert (await c.line()).startswith("552 5.3.4 ")
    assert gw.spooled() == []
    # Exactly at the limit is fine (the Received header we add is not counted).
    await c.cmd("MAIL FROM:<a@ext.example>")
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    body = b"Subject: fits\r\n\r\n" + (b"z" * 98 + b"\r\n") * 40
    body += b"z" * (4096 - len(body) - 2) + b"\r\n"
    assert len(body) == 4096
    assert (await c.cmd(body + b".\r\n")).startswith("250 ")
    assert len(gw.spooled()) == 1


async def test_recipients_over_maximum_get_452_4_5_3(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(limits={"max_recipients": 3}, listeners=NO_TLS)
    c = await _ready(gw, raw)
    await c.cmd("MAIL FROM:<a@ext.example>")
    got = [await c.cmd(f"RCPT TO:<u{i}@local.example>") for i in range(5)]
    assert got[:3] == ["250 2.1.5 Recipient OK"] * 3
    assert got[3:] == ["452 4.5.3 Too many recipients"] * 2
    await c.cmd("DATA")
    assert (await c.cmd(b"Subject: x\r\n\r\ny\r\n.\r\n")).startswith("250 ")
    [m] = gw.spooled()
    assert m.envelope.rcpt_to == ["u0@local.example", "u1@local.example", "u2@local.example"]


async def test_command_line_too_long_is_500_5_5_6_and_session_continues(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(limits={"max_line_length": 100}, listeners=NO_TLS)
    c = await _ready(gw, raw)
    assert await c.cmd("NOOP " + "x" * 93) == "250 2.0.0 OK"  # 100 octets with CRLF
    assert await c.cmd("NOOP " + "x" * 94) == "500 5.5.6 Line too long"
    assert await c.cmd("NOOP " + "x" * 5000) == "500 5.5.6 Line too long"
    assert await c.cmd("NOOP") == "250 2.0.0 OK"


async def test_data_line_too_long_is_500_5_5_6_and_not_spooled(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(limits={"max_line_length": 100}, listeners=NO_TLS)
    c = await _ready(gw, raw)
    await c.cmd("MAIL FROM:<a@ext.example>")
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    assert await c.cmd(b"Subject: x\r\n\r\n" + b"y" * 99 + b"\r\n.\r\n") == \
        "500 5.5.6 Line too long"
    await c.cmd("MAIL FROM:<a@ext.example>")
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    assert await c.cmd(b"Subject: x\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n") == \
        "500 5.5.6 Line too long"
    assert gw.spooled() == []
    # 98 octets + CRLF, and a stuffed dot on top of a full line, are fine.
    await c.cmd("MAIL FROM:<a@ext.example>")
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    body = b"Subject: x\r\n\r\n" + b"y" * 98 + b"\r\n" + b"." + b"." * 98 + b"\r\n"
    assert (await c.cmd(body + b".\r\n")).startswith("250 ")


async def _noops_until_421(c: RawClient, allowed: int) -> None:
    """``allowed`` NOOPs answered, then the next one closes the session with 421."""
    for _ in range(allowed):
        assert await c.cmd("NOOP") == "250 2.0.0 OK"
    c.send(b"NOOP\r\n")
    assert await c.rest() == ["421 4.7.0 Too many commands, closing connection"]


async def test_too_many_commands_get_421_and_close(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(limits={"max_commands": 10}, listeners=NO_TLS)
    c = await _ready(gw, raw)  # EHLO is command 1
    await _noops_until_421(c, 9)


async def test_commands_of_accepted_messages_do_not_count_against_the_limit(
    start_gateway: StartGateway, raw: Connect
) -> None:
    # A relay reusing one connection for many messages is never cut off: 5 messages
    # are 15 commands (MAIL, RCPT, DATA) on top of EHLO, with a limit of 10.
    gw = await start_gateway(limits={"max_commands": 10}, listeners=NO_TLS)
    c = await _ready(gw, raw)
    for i in range(5):
        await c.cmd("MAIL FROM:<a@ext.example>")
        await c.cmd("RCPT TO:<bob@local.example>")
        assert (await c.cmd("DATA")).startswith("354 ")
        assert (await c.cmd(f"Subject: {i}\r\n\r\nbody\r\n.\r\n".encode())).startswith("250 ")
    assert len(gw.spooled()) == 5
    await _noops_until_421(c, 9)  # EHLO and these: the limit is reached by talk alone


async def test_refused_recipients_count_against_the_command_limit(
    start_gateway: StartGateway, raw: Connect
) -> None:
    # Address probing: refused RCPTs stay charged even when the message is accepted.
    gw = await start_gateway(limits={"max_commands": 10}, listeners=NO_TLS)
    c = await _ready(gw, raw)  # 1
    await c.cmd("MAIL FROM:<a@ext.example>")  # credited with the accepted message
    for _ in range(6):  # 2..7, refused: relaying to an outside domain
        assert (await c.cmd("RCPT TO:<x@elsewhere.example>")).startswith("550 5.7.1")
    await c.cmd("RCPT TO:<bob@local.example>")  # credited
    assert (await c.cmd("DATA")).startswith("354 ")  # credited
    assert (await c.cmd(b"Subject: x\r\n\r\nbody\r\n.\r\n")).startswith("250 ")
    await _noops_until_421(c, 3)  # 8..10, then the 11th is refused


async def test_idle_client_gets_421_4_4_2_and_is_disconnected(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(limits={"idle_timeout": 0.3}, listeners=NO_TLS)
    c = await _ready(gw, raw)
    assert await c.rest() == ["421 4.4.2 Idle timeout, closing connection"]


async def test_slow_but_steady_data_upload_is_not_idle(start_gateway: StartGateway,
                                                       raw: Connect) -> None:
    # aiosmtpd counts idleness from the last command; we count from the last byte.
    # The upload (2.6 s) outlasts the idle timeout (2 s); no gap comes near it.
    gw = await start_gateway(limits={"idle_timeout": 2.0}, listeners=NO_TLS)
    c = await _ready(gw, raw)
    await c.cmd("MAIL FROM:<a@ext.example>")
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    c.send(b"Subject: slow\r\n\r\n")
    for i in range(13):
        await asyncio.sleep(0.2)
        c.send(b"line %d\r\n" % i)
    assert (await c.cmd(b".\r\n")).startswith("250 ")


async def test_connections_per_ip_over_maximum_get_421_4_7_0(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(limits={"max_connections_per_ip": 2}, listeners=NO_TLS)
    first, second = await _ready(gw, raw), await _ready(gw, raw)
    third: RawClient = await raw(gw.port())
    assert await third.rest() == ["421 4.7.0 Too many connections from your address"]
    assert gw.listeners.sessions == 2
    assert await first.cmd("QUIT") == "221 2.0.0 Bye"
    await first.rest()
    await gw.sessions_down_to(1)
    fourth = await _ready(gw, raw)
    assert await fourth.cmd("NOOP") == "250 2.0.0 OK"
    assert await second.cmd("NOOP") == "250 2.0.0 OK"


async def test_no_room_in_spool_answers_452_4_3_1_at_mail_and_is_not_the_clients_error(
    tmp_path: Path, raw: Connect
) -> None:
    # A real spool whose free-space reserve is larger than any disk.
    cfg = Config.model_validate({
        "hostname": "mx.coffer.test", "data_dir": str(tmp_path),
        "relay": {"local_domains": ["local.example"]}, "listeners": NO_TLS,
    })
    runner = Runner(Spool(tmp_path / "spool", fsync=False, min_free_bytes=2**62))
    listeners = await start_listeners(cfg, runner)
    try:
        c: RawClient = await raw(listeners.address("inbound")[1])
        await c.line()
        await c.cmd("EHLO client.example")
        # A client retrying through our full disk is not cut off after 20 "errors":
        # the cause is ours, not its.
        for _ in range(25):
            assert await c.cmd("MAIL FROM:<a@ext.example>") == \
                "452 4.3.1 Insufficient system storage, try again later"
        assert await c.cmd("NOOP") == "250 2.0.0 OK"
    finally:
        await listeners.close(drain_timeout=1)


async def test_twenty_errors_end_the_session_with_421(start_gateway: StartGateway,
                                                      raw: Connect) -> None:
    gw = await start_gateway(listeners=NO_TLS)
    c = await _ready(gw, raw)
    for _ in range(19):
        assert (await c.cmd("BOGUS")).startswith("500 5.5.2")
    c.send(b"BOGUS\r\n")
    assert await c.rest() == ["421 4.7.0 Too many errors, closing connection"]


async def test_http_request_is_disconnected(start_gateway: StartGateway, raw: Connect) -> None:
    gw = await start_gateway(listeners=NO_TLS)
    c = await _ready(gw, raw, ehlo=False)
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await c.rest() == ["421 4.7.0 This is an SMTP server, closing connection"]


async def test_smtplib_sees_552_for_oversized_message(start_gateway: StartGateway) -> None:
    gw = await start_gateway(limits={"max_message_size": 2048}, listeners=NO_TLS)

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", gw.port()) as s:
            s.ehlo("client.example")
            s.mail("a@ext.example")  # no SIZE: the data itself is measured
            s.rcpt("bob@local.example")
            return s.data(b"Subject: big\r\n\r\n" + (b"x" * 60 + b"\r\n") * 100)

    code, text = await asyncio.to_thread(send)
    assert (code, text[:6]) == (552, b"5.3.4 ")
    assert gw.spooled() == []


async def test_connections_over_process_maximum_get_421_4_3_2(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(limits={"max_connections": 2}, listeners=NO_TLS)
    await _ready(gw, raw)
    await _ready(gw, raw)
    third: RawClient = await raw(gw.port())
    assert await third.rest() == ["421 4.3.2 Too many connections, try again later"]
