"""Fixtures for the queue worker tests: the loopback next hop of tests/deliver, a clock."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

# The next-hop server lives with the delivery tests; share it rather than copy it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deliver"))

from nexthop import NextHop
from queuekit import FakeClock


@pytest.fixture
async def nexthop() -> AsyncIterator[NextHop]:
    hop = NextHop()
    await hop.start()
    yield hop
    await hop.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
