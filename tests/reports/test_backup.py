"""coffer backup create / restore: a consistent copy taken while messages keep arriving."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from conftest import mail, populate, sample
from metadata_db import Db
from test_rebuild import results

from archive.facade import Archive
from archive.metadata import Metadata
from archive.verify import verify
from gateway.cli import main

QUERIES = ["merger", "from:alice@example.com", "bcc:secret@example.org", "rule:phishing-words",
           "has:attachment", "spf:fail"]


def test_backup_restore_round_trip_passes_verify_and_searches_alike(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, dest, restored = tmp_path / "data", tmp_path / "bk", tmp_path / "restored"
    populate(data, sample())
    before = results(Db(data), QUERIES)
    assert main(["backup", "create", str(dest), "--data-dir", str(data)]) == 0
    assert "contains the archive keys" in capsys.readouterr().err
    keys = dest / "archive" / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) in (0o600, 0o644) for p in keys.iterdir())
    assert main(["backup", "restore", str(dest), "--data-dir", str(restored)]) == 0
    summary, findings = verify(restored / "archive")
    assert summary.ok, [str(f) for f in findings]
    assert results(Db(restored), QUERIES) == before
    assert main(["archive", "verify", "--data-dir", str(restored)]) == 0
    # A restore never overwrites an archive.
    assert main(["backup", "restore", str(dest), "--data-dir", str(restored)]) == 1


def test_backup_while_messages_arrive_is_consistent(tmp_path: Path) -> None:
    data, dest, restored = tmp_path / "data", tmp_path / "bk", tmp_path / "restored"
    populate(data, sample())
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        archive = Archive.open(data)
        try:
            n = 100
            while not stop.is_set() and n < 400:
                archive.put_many([mail("w@example.com", "x@example.com", f"live {n}", "b", n)],
                                 [{"qid": f"live{n}"}])
                n += 1
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            archive.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert main(["backup", "create", str(dest), "--data-dir", str(data)]) == 0
    finally:
        stop.set()
        t.join()
    assert not errors
    assert main(["backup", "restore", str(dest), "--data-dir", str(restored)]) == 0
    summary, findings = verify(restored / "archive")
    assert summary.ok, [str(f) for f in findings]
    with Metadata.for_data_dir(restored) as meta:
        archive = Archive.open(restored, create=False)
        try:
            for pk in range(1, meta.count() + 1):
                msg = meta.get(pk)
                assert msg is not None and archive.exists(msg.sha256)
        finally:
            archive.close()


def test_backup_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    data, dest = tmp_path / "data", tmp_path / "bk"
    populate(data, sample())
    dest.mkdir()
    (dest / "x").write_text("x")
    assert main(["backup", "create", str(dest), "--data-dir", str(data)]) == 1


def test_backup_without_keys_restores_and_verifies_ciphertext_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, dest, restored = tmp_path / "data", tmp_path / "bk", tmp_path / "restored"
    populate(data, sample())
    assert main(["backup", "create", str(dest), "--no-keys", "--data-dir", str(data)]) == 0
    assert "contains the archive keys" not in capsys.readouterr().err
    assert sorted(p.name for p in (dest / "archive" / "keys").iterdir()) == [
        "ledger-signing.pub"]
    assert main(["backup", "restore", str(dest), "--data-dir", str(restored)]) == 0
    summary, _ = verify(restored / "archive")
    assert summary.ok and summary.mode != "full"


def test_backup_of_an_archive_that_fails_verify_exits_1_and_names_the_finding(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, dest = tmp_path / "data", tmp_path / "bk"
    populate(data, sample())
    ledger = sorted(p for p in (data / "archive" / "ledger").rglob("*") if p.is_file()
                    and p.stat().st_size > 0)[0]
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:1] + lines[2:]))  # an entry removed from the chain
    assert main(["backup", "create", str(dest), "--data-dir", str(data)]) == 1
    assert "coffer backup: ERROR" in capsys.readouterr().err
