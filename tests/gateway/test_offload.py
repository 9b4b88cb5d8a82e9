"""gateway.offload: a message's CPU work runs inline when small, in a thread when large."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.offload import INLINE_BYTES, HopPool, cpu_bound, in_thread


def _where(tag: str, *, suffix: str = "") -> tuple[str, int]:
    return tag + suffix, threading.get_ident()


async def test_small_message_work_runs_on_the_event_loop_thread() -> None:
    loop_thread = threading.get_ident()
    result = await cpu_bound(INLINE_BYTES, None, _where, "small", suffix="!")
    assert result == ("small!", loop_thread)


async def test_large_message_work_runs_in_the_given_executor() -> None:
    with ThreadPoolExecutor(1, thread_name_prefix="offload-test") as pool:
        worker = pool.submit(threading.get_ident).result()
        result = await cpu_bound(INLINE_BYTES + 1, pool, _where, "large")
    assert result == ("large", worker)
    assert worker != threading.get_ident()


async def test_an_exception_reaches_the_caller_either_way() -> None:
    def boom() -> None:
        raise ValueError("bad message")

    for size in (1, INLINE_BYTES + 1):
        with pytest.raises(ValueError, match="bad message"):
            await cpu_bound(size, None, boom)


async def test_a_hop_pool_runs_calls_in_its_threads_and_hands_back_results() -> None:
    pool = HopPool(2, thread_name_prefix="hop-test")
    try:
        results = await asyncio.gather(*(in_thread(pool, _where, f"c{i}") for i in range(20)))
        assert [tag for tag, _ in results] == [f"c{i}" for i in range(20)]
        assert threading.get_ident() not in {t for _, t in results}
        assert len({t for _, t in results}) <= 2  # never more threads than asked for
    finally:
        pool.shutdown()


async def test_a_hop_pool_hands_exceptions_to_the_caller() -> None:
    def boom() -> None:
        raise OSError("fsync failed")

    pool = HopPool(1)
    try:
        with pytest.raises(OSError, match="fsync failed"):
            await in_thread(pool, boom)
        assert await in_thread(pool, len, b"ok") == 2  # the thread survives it
    finally:
        pool.shutdown()


async def test_a_hop_pool_serves_run_in_executor_too_and_refuses_work_after_shutdown() -> None:
    pool = HopPool(1)
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(pool, sum, [1, 2, 3]) == 6
    pool.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        pool.submit(sum, [1])


async def test_a_cancelled_caller_does_not_stop_the_call() -> None:
    pool = HopPool(1)
    started, release, ran = threading.Event(), threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        release.wait(5)
        ran.set()

    task = asyncio.create_task(in_thread(pool, slow))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    pool.shutdown(wait=True)
    assert ran.is_set()
