"""gateway.offload: a message's CPU work runs inline when small, in a thread when large."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.offload import INLINE_BYTES, cpu_bound


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
