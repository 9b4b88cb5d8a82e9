"""Prometheus exposition of :data:`gateway.metrics.REGISTRY` on a loopback HTTP port.

Metrics are for the operator's scraper on the same host (or a tunnel), never for
the world: an address that is not loopback is a configuration error.

Several worker processes (``queue.workers`` > 1): each worker serves its own
registry on its own port, ``metrics.address`` port + worker index (worker 0 on
the configured port, worker 1 on the next, ...).  We chose this over
prometheus_client's multiprocess mode because that mode must be switched on by
an environment variable before any metric is created, keeps mmap files that
need cleaning when a worker dies, and cannot aggregate gauges without a mode per
gauge; one target per worker is what Prometheus does natively (sum() over the
targets gives the gateway's totals).
"""

from __future__ import annotations

import ipaddress
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from gateway.config import parse_hostport
from gateway.errors import ConfigError
from gateway.metrics import REGISTRY

DEFAULT_PORT = 9025


def endpoint(address: str, worker_index: int = 0) -> tuple[str, int]:
    """(host, port) for a worker, or ValueError when the address is not loopback."""
    host, port = parse_hostport(address, DEFAULT_PORT)
    if host.lower() != "localhost":
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{address!r}: give a loopback IP address (127.0.0.1 or ::1), not a host name"
            ) from None
        if not ip.is_loopback:
            raise ValueError(
                f"{address!r} is not a loopback address; metrics are served on loopback only"
            )
    if not 0 <= port <= 65535:
        raise ValueError(f"{address!r}: port out of range")
    return host, (port + worker_index if port else 0)


class MetricsServer:
    """A small threaded HTTP server answering ``GET /metrics`` (any path, in fact)."""

    def __init__(self, address: str, worker_index: int = 0) -> None:
        try:
            self.host, self.port = endpoint(address, worker_index)
        except ValueError as exc:
            raise ConfigError(str(exc), key="metrics.address") from None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve in a daemon thread; returns the bound (host, port)."""
        host = "127.0.0.1" if self.host.lower() == "localhost" else self.host
        self._server, self._thread = start_http_server(self.port, host, registry=REGISTRY)
        self.port = self._server.server_port
        return host, self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
