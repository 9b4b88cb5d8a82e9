"""Recipient verdicts shared by every worker process and kept across restarts:
``DATA_DIR/recipients.db`` (Postfix's ``address_verify_map``).

One row per recipient (its :func:`gateway.receive.recipients.recipient_key`): the
verdict, the next hop's reply, when it was asked and until when the answer holds.  The
file is the truth: every RCPT to be verified reads it (a primary-key lookup), so an
answer written by one worker is used by all from then on, and ``coffer recipients cache
forget`` takes effect at the next RCPT with no signal.  Two workers asked about the same
new address at the same moment may both probe (each shares its probe with its own
concurrent RCPTs only); the later answer replaces the earlier, which is harmless.

Expired rows are deleted as the gateway goes (at the first answer stored, then every
:data:`PURGE_EVERY`), and then, beyond :data:`MAX_ROWS` (addresses come from the
Internet: a dictionary attack leaves one "unknown" row per guess), those that would
expire first.  If the file cannot be opened or used (permissions, disk full, not a
database), verification goes on in memory for this process, as it did before the file
existed; ``recipient_cache_unavailable`` is logged once.

Lookups and answers are made on the SMTP event loop, so the file waits at most
:data:`gateway.shared_db.LOOP_BUSY_TIMEOUT_MS` for another process's lock, not 2 s.
Still locked (``SQLITE_BUSY``), that one lookup or answer uses this process's memory
and the file stays in use: an answer not written only means another worker may ask
the next hop again; this worker uses it until it expires.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from gateway import log
from gateway.receive.recipients import Cached, Verdict, VerifyCache
from gateway.shared_db import LOOP_BUSY_TIMEOUT_MS, SharedDb, is_busy

FILE_NAME = "recipients.db"
PURGE_EVERY = 500  # answers stored between two deletions of expired rows
MAX_ROWS = 100_000  # as many as the in-memory cache holds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    address TEXT NOT NULL PRIMARY KEY, domain TEXT NOT NULL, verdict TEXT NOT NULL,
    reply TEXT NOT NULL, checked REAL NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID
"""
_COLUMNS = "address, verdict, reply, checked, expires"


@dataclass(frozen=True, slots=True)
class VerdictRow:
    """One remembered answer as ``coffer recipients cache list`` shows it."""

    address: str
    answer: Cached


class VerdictStore:
    """The verdicts file; every method may raise sqlite3.Error."""

    def __init__(self, path: Path, *, max_rows: int = MAX_ROWS,
                 purge_every: int = PURGE_EVERY,
                 busy_timeout_ms: int = LOOP_BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.max_rows = max_rows
        self.purge_every = purge_every
        self._file = SharedDb(path, _SCHEMA, busy_timeout_ms=busy_timeout_ms)
        self._puts = 0

    def get(self, key: str, now: float) -> Cached | None:
        with self._file.lock:
            row = self._file.conn().execute(
                f"SELECT {_COLUMNS} FROM verdicts WHERE address = ? AND expires > ?",
                (key, now)).fetchone()
        return None if row is None else _cached(row)

    def put(self, key: str, answer: Cached) -> None:
        with self._file.lock:
            db = self._file.conn()
            db.execute("INSERT OR REPLACE INTO verdicts (address, domain, verdict, reply, "
                       "checked, expires) VALUES (?, ?, ?, ?, ?, ?)",
                       (key, key.rpartition("@")[2], answer.verdict.value, answer.reply,
                        answer.checked, answer.expires))
            self._file.wrote()
            self._puts += 1
            if self._puts % self.purge_every == 1 % self.purge_every:
                self._purge(db, answer.checked)
                self._file.wrote()

    def _purge(self, db: sqlite3.Connection, now: float) -> None:
        db.execute("DELETE FROM verdicts WHERE expires <= ?", (now,))
        db.execute("DELETE FROM verdicts WHERE address IN (SELECT address FROM verdicts "
                   "ORDER BY expires LIMIT max(0, (SELECT count(*) FROM verdicts) - ?))",
                   (self.max_rows,))

    def rows(self, now: float) -> list[VerdictRow]:
        """Every answer still holding at ``now``, by address."""
        with self._file.lock:
            rows = self._file.conn().execute(
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
        with self._file.lock:
            n = self._file.conn().execute(sql, args).rowcount
            self._file.wrote()
            return n

    def close(self) -> None:
        self._file.close()


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
        self.store.close()
        self.store = None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
