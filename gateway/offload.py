"""CPU work for one message: on the event loop when the message is small, else in a thread.

Parsing, scoring and policy evaluation are Python code: a worker thread does not run
them in parallel with the event loop (the GIL), it only lets the loop interleave
other sessions while a large message is worked on.  The hop itself costs CPU on
both sides (submit, wake the thread, hand the GIL over, set the result, wake the
loop through its self-pipe): about 40 µs on an idle machine and more under load,
against 0.1-1 ms of work for a typical message.  So a message up to
:data:`INLINE_BYTES` is worked on inline, and only a larger one (whose work could
stall every other session for many milliseconds) goes to a thread.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# Like the queue worker's INLINE_READ_BYTES: a message of this size costs about a
# millisecond or two of CPU in the heaviest stage (MIME extraction).
INLINE_BYTES = 256 * 1024


async def cpu_bound(size: int, executor: Executor | None, fn: Callable[P, T],
                    *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)``: inline if ``size`` <= INLINE_BYTES, else in ``executor``
    (None: the loop's default executor)."""
    if size <= INLINE_BYTES:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))
