"""Fixtures: real SMTP listeners on 127.0.0.1 with a real spool, and raw clients.

``start_gateway(clock=..., **overrides)`` starts :func:`gateway.receive.start_listeners`
with a ``Runner`` spooling into a temporary directory (fsync off: durability is
not what these tests are about) and closes everything at the end of the test.
TLS uses a throw-away self-signed certificate for ``localhost``/127.0.0.1 made
with ``cryptography``; clients verify it against that certificate.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from receive_helpers import (
    CHEAP_HASHER,
    LOCAL,
    PASSWORD,
    UNKNOWN_TEXT,
    USER,
    Gateway,
    RawClient,
    StartGateway,
    TlsFiles,
    make_tls_files,
    merge,
)

from gateway.config import Config
from gateway.queue.spool import Spool
from gateway.receive import start_listeners
from gateway.receive.auth import hash_password
from gateway.receive.recipient_probe import RecipientGate
from gateway.receive.session import SmtpSession
from gateway.runner import Runner

# The next-hop server lives with the delivery tests; share it rather than copy it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deliver"))
from nexthop import NextHop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """asyncio's loop; uvloop's with COFFER_EVENT_LOOP=uvloop (as gateway.service offers)."""
    if os.environ.get("COFFER_EVENT_LOOP", "").lower() == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def passwd_line() -> str:
    return f"{USER}:{hash_password(PASSWORD, CHEAP_HASHER)}\n"


def base_config(tmp_path: Path, tls_files: TlsFiles) -> dict[str, Any]:
    return {
        "hostname": "mx.coffer.test",
        "data_dir": str(tmp_path),
        "relay": {"local_domains": [LOCAL, "Other.Example"]},
        "tls": {"cert": str(tls_files.cert), "key": str(tls_files.key)},
        "auth": {"passwd_file": "passwd"},
        "queue": {"fsync": False},
        "listeners": [{"name": "inbound", "address": "127.0.0.1:0", "tls": "starttls"}],
    }


@pytest.fixture
async def start_gateway(
    tmp_path: Path, tls_files: TlsFiles, passwd_line: str
) -> AsyncIterator[StartGateway]:
    started: list[Gateway] = []

    async def start(clock: Callable[[], float] = time.time, **overrides: Any) -> Gateway:
        (tmp_path / "passwd").write_text(passwd_line)
        cfg = Config.model_validate(merge(base_config(tmp_path, tls_files), overrides))
        spool = Spool(tmp_path / f"spool{len(started)}", fsync=False)
        accepted: list[str] = []
        runner = Runner(spool, on_queued=accepted.append)
        gw = Gateway(cfg, spool, await start_listeners(cfg, runner, clock=clock), accepted)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.listeners.close(drain_timeout=2.0)


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Awaitable[RawClient]]]:
    clients: list[RawClient] = []

    async def connect(port: int, *, tls: ssl.SSLContext | None = None) -> RawClient:
        c = await RawClient.connect(port, tls=tls)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        await c.close()


@pytest.fixture
async def hop() -> AsyncIterator[NextHop]:
    """A loopback mail store that knows every user but nobody@ (550) and busy@ (450); it
    counts the connections and RCPTs it sees (recipient verification tests)."""
    h = NextHop(rules={
        f"nobody@{LOCAL}": f"550 {UNKNOWN_TEXT}",
        f"busy@{LOCAL}": "450 4.2.1 Mailbox busy, try later",
    })
    await h.start()
    yield h
    await h.stop()


@pytest.fixture
async def gates() -> AsyncIterator[list[RecipientGate]]:
    """The RecipientGates a test makes (receive_helpers.make_gate), closed at its end."""
    made: list[RecipientGate] = []
    yield made
    for g in made:
        await g.aclose()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every transport write of every session, in order."""
    seen: list[bytes] = []
    original = SmtpSession.connection_made

    def connection_made(self: SmtpSession, transport: Any) -> None:
        if self.transport is None:
            write = transport.write

            def recording(data: bytes) -> None:
                seen.append(bytes(data))
                write(data)

            transport.write = recording
        original(self, transport)

    monkeypatch.setattr(SmtpSession, "connection_made", connection_made)
    return seen
