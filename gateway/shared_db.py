"""A small SQLite file shared by every worker process (rate counters, recipient verdicts,
TLS report counts).

WAL mode, so readers never wait for the one writer; ``synchronous=NORMAL``: a commit is
not fsynced, a power cut may lose the last writes, which only costs a recount or a probe
(what these files hold is worth less than a disk flush per SMTP command).  The
connection is opened at first use, so a file made before the workers fork is opened
once in each of them, never shared across a fork.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

BUSY_TIMEOUT_MS = 2000  # a worker waits this long for another's write to finish


class SharedDb:
    """One lazily opened connection to ``path``, its schema created, behind a lock."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self._schema = schema
        self._db: sqlite3.Connection | None = None
        self.lock = threading.Lock()

    def conn(self) -> sqlite3.Connection:
        """The open connection (sqlite3.Error if the file cannot be opened or created)."""
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(self._schema)  # one or more CREATE statements
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
