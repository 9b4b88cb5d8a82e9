"""The metrics endpoint serves the gateway's registry on loopback, and only on loopback."""

from __future__ import annotations

import urllib.request

import pytest

from gateway import metrics
from gateway.errors import ConfigError
from gateway.metrics_http import MetricsServer, endpoint


@pytest.mark.parametrize(
    ("address", "index", "expected"),
    [
        ("127.0.0.1:9025", 0, ("127.0.0.1", 9025)),
        ("127.0.0.1:9025", 2, ("127.0.0.1", 9027)),  # worker k serves on port + k
        ("[::1]:9100", 1, ("::1", 9101)),
        ("localhost:9025", 0, ("localhost", 9025)),
        ("127.0.0.5", 0, ("127.0.0.5", 9025)),
        ("127.0.0.1:0", 3, ("127.0.0.1", 0)),
    ],
)
def test_endpoint_of_each_worker(address: str, index: int, expected: tuple[str, int]) -> None:
    assert endpoint(address, index) == expected


@pytest.mark.parametrize("address", ["0.0.0.0:9025", "[::]:9025", "192.0.2.1:9025",
                                     "metrics.example:9025"])
def test_a_non_loopback_address_is_refused(address: str) -> None:
    with pytest.raises(ValueError):
        endpoint(address)
    with pytest.raises(ConfigError) as info:
        MetricsServer(address)
    assert info.value.key == "metrics.address"


def test_server_exposes_the_gateway_registry_and_closes_cleanly() -> None:
    metrics.ACCEPTED.labels("metrics-test").inc()
    server = MetricsServer("127.0.0.1:0")
    host, port = server.start()
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
    finally:
        server.close()
    assert 'coffer_messages_accepted_total{listener="metrics-test"} 1.0' in body
    assert "# TYPE coffer_queue_depth gauge" in body
