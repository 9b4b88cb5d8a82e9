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
import concurrent.futures
import contextlib
import functools
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, ParamSpec, TypeVar

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


async def in_thread(executor: Executor | None, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a thread of ``executor`` (None: the loop's default executor),
    by the cheaper hop when it is a :class:`HopPool`."""
    if isinstance(executor, HopPool):
        return await executor.run(fn, *args)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(fn, *args))


def _settle(fut: asyncio.Future[Any], value: object, error: BaseException | None) -> None:
    if fut.done():
        return  # the caller was cancelled; the call ran all the same
    if error is None:
        fut.set_result(value)
    else:
        fut.set_exception(error)


class _Mailbox:
    """Results from the pool's threads for one event loop, handed over in batches.

    ``call_soon_threadsafe`` writes to the loop's self-pipe at every call: a syscall
    in the worker thread (which gives the GIL up and must take it back) and a wake-up
    of the loop.  Calls that end together (the spool's group commit releases every
    waiter of one directory fsync at once) share one: a thread that finds the loop
    already told just adds its result to the batch.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Future[Any], object, BaseException | None]] = []
        self._armed = False  # a drain is scheduled and has not taken the batch yet

    def post(self, fut: asyncio.Future[Any], value: object,
             error: BaseException | None) -> None:
        with self._lock:
            self._items.append((fut, value, error))
            if self._armed:
                return
            self._armed = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._armed = False
        for fut, value, error in items:
            _settle(fut, value, error)


class HopPool(Executor):
    """Threads for short blocking calls (fsync) whose results go straight to the loop.

    Through a ThreadPoolExecutor and ``run_in_executor`` every call also makes a
    concurrent Future (its condition lock taken when the call starts, when it ends
    and by its callback), goes through an idle-thread semaphore and a chained
    asyncio future: Python code, much of it in the worker thread, where each step
    waits for the GIL the event loop holds.  Here the worker thread runs the call
    and hands the result to the loop with one ``call_soon_threadsafe``.
    :meth:`submit` keeps the Executor interface for other users.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "hop") -> None:
        self.max_workers = max_workers
        self.prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any],
                                             Callable[[Any, BaseException | None], None]]
                                       | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work and not yet promised to a caller
        self._closed = False
        self._boxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = \
            weakref.WeakKeyDictionary()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        box = self._boxes.get(loop)
        if box is None:
            box = self._boxes[loop] = _Mailbox(loop)
        fut: asyncio.Future[T] = loop.create_future()
        self._put(functools.partial(fn, *args), functools.partial(box.post, fut))
        return await fut

    def submit(self, fn: Callable[P, T], /, *args: P.args,
               **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        cf: concurrent.futures.Future[T] = concurrent.futures.Future()
        cf.set_running_or_notify_cancel()

        def done(value: Any, error: BaseException | None) -> None:
            if error is None:
                cf.set_result(value)
            else:
                cf.set_exception(error)

        self._put(functools.partial(fn, *args, **kwargs), done)
        return cf

    def _put(self, call: Callable[[], Any],
             done: Callable[[Any, BaseException | None], None]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self.max_workers:
                t = threading.Thread(target=self._work, daemon=True,
                                     name=f"{self.prefix}_{len(self._threads)}")
                self._threads.append(t)
                t.start()
            self._queue.put((call, done))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            call, done = item
            try:
                value = call()
            except BaseException as exc:  # handed to the caller, like an executor does
                done(None, exc)
            else:
                done(value, None)
            del item, call, done
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for t in threads:
                t.join()
