"""The suite's own guard: no test can send traffic beyond loopback."""

from __future__ import annotations

import socket

import pytest


def test_udp_to_a_non_loopback_resolver_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(PermissionError):
        s.sendto(b"x", ("10.255.255.53", 53))


def test_tcp_to_a_public_address_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, pytest.raises(PermissionError):
        s.connect(("192.0.2.1", 25))


def test_loopback_is_allowed() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("127.0.0.1", 9))
