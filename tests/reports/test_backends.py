"""reports/ code that talks SQL, on SQLite and on the real PostgreSQL (archive_db fixtures)."""

from __future__ import annotations

import hashlib
import sys
from datetime import timedelta
from pathlib import Path

from conftest import T0, Receipt, sample

from archive.extract import extract
from archive.metadata import MessageRecord, Metadata
from reports.compliance import build, parse_period

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "archive"))
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin


def _records(receipts: list[Receipt] | None = None) -> list[MessageRecord]:
    out = []
    for i, r in enumerate(receipts or sample()):
        received = T0 + timedelta(days=i, hours=1)
        out.append(MessageRecord(
            hashlib.sha256(r.raw).hexdigest(), extract(r.raw), received,
            direction=r.direction, state=r.state, mail_from=r.mail_from, rcpt_to=r.rcpt_to,
            verdicts=r.verdicts, decision=r.decision, rules=r.rules,
            retention_until=received + timedelta(days=r.retention_days)
            if r.retention_days else None))
    return out


def test_report_figures_are_the_same_on_sqlite_and_postgresql(meta: Metadata) -> None:
    meta.add_messages(_records())
    start, end = parse_period("2024-03-01", "2024-04-30")
    assert build(meta, "policy", start, end).figures() == {
        "messages": 4, "quarantined": 1, "encrypted": 1, "rule_hits": 3}
    assert build(meta, "auth", start, end).figures() == {
        "messages": 4, "domains": 4, "spf_pass": 3, "dkim_pass": 3, "dmarc_pass": 3,
        "dmarc_fail": 1}
    assert build(meta, "retention", start, end).figures() == {
        "messages_expiring": 1, "expiring_but_held": 0, "messages_expired": 0,
        "received_without_retention_end": 2}
    assert build(meta, "holds", start, end).figures()["holds_active"] == 0
    assert build(meta, "audit", start, end).figures()["events"] == 0


def test_rebuilt_audit_events_keep_their_ids_and_new_ones_follow(meta: Metadata,
                                                                  tmp_path: Path) -> None:
    """Entries older than ledger documents: hashed names, counted as such."""
    from datetime import UTC, datetime

    from archive.facade import Archive
    from archive.ledger import LedgerEntry
    from reports.rebuild_log import restore_audit

    entries = [LedgerEntry(seq=10 + i, time="2024-03-01T10:00:00.000+00:00", kind="audit",
                           prev="0" * 64, hash="1" * 64,
                           fields={"event": ev, "action": "search", "who_sha256": "ab",
                                   "at": "2024-03-01T10:00:00+00:00", "result_count": 3,
                                   "query_sha256": "cd"})
               for i, ev in enumerate((3, 7))]
    with Archive.open(tmp_path / "data") as archive:
        restored = restore_audit(meta, archive, entries)
    assert (restored.restored, restored.without_document) == (2, 2)
    new = meta.record_audit("olivia", "show", when=datetime(2024, 3, 2, tzinfo=UTC))
    events = meta.audit_events()
    assert [e.id for e in events] == [3, 7, new.id] and new.id > 7
    assert events[0].who == "sha256:ab" and events[0].detail["query_sha256"] == "cd"


def test_export_and_recovery_queries_work_on_both_backends(meta: Metadata, tmp_path: Path
                                                           ) -> None:
    from archive.facade import Archive
    from archive.index import Indexer, open_index
    from reports.export import ExportRequest, export
    from reports.export_verify import verify_package
    from reports.recover import recover

    receipts = sample()
    with Archive.open(tmp_path / "data") as archive:
        archive.put_many([r.raw for r in receipts], [{"qid": f"q{i}"} for i in range(4)])
        meta.add_messages(_records(receipts))  # the same bytes (MIME boundaries are random)
        engine = "pg" if meta.dialect == "postgresql" else "fts5"
        index = open_index(engine, data_dir=tmp_path / "data", meta=meta)
        try:
            Indexer(meta, index, archive.get).run()
            res = export(archive, meta, index, ExportRequest(
                "C-1", "merger OR participant:example.org", tmp_path / "pkg", "olivia"))
            plan = recover(archive, meta, index, tmp_path / "data" / "spool", "merger",
                           to=[], original_recipients=True, dry_run=True)
        finally:
            index.close()
    assert res.count == 3 and res.unavailable == 0 and verify_package(tmp_path / "pkg").ok
    manifest = (tmp_path / "pkg" / "manifest.json").read_text()
    assert "secret@example.org" in manifest  # the Bcc, from the envelope rows
    assert [p.rcpt_to for p in plan] == [["bob@example.org", "secret@example.org"],
                                         ["dave@example.com"]]


