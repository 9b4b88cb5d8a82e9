"""Listeners: bound addresses, SO_REUSEPORT, graceful drain on close."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import pytest
from receive_helpers import Connect, RawClient, StartGateway, TlsFiles, greeted, make_tls_files

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.queue.spool import Spool
from gateway.receive import start_listeners
from gateway.runner import Runner


def _cfg(tmp_path: Path, *listeners: dict[str, str]) -> Config:
    return Config.model_validate({
        "hostname": "mx.coffer.test", "data_dir": str(tmp_path),
        "relay": {"local_domains": ["local.example"]},
        "listeners": list(listeners) or [{"name": "inbound", "address": "127.0.0.1:0",
                                          "tls": "none"}],
    })


async def _transaction(c: RawClient) -> None:
    assert (await c.line()).startswith("220 ")
    await c.cmd("EHLO client.example")
    assert await c.cmd("MAIL FROM:<a@ext.example>") == "250 2.1.0 Sender OK"
    assert await c.cmd("RCPT TO:<bob@local.example>") == "250 2.1.5 Recipient OK"
    assert (await c.cmd("DATA")).startswith("354 ")


async def test_port_zero_reports_each_bound_address(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path,
               {"name": "mx", "address": "127.0.0.1:0", "tls": "none"},
               {"name": "sub", "role": "submission", "address": "127.0.0.1:0", "tls": "none"})
    listeners = await start_listeners(cfg, Runner(Spool(tmp_path / "spool", fsync=False)))
    try:
        addrs = listeners.addresses
        assert set(addrs) == {"mx", "sub"}
        assert addrs["mx"][0] == "127.0.0.1" and addrs["mx"][1] > 0
        assert addrs["mx"][1] != addrs["sub"][1]
        assert listeners.address("sub") == addrs["sub"]
        for name in addrs:
            r, w = await asyncio.open_connection(*listeners.address(name))
            assert (await r.readline()).startswith(b"220 mx.coffer.test ESMTP Coffer")
            w.close()
            await w.wait_closed()
    finally:
        await listeners.close(drain_timeout=1)


async def test_reuse_port_lets_two_workers_share_a_port(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    first = await start_listeners(_cfg(tmp_path), Runner(spool), reuse_port=True)
    try:
        port = first.address("inbound")[1]
        cfg2 = _cfg(tmp_path, {"name": "inbound", "address": f"127.0.0.1:{port}",
                               "tls": "none"})
        second = await start_listeners(cfg2, Runner(spool), reuse_port=True)
        try:
            assert second.address("inbound") == ("127.0.0.1", port)
            r, w = await asyncio.open_connection("127.0.0.1", port)
            assert (await r.readline()).startswith(b"220 ")
            w.close()
            await w.wait_closed()
        finally:
            await second.close(drain_timeout=1)
    finally:
        await first.close(drain_timeout=1)


async def test_port_in_use_is_a_config_error_naming_the_listener(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    first = await start_listeners(_cfg(tmp_path), Runner(spool))
    try:
        port = first.address("inbound")[1]
        cfg2 = _cfg(tmp_path,
                    {"name": "ok", "address": "127.0.0.1:0", "tls": "none"},
                    {"name": "clash", "address": f"127.0.0.1:{port}", "tls": "none"})
        with pytest.raises(ConfigError) as info:
            await start_listeners(cfg2, Runner(spool))
        assert "listener 'clash' cannot listen on" in str(info.value)
        assert info.value.key == "listeners.1.address"
    finally:
        await first.close(drain_timeout=1)


async def test_unreadable_tls_key_is_a_config_error(tmp_path: Path,
                                                    tls_files: TlsFiles) -> None:
    cfg = Config.model_validate({
        "data_dir": str(tmp_path), "tls": {"cert": str(tls_files.cert), "key": "missing.pem"},
        "listeners": [{"name": "inbound", "address": "127.0.0.1:0", "tls": "starttls"}],
    })
    with pytest.raises(ConfigError, match="cannot load TLS certificate/key"):
        await start_listeners(cfg, Runner(Spool(tmp_path / "spool", fsync=False)))


async def test_close_lets_the_transaction_in_flight_finish_then_says_421(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    busy: RawClient = await raw(gw.port())
    await _transaction(busy)
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
    idle: RawClient = await raw(gw.port())
    assert (await idle.line()).startswith("220 ")
    await idle.cmd("EHLO client.example")
    assert gw.listeners.sessions == 2

    closing = asyncio.create_task(gw.listeners.close(drain_timeout=10))
    # The idle session is told at once; nobody new gets in.
    assert await idle.rest() == ["421 4.3.2 Service shutting down, try again later"]
    with pytest.raises(OSError):
        _, w = await asyncio.open_connection("127.0.0.1", gw.port())
        w.close()
        await w.wait_closed()
    # The busy one finishes its message, gets its 250, then the 421.
    busy.send(b"second half\r\n.\r\n")
    lines = await busy.rest()
    assert lines[0].startswith("250 2.0.0 OK: queued as ")
    assert lines[1:] == ["421 4.3.2 Service shutting down, try again later"]
    await closing
    assert gw.listeners.sessions == 0
    [m] = gw.spooled()
    assert m.data.endswith(b"first half\r\nsecond half\r\n")


async def test_close_after_drain_timeout_cuts_stuck_sessions(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    stuck: RawClient = await raw(gw.port())
    await _transaction(stuck)
    stuck.send(b"Subject: never finished\r\n")
    await asyncio.sleep(0)
    await gw.listeners.close(drain_timeout=0.2)
    assert await stuck.rest() == ["421 4.3.2 Service shutting down, try again later"]
    assert gw.listeners.sessions == 0
    assert gw.spooled() == []


async def test_sessions_counts_open_connections(start_gateway: StartGateway, raw: Connect) -> None:
    gw = await start_gateway()
    assert gw.listeners.sessions == 0
    clients = [await raw(gw.port()) for _ in range(3)]
    for c in clients:
        await c.line()
    assert gw.listeners.sessions == 3
    for c in clients:
        await c.cmd("QUIT")
        with contextlib.suppress(ConnectionError):
            await c.rest()
    await gw.sessions_down_to(0)


async def test_reconfigure_applies_to_new_sessions_only(start_gateway: StartGateway,
                                                        raw: Connect) -> None:
    gw = await start_gateway()
    before: RawClient = await raw(gw.port())
    await before.line()
    await before.cmd("EHLO client.example")
    data = gw.cfg.model_dump()
    data["relay"]["local_domains"] = ["local.example", "new.example"]
    data["limits"]["max_recipients"] = 1
    gw.listeners.reconfigure(Config.model_validate(data))
    assert gw.listeners.config.relay.local_domains == ["local.example", "new.example"]
    after: RawClient = await raw(gw.port())
    await after.line()
    await after.cmd("EHLO client.example")
    for c in (before, after):
        await c.cmd("MAIL FROM:<a@ext.example>")
    assert (await before.cmd("RCPT TO:<x@new.example>")).startswith("550 5.7.1")
    assert await after.cmd("RCPT TO:<x@new.example>") == "250 2.1.5 Recipient OK"
    assert (await after.cmd("RCPT TO:<y@new.example>")).startswith("452 4.5.3")


async def test_reconfigure_refuses_listener_changes_and_keeps_the_old_config(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    data = gw.cfg.model_dump()
    data["listeners"][0]["address"] = "127.0.0.1:1"
    data["relay"]["local_domains"] = ["new.example"]
    with pytest.raises(ConfigError, match="restart"):
        gw.listeners.reconfigure(Config.model_validate(data))
    data = gw.cfg.model_dump()
    data["auth"]["passwd_file"] = "no-such-file"
    with pytest.raises(ConfigError, match="cannot read"):
        gw.listeners.reconfigure(Config.model_validate(data))
    c = await greeted(gw, raw)
    await c.cmd("MAIL FROM:<a@ext.example>")
    assert await c.cmd("RCPT TO:<x@local.example>") == "250 2.1.5 Recipient OK"


async def test_ipv6_listener_records_the_client_and_literal(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"name": "v6", "address": "[::1]:0", "tls": "none"})
    spool = Spool(tmp_path / "spool", fsync=False)
    listeners = await start_listeners(cfg, Runner(spool))
    try:
        host, port = listeners.address("v6")
        assert host == "::1"
        r, w = await asyncio.open_connection("::1", port)
        try:
            w.write(b"EHLO v6.example\r\nMAIL FROM:<a@ext.example>\r\n"
                    b"RCPT TO:<bob@local.example>\r\nDATA\r\n")
            await r.readuntil(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            w.write(b"Subject: v6\r\n\r\nhi\r\n.\r\nQUIT\r\n")
            assert b"250 2.0.0 OK: queued as " in await r.read()
        finally:
            w.close()
            await w.wait_closed()
    finally:
        await listeners.close(drain_timeout=1)
    [qid] = spool.queue_ids()
    m = spool.load(qid)
    assert m.envelope.client_ip == "::1"
    assert m.data.startswith(b"Received: from v6.example ([IPv6:::1])\r\n")


async def test_reconfigure_loads_a_renewed_certificate_for_new_handshakes(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles, tmp_path: Path
) -> None:
    gw = await start_gateway(listeners=[{"name": "smtps", "address": "127.0.0.1:0",
                                         "tls": "implicit"}])
    (tmp_path / "renewed").mkdir()
    renewed = make_tls_files(tmp_path / "renewed")
    data = gw.cfg.model_dump()
    data["tls"] = {"cert": str(renewed.cert), "key": str(renewed.key)}
    gw.listeners.reconfigure(Config.model_validate(data))
    c: RawClient = await raw(gw.port("smtps"), tls=renewed.client_context())
    assert (await c.line()).startswith("220 ")
    with pytest.raises(ssl.SSLCertVerificationError):
        await raw(gw.port("smtps"), tls=tls_files.client_context())
