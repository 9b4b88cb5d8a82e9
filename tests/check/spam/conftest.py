"""Fixtures of the spam tests: real spamd and rspamd on loopback.

The DNS server (``zone``, ``resolver``) and ``corpus`` fixtures come from
tests/check/conftest.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from scanners import Daemon, start_rspamd, start_spamd


@pytest.fixture(scope="session")
def spamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A real spamd (SpamAssassin) on loopback, local tests only."""
    daemon = start_spamd(tmp_path_factory.mktemp("spamd"))
    if isinstance(daemon, str):
        pytest.skip(daemon)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A real rspamd normal worker on loopback, with no network modules."""
    daemon = start_rspamd(tmp_path_factory.mktemp("rspamd"))
    if isinstance(daemon, str):
        pytest.skip(daemon)
    try:
        yield daemon
    finally:
        daemon.stop()
