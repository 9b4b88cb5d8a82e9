"""The verdicts file's expired and surplus rows are deleted off the SMTP event loop, in
small transactions, and an expired verdict is never used before it is.

What each test proves is counted by SQLite itself: ``total_changes`` of the loop's
connection (rows its statements wrote) and the rowcount of each of the purger's
transactions, not timings.  The files are real, with 200,000 expired rows written by
the test's own connection, as a dictionary attack would leave them; the two purging
processes are real ones.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gateway.receive.recipients import Cached, Verdict
from gateway.receive.verify_store import FILE_NAME, PURGE_BATCH, VerdictStore
from gateway.shared_db import BUSY_TIMEOUT_MS

T0 = 1_000_000.0
EXPIRED = 200_000
DOMAIN = "example.com"


def _fill(path: Path, n: int, *, expires: Callable[[int], float], prefix: str = "x") -> None:
    """``n`` rows written as an older gateway would have: the table, no expiry index."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS verdicts (address TEXT NOT NULL PRIMARY KEY, "
                   "domain TEXT NOT NULL, verdict TEXT NOT NULL, reply TEXT NOT NULL, "
                   "checked REAL NOT NULL, expires REAL NOT NULL) WITHOUT ROWID")
        db.execute("BEGIN")
        db.executemany("INSERT INTO verdicts VALUES (?, ?, 'unknown', '550 no', ?, ?)",
                       ((f"{prefix}{i}@{DOMAIN}", DOMAIN, T0 - 7200, expires(i))
                        for i in range(n)))
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def _expired_at_t0(i: int) -> float:
    return T0 - 3600 + i * 0.01  # all before T0, in no particular order of address


def _count(path: Path, where: str = "1", *args: float) -> int:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        (n,) = db.execute(f"SELECT count(*) FROM verdicts WHERE {where}", args).fetchone()
        return int(n)
    finally:
        db.close()


def _answer(now: float, ttl: float = 600.0) -> Cached:
    return Cached(Verdict.UNKNOWN, "550 no", now + ttl, now)


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 120
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_the_loop_s_answers_write_one_verdict_each_and_never_purge(tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    _fill(path, EXPIRED, expires=_expired_at_t0)
    # A purge due at every answer: each of them hands it to the thread.  The CLI's 2 s
    # busy timeout, not the loop's 5 ms: on a loaded machine a batch (or the index made
    # on this older file) may hold the lock longer, and an answer not written would be
    # kept in memory by SharedVerifyCache (tests/gateway/test_shared_db.py), not counted.
    store = VerdictStore(path, purge_every=1, busy_timeout_ms=BUSY_TIMEOUT_MS)
    try:
        db = store.file.conn()
        for i in range(100):
            before = db.total_changes
            store.put(f"u{i}@{DOMAIN}", _answer(T0 + i))
            assert db.total_changes - before == 1, "the loop's commit wrote one verdict"
            before = db.total_changes
            assert store.get(f"x{i}@{DOMAIN}", T0 + i) is None
            assert db.total_changes == before
        purger = store.purger
        assert purger is not None
        _wait_for(lambda: _count(path, "expires <= ?", T0) == 0, "expired rows left")
        assert purger.deleted == EXPIRED
    finally:
        store.close()


def test_the_purger_deletes_every_expired_verdict_in_batches_never_returning_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / FILE_NAME
    _fill(path, EXPIRED, expires=_expired_at_t0)
    _fill(path, 50, expires=lambda i: T0 + 3600, prefix="live")
    store = VerdictStore(path, purge_pause=0.0005)
    try:
        store.put(f"new@{DOMAIN}", _answer(T0))  # the first answer starts a purge
        purger = store.purger
        assert purger is not None
        i = 0
        while _count(path, "expires <= ?", T0) > 0:
            # Meanwhile every lookup of an expired verdict misses; the live ones hold.
            assert store.get(f"x{i % EXPIRED}@{DOMAIN}", T0) is None
            live = store.get(f"live{i % 50}@{DOMAIN}", T0)
            assert live is not None and live.verdict is Verdict.UNKNOWN
            assert all(not r.address.startswith("x") for r in store.rows(T0)[:5])
            i += 1
        _wait_for(lambda: purger.runs == 1 and purger.deleted == EXPIRED, "purge not done")
        assert purger.largest_transaction == PURGE_BATCH
        assert purger.transactions >= EXPIRED // PURGE_BATCH
        assert _count(path) == 51
        db = sqlite3.connect(path)
        indexes = [r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'verdicts'")]
        db.close()
        assert "verdicts_expires" in indexes, "the purger indexed an older file"
    finally:
        store.close()


def test_the_surplus_over_max_rows_goes_in_batches_those_expiring_first(
    tmp_path: Path,
) -> None:
    path = tmp_path / FILE_NAME
    _fill(path, 5000, expires=lambda i: T0 + 1000 + i)
    store = VerdictStore(path, max_rows=1000, purge_batch=300, purge_pause=0.0)
    try:
        store.put(f"new@{DOMAIN}", _answer(T0, ttl=10**6))
        purger = store.purger
        assert purger is not None
        _wait_for(lambda: _count(path) == 1000, "surplus left")
        assert purger.deleted == 4001
        assert purger.largest_transaction == 300
        kept = {r.address for r in store.rows(T0)}
        assert kept == {f"x{i}@{DOMAIN}" for i in range(4001, 5000)} | {f"new@{DOMAIN}"}
    finally:
        store.close()


_PURGING = """
import json, sys
from pathlib import Path
from gateway.receive.verify_store import Purger
from gateway.shared_db import BUSY_TIMEOUT_MS, open_db
path = Path(sys.argv[1])
db = open_db(path, BUSY_TIMEOUT_MS)
purger = Purger(path, max_rows=10**9, batch=100, pause=0.0)
print("ready", flush=True)
sys.stdin.readline()
purger.purge(db, float(sys.argv[2]))
purger.stop()
db.close()
print(json.dumps({"deleted": purger.deleted, "largest": purger.largest_transaction}))
"""


def test_two_processes_purging_at_once_take_turns_and_delete_each_row_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / FILE_NAME
    _fill(path, EXPIRED, expires=_expired_at_t0)
    _fill(path, 10, expires=lambda i: T0 + 3600, prefix="live")
    procs = [subprocess.Popen([sys.executable, "-c", _PURGING, str(path), str(T0)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:  # both go at once
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0 and err == "", err
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    # Every expired row deleted by exactly one of them, at most a batch at a time.
    assert sum(r["deleted"] for r in results) == EXPIRED
    assert all(r["largest"] <= 100 for r in results)
    assert _count(path) == 10
