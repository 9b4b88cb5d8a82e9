"""The rate-limit counters, shared by every worker process: ``DATA_DIR/ratelimit.db``.

One SQLite file in WAL mode, one row per counter (rule, kind, key) holding its
sliding-window state (:class:`gateway.receive.rate_limits.Window`).  A MAIL or RCPT
charges its counters in one ``BEGIN IMMEDIATE`` transaction, so two workers cannot both
take the last message of a limit.  The file is a :class:`gateway.shared_db.SharedDb`: a
power cut may lose the last counts, which only lets a client send a little more.

If the file cannot be used (disk full, permissions), mail is not refused: the limit is
a guard against abuse, not a reason to stop every user; the error is logged.

The charge runs on the SMTP event loop, so it waits at most
:data:`gateway.shared_db.LOOP_BUSY_TIMEOUT_MS` for another process's write lock (the
default 2 s would stall every session of the worker).  Still locked, the MAIL or RCPT
is let through and its charges are *deferred*: kept in memory and added, whatever the
limit, in the transaction of this process's next charge (before that charge is decided),
so the count stays right and a limit is overshot only by what was accepted while the
file was locked -- failing closed would turn a slow disk into 450s for every user,
and dropping the counts would let a sender that keeps the workers busy escape its
limit.  ``rate_limit_store_busy`` is logged when a run of deferrals begins; at most
:data:`MAX_DEFERRED` charges wait (the oldest go uncounted beyond that).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from gateway import log
from gateway.receive.rate_limits import (
    Charge,
    Refused,
    Window,
    add,
    advance,
    charge,
    estimate,
)
from gateway.shared_db import LOOP_BUSY_TIMEOUT_MS, SharedDb, is_busy

FILE_NAME = "ratelimit.db"
PURGE_EVERY = 1000  # takes between two deletions of counters idle for two windows
MAX_DEFERRED = 10_000  # charges let through while the file was locked, not yet counted

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    rule TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
    key_type TEXT NOT NULL, lim INTEGER NOT NULL, window REAL NOT NULL,
    start REAL NOT NULL, current INTEGER NOT NULL, previous INTEGER NOT NULL,
    warned REAL NOT NULL,
    PRIMARY KEY (rule, kind, key)
) WITHOUT ROWID
"""
_SELECT = ("SELECT window, start, current, previous, warned FROM counters "
           "WHERE rule = ? AND kind = ? AND key = ?")
_UPSERT = ("INSERT OR REPLACE INTO counters (rule, kind, key, key_type, lim, window, start, "
           "current, previous, warned) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


@dataclass(frozen=True, slots=True)
class CounterRow:
    """One counter as ``coffer ratelimit list`` shows it."""

    rule: str
    kind: str
    key_type: str
    key: str
    limit: int
    window: float
    count: float


class RateStore:
    """The SQLite counters; the connection is opened at first use (after a fork)."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = LOOP_BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self._file = SharedDb(path, _SCHEMA, busy_timeout_ms=busy_timeout_ms)
        self._lock = self._file.lock
        self._conn = self._file.conn
        self._takes = 0
        self.deferred: list[tuple[float, Charge]] = []  # (when, charge), oldest first

    def close(self) -> None:
        self._file.close()

    @property
    def file(self) -> SharedDb:
        return self._file

    def take(self, now: float, charges: list[Charge]) -> Refused | None:
        try:
            with self._lock:
                return self._take(self._conn(), now, charges)
        except sqlite3.Error as exc:
            if is_busy(exc):
                self._defer(now, charges, exc)
                return None
            log.event("rate_limit_store_error", logging.ERROR, file=str(self.path),
                      error=f"{type(exc).__name__}: {exc}")
            return None

    def _take(self, db: sqlite3.Connection, now: float,
              charges: list[Charge]) -> Refused | None:
        db.execute("BEGIN IMMEDIATE")
        try:
            self._count_deferred(db, now)
            updates = []
            for c in charges:
                out = charge(self._window(db, c), c, now)
                if out.over:
                    if out.first_refusal:  # remember the warning, count nothing
                        db.execute(_UPSERT, _row(c, out.window))
                    self._commit(db)
                    return Refused(c, out.count, out.first_refusal)
                updates.append(_row(c, out.window))
            db.executemany(_UPSERT, updates)
            self._takes += 1
            if self._takes % PURGE_EVERY == 0:
                db.execute("DELETE FROM counters WHERE start + 2 * window <= ?", (now,))
            self._commit(db)
            return None
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _commit(self, db: sqlite3.Connection) -> None:
        db.execute("COMMIT")
        self.deferred.clear()  # counted by this transaction
        self._file.wrote()

    def _count_deferred(self, db: sqlite3.Connection, now: float) -> None:
        """Add the charges let through while the file was locked (not those whose window
        has passed since: they would no longer count)."""
        for when, c in self.deferred:
            if when + c.window > now:
                db.execute(_UPSERT, _row(c, add(self._window(db, c), c, now)))

    def _defer(self, now: float, charges: list[Charge], exc: sqlite3.Error) -> None:
        if not self.deferred:
            log.event("rate_limit_store_busy", logging.WARNING, file=str(self.path),
                      error=f"{type(exc).__name__}: {exc}",
                      then="charges let through, counted at this worker's next charge")
        self.deferred.extend((now, c) for c in charges)
        del self.deferred[:-MAX_DEFERRED]

    @staticmethod
    def _window(db: sqlite3.Connection, c: Charge) -> Window:
        row = db.execute(_SELECT, (c.rule, c.kind, c.key)).fetchone()
        if row is None or row[0] != c.window:  # new, or the rule's window changed
            return Window()
        return Window(start=row[1], current=row[2], previous=row[3], warned=row[4])

    def counters(self, now: float) -> list[CounterRow]:
        """Every counter with something in its sliding window at ``now``."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT rule, kind, key, key_type, lim, window, start, current, previous, "
                "warned FROM counters ORDER BY rule, kind, key").fetchall()
        out = []
        for rule, kind, key, key_type, lim, window, start, cur, prev, warned in rows:
            w = advance(Window(start, cur, prev, warned), now, window)
            count = estimate(w, now, window)
            if count > 0:
                out.append(CounterRow(rule, kind, key_type, key, lim, window, count))
        return out

    def reset(self, key: str, rule: str | None = None) -> int:
        """Forget the counters of ``key`` (of every rule, or of ``rule``): how many."""
        with self._lock:
            db = self._conn()
            if rule is None:
                cur = db.execute("DELETE FROM counters WHERE key = ?", (key,))
            else:
                cur = db.execute("DELETE FROM counters WHERE key = ? AND rule = ?", (key, rule))
            return cur.rowcount


def _row(c: Charge, w: Window) -> tuple[object, ...]:
    return (c.rule, c.kind, c.key, c.key_type, c.limit, c.window, w.start, w.current,
            w.previous, w.warned)


def open_store(data_dir: Path) -> RateStore:
    return RateStore(data_dir / FILE_NAME)
