"""STARTTLS command injection (CVE-2011-0411 class): regression tests, raw sockets.

Commands a client (or a man in the middle) pipelines in clear text after
STARTTLS must be discarded, not run inside the TLS session (RFC 3207 §4.2).
"""

from __future__ import annotations

import asyncio

from receive_helpers import Connect, RawClient, StartGateway, TlsFiles, greeted


async def test_pipelined_rset_after_starttls_is_not_executed_inside_tls(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await start_gateway()
    c: RawClient = await raw(gw.port())
    await c.line()
    c.send(b"EHLO client.example\r\n")
    await c.reply()
    c.send(b"STARTTLS\r\nRSET\r\n")  # one write, one packet
    assert await c.line() == "220 2.0.0 Ready to start TLS"
    await c.start_tls(tls_files.client_context())
    # Had RSET been kept, its "250 2.0.0 Reset OK" would come before NOOP's reply.
    assert await c.cmd("NOOP") == "250 2.0.0 OK"


async def test_injected_mail_transaction_after_starttls_is_discarded(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await start_gateway()
    c: RawClient = await raw(gw.port())
    await c.line()
    c.send(b"EHLO client.example\r\n")
    await c.reply()
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@ext.example>\r\nRCPT TO:<bob@local.example>\r\n")
    assert (await c.line()).startswith("220 ")
    await c.start_tls(tls_files.client_context())
    # RFC 3207 §4.2: the session starts over: no HELO, no transaction survives.
    assert await c.cmd("RCPT TO:<bob@local.example>") == "503 5.5.1 Send EHLO or HELO first"
    c.send(b"EHLO client.example\r\n")
    await c.reply()
    assert await c.cmd("RCPT TO:<bob@local.example>") == "503 5.5.1 Need MAIL command first"


async def test_starttls_twice_is_refused(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    await c.cmd("STARTTLS")
    await c.start_tls(tls_files.client_context())
    assert await c.cmd("STARTTLS") == "503 5.5.1 TLS already active"


async def test_starttls_inside_a_transaction_is_refused(start_gateway: StartGateway,
                                                        raw: Connect) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    await c.cmd("MAIL FROM:<a@ext.example>")
    assert await c.cmd("STARTTLS") == "503 5.5.1 Not permitted during a mail transaction"


async def test_failed_handshake_after_starttls_closes_cleanly(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    assert (await c.cmd("STARTTLS")).startswith("220 ")
    c.send(b"EHLO this is not a TLS ClientHello\r\n")
    await asyncio.wait_for(c.reader.read(), 10)  # a TLS alert or nothing, then EOF
    await gw.sessions_down_to(0)
    assert gw.spooled() == []


async def test_plaintext_client_on_implicit_tls_port_is_dropped(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(listeners=[{"name": "smtps", "address": "127.0.0.1:0",
                                         "tls": "implicit"}])
    c: RawClient = await raw(gw.port("smtps"))
    c.send(b"EHLO plain.example\r\n")
    data = await asyncio.wait_for(c.reader.read(), 10)
    assert b"220 " not in data  # no SMTP in clear text on an implicit-TLS port
    assert gw.listeners.sessions == 0
