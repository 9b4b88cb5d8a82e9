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

A SQLite file and the local store have no outage of their own (a full disk is
the spool's 452): the probe simply passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gateway import log, metrics, replies
from gateway.replies import Reply

ARCHIVE_UNAVAILABLE = replies.Reply(
    451, "4.3.0", "Archive temporarily unavailable, try again later")


def backend_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means "the archive backend cannot be reached now" (try later).

    S3: unreachable, timed out or 5xx (archive.s3store.ObjectStoreUnavailableError).
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
        cur = cur.__cause__ or cur.__context__
    return False


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
