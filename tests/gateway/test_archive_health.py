"""Which failures count as an archive backend outage, and what a client is told meanwhile."""

from __future__ import annotations

import errno
import os
from pathlib import Path

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
