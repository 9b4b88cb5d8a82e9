"""coffer archive rebuild restores legal holds and the audit log from their ledger documents.

Every comparison runs on SQLite and on the real PostgreSQL (metadata_db.db).
The only difference allowed between before and after is the rebuild's own
audit event, appended last: holds and audit events keep their ids, because
``hold:CASE`` searches, hold folders and reports name them, and an audit
trail whose ids changed would no longer match the ledger entries (``event``)
that prove it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import Receipt, populate, sample
from metadata_db import *  # noqa: F403 - fixtures: db (sqlite, postgresql), backend, pg_admin
from metadata_db import Db
from test_rebuild import QUERIES, RECEIPT_QUERIES, gatewayed, results, run_stage, through_stage

from archive.audit import check_database
from archive.facade import Archive
from gateway.cli import main
from gateway.envelope import Envelope
from gateway.pipeline import MessageContext
from reports.compliance import build

START = datetime(2000, 1, 1, tzinfo=UTC)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> list[Any]:
    """Run ``coffer ARGS --json``; its stdout as parsed JSON lines."""
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]


def rebuild(capsys: pytest.CaptureFixture[str], db: Db) -> dict[str, Any]:
    db.lose()
    [summary] = cli(capsys, "archive", "rebuild", *db.cli())
    return dict(summary)


def report(db: Db, name: str, end: datetime) -> dict[str, Any]:
    with db.open() as meta:
        return build(meta, name, START, end).to_json()


def ledger_errors(db: Db) -> list[str]:
    with db.open() as meta:
        return [str(f) for f in check_database(meta, db.data / "archive" / "ledger")
                if f.severity == "error"]


def staged(receipts: list[Receipt]) -> list[MessageContext]:
    """The sample as the gateway archives it: envelope (Bcc included), verdicts, decision
    with its rule hits, all of which go into each message's receipt blob."""
    out = []
    for i, r in enumerate(receipts):
        decide = {**(r.decision or {"decision": "accept"}),
                  "rules": [{"name": n, "matched": True} for n in r.rules]}
        env = Envelope(r.mail_from, r.rcpt_to, client_ip="192.0.2.7", helo="mx.example.net",
                       auth_user="alice" if r.direction == "outbound" else None,
                       received_at=1709283600.0 + i * 86400 + 3600)
        out.append(MessageContext(env, r.raw, {"check": r.verdicts, "decide": decide},
                                  qid=f"S{i}"))
    return out


