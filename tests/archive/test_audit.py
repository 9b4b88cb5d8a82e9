"""Audit events reach the ledger (ids and hashes only), and the database is cross-checked
against the ledger: a deleted message row or audit event is found."""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from admin_env import *  # noqa: F403 - fixtures: env
from admin_env import Env
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import M1, M2

from archive.audit import check_database, connect_audit_to_ledger, ledger_audit
from archive.metadata import AuditEvent, Message, Participant
from archive.search import audit


def test_connected_audit_hook_appends_hashed_entries_to_the_ledger(env: Env) -> None:
    disconnect = connect_audit_to_ledger(env.archive)
    connect_audit_to_ledger(env.archive)  # twice: still one ledger entry per event
    try:
        ev = audit(env.meta, "olga", "search", query="from:alice@example.com", result_count=3,
                   detail={"limit": 50})
    finally:
        disconnect()
    audit(env.meta, "olga", "search", query="after hook removed")
    entries = [e for e in env.archive.ledger.entries() if e.kind == "audit"]
    assert len(entries) == 1
    fields = entries[0].fields
    assert fields["event"] == ev.id and fields["action"] == "search"
    assert fields["result_count"] == 3
    assert fields["query_sha256"] == hashlib.sha256(b"from:alice@example.com").hexdigest()
    assert fields["who_sha256"] == hashlib.sha256(b"olga").hexdigest()
    ledger_text = b"".join(p.read_bytes() for p in env.archive.paths.ledger.glob("*.jsonl"))
    assert b"alice" not in ledger_text and b"olga" not in ledger_text


def test_ledger_audit_opens_the_archive_of_a_data_directory(env: Env) -> None:
    with ledger_audit(env.data_dir):
        audit(env.meta, "olga", "show", target="42", result_count=1)
    entries = [e for e in env.archive.ledger.entries() if e.kind == "audit"]
    assert [(e.fields["action"], e.fields["target"]) for e in entries] == [("show", "42")]


def test_intact_database_agrees_with_the_ledger(env: Env) -> None:
    env.add(M1)
    env.add(M1)  # a second receipt of the same bytes: two rows, two ledger entries
    env.add(M2)
    with ledger_audit(env.archive):
        audit(env.meta, "olga", "search", query="x", result_count=0)
    assert [f for f in check_database(env.meta, env.archive.paths.ledger)
            if f.severity == "error"] == []


def test_deleted_message_row_is_detected(env: Env) -> None:
    env.add(M1)
    gone = env.add(M2)
    with env.meta.session() as s:  # what someone hiding a message would do
        s.execute(sa.delete(Participant).where(Participant.message_pk == gone))
        s.execute(sa.delete(Message).where(Message.id == gone))
    findings = check_database(env.meta, env.archive.paths.ledger)
    assert [(f.code, f.sha256) for f in findings] == [
        ("db_message_missing", hashlib.sha256(M2).hexdigest())]


def test_deleted_audit_event_and_forged_row_are_detected(env: Env) -> None:
    with ledger_audit(env.archive):
        ev = audit(env.meta, "olga", "show", target="1", result_count=1)
    with env.meta.session() as s:
        s.execute(sa.delete(AuditEvent).where(AuditEvent.id == ev.id))
    # A row for bytes the archive never stored.
    from archive_db import make_record
    env.meta.add_message(make_record(b"Subject: forged\r\n\r\nnever stored\r\n"))
    codes = sorted(f.code for f in check_database(env.meta, env.archive.paths.ledger))
    assert codes == ["db_audit_missing", "db_message_unlisted"]
