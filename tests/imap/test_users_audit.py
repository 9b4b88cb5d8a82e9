"""``coffer users`` changes are audited: who may read the archive is part of what an
auditor must reconstruct.  Each change (and each refused change) leaves a row in the
archive's metadata database and an ``audit`` entry in its ledger; the password never
appears in either."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from auditkit import audit_rows, ledger_audits

from archive.audit import sha256_text
from gateway.cli import main


def coffer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
           *argv: str, stdin: str = "") -> tuple[int, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(list(argv))
    return rc, capsys.readouterr().err



def test_every_account_change_is_audited_with_the_officer_and_no_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    d = ["--data-dir", str(tmp_path), "--officer", "root-admin"]
    steps = [
        (("users", "add", "alice", "--role", "user", "--address", "a@corp.example",
          "--password-stdin"), "first secret\n"),
        (("users", "passwd", "alice", "--password-stdin"), "second secret\n"),
        (("users", "role", "alice", "officer"), ""),
        (("users", "address", "alice", "b@corp.example"), ""),
        (("users", "disable", "alice"), ""),
        (("users", "enable", "alice"), ""),
    ]
    for argv, stdin in steps:
        rc, err = coffer(monkeypatch, capsys, *argv, *d, stdin=stdin)
        assert rc == 0, err
    assert coffer(monkeypatch, capsys, "users", "list", "--data-dir", str(tmp_path))[0] == 0
    rows = audit_rows(tmp_path)
    assert [(r.who, r.action, r.target) for r in rows] == [
        ("root-admin", "user-add", "alice"), ("root-admin", "user-passwd", "alice"),
        ("root-admin", "user-role", "alice"), ("root-admin", "user-address", "alice"),
        ("root-admin", "user-disable", "alice"), ("root-admin", "user-enable", "alice")]
    assert rows[0].detail == {"role": "user", "addresses": ["a@corp.example"]}
    assert rows[2].detail == {"role": "officer"}
    assert rows[3].detail == {"addresses": ["b@corp.example"]}
    assert all("secret" not in repr(r.detail) for r in rows)
    entries = ledger_audits(tmp_path)  # `users list` is not audited
    assert [e["event"] for e in entries] == [r.id for r in rows]
    assert {e["who_sha256"] for e in entries} == {sha256_text("root-admin")}
    assert {e["target_sha256"] for e in entries} == {sha256_text("alice")}
    archive_files = b"".join(p.read_bytes() for p in (tmp_path / "archive").rglob("*")
                             if p.is_file() and p.name != "imap.db")
    assert b"secret" not in archive_files


def test_a_refused_account_change_is_audited_with_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = coffer(monkeypatch, capsys, "users", "role", "nobody", "admin",
                     "--data-dir", str(tmp_path), "--officer", "mallory")
    assert rc == 1 and err == "coffer: no such user 'nobody'\n"
    (row,) = audit_rows(tmp_path)
    assert (row.who, row.action, row.target) == ("mallory", "user-role", "nobody")
    assert row.detail == {"role": "admin", "error": "no such user 'nobody'"}
    (entry,) = ledger_audits(tmp_path)
    assert entry["event"] == row.id and entry["action"] == "user-role"
