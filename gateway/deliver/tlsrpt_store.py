"""The TLS report counts (RFC 8460), shared by every worker process:
``DATA_DIR/tlsrpt.db``, a :class:`gateway.shared_db.SharedDb`.

The deliverer counts each MX session to a domain with an MTA-STS policy or DANE
records (:meth:`TlsReportStore.count`) in memory, which costs nothing on the
delivery path; :meth:`TlsReportStore.flush` adds them to one row per
(UTC day, :class:`~gateway.deliver.tlsrpt.SessionKey`) in one transaction, from a
thread.  The daily job claims (day, domain) in the same file before it reports
(:meth:`TlsReportStore.claim`), so that of several workers or a restarted one,
exactly one sends each domain's report at a time.  A claim is a lease: not settled
(:meth:`TlsReportStore.finish`) before it runs out -- its worker died, or it put the
report back for a retry (:meth:`TlsReportStore.retry_at`) -- any worker may take it
again, and sends only to the rua URIs not yet recorded as served
(:meth:`TlsReportStore.served`).  Each send is marked in the file before it starts
(:meth:`TlsReportStore.sending`) and the mark replaced by the served record when it
ends: a mark found by the next claim is a send cut short, whose outcome is unknown,
and that rua is not sent the report again (:meth:`TlsReportStore.interrupted`): at
most once per (report-id, rua).  A failed write keeps the counts in memory for the
next flush; the file unusable, reports are incomplete, mail flows.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections import Counter
from datetime import UTC, date, datetime
from pathlib import Path

from gateway import log
from gateway.deliver.tlsrpt import SessionKey
from gateway.shared_db import SharedDb

FILE_NAME = "tlsrpt.db"
KEEP_DAYS = 14  # counts older than this are deleted after their report

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    day TEXT NOT NULL, policy_domain TEXT NOT NULL, policy_type TEXT NOT NULL,
    policy_string TEXT NOT NULL, mx_host TEXT NOT NULL, result TEXT NOT NULL,
    receiving_mx TEXT NOT NULL, receiving_ip TEXT NOT NULL, sending_ip TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, policy_domain, policy_type, policy_string, mx_host, result,
                 receiving_mx, receiving_ip, sending_ip)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reports (
    day TEXT NOT NULL, policy_domain TEXT NOT NULL, claimed_by TEXT NOT NULL,
    outcome TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (day, policy_domain)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS claims (
    day TEXT NOT NULL, policy_domain TEXT NOT NULL, claimed_by TEXT NOT NULL,
    lease_until REAL NOT NULL, done INTEGER NOT NULL DEFAULT 0,
    tries INTEGER NOT NULL DEFAULT 0, outcome TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (day, policy_domain)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS served (
    day TEXT NOT NULL, policy_domain TEXT NOT NULL, rua TEXT NOT NULL,
    PRIMARY KEY (day, policy_domain, rua)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sending (
    day TEXT NOT NULL, policy_domain TEXT NOT NULL, rua TEXT NOT NULL,
    claimed_by TEXT NOT NULL, started REAL NOT NULL,
    PRIMARY KEY (day, policy_domain, rua)
) WITHOUT ROWID;
"""
# ``reports`` holds the claims made before leases (never retried): a row there is a
# report settled for good; it empties itself after KEEP_DAYS.
_SETTLED = ("SELECT EXISTS (SELECT 1 FROM reports WHERE day = ?1 AND policy_domain = ?2) "
            "OR EXISTS (SELECT 1 FROM claims WHERE day = ?1 AND policy_domain = ?2 "
            "AND (done OR lease_until > ?3))")
_ADD = ("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT DO UPDATE SET count = count + excluded.count")


def day_of(now: float) -> date:
    return datetime.fromtimestamp(now, UTC).date()


