"""The shared SQLite files never flush or wait on the SMTP event loop.

What each test proves is read from SQLite itself (``PRAGMA wal_checkpoint`` answers how
many WAL frames there are and how many are copied back), not from timings; the clock
readings (a write while another process holds the lock) are checked against half the old
2 s busy timeout, far above the loop's 5 ms, so that a loaded machine cannot fail them.
The other process is a real one.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.receive.rate_limits import Charge
from gateway.receive.rate_store import RateStore
from gateway.receive.recipients import Verdict, VerifyCache
from gateway.receive.verify_store import SharedVerifyCache, VerdictStore
from gateway.shared_db import BUSY_TIMEOUT_MS, SharedDb

HOUR = 3600.0
T0 = 1_000_000 * HOUR
AUTOCHECKPOINT_PAGES = 1000  # SQLite's default wal_autocheckpoint


def _charge(key: str, limit: int = 10**9) -> Charge:
    return Charge("auth_user", "messages", "auth_user", key, limit, HOUR)


def _wal_frames(path: Path) -> tuple[int, int]:
    """(frames in the WAL, frames copied into the database), asked of a connection of
    the test's own; a PASSIVE checkpoint waits for nobody."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        _busy, frames, done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return frames, done
    finally:
        db.close()


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _without_checkpointer(store: RateStore) -> RateStore:
    store.take(T0, [_charge("first")])  # opens the file and starts the thread
    checkpointer = store.file.checkpointer
    assert checkpointer is not None
    checkpointer.stop()
    return store


def test_a_plain_connection_would_checkpoint_inside_a_commit(tmp_path: Path) -> None:
    """The hazard, for comparison: SQLite's default checkpoints in whichever commit takes
    the WAL past 1000 pages, so the WAL never holds many more."""
    path = tmp_path / "plain.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID")
    for i in range(3000):
        db.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (f"k{i % 200}", i))
    frames, _ = _wal_frames(path)
    db.close()
    assert frames < AUTOCHECKPOINT_PAGES + 10


def test_a_charge_never_checkpoints_in_its_commit(tmp_path: Path) -> None:
    path = tmp_path / "ratelimit.db"
    store = _without_checkpointer(RateStore(path))
    for i in range(3000):
        assert store.take(T0 + i, [_charge(f"user{i % 200}")]) is None
    frames, done = _wal_frames(path)
    # Every commit's frames are still in the WAL: no commit copied them back (which is
    # where the fsyncs are); the test's own checkpoint copied them all.
    assert frames > 3000 and done == frames
    store.close()


def test_the_checkpointer_thread_copies_the_wal_back_and_it_restarts(tmp_path: Path) -> None:
    path = tmp_path / "ratelimit.db"
    store = RateStore(path)
    store.file.checkpoint_every = 0.05
    for i in range(3000):
        store.take(T0 + i, [_charge(f"user{i % 200}")])
    checkpointer = store.file.checkpointer
    assert checkpointer is not None
    runs = checkpointer.runs
    _wait_for(lambda: checkpointer.runs >= runs + 2, "the checkpointer never ran")
    # One full background checkpoint after the last write: the next writer starts the
    # WAL from its beginning, so it holds that one commit's frames only.
    store.take(T0 + 3000, [_charge("last")])
    frames, _ = _wal_frames(path)
    assert 0 < frames < 10
    store.close()


def test_under_writes_without_a_pause_the_wal_is_restarted_not_grown(tmp_path: Path) -> None:
    """A PASSIVE checkpoint never catches up with a writer that never pauses, and the WAL
    restarts only when one has: past restart_frames the thread copies the rest holding
    the write lock (RESTART), and the WAL starts afresh."""
    path = tmp_path / "ratelimit.db"
    store = RateStore(path)
    store.file.checkpoint_every = 0.01
    store.take(T0, [_charge("first")])
    checkpointer = store.file.checkpointer
    assert checkpointer is not None
    checkpointer.restart_frames = 300
    takes = 0
    deadline = time.monotonic() + 60
    while checkpointer.restarts < 2:
        assert time.monotonic() < deadline, "no RESTART checkpoint"
        store.take(T0 + takes, [_charge(f"user{takes % 200}")])
        takes += 1
    checkpointer.stop()
    frames, _ = _wal_frames(path)
    assert frames < takes  # each take wrote at least one frame: the WAL was restarted
    store.close()


