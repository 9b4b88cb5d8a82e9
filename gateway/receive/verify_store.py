"""Recipient verdicts shared by every worker process and kept across restarts:
``DATA_DIR/recipients.db`` (Postfix's ``address_verify_map``).

One row per recipient (its :func:`gateway.receive.recipients.recipient_key`): the
verdict, the next hop's reply, when it was asked and until when the answer holds.  The
file is the truth: every RCPT to be verified reads it (a primary-key lookup), so an
answer written by one worker is used by all from then on, and ``coffer recipients cache
forget`` takes effect at the next RCPT with no signal.  Two workers asked about the same
new address at the same moment may both probe (each shares its probe with its own
concurrent RCPTs only); the later answer replaces the earlier, which is harmless.

A lookup never returns an expired row (its query asks ``expires > now``), so deleting
them is only housekeeping, and it is done off the event loop: a :class:`Purger` thread
of each process, on a connection of its own, woken at the first answer stored and then
every :data:`PURGE_EVERY`, deletes the expired rows and then, beyond :data:`MAX_ROWS`
(addresses come from the Internet: a dictionary attack leaves one "unknown" row per
guess), those that would expire first, :data:`PURGE_BATCH` rows per transaction (an
index on ``expires`` finds them), so the write lock another worker's answer waits for is
never held longer than one small batch.  Two processes purging at once only take turns:
each batch deletes what is still there.

If the file cannot be opened or used (permissions, disk full, not a database),
verification goes on in memory for this process, as it did before the file existed;
``recipient_cache_unavailable`` is logged once.

Lookups and answers are made on the SMTP event loop, so the file waits at most
:data:`gateway.shared_db.LOOP_BUSY_TIMEOUT_MS` for another process's lock, not 2 s.
Still locked (``SQLITE_BUSY``), that one lookup or answer uses this process's memory
and the file stays in use: an answer not written only means another worker may ask
the next hop again; this worker uses it until it expires.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from gateway import log
from gateway.receive.recipients import Cached, Verdict, VerifyCache
from gateway.shared_db import (
    BUSY_TIMEOUT_MS,
    LOOP_BUSY_TIMEOUT_MS,
    FileThread,
    SharedDb,
    is_busy,
)

FILE_NAME = "recipients.db"
PURGE_EVERY = 500  # answers stored between two deletions of expired rows
MAX_ROWS = 100_000  # as many as the in-memory cache holds
# Rows per purge transaction: measured 0.4 ms of write lock (4 ms at worst, 200,000
# expired rows, a loaded 2-core machine); the loop's writers wait at most
# LOOP_BUSY_TIMEOUT_MS for it, then keep that answer in memory.
PURGE_BATCH = 200
# Seconds between two batches: the lock is free >95 % of a long purge, and SQLite's
# busy handler sleeps whole milliseconds, so a writer that finds it held gets it next.
PURGE_PAUSE = 0.01

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    address TEXT NOT NULL PRIMARY KEY, domain TEXT NOT NULL, verdict TEXT NOT NULL,
    reply TEXT NOT NULL, checked REAL NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID
"""
# Made by the Purger, off the loop: on a file from before it, building it takes a while.
_INDEX = "CREATE INDEX IF NOT EXISTS verdicts_expires ON verdicts (expires)"
_COLUMNS = "address, verdict, reply, checked, expires"


@dataclass(frozen=True, slots=True)
class VerdictRow:
    """One remembered answer as ``coffer recipients cache list`` shows it."""

    address: str
    answer: Cached


class Purger(FileThread):
    """The background thread that deletes one file's expired and surplus verdicts (see
    the module docstring); a failed purge is logged ``recipient_cache_purge_error`` and
    tried again at the next wake-up (expired rows are never used meanwhile, only kept)."""

    failure_event = "recipient_cache_purge_error"

    def __init__(self, path: Path, max_rows: int, batch: int = PURGE_BATCH,
                 pause: float = PURGE_PAUSE) -> None:
        self.max_rows = max_rows
        self.batch = batch
        self.pause = pause
        # Read by the tests: what each transaction deleted, as SQLite counts it.
        self.runs = 0
        self.deleted = 0
        self.transactions = 0
        self.largest_transaction = 0
        self._now = 0.0
        super().__init__(path, "purge", BUSY_TIMEOUT_MS)

    def due(self, now: float) -> None:
        """Purge what has expired at ``now`` (the verdicts' clock), soon, in the thread."""
        self._now = now
        self.wake()

    def work(self, db: sqlite3.Connection) -> None:
        self.purge(db, self._now)

    def purge(self, db: sqlite3.Connection, now: float) -> None:
        """Delete, one batch per transaction (autocommit), the rows expired at ``now``,
        then the surplus over ``max_rows`` that expires first."""
        db.execute(_INDEX)
        self.runs += 1
        while not self._stop.is_set():
            if self._delete(db, "SELECT address FROM verdicts WHERE expires <= ? "
                            "ORDER BY expires LIMIT ?", (now, self.batch)) < self.batch:
                break
        while not self._stop.is_set():
            # Counted in a read, outside the write transaction: a count of 100,000 rows
            # would hold the lock.  Two processes may both trim the same surplus, which
            # only drops a few more of the answers that expire first.
            (count,) = db.execute("SELECT count(*) FROM verdicts").fetchone()
            surplus = min(self.batch, count - self.max_rows)
            if surplus <= 0 or self._delete(db, "SELECT address FROM verdicts ORDER BY "
                                            "expires LIMIT ?", (surplus,)) == 0:
                break

    def _delete(self, db: sqlite3.Connection, which: str, args: tuple[float, ...]) -> int:
        # Not under the store's lock: this process's loop then waits for a batch in
        # SQLite's busy handler, bounded by its busy timeout, not for the GIL.
        n: int = db.execute(f"DELETE FROM verdicts WHERE address IN ({which})",
                            args).rowcount
        self.deleted += n
        self.transactions += 1
        self.largest_transaction = max(self.largest_transaction, n)
        if n:
            time.sleep(self.pause)  # let the other workers' answers have the lock
        return n


