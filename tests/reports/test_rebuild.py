"""coffer archive rebuild: after losing the database, the same searches give the same results."""

from __future__ import annotations

from pathlib import Path

from conftest import Receipt, corpus_receipts, populate, sample
from metadata_db import *  # noqa: F403 - fixtures: db (sqlite, postgresql), backend, pg_admin
from metadata_db import Db

from archive.metadata import Metadata
from archive.search import Searcher
from gateway.cli import main
from gateway.envelope import Envelope, TlsInfo
from gateway.pipeline import MessageContext
from gateway.receive.received import received_header
from reports.rebuild import envelope_from_headers

# Queries whose answers depend only on what the store and the ledger hold.
QUERIES = [
    "merger", "from:alice@example.com", "to:alice@example.com", "cc:carol@example.net",
    "participant:example.org", "subject:lunch", "has:attachment", "filename:forecast.xlsx",
    "date:2024-03-01..2024-03-02", "after:2024-03-02", "size:>100", "spf:fail", "dmarc:pass",
    "dkim:pass", "wire AND NOT merger", "\"noon\" OR invoice", "direction:outbound",
]


def gatewayed(r: Receipt, n: int) -> Receipt:
    """The bytes as the gateway archives them: its Received and Authentication-Results."""
    env = Envelope(r.mail_from, r.rcpt_to, client_ip="192.0.2.7", helo="mx.example.net",
                   tls=TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"),
                   auth_user="alice" if r.direction == "outbound" else None,
                   received_at=1709283600.0 + n * 86400 + 3600)
    v = r.verdicts
    ar = (f"Authentication-Results: coffer.test; spf={v['spf']['result']} "
          f"smtp.mailfrom={r.mail_from};\r\n\tdkim={v['dkim'][0]['result']};\r\n\t"
          f"dmarc={v['dmarc']['result']}\r\n").encode()
    raw = ar + received_header(env, hostname="coffer.test", trace_id=f"q{n}") + r.raw
    return Receipt(raw, r.rcpt_to, r.mail_from, r.direction, r.verdicts, r.decision, r.rules,
                   r.state, r.retention_days)


def results(db: Db, queries: list[str]) -> dict[str, list[tuple[int, str]]]:
    meta = db.open()
    index = db.index(meta)
    try:
        s = Searcher(meta, index)
        return {q: [(h.message.id, h.message.sha256)
                    for h in s.search(q, limit=10_000, snippets=False).hits] for q in queries}
    finally:
        index.close()
        meta.close()


def test_rebuild_after_losing_the_database_answers_searches_identically(db: Db) -> None:
    receipts = [gatewayed(r, i) for i, r in enumerate(sample())]
    populate(db.data, [*receipts, receipts[1]], db.url)
    before = results(db, QUERIES)
    assert all(before[q] for q in QUERIES), "every query must match something"
    db.lose()
    assert main(["archive", "rebuild", *db.cli()]) == 0
    assert results(db, QUERIES) == before


def test_rebuild_restores_the_envelope_the_headers_carry_and_not_bcc(db: Db) -> None:
    """An archive written without receipt blobs (before they existed): headers only."""
    receipts = [gatewayed(r, i) for i, r in enumerate(sample())]
    populate(db.data, receipts, db.url)
    before = results(db, ["bcc:secret@example.org", "to:bob@example.org"])
    db.lose()
    assert main(["archive", "rebuild", *db.cli()]) == 0
    after = results(db, ["bcc:secret@example.org", "to:bob@example.org"])
    assert before["bcc:secret@example.org"] and not after["bcc:secret@example.org"]
    assert after["to:bob@example.org"] == before["to:bob@example.org"]
    meta = db.open()
    try:
        m = meta.get(3)  # the single-recipient message: "for <...>" names its recipient
        assert m is not None
        assert (m.client_ip, m.helo, m.mail_from) == ("192.0.2.7", "mx.example.net",
                                                      "mallory@evil.test")
        assert m.tls == "TLSv1.3 TLS_AES_256_GCM_SHA384"
        assert [p.address for p in meta.participants(3) if p.role == "envelope_to"] == [
            "alice@example.com"]
    finally:
        meta.close()


def test_envelope_parser_ignores_authentication_results_of_another_authserv() -> None:
    raw = (b"Authentication-Results: evil.test; spf=pass smtp.mailfrom=a@b.test\r\n"
           b"Received: from h ([192.0.2.1]) by coffer.test (Coffer) with ESMTP id x;\r\n"
           b"\tFri, 01 Mar 2024 10:00:00 +0000\r\nSubject: x\r\n\r\nbody\r\n")
    env = envelope_from_headers(raw)
    assert env.client_ip == "192.0.2.1" and env.rcpt_to == [] and env.verdicts == {}


