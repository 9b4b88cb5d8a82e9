"""``coffer search`` and ``coffer show`` against a real archive, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import M1, M2, PG_URL, make_record

from archive.facade import Archive
from archive.index import Indexer, open_index
from archive.metadata import AuditEvent, Metadata
from archive.search import register_audit_hook, unregister_audit_hook
from gateway.cli import main


@pytest.fixture
def archive_dir(meta: Metadata, tmp_path: Path) -> Iterator[tuple[Path, list[str], dict[str, int]]]:
    """A data directory with two messages stored, recorded and indexed; the CLI
    arguments that locate its database and index."""
    ids: dict[str, int] = {}
    with Archive.open(tmp_path) as arc:
        for name, raw in (("m1", M1), ("m2", M2)):
            arc.put(raw)
            ids[name] = meta.add_message(make_record(raw, rcpt_to=["boss@corp.example"])).id
        engine = "pg" if meta.dialect == "postgresql" else "fts5"
        index = open_index(engine, data_dir=tmp_path, meta=meta)
        Indexer(meta, index, arc.get).run()
        index.close()
    args = ["--data-dir", str(tmp_path)]
    if meta.dialect == "postgresql":
        url = f"{PG_URL}?options={quote(f'-csearch_path={meta.schema}')}"
        args += ["--database", url]
    yield tmp_path, args, ids


def test_search_json_prints_one_object_per_hit_and_audits(
        archive_dir: tuple[Path, list[str], dict[str, int]], meta: Metadata,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, args, ids = archive_dir
    seen: list[AuditEvent] = []
    register_audit_hook(seen.append)
    try:
        code = main(["search", "body:merger", "--json", "--officer", "olga", *args])
    finally:
        unregister_audit_hook(seen.append)
    out, err = capsys.readouterr()
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == [ids["m1"]]
    assert {"id", "message_id", "date", "from", "to", "subject", "snippet"} <= set(rows[0])
    assert rows[0]["from"] == "alice@example.com" and rows[0]["to"] == ["bob@example.org"]
    assert "[merger]" in rows[0]["snippet"]  # decrypted from the store at query time
    assert "1 message matches" in err
    events = meta.audit_events()
    assert [(e.who, e.action, e.query, e.result_count) for e in events] == [
        ("olga", "search", "body:merger", 1)]
    assert [e.id for e in seen] == [events[0].id]


def test_search_table_shows_ids_subjects_and_snippets(
        archive_dir: tuple[Path, list[str], dict[str, int]],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, args, ids = archive_dir
    monkeypatch.setenv("USER", "uma")
    assert main(["search", "bcc:boss@corp.example", "--limit", "1", *args]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "DATE", "FROM", "SUBJECT"]
    assert lines[1].split()[0] == str(ids["m2"]) and "Lunch" in lines[1]
    assert "Cafe at noon?" in lines[2]
    assert "2 messages match; showing 1" in err


def test_query_error_exits_2_pointing_at_the_column(
        archive_dir: tuple[Path, list[str], dict[str, int]], meta: Metadata,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, args, _ = archive_dir
    assert main(["search", "subject:x size:huge", *args]) == 2
    err = capsys.readouterr().err
    assert "query error at column 16: expected a size" in err
    assert "\n  subject:x size:huge\n" + " " * 17 + "^" in err
    assert meta.audit_events() == []


def test_show_raw_writes_the_exact_original_bytes_and_audits(
        archive_dir: tuple[Path, list[str], dict[str, int]], meta: Metadata,
        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    _, args, ids = archive_dir
    assert main(["show", str(ids["m2"]), "--raw", "--officer", "olga", *args]) == 0
    assert capsysbinary.readouterr().out == M2
    event = meta.audit_events()[-1]
    assert (event.who, event.action, event.target) == ("olga", "show", str(ids["m2"]))
    assert event.detail["raw"] is True


def test_show_prints_envelope_headers_and_body(
        archive_dir: tuple[Path, list[str], dict[str, int]], meta: Metadata,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, args, ids = archive_dir
    mid = meta.get(ids["m1"]).message_id  # type: ignore[union-attr]
    assert main(["show", f"<{mid}>", *args]) == 0
    out = capsys.readouterr().out
    assert f"Archive-Id:       {ids['m1']}" in out
    assert "Bcc (envelope):   boss@corp.example" in out
    assert "Attachment:       forecast.txt (text/plain, 16 bytes)" in out
    assert "Subject: Quarterly report" in out
    assert "The merger with Falcon Corp" in out


def test_show_unknown_id_is_one_line_on_stderr_and_exit_1(
        archive_dir: tuple[Path, list[str], dict[str, int]],
        capsys: pytest.CaptureFixture[str]) -> None:
    _, args, _ = archive_dir
    assert main(["show", "999999", *args]) == 1
    err = capsys.readouterr().err
    assert err == "coffer: no archived message with id 999999\n"


def test_search_without_an_archive_says_where_it_looked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "x", "--data-dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("coffer: ") and "no archive metadata here" in err
    assert len(err.splitlines()) == 1
