"""How a journal copy is archived: which bytes, with which envelope (pure).

A journal copy (gateway.journal_intake) is one of three kinds:

* an Exchange / Microsoft 365 **envelope journal report** (gateway.journal_report):
  the ORIGINAL message it carries is archived byte for byte, with the envelope the
  report gives (sender; every recipient, Bcc and expanded list members included),
  as copy ``journaled``; the report itself, as it arrived over SMTP, is archived
  too, as copy ``journal_report``, linked to the original both ways: the receipt
  of how the copy reached the archive (which server, which journal address);
* a **BCC-style** copy (Postfix ``always_bcc``, ``recipient_bcc_maps``, Dovecot,
  any server that just adds the journal address as a recipient): the message as
  it arrived, with the envelope recipients of the transaction minus the journal
  address (often none: the server sent the journal copy in its own transaction,
  and the header's To/Cc are the participants);
* a **malformed report** (marked ``X-MS-Journal-Report`` but unreadable: no
  attachment, no sender): never lost, archived as it arrived, flagged
  ``journal_unparsed`` with the reason, and a warning is logged.

Every row has direction ``journal`` and source ``journal:<listener>``; the policy
never ran for it, so its retention is ``archive.journal.retention``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from archive.metadata import JOURNAL_REPORT, JOURNALED
from gateway.envelope import Envelope
from gateway.journal_report import (
    JournalReport,
    JournalReportError,
    is_journal_report,
    parse_report,
)
from gateway.mailparse import parse

DIRECTION = "journal"
STATE = "journaled"
FLAG_REPORT = "journaled: envelope journal report"
FLAG_BCC = "journaled: BCC copy"
FLAG_UNPARSED = "journal_unparsed"


@dataclass(frozen=True, slots=True)
class JournalCopy:
    """One row to archive for a journal copy: its bytes and the envelope it gets."""

    kind: str  # Message.copy
    data: bytes
    mail_from: str
    rcpt_to: list[str]
    flags: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class JournalPlan:
    copies: list[JournalCopy]
    facts: dict[str, Any]  # recorded with the rows (Decision trace) and in the spool
    warning: str = ""  # a malformed report: why (the caller logs it)


def source(envelope: Envelope) -> str:
    return f"journal:{envelope.listener}"


def _report_facts(report: JournalReport) -> dict[str, Any]:
    env = report.envelope
    return {
        "kind": "envelope_report", "sender": env.sender, "message_id": env.message_id,
        "on_behalf_of": env.on_behalf_of,
        "recipients": [{"address": r.address, "field": r.field,
                        **({"expanded_from": r.expanded_from} if r.expanded_from else {}),
                        **({"forwarded_from": r.forwarded_from} if r.forwarded_from else {})}
                       for r in env.recipients],
    }


def plan(envelope: Envelope, data: bytes, journal: dict[str, Any]) -> JournalPlan:
    """What to archive for the journal copy ``data`` (``journal``: facts["journal"])."""
    others = [str(r) for r in journal.get("recipients") or []]
    if not is_journal_report(parse(data)):
        return JournalPlan([JournalCopy("", data, envelope.mail_from, others, [FLAG_BCC])],
                           {"kind": "bcc"})
    try:
        report = parse_report(data)
    except JournalReportError as exc:
        return JournalPlan(
            [JournalCopy("", data, envelope.mail_from, others, [f"{FLAG_UNPARSED}: {exc}"])],
            {"kind": "unparsed", "error": str(exc)}, warning=str(exc))
    addresses = report.envelope.addresses
    return JournalPlan([
        JournalCopy(JOURNALED, report.original, report.envelope.sender, addresses,
                    [FLAG_REPORT]),
        JournalCopy(JOURNAL_REPORT, data, envelope.mail_from, list(envelope.rcpt_to),
                    [FLAG_REPORT]),
    ], _report_facts(report))