def test_rebuild_refuses_to_overwrite_a_database_without_force(tmp_path: Path) -> None:
    data = tmp_path / "data"
    populate(data, sample())
    assert main(["archive", "rebuild", "--data-dir", str(data)]) == 1
    assert main(["archive", "rebuild", "--data-dir", str(data), "--force"]) == 0
    assert any(p.name.startswith("meta.db.before-rebuild-")
               for p in (data / "archive").iterdir())


def test_rebuild_of_a_corpus_sample_matches_its_searches(db: Db) -> None:
    populate(db.data, corpus_receipts(60), db.url)
    queries = ["has:attachment", "subject:test", "from:example.com", "date:2000..2030",
               "size:>2k", "hello"]
    before = results(db, queries)
    db.lose()
    assert main(["archive", "rebuild", *db.cli()]) == 0
    assert any(before.values())
    assert results(db, queries) == before


def test_rebuild_keeps_shredded_rows_and_audit_events_so_the_ledger_agrees(db: Db) -> None:
    import hashlib

    from archive.audit import check_database
    from archive.facade import Archive

    data = db.data
    receipts = [gatewayed(r, i) for i, r in enumerate(sample())]
    populate(data, receipts, db.url)
    with Archive.open(data) as archive, db.open() as meta:
        archive.shred(hashlib.sha256(receipts[1].raw).hexdigest(), reason="retention")
        from reports.common import record_audit

        record_audit(meta, archive, "olivia", "search", query="merger", result_count=2)
    queries = ["merger", "invoice", "from:carol@example.net"]
    before = results(db, queries)
    db.lose()
    assert main(["archive", "rebuild", *db.cli()]) == 0
    assert results(db, queries) == before  # ids after the shredded one are unchanged
    with db.open() as meta:
        gone = meta.get(2)
        assert gone is not None and gone.state == "expired" and gone.expired_at is not None
        events = meta.audit_events()
        assert [e.action for e in events] == ["search", "rebuild"]
        # In clear again: from the event's encrypted ledger document.
        assert (events[0].who, events[0].query, events[0].result_count) == (
            "olivia", "merger", 2)
        assert [f for f in check_database(meta, data / "archive" / "ledger")
                if f.severity == "error"] == []


# -- receipts: what the archive stage stores beside each message (archive.receipts) --

BCC_DECIDE = {"decision": "accept", "direction": "outbound", "retention": "30d",
              "retention_detail": {"rule": "short"}, "actions": [{"action": "encrypt"}],
              "rules": [{"name": "encrypt-finance", "matched": True},
                        {"name": "quarantine-spam", "matched": False}]}
CHECK = {"spf": {"result": "pass"}, "dkim": [{"result": "pass"}], "dmarc": {"result": "pass"}}
RECEIPT_QUERIES = ["bcc:secret@example.org", "rule:encrypt-finance", "merger",
                   "to:bob@example.org", "spf:pass", "direction:outbound", "lunch"]


async def through_stage(db: Db) -> list[int]:
    """Two messages archived by the real ArchiveStage: one with a Bcc recipient, a
    policy decision with a rule hit and a retention end, one plain inbound."""
    first, second = sample()[0], sample()[1]
    return await run_stage(db, [
        MessageContext(Envelope("alice@example.com", ["bob@example.org", "secret@example.org"],
                                client_ip="192.0.2.9", helo="laptop", auth_user="alice",
                                tls=TlsInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256"),
                                received_at=1709283600.0, role="submission"),
                       first.raw, {"check": CHECK, "spam": {"score": 0.5},
                                   "decide": BCC_DECIDE}, qid="Q1"),
        MessageContext(Envelope("bob@example.org", ["alice@example.com"],
                                client_ip="198.51.100.4", received_at=1709373600.0),
                       second.raw, {"check": CHECK, "decide": {"decision": "accept"}},
                       qid="Q2")])


async def run_stage(db: Db, contexts: list[MessageContext]) -> list[int]:
    """Archive ``contexts`` with the real ArchiveStage (blob, receipt, row), then index;
    returns their archive ids."""
    from archive.facade import Archive
    from archive.index import Indexer
    from gateway.archive_stage import ArchiveStage

    meta = db.open()
    meta.migrate()
    archive = Archive.open(db.data)
    stage = ArchiveStage(archive, meta)
    try:
        out = [(await stage.run(ctx)).facts["message"] for ctx in contexts]
    finally:
        await stage.close()
        archive.close()
    with db.open() as meta2, Archive.open(db.data) as a:
        index = db.index(meta2)
        try:
            Indexer(meta2, index, a.get).run()
        finally:
            index.close()
    return out