def test_rebuild_keeps_both_audit_events_that_reused_an_id(meta: Metadata, tmp_path: Path
                                                           ) -> None:
    """A database restored from a backup hands out again the ids of events that reached
    the ledger after its snapshot: both events come back, the later with a new id."""
    from archive.audit import append_audit
    from archive.facade import Archive
    from archive.ledger import LedgerEntry
    from archive.metadata import AuditEvent
    from reports.rebuild_log import restore_audit

    at = T0 + timedelta(days=1)
    with Archive.open(tmp_path / "data") as archive:
        for who in ("olivia", "peter"):
            append_audit(archive, AuditEvent(id=5, at=at, who=who, action="search",
                                             query=f"q-{who}", result_count=1, target=None,
                                             detail={}))
        entries: list[LedgerEntry] = [e for e in archive.ledger.entries() if e.kind == "audit"]
        restored = restore_audit(meta, archive, entries)
    assert restored.restored == 2 and "appear twice" in restored.warnings[0]
    events = meta.audit_events()
    assert [(e.who, e.query) for e in events] == [("olivia", "q-olivia"), ("peter", "q-peter")]
    assert events[0].id == 5 and events[1].id > 5
    assert events[1].detail == {"ledger_event_id": 5}
    assert meta.record_audit("x", "show", when=at).id > events[1].id


def test_rebuild_keeps_both_holds_that_reused_an_id(meta: Metadata, tmp_path: Path) -> None:
    """Hold 3 reached the ledger after a backup's snapshot; the restored database gave id 3
    to the next hold: both come back, each with its own release state."""
    from archive.documents import append_documented
    from archive.facade import Archive
    from archive.holds import HOLD_DOCUMENT, RELEASE_DOCUMENT, list_holds
    from reports.rebuild_log import restore_holds

    meta.add_messages(_records())
    at = (T0 + timedelta(days=9)).isoformat()

    def placed(case: str, ids: list[int]) -> tuple[str, dict[str, object]]:
        return "hold_placed", {"kind": HOLD_DOCUMENT, "hold": 3, "case": case, "query": "q",
                               "reason": "", "created_at": at, "created_by": "olga",
                               "message_ids": ids}

    docs = [placed("C-MISSED", [1]), placed("C-NEXT", [2, 3]),
            ("hold_released", {"kind": RELEASE_DOCUMENT, "hold": 3, "case": "C-NEXT",
                               "released_at": at, "released_by": "peter"}),
            placed("C-NEXT", [4])]
    with Archive.open(tmp_path / "data") as archive:
        for kind, doc in docs:
            append_documented(archive, kind, doc, hold=3)
        entries = [e for e in archive.ledger.entries() if e.kind.startswith("hold_")]
        restored = restore_holds(meta, archive, entries)
    assert restored.restored == 2 and len(restored.warnings) == 2
    holds = {h.case: h for h in list_holds(meta)}
    assert (holds["C-MISSED"].id, holds["C-MISSED"].items, holds["C-MISSED"].active) == (
        3, 1, True)
    assert (holds["C-NEXT"].id, holds["C-NEXT"].items, holds["C-NEXT"].released_by) == (
        4, 2, "peter")
    assert meta.place_hold("C-NEW", "q", "olga", [], T0) == 5
