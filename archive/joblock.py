"""One node at a time: the lock that makes a cluster-wide job run exactly once.

Every node of a cluster runs the same periodic jobs (the full-text indexer; a
``coffer archive expire`` from each node's cron).  Each run takes the job's lock
first, without waiting; a node that does not get it skips this run, because
another node is doing exactly that work now and will have done it when the lock
is free again (each job commits its progress before the lock is released, so
the next holder starts where the last one stopped).

PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``, key
``hashtextextended('<schema>:coffer-job:<name>', 0)``: advisory locks belong to a
database, and two archives in two schemas of one database are two clusters) on a
connection held for the run.
When a node dies (kill -9, power) its connection closes and PostgreSQL releases
the lock, so the job moves to another node at its next run; nothing has to time
out.  SQLite (one node, maybe several processes): an exclusive ``flock`` of
``DATA_DIR/archive/jobs/<name>.lock``, released by the kernel the same way.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text

from archive.errors import ArchiveError
from archive.metadata import Metadata

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
_PG_KEY = "hashtextextended(current_schema() || ':' || :k, 0)"


class JobLock:
    """The cluster-wide lock of one job (``name``: e.g. "index", "retention-expire")."""

    def __init__(self, name: str, meta: Metadata, data_dir: Path) -> None:
        if not _NAME.match(name):
            raise ArchiveError(f"{name!r} is not a job name")
        self.name = name
        self.meta = meta
        self.data_dir = data_dir

    @property
    def key(self) -> str:
        return f"coffer-job:{self.name}"

    @contextmanager
    def attempt(self) -> Iterator[bool]:
        """Try to take the lock (never waits); yields whether this run holds it."""
        if self.meta.dialect == "postgresql":
            with self._advisory() as held:
                yield held
        else:
            with self._file() as held:
                yield held

    @contextmanager
    def _advisory(self) -> Iterator[bool]:
        with self.meta.engine.connect() as conn:
            held = bool(conn.execute(
                text(f"SELECT pg_try_advisory_lock({_PG_KEY})"),
                {"k": self.key}).scalar())
            conn.commit()  # no transaction stays open while the job runs
            try:
                yield held
            finally:
                if held:
                    conn.execute(text(f"SELECT pg_advisory_unlock({_PG_KEY})"),
                                 {"k": self.key})
                    conn.commit()

    @contextmanager
    def _file(self) -> Iterator[bool]:
        jobs = self.data_dir / "archive" / "jobs"
        jobs.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(jobs / f"{self.name}.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                held = False
            yield held
        finally:
            os.close(fd)  # releases the flock
