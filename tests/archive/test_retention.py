"""Retention: only messages past their retention end and under no hold are expired,
with time travel through an injected clock, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from admin_env import *  # noqa: F403 - fixtures: env
from admin_env import Env, ledger_kinds
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import M1, M2, M3, mail

from archive.errors import BlobNotFoundError, BlobShreddedError
from archive.holds import create_hold, release_hold
from archive.metadata import Blob, Message
from archive.retention import RetentionError, expire, refuse_unless_expirable
from archive.verify import verify

Y2025 = datetime(2025, 1, 1, tzinfo=UTC)
Y2030 = datetime(2030, 1, 1, tzinfo=UTC)


def at(year: int) -> datetime:
    return datetime(year, 6, 1, tzinfo=UTC)


def sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def test_expire_removes_only_messages_whose_retention_ended_as_time_passes(env: Env) -> None:
    m1 = env.add(M1, retention_until=Y2025)
    m2 = env.add(M2, retention_until=Y2030)
    m3 = env.add(M3)  # no retention end: kept forever

    report = expire(env.meta, env.archive, env.index, "olga", now=at(2026))
    assert [e.message_id for e in report.expired] == [m1]
    assert report.blobs_shredded == 1
    with pytest.raises((BlobShreddedError, BlobNotFoundError)):
        env.archive.get(sha(M1))
    assert env.archive.get(sha(M2)) == M2 and env.archive.get(sha(M3)) == M3
    row = env.meta.get(m1)
    assert row is not None and row.state == "expired" and row.expired_at == at(2026)
    assert any("retention ended 2025-01-01" in f for f in row.flags)

    # Time travel: 2031, M2's retention has ended too; M3 never expires.
    report = expire(env.meta, env.archive, env.index, "olga", now=at(2031))
    assert [e.message_id for e in report.expired] == [m2]
    report = expire(env.meta, env.archive, env.index, "olga", now=at(2999))
    assert report.expired == []
    assert env.archive.get(sha(M3)) == M3
    assert env.meta.get(m3) is not None and env.meta.get(m3).expired_at is None  # type: ignore[union-attr]


def test_expiry_writes_a_tombstone_and_an_audit_event(env: Env) -> None:
    m1 = env.add(M1, retention_until=Y2025)
    expire(env.meta, env.archive, env.index, "olga", now=at(2026))
    entries = list(env.archive.ledger.entries())
    tomb = [e for e in entries if e.kind == "tombstone"]
    assert len(tomb) == 1 and tomb[0].fields["sha256"] == sha(M1)
    assert tomb[0].fields["reason"] == "retention" and tomb[0].fields["messages"] == [m1]
    assert any(e.kind == "retention_expired" and e.fields["messages"] == [m1] for e in entries)
    events = env.meta.audit_events()
    assert [(e.who, e.action, e.result_count) for e in events] == [("olga", "expire", 1)]
    assert any(e.kind == "audit" and e.fields["action"] == "expire" for e in entries)


def test_dry_run_changes_nothing(env: Env) -> None:
    env.add(M1, retention_until=Y2025)
    env.indexer().run()
    head = env.archive.ledger.head()
    files = sorted(p.relative_to(env.data_dir) for p in (env.data_dir / "archive" / "store")
                   .rglob("*"))
    report = expire(env.meta, env.archive, env.index, "olga", now=at(2026), dry_run=True)
    assert len(report.expired) == 1 and report.dry_run
    assert env.archive.ledger.head() == head
    assert sorted(p.relative_to(env.data_dir) for p in (env.data_dir / "archive" / "store")
                  .rglob("*")) == files
    assert env.archive.get(sha(M1)) == M1
    assert env.meta.count(Message.expired_at.is_not(None)) == 0
    assert env.meta.audit_events() == []


def test_crypto_shredded_content_is_unreadable_but_verify_passes_with_tombstones(
        env: Env) -> None:
    env.add(M1, retention_until=Y2025)
    env.add(M2, retention_until=Y2030)
    expire(env.meta, env.archive, env.index, "olga", now=at(2026))
    env.archive.checkpoint()
    summary, findings = verify(env.data_dir / "archive")
    assert summary.ok, [str(f) for f in findings]
    assert summary.tombstoned == 1
    # The blob file is gone, so no ciphertext of M1 remains either.
    assert not env.archive.exists(sha(M1))
    assert b"Falcon" not in b"".join(p.read_bytes() for p in
                                     (env.data_dir / "archive" / "store").rglob("*")
                                     if p.is_file())


def test_held_message_is_never_expired_until_the_hold_is_released(env: Env) -> None:
    m1 = env.add(M1, retention_until=Y2025)
    env.indexer().run()
    create_hold(env.meta, env.archive, env.searcher(), "C-17", "from:alice@example.com",
                "hugo", clock=lambda: at(2024))
    report = expire(env.meta, env.archive, env.index, "olga", now=at(2030))
    assert report.expired == []
    assert [(k.message_id, k.reason) for k in report.kept] == [(m1, "hold:C-17")]
    assert env.archive.get(sha(M1)) == M1
    with pytest.raises(RetentionError, match="held"):
        refuse_unless_expirable(env.meta, m1, at(2030))

    release_hold(env.meta, env.archive, "C-17", "hugo", clock=lambda: at(2030))
    report = expire(env.meta, env.archive, env.index, "olga", now=at(2031))
    assert [e.message_id for e in report.expired] == [m1]


def test_hold_is_dynamic_messages_matching_its_query_later_are_held(env: Env) -> None:
    env.indexer().run()
    hold = create_hold(env.meta, env.archive, env.searcher(), "C-18", "body:merger", "hugo",
                       clock=lambda: at(2024))
    assert hold.items == 0
    # Arrives after the hold was placed; its retention ends before the expiry run.
    m1 = env.add(M1, retention_until=Y2025)
    m2 = env.add(M2, retention_until=Y2025)
    report = expire(env.meta, env.archive, env.index, "olga", now=at(2026))
    assert [(k.message_id, k.reason) for k in report.kept] == [(m1, "hold-query:C-18")]
    assert [e.message_id for e in report.expired] == [m2]
    assert env.archive.get(sha(M1)) == M1


def test_policy_decision_naming_a_hold_keeps_the_message(env: Env) -> None:
    m1 = env.add(M1, retention_until=Y2025,
                 decision={"decision": "accept", "holds": ["LIT-1"],
                           "retention_detail": {"period": "1y", "rule": "short"}})
    report = expire(env.meta, env.archive, env.index, "olga", now=at(2026))
    assert [(k.message_id, k.reason) for k in report.kept] == [(m1, "policy-hold:LIT-1")]


def test_expiry_names_the_retention_rule(env: Env) -> None:
    m1 = env.add(M1, retention_until=Y2025,
                 decision={"decision": "accept", "holds": [],
                           "retention_detail": {"period": "1y", "rule": "short-lived"}})
    report = expire(env.meta, env.archive, env.index, "olga", now=at(2026))
    assert [(e.message_id, e.rule) for e in report.expired] == [(m1, "short-lived")]
    row = env.meta.get(m1)
    assert row is not None and any("rule short-lived" in f for f in row.flags)


def test_shared_blob_is_shredded_only_when_every_copy_has_expired(env: Env) -> None:
    first = env.add(M1, retention_until=Y2025)
    second = env.add(M1, retention_until=Y2030)  # the same bytes received again
    report = expire(env.meta, env.archive, env.index, "olga", now=at(2026))
    assert [(e.message_id, e.blob_shredded) for e in report.expired] == [(first, False)]
    assert env.archive.get(sha(M1)) == M1  # still needed by the second copy
    report = expire(env.meta, env.archive, env.index, "olga", now=at(2031))
    assert [(e.message_id, e.blob_shredded) for e in report.expired] == [(second, True)]
    assert not env.archive.exists(sha(M1))
    with env.meta.session() as s:
        assert s.query(Blob).filter(Blob.shredded_at.is_not(None)).count() == 1


def test_expired_message_leaves_the_full_text_index(env: Env) -> None:
    env.add(M1, retention_until=Y2025)
    keep = env.add(mail("x@example.com", "y@example.com", "merger too", "merger talk",
                        "Tue, 02 Jan 2024 10:00:00 +0000"), retention_until=Y2030)
    env.indexer().run()
    assert len(env.searcher().message_ids("body:merger")) == 2
    expire(env.meta, env.archive, env.index, "olga", now=at(2026))
    assert env.searcher().message_ids("body:merger") == [keep]


def test_nothing_deletes_a_message_before_its_retention_ends(env: Env) -> None:
    m1 = env.add(M1, retention_until=Y2030)
    m2 = env.add(M2)
    with pytest.raises(RetentionError, match="within retention"):
        refuse_unless_expirable(env.meta, m1, at(2026))
    with pytest.raises(RetentionError, match="kept forever"):
        refuse_unless_expirable(env.meta, m2, at(2999))
    before = ledger_kinds(env.archive)
    report = expire(env.meta, env.archive, env.index, "olga", now=at(2026))
    assert report.expired == [] and report.kept == []
    assert "tombstone" not in ledger_kinds(env.archive)
    assert ledger_kinds(env.archive)[: len(before)] == before
    assert env.archive.get(sha(M1)) == M1 and env.archive.get(sha(M2)) == M2
