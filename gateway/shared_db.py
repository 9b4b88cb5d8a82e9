"""A small SQLite file shared by every worker process (rate counters, recipient verdicts,
TLS report counts).

WAL mode, so readers never wait for the one writer; ``synchronous=NORMAL``: a commit is
not fsynced, a power cut may lose the last writes, which only costs a recount or a probe
(what these files hold is worth less than a disk flush per SMTP command).  The
connection is opened at first use, so a file made before the workers fork is opened
once in each of them, never shared across a fork.

The rate counters and the verdicts are written from the SMTP event loop, where a wait
stalls every session of the worker, so two things a commit would otherwise do are kept
off it:

* The checkpoint (copying the WAL back into the database, and the only fsyncs of a
  ``synchronous=NORMAL`` database).  SQLite runs one automatically inside whichever
  commit takes the WAL past 1000 pages; here ``wal_autocheckpoint=0`` turns that off and
  a :class:`Checkpointer` thread of each process, on a connection of its own, runs a
  ``PASSIVE`` checkpoint every :data:`CHECKPOINT_EVERY` seconds and sooner after
  :data:`CHECKPOINT_AFTER_WRITES` commits.  PASSIVE takes no lock a writer needs
  (https://sqlite.org/c3ref/wal_checkpoint_v2.html), so the loop's commits go on while
  it flushes.  The WAL starts afresh only when a writer finds every frame copied back,
  which a busy gateway (commits while each checkpoint runs) never lets happen: the WAL
  file would grow without bound.  So once the WAL holds :data:`WAL_RESTART_FRAMES`
  frames without having restarted, the thread runs a ``RESTART`` checkpoint, which
  holds the write lock while it copies the few frames left, syncs, and waits (at most
  :data:`CHECKPOINTER_BUSY_TIMEOUT_MS`) for readers of old frames: the loop's writers
  then wait their short busy timeout (below) or defer, never the flush.  A WAL file is
  reused from its start after a reset, so it stays at its largest size, at most about
  :data:`WAL_RESTART_FRAMES` pages (no ``journal_size_limit``: that truncation would
  run in the loop's next commit).
* The wait for another process's write lock: the loop's connection waits at most
  ``busy_timeout_ms`` (the stores on the loop pass :data:`LOOP_BUSY_TIMEOUT_MS`), then
  gets ``SQLITE_BUSY`` (:func:`is_busy`); each store says what it does then.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import weakref
from pathlib import Path

from gateway import log

BUSY_TIMEOUT_MS = 2000  # off the loop (threads, the CLI): wait this long for a writer
# On the loop: another worker's charge holds the lock for tens of microseconds; a lock
# still held after this is a long transaction (the CLI, a purge) or the checkpointer's
# RESTART flush, not worth stalling every session for.
LOOP_BUSY_TIMEOUT_MS = 5
CHECKPOINT_EVERY = 1.0  # seconds between two background checkpoints
CHECKPOINT_AFTER_WRITES = 200  # commits that wake the checkpointer early (~600 WAL pages)
WAL_RESTART_FRAMES = 4000  # pages, about 16 MiB: a backstop, not the usual path
CHECKPOINTER_BUSY_TIMEOUT_MS = 200  # RESTART holds the write lock while it waits


def is_busy(exc: sqlite3.Error) -> bool:
    """Whether ``exc`` is SQLITE_BUSY (or SQLITE_LOCKED): another connection holds the
    lock, the file itself is fine."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # pragma: no cover - Python < 3.11 has no error codes
        return "locked" in str(exc)
    return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def open_db(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                         timeout=busy_timeout_ms / 1000)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # Per connection: a commit of this one never checkpoints (the Checkpointer does).
        db.execute("PRAGMA wal_autocheckpoint=0")
    except sqlite3.Error:
        db.close()
        raise
    return db


