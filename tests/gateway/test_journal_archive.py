"""What is archived for a journal copy: which bytes, with which envelope and flags."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from journal_reports import EXCHANGE_TEXT, ORIGINAL, report

from archive.metadata import JOURNAL_REPORT, JOURNALED
from archive.receipts import _document_text, apply_receipt, parse_receipt
from gateway.archive_stage import ArchiveStage, Copy, journaled, record_for
from gateway.envelope import Envelope
from gateway.journal_archive import FLAG_BCC, FLAG_REPORT, FLAG_UNPARSED, plan
from gateway.journal_intake import journal_copy
from gateway.pipeline import MessageContext

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _ctx(data: bytes, *rcpts: str) -> MessageContext:
    env = Envelope(mail_from="exchange@corp.example", rcpt_to=list(rcpts),
                   received_at=NOW.timestamp(), listener="journal-in")
    copy, facts = journal_copy(env, ["journal@coffer.example"], "7y")
    return MessageContext(envelope=copy, data=data, facts=facts, qid="Q1")


def test_envelope_report_gives_original_with_report_envelope_and_the_report_linked() -> None:
    data = report(EXCHANGE_TEXT)
    ctx = _ctx(data, "journal@coffer.example")
    p = plan(ctx.envelope, data, ctx.facts["journal"])
    original, rep = p.copies
    assert (original.kind, original.data, original.mail_from) == (
        JOURNALED, ORIGINAL, "alice@corp.example")
    assert original.rcpt_to == ["bob@corp.example", "carol@corp.example", "dave@corp.example",
                                "member@corp.example", "eve@corp.example"]
    assert (rep.kind, rep.data, rep.rcpt_to) == (JOURNAL_REPORT, data, ["journal@coffer.example"])
    assert original.flags == rep.flags == [FLAG_REPORT]
    assert {"address": "member@corp.example", "field": "to",
            "expanded_from": "team@corp.example"} in p.facts["recipients"]


def test_bcc_copy_is_archived_as_is_with_the_other_recipients() -> None:
    data = b"From: a@corp.example\r\nTo: b@corp.example\r\n\r\nhi\r\n"
    ctx = _ctx(data, "b@remote.example", "journal@coffer.example")
    [only] = plan(ctx.envelope, data, ctx.facts["journal"]).copies
    assert (only.kind, only.data, only.rcpt_to, only.flags) == (
        "", data, ["b@remote.example"], [FLAG_BCC])


def test_unreadable_report_is_archived_as_received_and_flagged() -> None:
    data = report(EXCHANGE_TEXT, attach=False)
    ctx = _ctx(data, "journal@coffer.example")
    p = plan(ctx.envelope, data, ctx.facts["journal"])
    [only] = p.copies
    assert only.data == data and only.rcpt_to == []
    assert only.flags == [f"{FLAG_UNPARSED}: no attached original message"]
    assert p.warning == "no attached original message"


def test_journaled_row_and_receipt_carry_direction_source_retention_and_flags() -> None:
    data = report(EXCHANGE_TEXT)
    ctx = _ctx(data, "journal@coffer.example")
    p = plan(ctx.envelope, data, ctx.facts["journal"])
    rec = journaled(record_for(ctx, "0" * 64, NOW, ORIGINAL, copy=JOURNALED), ctx, p, 0)
    assert (rec.direction, rec.source, rec.state) == ("journal", "journal:journal-in",
                                                       "journaled")
    assert rec.mail_from == "alice@corp.example" and "dave@corp.example" in rec.rcpt_to
    assert rec.retention_until == datetime(2033, 11, 29, 12, 0, tzinfo=UTC)
    assert rec.decision is not None and rec.decision["action"] == "journal"
    # The receipt keeps what a rebuild needs: the report's envelope, the flags.
    stage = ArchiveStage.__new__(ArchiveStage)  # _prepare needs only the clock
    stage.clock = lambda: NOW
    recs, receipts = stage._prepare(ctx, [Copy(c.kind, c.data) for c in p.copies], p)
    back = apply_receipt(recs[0], parse_receipt(receipts[0], recs[0].sha256))
    assert back.flags == [FLAG_REPORT] and back.mail_from == "alice@corp.example"
    assert back.rcpt_to == recs[0].rcpt_to and back.copy == JOURNALED
    # The receipt's fast encoding is the general one, flags included.
    assert receipts[0].decode() == _document_text(recs[0], json.loads(receipts[0])["envelope"],
                                                  "Q1")
