"""Real processes on loopback: `coffer serve` as a subprocess and a next-hop sink process."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from svcproc import Gateway, Sink


@pytest.fixture
def procs() -> Iterator[list[Gateway | Sink]]:
    """Everything started by a test; whatever is still running at the end is stopped."""
    started: list[Gateway | Sink] = []
    yield started
    for p in reversed(started):
        if isinstance(p, Gateway) and p.proc is not None:
            try:
                p.kill9()
            except ProcessLookupError:  # it exited by itself (what some tests are about)
                p.proc.wait(timeout=10)
        elif isinstance(p, Sink):
            p.stop()
