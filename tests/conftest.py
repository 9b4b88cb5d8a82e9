"""Suite-wide guards.

Every test gets the gateway's logger back as it found it: a CLI command run in-process
sets up the gateway's log (handlers on stderr or a file), which would otherwise stay for
the tests after it (and hide their records from caplog).

Tests talk to loopback only (127.0.0.0/8, ::1).  This guard makes an accidental
lookup through the system resolver, or a connection to any other address, fail
loudly in the process running the tests instead of leaking traffic.  (Gateways
started as subprocesses are configured with loopback nameservers and routes.)
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway import log

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto


def _check(sock: socket.socket, address: Any) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("localhost", ""):
        return
    try:
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        raise PermissionError(f"test tried to reach {host!r}: loopback IPs only") from None
    mapped = getattr(ip, "ipv4_mapped", None)
    if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
        raise PermissionError(f"test tried to reach {host}: tests use loopback addresses only")


def _connect(self: socket.socket, address: Any) -> None:
    _check(self, address)
    _real_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    _check(self, address)
    return _real_connect_ex(self, address)


def _sendto(self: socket.socket, data: Any, *args: Any) -> int:
    _check(self, args[-1])
    return _real_sendto(self, data, *args)


@pytest.fixture(autouse=True, scope="session")
def loopback_only() -> Iterator[None]:
    socket.socket.connect = _connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign,assignment]
    socket.socket.sendto = _sendto  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        socket.socket.connect = _real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]
        socket.socket.sendto = _real_sendto  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def restore_gateway_logger() -> Iterator[None]:
    saved = list(log.LOGGER.handlers), log.LOGGER.level, log.LOGGER.propagate
    yield
    log.LOGGER.handlers[:], log.LOGGER.level, log.LOGGER.propagate = saved


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], list[dict[str, Any]]]]:
    """events(name) -> the fields of every ``gateway.log`` event of that name so far."""
    logger = logging.getLogger("coffer")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="coffer")

    def named(name: str) -> list[dict[str, Any]]:
        # The handler may see a record twice (directly and through propagation).
        records = {id(r): r for r in caplog.records}.values()
        return [r.__dict__["fields"] for r in records if r.getMessage() == name]

    yield named
    logger.removeHandler(caplog.handler)
