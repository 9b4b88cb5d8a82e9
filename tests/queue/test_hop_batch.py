"""HopPool hands results that are ready together to the loop in one wake-up."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gateway.offload import HopPool


async def test_results_ready_together_share_one_wake_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    wakes: list[object] = []
    real = loop.call_soon_threadsafe

    def spy(callback: object, *args: object, **kw: object) -> object:
        wakes.append(callback)
        return real(callback, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "call_soon_threadsafe", spy)
    pool = HopPool(8)
    gate = threading.Event()
    finished: list[int] = []

    def call(i: int) -> int:
        gate.wait()
        if i == 5:
            raise ValueError("five")
        finished.append(i)
        return i * 10

    try:
        tasks = [asyncio.ensure_future(pool.run(call, i)) for i in range(8)]
        await asyncio.sleep(0)  # every call submitted
        gate.set()
        # The loop is busy (this thread does not yield) while every call ends.
        deadline = time.monotonic() + 10
        while len(finished) < 7 and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.05)  # the last poster is past its append
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        pool.shutdown()
    assert results[:5] == [0, 10, 20, 30, 40] and results[6:] == [60, 70]
    assert isinstance(results[5], ValueError)
    assert len(wakes) == 1


async def test_later_results_wake_the_loop_again() -> None:
    pool = HopPool(2)
    try:
        for i in range(50):  # each after the previous batch was drained
            assert await pool.run(lambda x: x + 1, i) == i + 1
        assert await asyncio.gather(*(pool.run(abs, -i) for i in range(40))) == list(range(40))
    finally:
        pool.shutdown()
