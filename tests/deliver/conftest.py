"""Fixtures for the delivery tests: a loopback next hop, test TLS, a loopback DNS server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from grouppeers import GroupServer
from nexthop import DnsZone, NextHop, TlsPair, make_tls

from gateway.config import Config, DeliveryConfig, DnsConfig, QueueConfig


@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelining"])
async def nexthop(request: pytest.FixtureRequest) -> AsyncIterator[NextHop]:
    # Every delivery test runs against a next hop with and without PIPELINING
    # (RFC 2920): both client paths must give the same results.
    hop = NextHop(pipelining=request.param)
    await hop.start()
    yield hop
    await hop.stop()


@pytest.fixture
def tls(tmp_path: Path) -> TlsPair:
    return make_tls(tmp_path)


@pytest.fixture
def dns_zone() -> Iterator[DnsZone]:
    zone = DnsZone()
    zone.start()
    yield zone
    zone.stop()


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., Config]:
    def make(routes: dict[str, str], *, nameservers: list[str] | None = None,
             **queue: Any) -> Config:
        return Config(
            hostname="coffer.test",
            data_dir=tmp_path,
            queue=QueueConfig(**queue),
            delivery=DeliveryConfig(routes=routes, connect_timeout=5.0, command_timeout=5.0),
            dns=DnsConfig(nameservers=nameservers or ["127.0.0.1:1"], timeout=2.0),
        )
    return make


@pytest.fixture
async def scripted() -> AsyncIterator[list[GroupServer]]:
    """The scripted group servers a test starts (grouppeers.GroupServer), stopped at its end."""
    servers: list[GroupServer] = []
    yield servers
    for s in servers:
        await s.stop()