class VerdictStore:
    """The verdicts file; every method may raise sqlite3.Error."""

    def __init__(self, path: Path, *, max_rows: int = MAX_ROWS,
                 purge_every: int = PURGE_EVERY, purge_batch: int = PURGE_BATCH,
                 purge_pause: float = PURGE_PAUSE,
                 busy_timeout_ms: int = LOOP_BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.max_rows = max_rows
        self.purge_every = purge_every
        self.purge_batch = purge_batch
        self.purge_pause = purge_pause
        self.file = SharedDb(path, _SCHEMA, busy_timeout_ms=busy_timeout_ms)
        self._puts = 0
        self.purger: Purger | None = None  # started at the first answer (after the fork)

    def get(self, key: str, now: float) -> Cached | None:
        with self.file.lock:
            row = self.file.conn().execute(
                f"SELECT {_COLUMNS} FROM verdicts WHERE address = ? AND expires > ?",
                (key, now)).fetchone()
        return None if row is None else _cached(row)

    def put(self, key: str, answer: Cached) -> None:
        with self.file.lock:
            db = self.file.conn()
            db.execute("INSERT OR REPLACE INTO verdicts (address, domain, verdict, reply, "
                       "checked, expires) VALUES (?, ?, ?, ?, ?, ?)",
                       (key, key.rpartition("@")[2], answer.verdict.value, answer.reply,
                        answer.checked, answer.expires))
            self.file.wrote()
            self._puts += 1
            if self._puts % self.purge_every == 1 % self.purge_every:
                # This commit wrote one verdict; the deletions are the thread's.
                if self.purger is None:
                    self.purger = Purger(self.path, self.max_rows, self.purge_batch,
                                         self.purge_pause)
                    weakref.finalize(self, self.purger.stop, False)
                self.purger.due(answer.checked)

    def rows(self, now: float) -> list[VerdictRow]:
        """Every answer still holding at ``now``, by address."""
        with self.file.lock:
            rows = self.file.conn().execute(
                f"SELECT {_COLUMNS} FROM verdicts WHERE expires > ? ORDER BY address",
                (now,)).fetchall()
        return [VerdictRow(row[0], _cached(row)) for row in rows]

    def forget(self, *, address: str | None = None, domain: str | None = None,
               verdict: Verdict | None = None) -> int:
        """Delete the answers about ``address``, every address of ``domain``, those with
        ``verdict``, or (none given) all of them: how many rows went."""
        where, args = [], []
        for column, value in (("address", address), ("domain", domain),
                              ("verdict", verdict.value if verdict else None)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = "DELETE FROM verdicts" + (" WHERE " + " AND ".join(where) if where else "")
        with self.file.lock:
            n = self.file.conn().execute(sql, args).rowcount
            self.file.wrote()
            return n

    def close(self, wait: bool = True) -> None:
        """Close the file; ``wait=False`` (on the loop) does not wait for the purge
        thread, which may be waiting up to 2 s for another process's lock: it closes
        its own connection when it stops."""
        if self.purger is not None:
            self.purger.stop(wait)
            self.purger = None
        self.file.close()


def _cached(row: tuple[str, str, str, float, float]) -> Cached:
    _address, verdict, reply, checked, expires = row
    return Cached(Verdict(verdict), reply, expires, checked)


class SharedVerifyCache:
    """A VerdictCache on the shared file, falling back to ``memory`` for good (in this
    process) at the first error of the file."""

    def __init__(self, memory: VerifyCache, store: VerdictStore) -> None:
        self.memory = memory
        self.store: VerdictStore | None = store

    def get(self, key: str) -> Cached | None:
        if self.store is not None:
            try:
                found = self.store.get(key, self.memory.clock())
                if found is not None:
                    return found
            except sqlite3.Error as exc:
                if not is_busy(exc):  # locked (rare: WAL readers do not wait): memory
                    self._unusable(exc)
        # Memory holds what this worker learnt while the file was locked or unusable.
        return self.memory.get(key)

    def put(self, key: str, verdict: Verdict, reply: str) -> Cached:
        if self.store is not None:
            answer = self.memory.entry(verdict, reply)
            try:
                self.store.put(key, answer)
                return answer
            except sqlite3.Error as exc:
                if not is_busy(exc):  # locked: this answer in memory, the file kept
                    self._unusable(exc)
        return self.memory.put(key, verdict, reply)

    def forget_undetermined(self) -> None:
        """Ask again about the recipients no next hop answered for (on reload: the
        operator may just have fixed the next hop)."""
        if self.store is not None:
            try:
                self.store.forget(verdict=Verdict.UNDETERMINED)
            except sqlite3.Error as exc:
                if not is_busy(exc):  # locked: they expire after undetermined_ttl anyway
                    self._unusable(exc)

    def _unusable(self, exc: sqlite3.Error) -> None:
        assert self.store is not None
        log.event("recipient_cache_unavailable", logging.WARNING, file=str(self.store.path),
                  error=f"{type(exc).__name__}: {exc}",
                  then="verdicts kept in memory by this process")
        self.store.close(wait=False)
        self.store = None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