def test_rebuild_restores_legal_holds_and_their_messages(
        db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    populate(db.data, [gatewayed(r, i) for i, r in enumerate(sample())], db.url)
    cli(capsys, "hold", "create", "C-MERGER", "--query", "merger", "--reason", "litigation",
        "--officer", "olga", *db.cli())
    # Arrives after the hold was placed: matches its query but is not one of its items.
    populate(db.data, [gatewayed(sample()[3], 9)], db.url)
    cli(capsys, "hold", "create", "C-CAROL", "--query", "from:carol@example.net",
        "--officer", "olga", *db.cli())
    cli(capsys, "hold", "release", "C-CAROL", "--officer", "peter", *db.cli())
    queries = ["hold:C-MERGER", "hold:C-CAROL", "merger", "merger AND NOT hold:C-MERGER"]
    before = results(db, queries)
    assert len(before["hold:C-MERGER"]) == 2 and len(before["merger"]) == 3
    listed = cli(capsys, "hold", "list", *db.cli())
    shown = cli(capsys, "hold", "show", "C-MERGER", *db.cli())
    assert [h["case"] for h in listed] == ["C-MERGER", "C-CAROL"]
    assert listed[1]["released_by"] == "peter" and not listed[1]["active"]
    end = datetime.now(UTC)
    holds_report = report(db, "holds", end)

    summary = rebuild(capsys, db)

    assert (summary["holds"], summary["holds_without_document"]) == (2, 0)
    assert results(db, queries) == before
    assert cli(capsys, "hold", "list", *db.cli()) == listed
    assert cli(capsys, "hold", "show", "C-MERGER", *db.cli()) == shown
    assert report(db, "holds", end) == holds_report
    assert ledger_errors(db) == []
    # The restored ids continue: a new hold follows the restored ones.
    [new] = cli(capsys, "hold", "create", "C-NEW", "--query", "lunch", "--officer", "olga",
                *db.cli())
    assert new["id"] == max(h["id"] for h in listed) + 1


async def test_rebuild_answers_the_same_searches_and_audit_log(
        db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    """All query kinds (full text, headers, envelope/bcc, rule:, hold:, verdicts) and the
    audit trail in clear, on both backends."""
    await run_stage(db, staged([gatewayed(r, i) for i, r in enumerate(sample())]))
    await through_stage(db)
    cli(capsys, "hold", "create", "C-BCC", "--query", "bcc:secret@example.org",
        "--officer", "olga", *db.cli())
    cli(capsys, "search", "merger", "--officer", "olivia", *db.cli())
    cli(capsys, "search", "from:alice@example.com", "--officer", "olivia", *db.cli())
    assert main(["show", "1", "--officer", "olivia", *db.cli()]) == 0
    queries = [*QUERIES, *RECEIPT_QUERIES, "hold:C-BCC", "rule:encrypt-finance",
               "bcc:secret@example.org AND hold:C-BCC"]
    before = results(db, queries)
    assert before["hold:C-BCC"] and before["rule:encrypt-finance"]
    holds = cli(capsys, "hold", "list", *db.cli())
    log = cli(capsys, "audit", "log", *db.cli())
    assert [e["action"] for e in log] == ["hold", "search", "search", "show"]
    end = datetime.now(UTC)
    audit_report = report(db, "audit", end)

    summary = rebuild(capsys, db)

    assert (summary["audit_events"], summary["audit_without_document"]) == (4, 0)
    assert results(db, queries) == before
    assert cli(capsys, "hold", "list", *db.cli()) == holds
    after = cli(capsys, "audit", "log", *db.cli())
    # Identical, ids included; the rebuild itself is the one event added.
    assert after[:-1] == log
    assert after[-1]["action"] == "rebuild" and after[-1]["detail"]["holds"] == 1
    assert report(db, "audit", end) == audit_report
    assert ledger_errors(db) == []
    assert main(["archive", "verify", "--data-dir", str(db.data)]) == 0


def test_rebuild_counts_hold_and_audit_entries_older_than_ledger_documents(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Entries written before documents existed: reported, never fatal."""
    db = Db(tmp_path / "data")
    populate(db.data, sample())
    with Archive.open(db.data) as archive:  # what the older code appended
        archive.append("hold_placed", hold=1, case="C-OLD", query_sha256="ab", items=1,
                       items_sha256="cd")
        archive.append("audit", event=1, action="search", at="2024-03-01T10:00:00+00:00",
                       who_sha256="ef", result_count=1)
        archive.append("audit", audit_id=2, who="olga", action="imap_fetch",  # the IMAP form
                       target="All Mail", result_count=3, query_sha256="01")
    summary = rebuild(capsys, db)
    assert (summary["holds"], summary["holds_without_document"]) == (0, 1)
    assert (summary["audit_events"], summary["audit_without_document"]) == (2, 2)
    assert any("C-OLD" in w and "coffer hold create" in w for w in summary["warnings"])
    log = cli(capsys, "audit", "log", "--data-dir", str(db.data))
    assert [(e["id"], e["who"], e["query"]) for e in log[:2]] == [
        (1, "sha256:ef", None), (2, "olga", None)]
    assert (log[1]["action"], log[1]["target"], log[1]["result_count"]) == (
        "imap_fetch", "All Mail", 3)
    assert cli(capsys, "hold", "list", "--data-dir", str(db.data)) == []


def test_ledger_documents_are_encrypted_and_the_ledger_names_them_by_hash(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = Db(tmp_path / "data")
    populate(db.data, sample())
    secret = "from:whistleblower@example.org OR merger"
    cli(capsys, "hold", "create", "C-7", "--query", secret, "--reason", "subpoena 7",
        "--officer", "olga", "--data-dir", str(db.data))
    with Archive.open(db.data) as archive:
        entries = list(archive.ledger.entries())
        placed = next(e for e in entries if e.kind == "hold_placed")
        audit = next(e for e in entries if e.kind == "audit")
        doc = json.loads(archive.get(placed.fields["document"]))
        assert (doc["kind"], doc["query"], doc["reason"], doc["created_by"]) == (
            "coffer-hold/1", secret, "subpoena 7", "olga")
        assert doc["message_ids"] == [1, 4]
        assert "whistleblower@example.org" in json.loads(
            archive.get(audit.fields["document"]))["query"]
        # The documents are blobs the ledger knows, marked as no message.
        kinds = {e.fields.get("document_for") for e in entries if e.kind == "message_stored"}
        assert kinds == {None, "hold_placed", "audit"}
    ledger_text = b"".join(p.read_bytes() for p in (db.data / "archive" / "ledger").iterdir())
    for clear in (b"whistleblower", b"subpoena", b"olga"):
        assert clear not in ledger_text
        for p in (db.data / "archive" / "store").rglob("*"):
            assert not p.is_file() or clear not in p.read_bytes()
    with db.open() as meta:
        assert meta.count() == 4  # documents are not messages
    assert ledger_errors(db) == []
    assert cli(capsys, "search", "subpoena", "--data-dir", str(db.data)) == []


@pytest.mark.parametrize("backend", ["postgresql"])
def test_rebuild_refuses_a_postgresql_database_that_is_not_empty_even_with_force(
        db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    populate(db.data, sample(), db.url)
    with db.open() as meta:
        rows = meta.count()
    for force in ([], ["--force"]):
        assert main(["archive", "rebuild", *db.cli(), *force]) == 1
        assert "not empty" in capsys.readouterr().err
    with db.open() as meta:
        assert meta.count() == rows
