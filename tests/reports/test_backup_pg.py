"""coffer backup create / restore with the metadata in the real PostgreSQL (pg_dump/pg_restore).

Each test works in databases of its own (metadata_db.pg_database), created and
dropped around it, since a dump and its restore are whole-database operations.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import T0, mail, populate, sample
from metadata_db import *  # noqa: F403 - fixtures: pg_database, pg_admin
from metadata_db import Db
from test_rebuild import gatewayed, results, run_stage
from test_rebuild_log import START, cli, ledger_errors, staged

from archive.extract import extract
from archive.facade import Archive
from archive.metadata import MessageRecord, Metadata
from gateway.cli import main
from reports.compliance import build

QUERIES = ["merger", "from:alice@example.com", "bcc:secret@example.org", "rule:phishing-words",
           "has:attachment", "spf:fail", "hold:C-1"]


async def test_backup_restore_round_trip_on_postgresql_passes_verify_and_answers_alike(
        tmp_path: Path, pg_database: Callable[[], str],
        capsys: pytest.CaptureFixture[str]) -> None:
    src = Db(tmp_path / "data", database=pg_database())
    dst = Db(tmp_path / "restored", database=pg_database())
    await run_stage(src, staged([gatewayed(r, i) for i, r in enumerate(sample())]))
    cli(capsys, "hold", "create", "C-1", "--query", "merger", "--officer", "olga", *src.cli())
    cli(capsys, "search", "invoice", "--officer", "olivia", *src.cli())
    before = results(src, QUERIES)
    holds = cli(capsys, "hold", "list", *src.cli())
    log = cli(capsys, "audit", "log", *src.cli())
    with src.open() as meta:
        holds_report = build(meta, "holds", START, T0 + timedelta(days=3650)).to_json()

    dest = tmp_path / "bk"
    assert main(["backup", "create", str(dest), *src.cli()]) == 0
    info = json.loads((dest / "BACKUP.json").read_text())
    assert (info["database"], info["receipts_not_in_database"]) == ("postgresql", 0)
    assert (dest / "metadata.pgdump").is_file()
    assert main(["backup", "restore", str(dest), *dst.cli()]) == 0

    assert main(["archive", "verify", "--data-dir", str(dst.data)]) == 0
    assert results(dst, QUERIES) == before
    assert cli(capsys, "hold", "list", *dst.cli()) == holds
    restored_log = cli(capsys, "audit", "log", *dst.cli())
    # The dump was taken before the backup's own event; the restore adds its own.
    assert restored_log[:-1] == log and restored_log[-1]["action"] == "restore"
    with dst.open() as meta:
        assert build(meta, "holds", START, T0 + timedelta(days=3650)).to_json() == holds_report
    assert ledger_errors(dst) == []


def test_restore_refuses_a_non_empty_database_and_a_missing_url(
        tmp_path: Path, pg_database: Callable[[], str],
        capsys: pytest.CaptureFixture[str]) -> None:
    src = Db(tmp_path / "data", database=pg_database())
    populate(src.data, sample(), src.url)
    dest = tmp_path / "bk"
    assert main(["backup", "create", str(dest), *src.cli()]) == 0
    capsys.readouterr()
    # Into the database it came from (not empty): refused, nothing written.
    assert main(["backup", "restore", str(dest), "--data-dir", str(tmp_path / "r1"),
                 "--database", str(src.url)]) == 1
    assert "already holds an archive" in capsys.readouterr().err
    assert not (tmp_path / "r1" / "archive").exists()
    # A PostgreSQL dump cannot go into the embedded SQLite default.
    assert main(["backup", "restore", str(dest), "--data-dir", str(tmp_path / "r2")]) == 1
    assert "--database" in capsys.readouterr().err
    assert not (tmp_path / "r2" / "archive").exists()


def test_backup_on_postgresql_while_messages_arrive_is_consistent(
        tmp_path: Path, pg_database: Callable[[], str]) -> None:
    """Rows committed during the backup are either in the dump with their blob and ledger
    entry, or not in the dump at all (counted as receipts_not_in_database)."""
    src = Db(tmp_path / "data", database=pg_database())
    dst = Db(tmp_path / "restored", database=pg_database())
    populate(src.data, sample(), src.url)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        # As the archive stage does: blob and ledger entry first, then the row.
        try:
            with Archive.open(src.data) as archive, Metadata(str(src.url)) as meta:
                n = 100
                while not stop.is_set() and n < 300:
                    raw = mail("w@example.com", "x@example.com", f"live {n}", "b", n)
                    ref = archive.put(raw, {"qid": f"live{n}"})
                    meta.add_message(MessageRecord(ref.sha256, extract(raw), T0))
                    n += 1
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert main(["backup", "create", str(tmp_path / "bk"), *src.cli()]) == 0
    finally:
        stop.set()
        t.join()
    assert not errors
    assert main(["backup", "restore", str(tmp_path / "bk"), *dst.cli()]) == 0
    assert main(["archive", "verify", "--data-dir", str(dst.data)]) == 0
    with dst.open() as meta, Archive.open(dst.data, create=False) as archive:
        for pk in range(1, meta.count() + 1):
            msg = meta.get(pk)
            assert msg is not None and archive.exists(msg.sha256)
    # What the ledger copy has beyond the dump is exactly what the manifest counted.
    missed = json.loads((tmp_path / "bk" / "BACKUP.json").read_text())["receipts_not_in_database"]
    findings = ledger_errors(dst)
    assert all("db_message_missing" in f for f in findings) and len(findings) == missed


def test_libpq_arguments_keep_the_password_off_the_command_line() -> None:
    from reports.pg_backup import libpq

    conn = libpq("postgresql+psycopg://arch:s3cret@db.internal:6543/coffer"
                 "?options=-csearch_path%3Dtenant_a")
    assert conn.args == ["--dbname=coffer", "--host=db.internal", "--port=6543",
                         "--username=arch"]
    assert conn.env == {"PGPASSWORD": "s3cret"} and conn.schema == "tenant_a"
    assert libpq("postgresql://postgres@127.0.0.1/test").schema is None


def test_restore_refuses_a_url_without_a_database_or_in_another_schema(tmp_path: Path) -> None:
    from reports.errors import BackupError
    from reports.pg_backup import restore

    with pytest.raises(BackupError, match="must name a database"):
        restore(tmp_path / "x.pgdump", "postgresql://postgres@127.0.0.1", None)
    with pytest.raises(BackupError, match="schema tenant_a"):
        restore(tmp_path / "x.pgdump",
                "postgresql://postgres@127.0.0.1/test?options=-csearch_path%3Dtenant_b",
                "tenant_a")
