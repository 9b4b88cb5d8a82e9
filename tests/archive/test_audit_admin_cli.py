"""Officer actions on the archive's bytes and keys that used to go unaudited:
``coffer archive compact`` and ``coffer archive keys rotate`` each leave an audit row
in the metadata database and an ``audit`` entry in the ledger (archive.audit)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from archive_verify_cli import run_coffer
from auditkit import audit_rows, ledger_audits

from archive.audit import sha256_text
from archive.facade import Archive
from archive.verify import verify

MSGS = [b"Subject: compact %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(3)]



def test_compact_is_audited_with_the_officer_and_what_it_freed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Archive.open(tmp_path) as a:
        a.put_many(MSGS)
        a.shred(hashlib.sha256(MSGS[1]).hexdigest(), reason="retention", delete_blob=True)
    assert run_coffer(["archive", "compact", "--json", "--data-dir", str(tmp_path),
                       "--officer", "alice"]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = audit_rows(tmp_path)
    assert (row.who, row.action, row.result_count) == ("alice", "compact", 1)
    assert row.detail == {"records": 1, "freed_bytes": out["freed_bytes"]}
    (entry,) = ledger_audits(tmp_path)
    assert entry["event"] == row.id and entry["action"] == "compact"
    assert entry["who_sha256"] == sha256_text("alice") and entry["result_count"] == 1
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok, findings


def test_a_compaction_with_nothing_to_do_is_audited_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Archive.open(tmp_path).close()
    assert run_coffer(["archive", "compact", "--data-dir", str(tmp_path),
                       "--officer", "bob"]) == 0
    assert capsys.readouterr().out.startswith("compacted 0 segment(s)")
    (row,) = audit_rows(tmp_path)
    assert (row.who, row.action, row.result_count) == ("bob", "compact", 0)
    assert [e["action"] for e in ledger_audits(tmp_path)] == ["compact"]


def test_key_rotation_is_audited_with_the_new_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Archive.open(tmp_path).close()
    assert run_coffer(["archive", "keys", "rotate", "--data-dir", str(tmp_path),
                       "--officer", "carol"]) == 0
    assert "archive key k2" in capsys.readouterr().out
    (row,) = audit_rows(tmp_path)
    assert (row.who, row.action, row.target) == ("carol", "key-rotate", "k2")
    (entry,) = ledger_audits(tmp_path)
    assert entry["event"] == row.id and entry["action"] == "key-rotate"
    assert entry["who_sha256"] == sha256_text("carol")
    assert entry["target_sha256"] == sha256_text("k2")
    assert run_coffer(["archive", "audit-db", "--data-dir", str(tmp_path)]) == 0