class FileThread:
    """A daemon thread working on one shared file over a connection of its own.

    It runs :meth:`work` when woken (:meth:`wake`) or every ``every`` seconds (None: only
    when woken).  A failure is logged once per run of failures (``failure_event``) and
    retried at the next turn on a fresh connection; the thread ends when stopped or when
    the file is gone (a test's temporary one).  Subclasses set their own attributes
    before calling ``__init__``, which starts the thread."""

    failure_event = "shared_db_thread_error"

    def __init__(self, path: Path, name: str, busy_timeout_ms: int,
                 every: float | None = None) -> None:
        self.path = path
        self.every = every
        self._busy_timeout_ms = busy_timeout_ms
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name} {path.name}",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def work(self, db: sqlite3.Connection) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        failing = False
        try:
            while not self._stop.is_set():
                self._wake.wait(self.every)
                self._wake.clear()
                if self._stop.is_set() or not self.path.exists():
                    break
                try:
                    if db is None:
                        db = open_db(self.path, self._busy_timeout_ms)
                    self.work(db)
                    failing = False
                except sqlite3.Error as exc:
                    if not failing:
                        log.event(self.failure_event, logging.WARNING,
                                  file=str(self.path), error=f"{type(exc).__name__}: {exc}")
                    failing = True
                    if db is not None:
                        db.close()
                        db = None
        finally:
            if db is not None:
                db.close()


class Checkpointer(FileThread):
    """The background thread that checkpoints one file's WAL (see the module docstring);
    a failed checkpoint is logged ``shared_db_checkpoint_error`` (the store reports an
    unusable file where it is used)."""

    failure_event = "shared_db_checkpoint_error"

    def __init__(self, path: Path, every: float = CHECKPOINT_EVERY,
                 after_writes: int = CHECKPOINT_AFTER_WRITES,
                 restart_frames: int = WAL_RESTART_FRAMES) -> None:
        self.after_writes = after_writes
        self.restart_frames = restart_frames
        self.runs = 0  # checkpoints done (tests read them)
        self.restarts = 0  # of which RESTART ones
        self._writes = 0
        super().__init__(path, "checkpoint", CHECKPOINTER_BUSY_TIMEOUT_MS, every)

    def wrote(self) -> None:
        """A commit was made on the file: wake the thread after ``after_writes`` of them."""
        self._writes += 1
        if self._writes >= self.after_writes:
            self._writes = 0
            self.wake()

    def work(self, db: sqlite3.Connection) -> None:
        self.checkpoint(db)

    def checkpoint(self, db: sqlite3.Connection) -> None:
        # frames: the WAL's length when this PASSIVE began, all copied back unless a
        # reader holds old ones; commits made meanwhile are beyond it.
        _busy, frames, _done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.runs += 1
        if frames >= self.restart_frames:
            # The WAL has not restarted for this many frames: writes never left it a
            # moment with everything copied (see the module docstring).  Copy the rest
            # holding the write lock, so that the next writer starts it afresh.
            db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            self.restarts += 1


class SharedDb:
    """One lazily opened connection to ``path``, its schema created, behind a lock, and
    the :class:`Checkpointer` of the file in this process."""

    def __init__(self, path: Path, schema: str, *,
                 busy_timeout_ms: int = BUSY_TIMEOUT_MS,
                 checkpoint_every: float = CHECKPOINT_EVERY) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.checkpoint_every = checkpoint_every
        self._schema = schema
        self._db: sqlite3.Connection | None = None
        self.checkpointer: Checkpointer | None = None
        self.lock = threading.Lock()

    def conn(self) -> sqlite3.Connection:
        """The open connection (sqlite3.Error if the file cannot be opened or created)."""
        if self._db is None:
            # The schema may wait for another worker creating it at the same moment.
            db = open_db(self.path, BUSY_TIMEOUT_MS)
            try:
                db.executescript(self._schema)  # one or more CREATE statements
                db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
            if self.checkpointer is None:  # started here: after the fork, in each worker
                self.checkpointer = Checkpointer(self.path, self.checkpoint_every)
                # A store dropped without close() does not leave its thread behind.
                weakref.finalize(self, self.checkpointer.stop, False)
        return self._db

    def wrote(self) -> None:
        """Called after each commit on :meth:`conn` (under :attr:`lock`)."""
        if self.checkpointer is not None:
            self.checkpointer.wrote()

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
            self.checkpointer = None
        if self._db is not None:
            self._db.close()
            self._db = None