class TlsReportStore:
    """The counts file; the connection is opened at first use (after a fork)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = SharedDb(path, _SCHEMA)
        self._lock = self._file.lock  # the connection, between threads
        self._conn = self._file.conn
        self._pending: Counter[tuple[date, SessionKey]] = Counter()
        self._pending_lock = threading.Lock()  # count() on the loop, flush() in a thread

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def count(self, now: float, key: SessionKey) -> None:
        """One session, in memory until the next :meth:`flush`."""
        with self._pending_lock:
            self._pending[(day_of(now), key)] += 1

    def flush(self) -> int:
        """Write the counts taken since the last flush (blocking: from a thread).
        How many sessions were written; on a database error, none (kept for later)."""
        with self._pending_lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return 0
        rows = [(day.isoformat(), k.policy_domain, k.policy_type,
                 json.dumps(list(k.policy_string)), json.dumps(list(k.mx_host)), k.result,
                 k.receiving_mx, k.receiving_ip, k.sending_ip, n)
                for (day, k), n in pending.items()]
        try:
            with self._lock:
                db = self._conn()
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany(_ADD, rows)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            with self._pending_lock:
                self._pending.update(pending)
            log.event("tlsrpt_store_error", logging.ERROR, file=str(self.path),
                      error=f"{type(exc).__name__}: {exc}")
            return 0
        return sum(pending.values())

    def sessions(self, day: date) -> list[tuple[SessionKey, int]]:
        """Every count of ``day`` (what was flushed), in key order."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT policy_domain, policy_type, policy_string, mx_host, result, "
                "receiving_mx, receiving_ip, sending_ip, count FROM sessions WHERE day = ?",
                (day.isoformat(),)).fetchall()
        out = [(SessionKey(d, t, tuple(json.loads(ps)), tuple(json.loads(mx)), r, rmx, rip,
                           sip), n)
               for d, t, ps, mx, r, rmx, rip, sip, n in rows]
        return sorted(out)

    def domains(self, day: date) -> list[str]:
        """The policy domains with counts on ``day``."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT DISTINCT policy_domain FROM sessions WHERE day = ? "
                "ORDER BY policy_domain", (day.isoformat(),)).fetchall()
        return [r[0] for r in rows]

    def open_domains(self, day: date, now: float) -> list[str]:
        """The policy domains of ``day`` whose report is neither settled nor under a
        live lease: the ones a worker may claim at ``now``."""
        key = day.isoformat()
        with self._lock:
            rows = self._conn().execute(
                "SELECT DISTINCT policy_domain FROM sessions WHERE day = ? "
                "AND policy_domain NOT IN (SELECT policy_domain FROM reports WHERE day = ?) "
                "AND policy_domain NOT IN (SELECT policy_domain FROM claims WHERE day = ? "
                "AND (done OR lease_until > ?)) ORDER BY policy_domain",
                (key, key, key, now)).fetchall()
        return [r[0] for r in rows]

    def claim(self, day: date, domain: str, who: str, now: float, lease: float) -> int:
        """Take the report of (``day``, ``domain``) until ``now + lease``: the number
        of earlier tries (0 for a first claim) for the one caller that gets it, -1 if
        it is settled or another worker holds a live lease on it."""
        key = day.isoformat()
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")  # the check and the take, as one
            try:
                if db.execute(_SETTLED, (key, domain, now)).fetchone()[0]:
                    db.execute("COMMIT")
                    return -1
                row = db.execute("SELECT tries FROM claims WHERE day = ? AND policy_domain = ?",
                                 (key, domain)).fetchone()
                db.execute(
                    "INSERT INTO claims (day, policy_domain, claimed_by, lease_until) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                    "claimed_by = excluded.claimed_by, lease_until = excluded.lease_until",
                    (key, domain, who, now + lease))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return 0 if row is None else int(row[0])

    def served(self, day: date, domain: str) -> set[str]:
        """The rua URIs that already have the report of (``day``, ``domain``)."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT rua FROM served WHERE day = ? AND policy_domain = ?",
                (day.isoformat(), domain)).fetchall()
        return {r[0] for r in rows}

    def sending(self, day: date, domain: str, ruas: list[str], who: str, now: float) -> None:
        """Record, before the report goes to ``ruas``, that it is being sent there.

        Written with ``synchronous=FULL`` (the file's other writes are NORMAL): the
        mark must outlive a power cut as well as a crash, or a report whose send was
        cut short could go out a second time.
        """
        rows = [(day.isoformat(), domain, rua, who, now) for rua in ruas]
        with self._lock:
            db = self._conn()
            db.execute("PRAGMA synchronous=FULL")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany("INSERT OR REPLACE INTO sending VALUES (?, ?, ?, ?, ?)",
                                   rows)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            finally:
                db.execute("PRAGMA synchronous=NORMAL")

    def interrupted(self, day: date, domain: str) -> set[str]:
        """The rua URIs whose send of the report began and never ended, neither
        recorded as served nor as failed: a worker died (or lost its lease) meanwhile,
        and whether the report arrived is unknown."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT rua FROM sending WHERE day = ? AND policy_domain = ?",
                (day.isoformat(), domain)).fetchall()
        return {r[0] for r in rows}

    def unsent(self, day: date, domain: str, rua: str) -> None:
        """The send to ``rua`` failed for sure: it may be tried again."""
        with self._lock:
            self._conn().execute(
                "DELETE FROM sending WHERE day = ? AND policy_domain = ? AND rua = ?",
                (day.isoformat(), domain, rua))

    def serve(self, day: date, domain: str, rua: str) -> None:
        """Record that ``rua`` has the report, or is not to get it again (right after
        it was sent, or found interrupted): never twice."""
        key = day.isoformat()
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT OR IGNORE INTO served VALUES (?, ?, ?)", (key, domain, rua))
                db.execute("DELETE FROM sending WHERE day = ? AND policy_domain = ? AND rua = ?",
                           (key, domain, rua))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def finish(self, day: date, domain: str, outcome: str) -> None:
        """Settle a claimed report for good (``outcome`` for the operator)."""
        with self._lock:
            self._conn().execute(
                "UPDATE claims SET done = 1, outcome = ? WHERE day = ? AND policy_domain = ?",
                (outcome, day.isoformat(), domain))

    def retry_at(self, day: date, domain: str, outcome: str, when: float) -> None:
        """Put a claimed report back, for any worker to take again at ``when``."""
        with self._lock:
            self._conn().execute(
                "UPDATE claims SET lease_until = ?, tries = tries + 1, outcome = ? "
                "WHERE day = ? AND policy_domain = ?",
                (when, outcome, day.isoformat(), domain))

    def purge(self, before: date) -> None:
        """Forget counts and claims of days before ``before``."""
        with self._lock:
            db = self._conn()
            db.execute("DELETE FROM sessions WHERE day < ?", (before.isoformat(),))
            for table in ("reports", "claims", "served", "sending"):
                db.execute(f"DELETE FROM {table} WHERE day < ?", (before.isoformat(),))


def open_store(data_dir: Path) -> TlsReportStore:
    return TlsReportStore(data_dir / FILE_NAME)