def row_facts(db: Db, ids: list[int]) -> list[tuple[object, ...]]:
    with db.open() as meta:
        out: list[tuple[object, ...]] = []
        for pk in ids:
            m = meta.get(pk)
            assert m is not None
            out.append((m.sha256, m.retention_until, m.state, m.direction, m.mail_from,
                        m.client_ip, m.helo, m.tls, m.auth_user, m.spf, m.dkim, m.dmarc,
                        m.received_at,
                        sorted((p.role, p.address) for p in meta.participants(pk))))
        return out


async def test_rebuild_restores_bcc_rule_hits_and_retention_from_receipt_blobs(
        db: Db) -> None:
    from archive.audit import check_database

    data = db.data
    ids = await through_stage(db)
    before = results(db, RECEIPT_QUERIES)
    facts = row_facts(db, ids)
    assert before["bcc:secret@example.org"] == before["rule:encrypt-finance"] == [
        (ids[0], facts[0][0])]
    assert facts[0][1] is not None and facts[1][1] is None  # 30d retention vs none
    db.lose()
    assert main(["archive", "rebuild", *db.cli()]) == 0
    assert results(db, RECEIPT_QUERIES) == before
    assert row_facts(db, ids) == facts
    with db.open() as meta:
        assert meta.count() == 2  # receipts are not messages
        assert [f for f in check_database(meta, data / "archive" / "ledger")
                if f.severity == "error"] == []
    assert main(["archive", "verify", "--data-dir", str(data)]) == 0


async def test_receipt_blobs_are_not_messages_and_the_ledger_holds_only_hashes(
        tmp_path: Path) -> None:
    import json

    from archive.facade import Archive

    data = tmp_path / "data"
    ids = await through_stage(Db(data))
    with Metadata.for_data_dir(data) as meta:
        assert meta.count() == len(ids)
    # Words only a receipt holds are not in the full-text index.
    assert results(Db(data), ["coffer-receipt", "laptop", "Q1"]) == {
        "coffer-receipt": [], "laptop": [], "Q1": []}
    with Archive.open(data) as archive:
        stored = [e for e in archive.ledger.entries() if e.kind == "message_stored"]
        assert len(stored) == 4
        receipt, message = stored[0].fields, stored[1].fields
        assert receipt["receipt_of"] == message["sha256"]
        assert message["receipt"] == receipt["sha256"]
        ledger_text = json.dumps([e.fields for e in stored])
        assert "secret@example.org" not in ledger_text and "alice" not in ledger_text
        doc = json.loads(archive.get(message["receipt"]))
        assert doc["kind"] == "coffer-receipt/1"
        assert doc["envelope"]["rcpt_to"] == ["bob@example.org", "secret@example.org"]
        # Encrypted at rest: the Bcc address is in no store file.
        for p in (data / "archive" / "store").rglob("*"):
            if p.is_file():
                assert b"secret@example.org" not in p.read_bytes()


async def test_expiry_shreds_the_receipt_with_its_message_and_rebuild_agrees(db: Db) -> None:
    from datetime import UTC, datetime

    import pytest

    from archive.errors import BlobNotFoundError, BlobShreddedError
    from archive.facade import Archive
    from archive.retention import expire

    data = db.data
    ids = await through_stage(db)
    with Archive.open(data) as archive:
        msg_entry = next(e for e in archive.ledger.entries()
                         if e.kind == "message_stored" and "receipt" in e.fields)
        receipt_sha = msg_entry.fields["receipt"]
        with db.open() as meta:
            index = db.index(meta)
            try:
                report = expire(meta, archive, index, "olga",
                                now=datetime(2024, 6, 1, tzinfo=UTC))
            finally:
                index.close()
        assert [e.message_id for e in report.expired] == [ids[0]]
        for sha in (msg_entry.fields["sha256"], receipt_sha):
            with pytest.raises((BlobShreddedError, BlobNotFoundError)):
                archive.get(sha)
        tombs = [e.fields for e in archive.ledger.entries() if e.kind == "tombstone"]
        # The receipt goes first, so a crash in between never leaves it without content.
        assert [t["sha256"] for t in tombs] == [receipt_sha, msg_entry.fields["sha256"]]
        assert tombs[0]["receipt_of"] == msg_entry.fields["sha256"]
    assert main(["archive", "verify", "--data-dir", str(data)]) == 0
    db.lose()
    assert main(["archive", "rebuild", *db.cli()]) == 0
    with db.open() as meta:
        gone, kept = meta.get(ids[0]), meta.get(ids[1])
        assert gone is not None and gone.state == "expired"
        assert kept is not None and (kept.state, kept.client_ip) == ("accepted", "198.51.100.4")
    assert results(db, ["bcc:secret@example.org", "lunch"])["lunch"] == [
        (ids[1], row_facts(db, [ids[1]])[0][0])]
