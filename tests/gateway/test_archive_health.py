"""Which failures count as an archive backend outage, and what a client is told meanwhile."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

from archive.metadata import MetadataError
from archive.s3store import ObjectStoreError, ObjectStoreUnavailableError
from gateway.archive_health import (
    ARCHIVE_UNAVAILABLE,
    BackendHealth,
    backend_unavailable,
    check_room,
    describe,
    unavailable_at_start,
)
from gateway.queue.spool import Spool
from gateway.runner import Runner


def _wrapped(inner: BaseException) -> MetadataError:
    try:
        raise MetadataError("cannot record") from inner
    except MetadataError as exc:
        return exc


def test_unreachable_database_or_storage_is_an_outage() -> None:
    lost = sa_exc.OperationalError("INSERT ...", {}, Exception("server closed the connection"))
    assert backend_unavailable(lost)
    assert backend_unavailable(_wrapped(lost))
    assert backend_unavailable(sa_exc.InterfaceError("SELECT 1", {}, Exception("closed")))
    assert backend_unavailable(ObjectStoreUnavailableError("S3 put_object: unreachable"))


def test_a_full_file_system_under_the_archive_is_an_outage() -> None:
    assert backend_unavailable(OSError(errno.ENOSPC, "No space left on device"))
    assert backend_unavailable(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert backend_unavailable(_wrapped(OSError(errno.ENOSPC, "No space left on device")))
    assert not backend_unavailable(OSError(errno.EACCES, "Permission denied"))
    assert not backend_unavailable(OSError(errno.EIO, "Input/output error"))


def test_the_probe_keeps_a_full_archive_down_until_it_has_room(tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    check_room([tmp_path], min_free=1)
    with pytest.raises(OSError) as info:
        check_room([tmp_path], min_free=free * 2)
    assert info.value.errno == errno.ENOSPC and backend_unavailable(info.value)


def test_a_refusal_or_a_bug_is_not_an_outage() -> None:
    dup = sa_exc.IntegrityError("INSERT ...", {}, Exception("duplicate key"))
    assert not backend_unavailable(dup)
    assert not backend_unavailable(ObjectStoreError("S3 put_object: AccessDenied", "AccessDenied"))
    assert not backend_unavailable(ValueError("bug"))


def test_describe_keeps_the_statement_and_its_parameters_out_of_the_log() -> None:
    err = sa_exc.OperationalError("INSERT INTO messages VALUES (%(subject)s)",
                                  {"subject": "secret merger"}, Exception("connection lost"))
    text = describe(err)
    assert "connection lost" in text and "secret merger" not in text and "\n" not in text


def test_new_transactions_are_refused_only_while_the_backend_is_down(tmp_path: Path) -> None:
    health = BackendHealth()
    runner = Runner(Spool(tmp_path / "spool"), refuse=health.refusal)
    assert runner.room_for(1000) is None
    health.mark_down("OperationalError: connection refused")
    assert runner.room_for(1000) == ARCHIVE_UNAVAILABLE
    assert str(ARCHIVE_UNAVAILABLE).startswith("451 4.3.0 ")
    assert health.mark_up() and not health.mark_up()  # only the first call recovers
    assert runner.room_for(1000) is None and health.recoveries == 1


def _pg_connect_failure(text: str) -> MetadataError:
    """What ArchiveStage.open raises when libpq could not connect, with libpq's text."""
    try:
        try:
            raise psycopg.OperationalError(f"connection failed: {text}")
        except psycopg.OperationalError as orig:
            raise sa_exc.OperationalError("SELECT 1", {}, orig) from orig
    except sa_exc.OperationalError as exc:
        return _wrapped(exc)


def test_at_start_an_unreachable_backend_is_waited_for() -> None:
    refused = _pg_connect_failure('connection to server at "127.0.0.1", port 5999 failed: '
                                  "Connection refused")
    assert unavailable_at_start(refused)
    assert unavailable_at_start(_pg_connect_failure(
        "failed to resolve host 'db.internal': [Errno -3] Temporary failure in name resolution"))
    # The server is there but refuses connections for now (SQLSTATE 57P03, 53300).
    assert unavailable_at_start(_pg_connect_failure(
        'connection to server at "127.0.0.1", port 5432 failed: FATAL:  the database '
        "system is starting up"))
    assert unavailable_at_start(_pg_connect_failure(
        'connection to server at "127.0.0.1", port 5432 failed: FATAL:  sorry, too many '
        "clients already"))
    assert unavailable_at_start(ObjectStoreUnavailableError("S3 head_bucket: unreachable"))


def test_at_start_a_backend_that_refuses_the_configuration_is_a_mistake() -> None:
    for fatal in ('database "archive" does not exist', 'role "coffer" does not exist',
                  'password authentication failed for user "coffer"',
                  'no pg_hba.conf entry for host "127.0.0.1", user "coffer"'):
        assert not unavailable_at_start(_pg_connect_failure(
            f'connection to server at "127.0.0.1", port 5432 failed: FATAL:  {fatal}')), fatal
    assert not unavailable_at_start(_pg_connect_failure(
        'connection to server at "127.0.0.1", port 5432 failed: fe_sendauth: no password '
        "supplied"))
    assert not unavailable_at_start(ObjectStoreError("S3 head_bucket: 403", "403"))
    assert not unavailable_at_start(ObjectStoreError("S3 put_object: SignatureDoesNotMatch",
                                                     "SignatureDoesNotMatch"))
    assert not unavailable_at_start(ValueError("bug"))
