"""Is the archive backend (PostgreSQL, S3) reachable?  Outage = tempfail, never loss.

Nothing is delivered that was not archived, so while the metadata database or
the object storage is unreachable the after-queue archive stage cannot finish:
it defers the message (it stays in this node's spool, retried with the queue's
backoff) instead of holding it for an operator.  The first such failure marks
the backend down; while it is down the before-queue path answers new
transactions ``451 4.3.0`` at MAIL FROM, so the spool does not fill up with mail
that cannot move (RFC 5321 §4.2.5: the client keeps it and tries again).  A
periodic probe (a ``SELECT 1`` and a HEAD of the bucket, ``archive.health_probe``)
marks it up again, and the messages deferred by the outage are retried at once.

A SQLite file and the local store have one outage of their own: a full file system.
Their writes then fail with ENOSPC (SQLite: "database or disk is full"); the message
is deferred, new mail gets 451 4.3.0, and the probe (:func:`check_room`) sees the
backend up again once the archive's file systems have room.

At start (:func:`unavailable_at_start`) the same outage does not stop ``coffer serve``:
the process binds its listeners, answers 451 4.3.0 and opens the archive when a probe
succeeds (gateway.archive_stage.ArchivePending).  A backend that answers and refuses
this configuration (an unknown database or role, a wrong password, S3 credentials it
rejects, a bucket that is missing or has no Object Lock) is a configuration mistake:
``coffer serve`` refuses to start and says why.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from gateway import log, metrics, replies
from gateway.replies import Reply

ARCHIVE_UNAVAILABLE = replies.Reply(
    451, "4.3.0", "Archive temporarily unavailable, try again later")


# A full file system (or quota) under the local store, ledger or SQLite files is an
# outage like an unreachable server: the message waits in the spool until there is room.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# Below this much free space under an archive directory the probe keeps the backend down.
PROBE_MIN_FREE = 1024 * 1024


def check_room(paths: Iterable[Path], min_free: int = PROBE_MIN_FREE) -> None:
    """Raise OSError(ENOSPC) when the file system of one of ``paths`` has less than
    ``min_free`` bytes available (the probe of a local archive after a full disk)."""
    for path in paths:
        st = os.statvfs(path)
        if st.f_bavail * st.f_frsize < min_free:
            raise OSError(errno.ENOSPC, f"less than {min_free} bytes free", str(path))


def backend_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means "the archive backend cannot be reached now" (try later).

    S3: unreachable, timed out or 5xx (archive.s3store.ObjectStoreUnavailableError).
    Local files: a full file system or quota (ENOSPC, EDQUOT; SQLite's "database or disk
    is full" is an OperationalError).
    PostgreSQL: a connection that could not be made or was lost (SQLAlchemy's
    OperationalError / InterfaceError / DisconnectionError, also when wrapped in a
    MetadataError).  A constraint violation or a bug is not an outage: it still
    holds the message for an operator.
    """
    from sqlalchemy import exc as sa_exc

    from archive.s3store import ObjectStoreUnavailableError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ObjectStoreUnavailableError | sa_exc.DisconnectionError):
            return True
        if isinstance(cur, sa_exc.OperationalError | sa_exc.InterfaceError):
            return True
        if isinstance(cur, sa_exc.DBAPIError) and cur.connection_invalidated:
            return True
        if isinstance(cur, OSError) and cur.errno in DISK_FULL:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


# What a PostgreSQL server says when it refuses a connection only for now: SQLSTATE
# 57P03 cannot_connect_now (starting up, shutting down, in recovery) and 53300
# too_many_connections.  libpq reports no SQLSTATE for a connection that failed, only
# its text (psycopg's OperationalError.sqlstate is None then), so the text it is.
_PG_NOT_NOW = ("the database system is", "too many clients",
               "remaining connection slots are reserved")
# A connection that failed with one of these texts was refused by the server (a FATAL
# answer: unknown database or role, failed authentication, no pg_hba.conf entry) or by
# libpq itself for want of a password: the configuration is wrong, not the network.
_PG_REFUSED = ("FATAL:", "no password supplied")


def refused_by_server(exc: BaseException) -> bool:
    """True when ``exc`` says the PostgreSQL server answered and refused this connection
    for good (database, role, password, pg_hba.conf), not that it cannot be reached."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = str(cur)
        if (type(cur).__module__.startswith("psycopg")
                and any(m in text for m in _PG_REFUSED)
                and not any(m in text for m in _PG_NOT_NOW)):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def unavailable_at_start(exc: BaseException) -> bool:
    """True when ``coffer serve`` failed to open its archive because the backend cannot be
    reached now (start anyway, refuse mail with 451 and keep probing); False for a
    configuration mistake or a bug, which must stop the start.

    The rule: what :func:`backend_unavailable` calls an outage at run time (connection
    refused or lost, timeout, an S3 5xx, a name that does not resolve, a full disk),
    except a PostgreSQL server that answered and refused us (:func:`refused_by_server`).
    An S3 4xx (credentials, a missing bucket or one without Object Lock) is never an
    outage.  Where the text is not recognised the failure counts as an outage: the node
    then runs, refuses mail with 451 and logs the reason, rather than not start at all.
    """
    return backend_unavailable(exc) and not refused_by_server(exc)


def describe(exc: BaseException) -> str:
    """A one-line reason for a log: SQLAlchemy appends the statement and its parameters
    (message data) on later lines, and those stay out of the log."""
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


class BackendHealth:
    """The archive backend's state as this process last saw it (one flag, no I/O)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.down_since: float | None = None
        self.reason = ""
        self.recoveries = 0  # how many times it came back (a probe's success after a failure)

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def mark_down(self, reason: str) -> None:
        if self.down_since is None:
            self.down_since = self.clock()
            log.event("archive_backend_down", level=logging.ERROR, error=reason)
            metrics.ARCHIVE_BACKEND_UP.set(0)
        self.reason = reason

    def mark_up(self) -> bool:
        """Clear the flag; True if it was set (the caller retries what the outage deferred)."""
        if self.down_since is None:
            return False
        seconds = round(self.clock() - self.down_since, 3)
        self.down_since, self.reason = None, ""
        self.recoveries += 1
        log.event("archive_backend_up", seconds_down=seconds)
        metrics.ARCHIVE_BACKEND_UP.set(1)
        return True

    def refusal(self) -> Reply | None:
        """The reply to a new transaction while the backend is down, else None."""
        return ARCHIVE_UNAVAILABLE if self.down else None
