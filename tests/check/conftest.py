"""Fixtures of the check-stage tests: a real DNS server on loopback, the corpus."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from authcorpus import corpus_dir
from authdns import DnsTestServer, Zone

from gateway.check.dns import Resolver, TtlCache


@pytest.fixture(scope="session")
def corpus() -> Path:
    path = corpus_dir()
    if path is None:
        pytest.skip("test corpus not found: set COFFER_CORPUS or check out ../shared/corpus")
    return path


@pytest.fixture(scope="session")
def _dns_server() -> Iterator[DnsTestServer]:
    server = DnsTestServer(Zone()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dns_server(_dns_server: DnsTestServer) -> Iterator[DnsTestServer]:
    """The loopback DNS server, with an empty zone for this test to fill."""
    _dns_server.zone.clear()
    yield _dns_server
    _dns_server.zone.clear()


@pytest.fixture
def zone(dns_server: DnsTestServer) -> Zone:
    return dns_server.zone


@pytest.fixture
def resolver(dns_server: DnsTestServer) -> Resolver:
    """A resolver that asks only the loopback server; short timeout for TIMEOUT names."""
    return Resolver([dns_server.hostport], timeout=0.5, cache=TtlCache())
