"""coffer archive rebuild --missing: the database keeps its rows and gets back the ones it lost."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from conftest import mail
from metadata_db import *  # noqa: F403 - fixtures: db (sqlite, postgresql), backend, pg_admin
from metadata_db import Db

from archive.audit import check_database
from archive.facade import Archive
from archive.holds import HoldInfo, get_hold
from archive.index import Indexer
from archive.search import Searcher
from gateway.archive_stage import ArchiveStage, record_for
from gateway.cli import main
from gateway.envelope import Envelope, TlsInfo
from gateway.pipeline import MessageContext
from reports.rebuild import catch_up, tail_start
from reports.rebuild_log import held_rows

CHECK = {"spf": {"result": "pass"}, "dkim": [{"result": "pass"}], "dmarc": {"result": "pass"}}
T0 = 1709283600.0


def context(n: int) -> MessageContext:
    """Message ``n``: a Bcc recipient, a rule hit and a retention end only its receipt
    holds, and a word (``wordN``) only its body holds."""
    raw = mail("alice@example.com", f"bob{n}@example.org", f"Report {n}",
               f"The figures of quarter {n}: zebra{n}quill\n", n)
    decide = {"decision": "accept", "retention": "30d", "direction": "outbound",
              "rules": [{"name": f"rule-{n}", "matched": True},
                        {"name": "never", "matched": False}]}
    env = Envelope("alice@example.com", [f"bob{n}@example.org", f"hidden{n}@example.org"],
                   client_ip="192.0.2.9", helo="laptop", auth_user="alice",
                   tls=TlsInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256"),
                   received_at=T0 + 60 * n, role="submission")
    return MessageContext(env, raw, {"check": CHECK, "spam": {"score": 0.5}, "decide": decide},
                          qid=f"Q{n}")


async def archive(db: Db, contexts: list[MessageContext], *, index: bool = True) -> list[int]:
    """Archive with the real ArchiveStage (blob, receipt, ledger entry, row)."""
    meta = db.open()
    meta.migrate()
    stage = ArchiveStage(Archive.open(db.data), meta)
    try:
        ids = [(await stage.run(ctx)).facts["message"] for ctx in contexts]
    finally:
        await stage.close()
        stage.archive.close()
    if index:
        with db.open() as meta2, Archive.open(db.data) as a:
            idx = db.index(meta2)
            try:
                Indexer(meta2, idx, a.get).run()
            finally:
                idx.close()
    return ids


def lose_newest(db: Db, n: int) -> None:
    """What a power loss does to a WAL database: the newest rows (and everything that
    hangs off them, their blobs too) are gone."""
    with db.open() as meta, meta.engine.begin() as c:
        ids = [r[0] for r in c.execute(sa.text(
            "SELECT id FROM messages ORDER BY id DESC LIMIT :n"), {"n": n})]
        for table in ("rule_hits", "decisions", "verdicts", "participants", "hold_items"):
            c.execute(sa.text(f"DELETE FROM {table} WHERE message_pk IN ({_in(ids)})"))
        blobs = [r[0] for r in c.execute(sa.text(
            f"SELECT blob_id FROM messages WHERE id IN ({_in(ids)})"))]
        c.execute(sa.text(f"DELETE FROM messages WHERE id IN ({_in(ids)})"))
        orphans = [b for b in blobs if not c.execute(sa.text(
            "SELECT 1 FROM messages WHERE blob_id = :b"), {"b": b}).first()]
        if orphans:
            c.execute(sa.text(f"DELETE FROM attachments WHERE blob_id IN ({_in(orphans)})"))
            if meta.dialect == "postgresql":  # the index lives in the same database
                c.execute(sa.text(f"DELETE FROM fts_docs WHERE doc_id IN ({_in(orphans)})"))
            c.execute(sa.text(f"DELETE FROM blobs WHERE id IN ({_in(orphans)})"))


def _in(ids: list[int]) -> str:
    return ", ".join(str(int(i)) for i in ids) or "NULL"


def errors(db: Db) -> list[str]:
    with db.open() as meta:
        return [str(f) for f in check_database(meta, db.data / "archive" / "ledger")
                if f.severity != "info"]


def search(db: Db, queries: list[str]) -> dict[str, list[str]]:
    """Query -> the sha256 of the messages found (ids change: the database was kept)."""
    with db.open() as meta:
        idx = db.index(meta)
        try:
            s = Searcher(meta, idx)
            return {q: sorted(h.message.sha256 for h in s.search(q, limit=100, snippets=False)
                              .hits) for q in queries}
        finally:
            idx.close()


def facts(db: Db) -> dict[str, tuple[object, ...]]:
    """sha256 -> everything a row says about its receipt (not its id)."""
    with db.open() as meta, meta.session() as s:
        from archive.metadata import Message

        out: dict[str, tuple[object, ...]] = {}
        for m in s.scalars(sa.select(Message)):
            out[m.sha256] = (
                m.retention_until, m.state, m.direction, m.mail_from, m.client_ip, m.helo,
                m.tls, m.auth_user, m.spf, m.dkim, m.dmarc, m.received_at, m.source, m.copy,
                sorted((p.role, p.address) for p in m.participants),
                sorted((v.kind, v.result) for v in m.verdicts),
                m.decision.action if m.decision else None)
        return out


def rebuild_missing(db: Db, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    capsys.readouterr()
    assert main(["archive", "rebuild", "--missing", "--json", *db.cli()]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


QUERIES = ["bcc:hidden4@example.org", "rule:rule-5", "zebra3quill", "bcc:hidden1@example.org",
           "from:alice@example.com", "spf:pass"]


async def test_rebuild_missing_restores_the_lost_rows_as_a_rebuild_would(
        db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    await archive(db, [context(n) for n in range(3)])
    await archive(db, [context(n) for n in range(3, 6)], index=False)  # lost before indexing
    before, found = facts(db), None
    lose_newest(db, 3)
    assert len([e for e in errors(db) if "db_message_missing" in e]) == 3
    assert search(db, ["bcc:hidden4@example.org", "rule:rule-5", "zebra3quill"]) == {
        "bcc:hidden4@example.org": [], "rule:rule-5": [], "zebra3quill": []}

    out = rebuild_missing(db, capsys)
    assert out["checked"] == 6 and out["restored"] == 3 and out["receipts"] == 3
    assert out["warnings"] == []
    assert errors(db) == []
    assert facts(db) == before  # envelope, Bcc, verdicts, decision, retention end
    found = search(db, QUERIES)
    assert all(len(found[q]) == 1 for q in QUERIES[:4]), found
    assert len(found["from:alice@example.com"]) == 6

    assert rebuild_missing(db, capsys)["restored"] == 0  # idempotent
    assert search(db, QUERIES) == found
    with db.open() as meta:
        assert meta.count() == 6
        events = [e for e in meta.audit_events() if e.action == "rebuild-missing"]
        assert [e.result_count for e in events] == [3, 0]
    assert main(["archive", "verify", "--data-dir", str(db.data)]) == 0


def message_shas(db: Db) -> list[str]:
    """The sha256 of every message the ledger stored, in order (not receipts)."""
    with Archive.open(db.data) as a:
        return [str(e.fields["sha256"]) for e in a.ledger.entries()
                if e.kind == "message_stored" and "qid" in e.fields]


async def test_restored_rows_wait_unindexed_for_the_running_indexer(db: Db) -> None:
    await archive(db, [context(n) for n in range(4)])
    lose_newest(db, 2)
    with db.open() as meta, Archive.open(db.data) as a:
        res = catch_up(a, meta)
        assert (res.checked, res.restored) == (4, 2)
        assert sorted(sha for _, sha in meta.unindexed()) == sorted(message_shas(db)[2:])


async def test_a_row_the_writer_records_while_catching_up_is_not_duplicated(db: Db) -> None:
    ctxs = [context(n) for n in range(3)]
    await archive(db, ctxs)
    # The writer appended message 2's ledger entry and has not written its row yet.
    lose_newest(db, 1)
    sha = message_shas(db)[2]
    with db.open() as meta, Archive.open(db.data) as a:
        assert catch_up(a, meta).restored == 1
        # Now the writer records it: the archive stage's own record (``once``).
        row = meta.add_messages([record_for(ctxs[2], sha, datetime.now(UTC))])[0]
        assert meta.count() == 3
        with meta.session() as s:
            from archive.metadata import Message

            assert list(s.scalars(sa.select(Message.id).where(Message.sha256 == sha))) == [
                row.id]
    assert errors(db) == []


async def test_the_start_up_check_reads_only_the_ledger_tail(db: Db) -> None:
    await archive(db, [context(n) for n in range(3)])
    lose_newest(db, 1)
    with db.open() as meta, Archive.open(db.data) as a:
        since = tail_start(meta)
        assert since is not None
        res = catch_up(a, meta, since=since)
        assert res.restored == 1 and res.since == since.isoformat()
        # Entries of the whole ledger here are recent; with the newest row far in the
        # future, the tail holds nothing and nothing is read from before it.
        assert catch_up(a, meta, since=datetime(2999, 1, 1, tzinfo=UTC)).checked == 0
    assert errors(db) == []


def test_rebuild_missing_and_force_are_not_given_together(
        db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["archive", "rebuild", "--missing", "--force", *db.cli()]) == 2
    assert "choose one" in capsys.readouterr().err


async def test_new_mail_given_a_lost_blob_id_is_found_by_its_own_words_only(
        db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    """The index file kept the lost row's document; the database hands its blob id to
    the next message (SQLite reuses a deleted last id)."""
    await archive(db, [context(n) for n in range(3)])
    shas = message_shas(db)
    lose_newest(db, 1)
    await archive(db, [context(7)])
    new = message_shas(db)[-1]
    assert rebuild_missing(db, capsys)["restored"] == 1
    assert search(db, ["zebra7quill", "zebra2quill", "quarter"]) == {
        "zebra7quill": [new], "zebra2quill": [shas[2]], "quarter": sorted([*shas, new])}


def hold_of(db: Db, case: str) -> tuple[HoldInfo, list[str]]:
    """The hold and the blob sha256 of each message it holds (ids change)."""
    with db.open() as meta, meta.session() as s:
        from archive.metadata import Message

        info = get_hold(meta, case, missing_ok=False, with_ids=True)
        assert info is not None
        shas = sorted(s.scalars(sa.select(Message.sha256)
                                .where(Message.id.in_(info.message_ids))))
        return info, shas


def lose_holds(db: Db) -> None:
    """The holds were written after the lost rows: they went with them."""
    with db.open() as meta, meta.engine.begin() as c:
        c.execute(sa.text("DELETE FROM hold_items"))
        c.execute(sa.text("DELETE FROM holds"))


async def test_a_legal_hold_the_database_lost_comes_back_holding_its_message_by_blob(
        db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    await archive(db, [context(n) for n in range(3)])
    assert main(["hold", "create", "C-LOST", "--query", "zebra2quill", "--officer", "olga",
                 "--reason", "litigation 7", *db.cli()]) == 0
    placed, frozen = hold_of(db, "C-LOST")
    assert len(frozen) == 1
    lose_newest(db, 1)  # message 2 itself: its row comes back under another id
    lose_holds(db)
    # Mail and an officer go on after the loss: the new row and the new hold may be
    # handed the lost ones' ids (SQLite reuses a deleted last id).
    await archive(db, [context(7)])
    assert main(["hold", "create", "C-NEW", "--query", "zebra7quill", "--officer", "otto",
                 *db.cli()]) == 0

    out = rebuild_missing(db, capsys)
    assert (out["restored"], out["holds"], out["hold_releases"]) == (1, 1, 0)
    restored, shas = hold_of(db, "C-LOST")
    assert shas == frozen  # message 2's blob, not the message that took its id
    assert (restored.query, restored.reason, restored.created_by, restored.created_at,
            restored.active) == ("zebra2quill", "litigation 7", "olga", placed.created_at, True)
    assert hold_of(db, "C-NEW")[0].case == "C-NEW"  # kept as it is
    if restored.id != placed.id:
        assert any("C-LOST" in str(w) and "restored as" in str(w)
                   for w in out["warnings"])  # type: ignore[union-attr]
    again = rebuild_missing(db, capsys)
    assert (again["holds"], again["hold_releases"]) == (0, 0)  # idempotent
    with db.open() as meta:
        [event, _] = [e for e in meta.audit_events() if e.action == "rebuild-missing"]
        assert event.detail["holds"] == 1
    assert errors(db) == []


async def test_a_release_the_database_lost_is_restored_for_the_hold_it_kept(
        db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    await archive(db, [context(n) for n in range(2)])
    assert main(["hold", "create", "C-1", "--query", "zebra1quill", *db.cli()]) == 0
    assert main(["hold", "release", "C-1", "--officer", "rita", *db.cli()]) == 0
    released = hold_of(db, "C-1")[0]
    with db.open() as meta, meta.engine.begin() as c:  # the release's transaction is lost
        c.execute(sa.text("UPDATE holds SET released_at = NULL, released_by = NULL"))
    assert hold_of(db, "C-1")[0].active

    out = rebuild_missing(db, capsys)
    assert (out["holds"], out["hold_releases"]) == (0, 1)
    info = hold_of(db, "C-1")[0]
    assert (info.active, info.released_by, info.released_at) == (
        False, "rita", released.released_at)
    assert rebuild_missing(db, capsys)["hold_releases"] == 0


async def test_a_hold_document_without_blob_hashes_finds_no_message_by_a_bare_id(
        db: Db) -> None:
    await archive(db, [context(n) for n in range(2)])
    with db.open() as meta, meta.session() as s:
        from archive.metadata import Message

        ids = sorted(s.scalars(sa.select(Message.id)))
        sha = s.scalar(sa.select(Message.sha256).where(Message.id == ids[1]))
        old = {"message_ids": ids}  # before blob hashes: an id alone is not trusted
        assert held_rows(meta, s, old) == ([], 2)
        moved = {"message_ids": [999], "message_sha256": {"999": sha}}
        assert held_rows(meta, s, moved) == ([ids[1]], 0)
        wrong = {"message_ids": [ids[0]], "message_sha256": {str(ids[0]): sha}}
        assert held_rows(meta, s, wrong) == ([ids[1]], 0)  # the id is another blob's now


async def test_audit_events_the_database_lost_come_back_from_the_ledger(
        db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    await archive(db, [context(n) for n in range(2)])
    assert main(["search", "zebra1quill", "--officer", "olivia", *db.cli()]) == 0
    lose_newest(db, 1)
    with db.open() as meta, meta.engine.begin() as c:  # written after the lost row
        c.execute(sa.text("DELETE FROM audit_events WHERE action = 'search'"))
    assert any("db_audit_missing" in e for e in errors(db))
    out = rebuild_missing(db, capsys)
    assert (out["restored"], out["audit_events"]) == (1, 1)
    assert errors(db) == []
    with db.open() as meta:
        [event] = [e for e in meta.audit_events() if e.action == "search"]
        assert (event.who, event.query) == ("olivia", "zebra1quill")


async def test_the_same_bytes_received_twice_get_back_only_the_lost_receipt(
        db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    first, again = context(1), context(1)
    again.envelope.received_at += 3600  # the same bytes, another SMTP transaction
    await archive(db, [context(0), first, again])
    before = sorted(facts_rows(db))
    lose_newest(db, 1)  # the second receipt: its blob row stays (the first holds it)
    assert rebuild_missing(db, capsys)["restored"] == 1
    assert sorted(facts_rows(db)) == before
    assert rebuild_missing(db, capsys)["restored"] == 0
    assert errors(db) == []


def facts_rows(db: Db) -> list[tuple[str, datetime, str]]:
    with db.open() as meta, meta.session() as s:
        from archive.metadata import Message

        return [(sha, when, rcpt) for sha, when, rcpt in s.execute(
            sa.select(Message.sha256, Message.received_at, Message.mail_from))]
