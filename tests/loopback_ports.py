"""Loopback ports for test servers that are stopped and started again on the same port.

A port the kernel picks for ``bind(("127.0.0.1", 0))`` comes from the ephemeral range
(``net.ipv4.ip_local_port_range``), where every outgoing connection of every test also
takes its source port: between a server's stop and its restart (an outage test), or
between picking the port and the server binding it, a client connection can take it and
the restart fails with "address already in use".  Ports below that range are never
handed out to clients.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000  # above the well-known and most registered services' ports


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def stable_ports(n: int) -> list[int]:
    """``n`` distinct loopback TCP ports, free now, outside the ephemeral range."""
    top = _ephemeral_start()
    if top - LOWEST < 1000:  # an unusual range: fall back to what the kernel gives
        return _kernel_ports(n)
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(LOWEST, top)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (another test's server): try another
        ports.append(port)
    return ports


def _kernel_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()
