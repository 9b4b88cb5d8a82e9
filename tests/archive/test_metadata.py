"""archive.metadata on SQLite and PostgreSQL: schema, single instance, envelopes, audit."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import make_record

from archive.metadata import (
    Attachment,
    Base,
    Blob,
    Decision,
    Message,
    Metadata,
    Participant,
    RuleHit,
    Verdict,
)

T0 = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)


def message(subject: str = "Hello", to: str = "bob@example.org", cc: str = "",
            attachment: bytes | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.com>"
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = "Mon, 15 Jan 2024 10:30:00 +0000"
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@example.com>"
    msg.set_content("body text")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="text", subtype="plain", filename="a.txt")
    return msg.as_bytes(policy=SMTP)


def count(meta: Metadata, model: type[Base]) -> int:
    with meta.session() as s:
        return int(s.scalar(sa.select(sa.func.count()).select_from(model)) or 0)


def test_migrate_builds_exactly_the_model_schema_and_is_idempotent(meta: Metadata) -> None:
    meta.migrate()  # second time: nothing to do
    with meta.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
        assert ctx.get_current_revision() == "0003"  # the newest migration


def test_same_bytes_twice_are_one_blob_with_two_envelope_records(meta: Metadata) -> None:
    raw = message(attachment=b"attached words")
    first = meta.add_message(make_record(raw, rcpt_to=["bob@example.org"]))
    second = meta.add_message(make_record(raw, rcpt_to=["dave@example.org"],
                                          received_at=T0 + timedelta(minutes=5)))
    assert first.new_blob and not second.new_blob
    assert first.blob_id == second.blob_id and first.id != second.id
    assert count(meta, Blob) == 1 and count(meta, Message) == 2
    assert count(meta, Attachment) == 1  # attachments belong to the content, stored once
    att = meta.attachments(first.blob_id)[0]
    assert (att.name, att.content_type, att.size) == ("a.txt", "text/plain", 14)


def test_fifty_recipients_are_one_message_row_and_fifty_envelope_rows(meta: Metadata) -> None:
    rcpts = [f"user{i}@corp.example" for i in range(50)]
    raw = message(to="user0@corp.example", cc="User One <user1@corp.example>")
    stored = meta.add_message(make_record(raw, mail_from="Alice@Example.com", rcpt_to=rcpts))
    assert count(meta, Message) == 1
    people = meta.participants(stored.id)
    roles: dict[str, list[str]] = {}
    for p in people:
        roles.setdefault(p.role, []).append(p.address)
    assert roles["envelope_to"] == rcpts
    assert roles["envelope_from"] == ["alice@example.com"]
    assert roles["to"] == ["user0@corp.example"] and roles["cc"] == ["user1@corp.example"]
    # RFC 5322 §3.6.3: envelope recipients named in no To/Cc header were Bcc'd.
    assert roles["bcc"] == rcpts[2:]
    assert count(meta, Participant) == 3 + 1 + 50 + 48  # from to cc, envelope_from, ...)


def test_verdicts_decision_and_rule_hits_are_recorded_and_summarised(meta: Metadata) -> None:
    check = {"spf": {"result": "fail", "domain": "example.com"},
             "dkim": [{"result": "fail", "d": "a.example"}, {"result": "pass", "d": "b.example"}],
             "dmarc": {"result": "none"}}
    decision = {"action": "quarantine", "trace": [{"rule": "r1", "hit": True},
                                                  {"rule": "r2", "hit": False}]}
    stored = meta.add_message(make_record(message(), verdicts=check, decision=decision,
                                          rules=["r1", "r1", "retain-7y"]))
    msg = meta.get(stored.id)
    assert msg is not None
    assert (msg.spf, msg.dkim, msg.dmarc) == ("fail", "pass", "none")
    with meta.session() as s:
        kinds = {v.kind: (v.result, v.detail) for v in s.scalars(sa.select(Verdict))}
        dec = s.scalars(sa.select(Decision)).one()
        hits = sorted(h.rule for h in s.scalars(sa.select(RuleHit)))
    assert kinds["dkim"] == ("pass", check["dkim"])
    assert dec.action == "quarantine" and dec.trace == decision
    assert hits == ["r1", "retain-7y"]


def test_timestamps_come_back_aware_utc_and_undated_mail_is_dated_by_receipt(
        meta: Metadata) -> None:
    raw = b"From: a@example.com\r\nSubject: no date\r\n\r\nbody\r\n"
    when = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
    stored = meta.add_message(make_record(raw, received_at=when,
                                          retention_until=when + timedelta(days=3650)))
    msg = meta.get(stored.id)
    assert msg is not None
    assert msg.date == when and msg.received_at == when
    assert msg.retention_until == datetime(2034, 2, 27, 8, 0, tzinfo=UTC)
    assert "no Date header: dated by receipt" in msg.flags


def test_text_with_nul_and_8bit_headers_is_stored(meta: Metadata) -> None:
    raw = b"From: \xc3\x9cser <u@example.com>\r\nSubject: a\x00b caf\xe9\r\n\r\nx\r\n"
    msg = meta.get(meta.add_message(make_record(raw)).id)
    assert msg is not None and msg.subject == "ab café"


def test_indexer_queue_hands_out_unindexed_blobs_until_marked(meta: Metadata) -> None:
    ids = [meta.add_message(make_record(message(f"m{i}"))).blob_id for i in range(3)]
    assert [b for b, _ in meta.unindexed()] == ids
    meta.mark_indexed(ids[:2], T0)
    assert [b for b, _ in meta.unindexed()] == ids[2:]
    assert [b for b, _ in meta.all_blobs()] == ids


def test_ids_condition_takes_more_ids_than_the_driver_has_parameters(meta: Metadata) -> None:
    stored = meta.add_message(make_record(message()))
    many = [*range(10**6, 10**6 + 70_000), stored.id]
    assert meta.count(meta.ids_condition(Message.id, many)) == 1
    assert meta.count(meta.ids_condition(Message.id, [])) == 0


def test_audit_events_record_who_what_and_how_many(meta: Metadata) -> None:
    meta.record_audit("officer1", "search", when=T0, query="from:x", result_count=3)
    meta.record_audit("officer2", "show", when=T0 + timedelta(hours=1), target="17",
                      detail={"raw": True})
    events = meta.audit_events()
    assert [(e.who, e.action, e.query, e.result_count, e.target) for e in events] == [
        ("officer1", "search", "from:x", 3, None), ("officer2", "show", None, None, "17")]
    assert events[1].detail == {"raw": True}
    assert [e.who for e in meta.audit_events(since=T0 + timedelta(minutes=1))] == ["officer2"]


def test_each_postgresql_test_has_its_own_schema(meta: Metadata, backend: str) -> None:
    assert count(meta, Message) == 0
    if backend == "postgresql":
        with meta.engine.connect() as c:
            schema = c.execute(sa.text("SELECT current_schema()")).scalar_one()
        assert schema == meta.schema and schema.startswith("coffer_t")


def test_a_batch_holding_the_same_bytes_twice_creates_the_blob_once(meta: Metadata) -> None:
    a, b = message("one"), message("two")
    stored = meta.add_messages([make_record(a), make_record(a), make_record(b)])
    assert [s.new_blob for s in stored] == [True, False, True]
    assert stored[0].blob_id == stored[1].blob_id != stored[2].blob_id
    assert len({s.id for s in stored}) == 3
    assert count(meta, Blob) == 2 and count(meta, Message) == 3
    assert meta.add_messages([]) == []


def test_index_lag_is_the_age_of_the_oldest_unindexed_blob(meta: Metadata) -> None:
    assert meta.index_lag(T0) == 0.0
    first = meta.add_message(make_record(message("a"), received_at=T0))
    meta.add_message(make_record(message("b"), received_at=T0 + timedelta(seconds=30)))
    assert meta.index_lag(T0 + timedelta(seconds=45)) == 45.0
    meta.mark_indexed([first.blob_id], T0 + timedelta(seconds=46))
    assert meta.index_lag(T0 + timedelta(seconds=45)) == 15.0


def test_nodes_migrating_at_the_same_time_all_succeed(meta: Metadata, backend: str) -> None:
    """Four processes open a new archive database at once: one creates the schema, the
    others wait for it (advisory lock on PostgreSQL, lock file on SQLite)."""
    if backend == "sqlite":
        url, schema = meta.url.replace("meta.db", "meta2.db"), None
    else:
        url, schema = meta.url, f"{meta.schema}_m"
        with meta.engine.begin() as c:
            c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    code = ("import sys; from archive.metadata import Metadata; "
            "m = Metadata(sys.argv[1], schema=sys.argv[2] or None); m.migrate(); m.close()")
    procs = [subprocess.Popen([sys.executable, "-W", "error", "-c", code, url, schema or ""],
                              stderr=subprocess.PIPE) for _ in range(4)]
    results = [(p.wait(timeout=120), p.stderr.read().decode() if p.stderr else "")
               for p in procs]
    for p in procs:
        if p.stderr:
            p.stderr.close()
    fresh = Metadata(url, schema=schema)
    try:
        assert results == [(0, "")] * 4
        with fresh.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == "0003"
    finally:
        fresh.close()
        if schema is not None:
            with meta.engine.begin() as c:
                c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


def test_sqlite_timestamps_are_bound_as_the_generic_type_decorator_binds_them() -> None:
    """UtcDateTime's one-step SQLite processor writes the text the generic path
    (process_bind_param, then SQLite DATETIME's format) writes."""
    import random
    from datetime import timezone

    from sqlalchemy.types import TypeDecorator

    dialect = sa.create_engine("sqlite://").dialect
    typ = Message.__table__.c.date.type.dialect_impl(dialect)
    fast, generic = typ.bind_processor(dialect), TypeDecorator.bind_processor(typ, dialect)
    assert fast is not None and generic is not None and fast is not generic
    rng = random.Random(5)
    values: list[datetime | None] = [None, T0, datetime(1, 1, 1, tzinfo=UTC),
                                     datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)]
    for _ in range(2000):
        tz = timezone(timedelta(minutes=rng.randint(-14 * 60, 14 * 60)))
        values.append(datetime(rng.randint(2, 9998), rng.randint(1, 12), rng.randint(1, 28),
                               rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59),
                               rng.choice([0, rng.randint(0, 999999)]), tzinfo=tz))
    for value in values:
        assert fast(value) == generic(value)
    with pytest.raises(ValueError, match="naive"):
        fast(datetime(2024, 1, 1))


def test_other_dialects_bind_timestamps_the_generic_way() -> None:
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    typ = Message.__table__.c.date.type.dialect_impl(dialect)
    fast = typ.bind_processor(dialect)
    assert fast is None or fast.__name__ != "_sqlite_utc_text"


def test_sqlite_metadata_commits_are_durable_at_once_not_at_the_next_checkpoint(
        tmp_path: Path) -> None:
    # synchronous=FULL in WAL mode fsyncs the WAL at every commit: a power loss cannot
    # take rows whose messages the queue already counts as archived.
    meta = Metadata.for_data_dir(tmp_path)
    try:
        meta.migrate()
        with meta.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        meta.close()
