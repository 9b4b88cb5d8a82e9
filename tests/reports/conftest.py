"""Archives for the reports tests: written the way the archive stage writes them.

``populate`` stores the bytes with Archive.put_many (blob + ``message_stored``
ledger entry, qid in the record) and then records each receipt with
Metadata.add_messages, then runs the full-text indexer: the same three steps as
gateway/archive_stage.py and archive.index.Indexer.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import pytest

from archive.extract import extract
from archive.facade import Archive
from archive.index import Indexer, open_index
from archive.metadata import MessageRecord, Metadata

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


def mail(frm: str, to: str, subject: str, body: str, n: int, cc: str = "",
         attachment: tuple[str, bytes] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = frm
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = (T0 + timedelta(days=n)).strftime("%a, %d %b %Y %H:%M:%S +0000")
    msg["Message-ID"] = f"<m{n}.{hashlib.sha256(subject.encode()).hexdigest()[:8]}@test.example>"
    msg.set_content(body)
    if attachment:
        msg.add_attachment(attachment[1], maintype="application", subtype="octet-stream",
                           filename=attachment[0])
    return msg.as_bytes(policy=SMTP)


@dataclass
class Receipt:
    raw: bytes
    rcpt_to: list[str]
    mail_from: str = ""
    direction: str = "inbound"
    verdicts: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] | None = None
    rules: list[str] = field(default_factory=list)
    state: str = "accepted"
    retention_days: int | None = None


def sample() -> list[Receipt]:
    spf_pass = {"spf": {"result": "pass"}, "dkim": [{"result": "pass"}],
                "dmarc": {"result": "pass"}}
    spf_fail = {"spf": {"result": "fail"}, "dkim": [{"result": "none"}],
                "dmarc": {"result": "fail"}}
    enc = {"decision": "accept", "actions": [{"action": "encrypt"}],
           "retention": "7y", "retention_detail": {"rule": "keep-finance"}, "direction": "outbound"}
    quar = {"decision": "quarantine", "actions": [{"action": "quarantine"}],
            "retention": "30d", "retention_detail": {"rule": "short"}, "direction": "inbound"}
    return [
        Receipt(mail("Alice <alice@example.com>", "bob@example.org", "Quarterly report",
                     "The merger with Falcon Corp is on track.\nFrom the desk of Alice\n", 0,
                     attachment=("forecast.xlsx", b"PK\x03\x04 not really")),
                ["bob@example.org", "secret@example.org"], "alice@example.com", "outbound",
                spf_pass, enc, ["keep-finance", "encrypt-finance"], retention_days=2555),
        Receipt(mail("Bob <bob@example.org>", "alice@example.com", "Lunch", "Cafe at noon?", 1,
                     cc="Carol <carol@example.net>"),
                ["alice@example.com", "carol@example.net"], "bob@example.org", "inbound",
                spf_pass, {"decision": "accept", "actions": [], "direction": "inbound"}),
        Receipt(mail("mallory@evil.test", "alice@example.com", "Invoice overdue",
                     "Pay now: wire transfer to account 1234", 2),
                ["alice@example.com"], "mallory@evil.test", "inbound", spf_fail, quar,
                ["phishing-words"], "quarantined", retention_days=30),
        Receipt(mail("carol@example.net", "dave@example.com", "Re: merger",
                     "the merger closes on Friday", 3),
                ["dave@example.com"], "carol@example.net", "inbound", spf_pass,
                {"decision": "accept", "actions": [], "direction": "inbound"}),
    ]


def populate(data_dir: Path, receipts: Sequence[Receipt], database: str | None = None
             ) -> list[int]:
    """Store, record and index ``receipts``; return their archive ids in order.

    ``database``: a metadata URL (PostgreSQL, indexed with the pg engine) instead of
    the embedded SQLite database."""
    archive = Archive.open(data_dir, checkpoint_every=3)
    meta = Metadata(database) if database else Metadata.for_data_dir(data_dir)
    meta.migrate()
    try:
        refs = archive.put_many([r.raw for r in receipts],
                                [{"qid": f"q{i:04d}"} for i in range(len(receipts))])
        recs = []
        for i, (r, ref) in enumerate(zip(receipts, refs, strict=True)):
            received = T0 + timedelta(days=i, hours=1)
            recs.append(MessageRecord(
                ref.sha256, extract(r.raw), received, direction=r.direction, source="smtp",
                state=r.state, mail_from=r.mail_from, rcpt_to=r.rcpt_to,
                client_ip="192.0.2.7", helo="mx.example.net", verdicts=r.verdicts,
                decision=r.decision, rules=r.rules,
                retention_until=received + timedelta(days=r.retention_days)
                if r.retention_days else None))
        ids = [s.id for s in meta.add_messages(recs)]
        index = open_index("pg" if meta.dialect == "postgresql" else "fts5",
                           data_dir=data_dir, meta=meta)
        try:
            Indexer(meta, index, archive.get).run()
        finally:
            index.close()
        return ids
    finally:
        meta.close()
        archive.close()


def corpus_receipts(limit: int = 60) -> list[Receipt]:
    root = os.environ.get("COFFER_CORPUS")
    base = (Path(root) if root else
            Path(__file__).resolve().parents[2].parent / "shared" / "corpus")
    mime = base / "mime"
    if not mime.is_dir():
        pytest.skip(f"MIME corpus not found at {mime} (set COFFER_CORPUS)")
    files = sorted(mime.rglob("*.eml"))[:limit]
    return [Receipt(p.read_bytes(), [f"user{i}@example.com"], "sender@example.net")
            for i, p in enumerate(files)]


@dataclass
class Populated:
    data_dir: Path
    ids: list[int]
    receipts: list[Receipt]


@pytest.fixture
def archive_dir(tmp_path: Path) -> Iterator[Populated]:
    data = tmp_path / "data"
    receipts = sample()
    receipts.append(receipts[1])  # the same bytes received twice: one blob, two receipts
    ids = populate(data, receipts)
    yield Populated(data, ids, receipts)