def test_the_checkpointer_runs_early_after_many_writes(tmp_path: Path) -> None:
    path = tmp_path / "ratelimit.db"
    store = RateStore(path)
    store.file.checkpoint_every = 3600.0  # never by time: only the writes wake it
    store.take(T0, [_charge("first")])
    checkpointer = store.file.checkpointer
    assert checkpointer is not None
    runs = checkpointer.runs
    for i in range(checkpointer.after_writes):
        store.take(T0 + i, [_charge(f"user{i}")])
    _wait_for(lambda: checkpointer.runs > runs, "the writes did not wake the checkpointer")
    store.close()


def test_close_stops_the_checkpointer(tmp_path: Path) -> None:
    db = SharedDb(tmp_path / "x.db", "CREATE TABLE IF NOT EXISTS t (k TEXT)")
    db.conn()
    checkpointer = db.checkpointer
    assert checkpointer is not None
    db.close()
    assert db.checkpointer is None and not checkpointer._thread.is_alive()


_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")  # the write lock, as another worker's long transaction
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[Callable[[Path], subprocess.Popen[str]]]:
    """Another process that holds a file's write lock until its stdin says go."""
    procs: list[subprocess.Popen[str]] = []

    def hold(path: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        return proc

    yield hold
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _release(proc: subprocess.Popen[str]) -> None:
    proc.communicate("go\n", timeout=30)
    assert proc.returncode == 0


def test_a_charge_while_another_process_holds_the_lock_is_let_through_then_counted(
    tmp_path: Path, lock_holder: Callable[[Path], subprocess.Popen[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "ratelimit.db"
    store = RateStore(path)
    assert store.take(T0, [_charge("alice", limit=2)]) is None  # 1 of 2
    caplog.set_level(logging.WARNING, logger="coffer")
    holder = lock_holder(path)
    started = time.monotonic()
    assert store.take(T0 + 1, [_charge("alice", limit=2)]) is None  # 2 of 2, deferred
    assert store.take(T0 + 2, [_charge("alice", limit=2)]) is None  # 3 of 2, deferred
    # Not the 2 s the busy timeout was: the loop waited LOOP_BUSY_TIMEOUT_MS per charge.
    assert time.monotonic() - started < BUSY_TIMEOUT_MS / 1000 / 2
    assert [r.getMessage() for r in caplog.records] == ["rate_limit_store_busy"]
    assert len(store.deferred) == 2
    _release(holder)
    # The next charge adds the two let through first, so it is over the limit.
    refused = store.take(T0 + 3, [_charge("alice", limit=2)])
    assert refused is not None and refused.count == 3
    assert store.deferred == []
    [row] = store.counters(T0 + 3)
    assert row.count == 3
    store.close()


def test_deferred_charges_whose_window_has_passed_are_not_counted(
    tmp_path: Path, lock_holder: Callable[[Path], subprocess.Popen[str]],
) -> None:
    path = tmp_path / "ratelimit.db"
    store = RateStore(path)
    store.take(T0, [_charge("bob")])
    holder = lock_holder(path)
    assert store.take(T0 + 1, [_charge("alice")]) is None
    _release(holder)
    store.take(T0 + 3 * HOUR, [_charge("bob")])
    assert [r.key for r in store.counters(T0 + 3 * HOUR)] == ["bob"]
    store.close()


def test_a_verdict_answered_while_the_file_is_locked_is_kept_in_memory_and_the_file_kept(
    tmp_path: Path, lock_holder: Callable[[Path], subprocess.Popen[str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "recipients.db"
    now = [T0]
    memory = VerifyCache(3600.0, 600.0, 60.0, clock=lambda: now[0])
    cache = SharedVerifyCache(memory, VerdictStore(path))
    cache.put("a@example.com", Verdict.VALID, "250 ok")
    caplog.set_level(logging.WARNING, logger="coffer")
    holder = lock_holder(path)
    started = time.monotonic()
    answer = cache.put("b@example.com", Verdict.UNKNOWN, "550 no")
    assert time.monotonic() - started < BUSY_TIMEOUT_MS / 1000 / 2
    assert answer.verdict is Verdict.UNKNOWN
    assert cache.store is not None, "a locked file is not an unusable one"
    assert caplog.records == []
    # WAL readers do not wait for the writer: the file still answers, memory too.
    answer_a = cache.get("a@example.com")
    assert answer_a is not None and answer_a.verdict is Verdict.VALID
    answer_b = cache.get("b@example.com")
    assert answer_b is not None and answer_b.verdict is Verdict.UNKNOWN
    _release(holder)
    cache.put("c@example.com", Verdict.VALID, "250 ok")
    assert [r.address for r in cache.store.rows(T0)] == ["a@example.com", "c@example.com"]
    cache.close()
