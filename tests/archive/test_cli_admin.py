"""``coffer archive expire|import|reindex|audit-db``, ``coffer hold ...`` and ``coffer audit
log`` against a real archive, on SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from admin_env import *  # noqa: F403 - fixtures: env
from admin_env import Env, ledger_kinds
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import M1, M2, M3

from archive.audit import sha256_text
from archive.metadata import Message, Participant
from gateway.cli import build_parser, main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, object]],
                                                                 str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


@pytest.fixture
def emls(tmp_path: Path) -> Path:
    d = tmp_path / "old-mail"
    d.mkdir()
    for name, raw in (("m1.eml", M1), ("m2.eml", M2), ("m3.eml", M3)):
        (d / name).write_bytes(raw)
    return d


def test_import_json_reports_and_a_second_import_stores_nothing(
        env: Env, emls: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, _ = run(capsys, "archive", "import", str(emls), "--json", *env.cli_args())
    assert code == 0
    assert rows[-1]["type"] == "summary" and rows[-1]["stored"] == 3
    assert rows[-1]["indexed"] == 3
    code, rows, _ = run(capsys, "archive", "import", str(emls), "--json", *env.cli_args())
    assert code == 0 and rows[-1]["stored"] == 0 and rows[-1]["duplicates"] == 3


def test_import_reports_malformed_files_and_exits_1(
        env: Env, emls: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (emls / "junk.eml").write_bytes(b"\x00\x00 garbage")
    code, rows, err = run(capsys, "archive", "import", str(emls), "--json", "--progress",
                          *env.cli_args())
    assert code == 1
    failures = [r for r in rows if r["type"] == "failure"]
    assert len(failures) == 1 and str(failures[0]["where"]).endswith("junk.eml")
    assert rows[-1]["stored"] == 3 and rows[-1]["failed"] == 1
    assert "1 item(s) could not be imported" in err
    assert "import: " in err  # the progress line, forced with --progress


def test_hold_lifecycle_and_audit_log(env: Env, emls: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "archive", "import", str(emls), *env.cli_args())
    code, rows, _ = run(capsys, "hold", "create", "C-9", "--query", "body:merger",
                        "--reason", "litigation", "--officer", "hugo", "--json",
                        *env.cli_args())
    assert code == 0 and rows == [rows[0]] and rows[0]["items"] == 2
    assert rows[0]["query"] == "body:merger" and rows[0]["active"] is True
    code, rows, _ = run(capsys, "hold", "show", "C-9", "--json", *env.cli_args())
    assert code == 0 and len(rows[0]["message_ids"]) == 2  # type: ignore[arg-type]
    code, rows, _ = run(capsys, "hold", "release", "C-9", "--officer", "ines", "--json",
                        *env.cli_args())
    assert code == 0 and rows[0]["active"] is False and rows[0]["released_by"] == "ines"
    code, rows, _ = run(capsys, "hold", "list", "--json", *env.cli_args())
    assert [(r["case"], r["active"]) for r in rows] == [("C-9", False)]
    code, rows, _ = run(capsys, "hold", "list", "--active", "--json", *env.cli_args())
    assert rows == []
    code, _, err = run(capsys, "hold", "release", "C-9", *env.cli_args())
    assert code == 1 and "already released" in err
    code, _, err = run(capsys, "hold", "create", "C-10", "--query", "from:(", *env.cli_args())
    assert code == 2 and "column" in err

    code, rows, _ = run(capsys, "audit", "log", "--json", *env.cli_args())
    assert [(r["who"], r["action"], r["target"], r["result_count"]) for r in rows][1:] == [
        ("hugo", "hold", "C-9", 2), ("ines", "release", "C-9", 2)]
    assert rows[0]["action"] == "import"  # the import before the holds
    code, rows, _ = run(capsys, "audit", "log", "--since", "2999-01-01", "--json",
                        *env.cli_args())
    assert code == 0 and rows == []
    assert ledger_kinds(env.archive).count("audit") == 3


def test_import_is_audited_with_the_officer_and_what_came_in(
        env: Env, emls: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (emls / "junk.eml").write_bytes(b"\x00\x00 garbage")
    code, _, _ = run(capsys, "archive", "import", str(emls), "--retention", "7y",
                     "--officer", "ivan", *env.cli_args())
    assert code == 1  # one file failed: the import is audited all the same
    code, _, _ = run(capsys, "archive", "import", str(emls), "--officer", "ivan",
                     *env.cli_args())
    code, rows, _ = run(capsys, "audit", "log", "--json", *env.cli_args())
    assert [(r["who"], r["action"], r["result_count"]) for r in rows] == [
        ("ivan", "import", 3), ("ivan", "import", 0)]
    assert rows[0]["detail"] == {"source": str(emls), "retention": "7y", "found": 3,
                                 "new_blobs": 3, "duplicates": 0, "failed": 1}
    assert rows[1]["detail"]["duplicates"] == 3  # type: ignore[index]
    entries = [e.fields for e in env.archive.ledger.entries() if e.kind == "audit"]
    assert [(e["event"], e["action"], e["result_count"]) for e in entries] == [
        (rows[0]["id"], "import", 3), (rows[1]["id"], "import", 0)]
    assert entries[0]["who_sha256"] == sha256_text("ivan")


def test_expire_dry_run_then_expire_respects_holds(
        env: Env, emls: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Kept one day from their Date (2024): their retention has ended by now.
    run(capsys, "archive", "import", str(emls), "--retention", "1d", *env.cli_args())
    run(capsys, "hold", "create", "C-1", "--query", "subject:lunch", *env.cli_args())
    head = env.archive.ledger.head()
    code, rows, _ = run(capsys, "archive", "expire", "--dry-run", "--json", *env.cli_args())
    assert code == 0
    assert [r["type"] for r in rows] == ["expired", "expired", "kept", "summary"]
    assert rows[2]["reason"] == "hold:C-1" and rows[-1]["dry_run"] is True
    assert env.archive.ledger.head() == head
    assert env.meta.count(Message.expired_at.is_not(None)) == 0

    code, rows, _ = run(capsys, "archive", "expire", "--json", "--officer", "olga",
                        *env.cli_args())
    assert code == 0 and rows[-1]["expired"] == 2 and rows[-1]["blobs_shredded"] == 2
    assert env.meta.count(Message.expired_at.is_not(None)) == 2
    code, rows, _ = run(capsys, "audit", "log", "--json", *env.cli_args())
    assert rows[-1]["action"] == "expire" and rows[-1]["who"] == "olga"
    code, _, _ = run(capsys, "archive", "verify", "--data-dir", str(env.data_dir))
    assert code == 0


def test_reindex_rebuilds_the_index_from_the_store(
        env: Env, emls: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "archive", "import", str(emls), *env.cli_args())
    env.index.clear()
    assert env.searcher().message_ids("body:merger") == []
    code, _, err = run(capsys, "archive", "reindex", "--progress", *env.cli_args())
    assert code == 0 and "reindex" in err
    assert len(env.searcher().message_ids("body:merger")) == 2
    if env.meta.dialect == "sqlite":
        code, _, _ = run(capsys, "archive", "reindex", "--engine", "whoosh", *env.cli_args())
        assert code == 0
        assert (env.data_dir / "archive" / "index" / "whoosh").is_dir()


def test_audit_db_finds_a_deleted_message_row(
        env: Env, emls: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "archive", "import", str(emls), *env.cli_args())
    code, rows, _ = run(capsys, "archive", "audit-db", "--json", *env.cli_args())
    assert code == 0 and rows[-1]["ok"] is True
    with env.meta.session() as s:
        victim = s.scalar(sa.select(sa.func.min(Message.id)))
        s.execute(sa.delete(Participant).where(Participant.message_pk == victim))
        s.execute(sa.delete(Message).where(Message.id == victim))
    code, rows, _ = run(capsys, "archive", "audit-db", "--json", *env.cli_args())
    assert code == 1
    assert [r["code"] for r in rows if r["type"] == "finding"] == ["db_message_missing"]


def test_search_and_show_are_audited_in_the_ledger(
        env: Env, emls: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "archive", "import", str(emls), *env.cli_args())
    index = ["--index", "pg" if env.meta.dialect == "postgresql" else "fts5"]
    code, rows, _ = run(capsys, "search", "body:merger", "--json", *index, *env.cli_args())
    assert code == 0 and len(rows) == 2
    code, _, _ = run(capsys, "show", str(rows[0]["id"]), *index, *env.cli_args())
    assert code == 0
    audits = [e.fields for e in env.archive.ledger.entries() if e.kind == "audit"]
    assert [(a["action"], a.get("result_count")) for a in audits] == [
        ("import", 3), ("search", 2), ("show", 1)]


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(f"{prefix}{name}")
                out.extend(_commands(sub, f"{prefix}{name} "))
    return out


def test_no_command_deletes_a_message_before_its_retention_ends() -> None:
    commands = _commands(build_parser())
    assert "archive expire" in commands and "hold release" in commands
    forbidden = {"delete", "purge", "shred", "remove", "rm", "erase", "destroy", "wipe"}
    # (``queue delete`` drops a message not yet delivered: the spool, not the archive.)
    archive = [c for c in commands if c.split()[0] in {"archive", "hold", "audit", "search",
                                                          "show", "imap"}]
    assert [c for c in archive if forbidden & set(c.split())] == []
    # expire takes no message ids and no date: it can only apply retention as it stands.
    expire = next(a for a in build_parser()._subparsers._group_actions  # type: ignore[union-attr]
                  if isinstance(a, argparse._SubParsersAction)).choices["archive"]
    sub = next(a for a in expire._actions if isinstance(a, argparse._SubParsersAction))
    options = {o for a in sub.choices["expire"]._actions for o in a.option_strings}
    assert options == {"-h", "--help", "--dry-run", "--json", "--data-dir", "--config",
                       "--database", "--index", "--officer"}
    assert [a.dest for a in sub.choices["expire"]._actions if not a.option_strings] == []
