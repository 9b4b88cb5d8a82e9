"""`coffer serve` archives journal copies (internal mail) and delivers nothing to them.

A mail server in a trusted network sends an Exchange envelope journal report and a
BCC-style copy to the journal address; the archive has the original (its bytes
exactly) with the report's envelope, Bcc included; nothing reaches the journal
address; the normal recipients of a mixed transaction are delivered as usual; an
untrusted client is refused at RCPT; a malformed report is archived, flagged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import smtplib
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from svcproc import REPO, Gateway, Sink, start_relay, wait_for

from tests.gateway.journal_reports import EXCHANGE_TEXT, report

JOURNAL = "journal@gw.test"
EXTRA = f"archive:\n  journal:\n    addresses: [{JOURNAL}]\n    retention: 7y\n"


def _coffer(cfg: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(cfg)],
                          cwd=REPO, capture_output=True, check=False, timeout=120)


def _search(cfg: Path, query: str, *flags: str) -> list[dict[str, object]]:
    out = _coffer(cfg, "search", "--json", *flags, query)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _original(token: str) -> bytes:
    return (f"From: Alice <alice@corp.example>\r\nTo: Bob <bob@corp.example>\r\n"
            f"Subject: internal {token}\r\nMessage-ID: <{token}@corp.example>\r\n"
            f"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n\r\n"
            f"Internal memo {token}.\r\n").encode()


@pytest.fixture
def relay(tmp_path: Path, procs: list[Gateway | Sink]) -> tuple[Path, Gateway, Sink]:
    cfg, gw = start_relay(tmp_path, procs, extra=EXTRA)
    sink = procs[0]
    assert isinstance(sink, Sink)
    return cfg, gw, sink


def test_exchange_journal_report_archives_original_with_report_envelope(
        relay: tuple[Path, Gateway, Sink]) -> None:
    cfg, gw, sink = relay
    token = uuid.uuid4().hex
    original = _original(token)
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as smtp:
        smtp.sendmail("exchange@corp.example", [JOURNAL],
                      report(EXCHANGE_TEXT, original, subject=f"internal {token}"))

    wait_for(lambda: len(_search(cfg, f"subject:{token} direction:journal")) == 1,
             what="the journaled original to be indexed")
    [hit] = _search(cfg, f"subject:{token} direction:journal")
    assert hit["copy"] == "journaled"
    assert hit["sha256"] == hashlib.sha256(original).hexdigest()
    raw = _coffer(cfg, "show", "--raw", str(hit["id"])).stdout
    assert raw == original
    # Bcc and expanded recipients are participants of the original.
    for who in ("dave@corp.example", "member@corp.example", "carol@corp.example"):
        assert [h["id"] for h in _search(cfg, f"participant:{who} subject:{token}")] \
            == [hit["id"]], who
    assert [h["id"] for h in _search(cfg, f"bcc:dave@corp.example subject:{token}")] \
        == [hit["id"]]
    shown = _coffer(cfg, "show", str(hit["id"])).stdout.decode()
    assert "journal:inbound" in shown and "journaled: envelope journal report" in shown
    envelope_from = next(x for x in shown.splitlines() if x.startswith("Envelope-From"))
    assert envelope_from.endswith("alice@corp.example")
    # archive.journal.retention: the policy does not run for journal copies.
    retention = next(x for x in shown.splitlines() if x.startswith("Retention-Until"))
    assert f"{datetime.now(UTC).year + 7}-" in retention
    # The report itself is kept, linked: the receipt of how the copy arrived.
    both = _search(cfg, f"subject:{token}", "--all-copies")
    by_copy = {h["copy"]: h for h in both}
    assert set(by_copy) == {"journaled", "journal_report"}
    assert by_copy["journal_report"]["linked_id"] == hit["id"]
    assert hit["linked_id"] == by_copy["journal_report"]["id"]
    # Nothing was delivered anywhere.
    assert not [r for r in sink.records() if token in str(r.get("subject"))]

    # A rebuild from store + ledger gives the same rows back (the receipts carry the
    # report's envelope, the flags and the link).
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0
    db = cfg.parent / "archive" / "meta.db"
    shutil.move(db, cfg.parent / "meta.db.lost")
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    rebuilt = _coffer(cfg, "archive", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    [again] = _search(cfg, f"bcc:dave@corp.example direction:journal subject:{token}")
    assert again["copy"] == "journaled" and again["sha256"] == hit["sha256"]
    shown = _coffer(cfg, "show", str(again["id"])).stdout.decode()
    assert "journaled: envelope journal report" in shown and "journal:inbound" in shown


def test_bcc_copy_and_mixed_transaction_deliver_only_the_normal_recipients(
        relay: tuple[Path, Gateway, Sink]) -> None:
    cfg, gw, sink = relay
    token = uuid.uuid4().hex
    body = (f"From: carol@gw.test\r\nTo: bob@remote.test\r\nSubject: mixed {token}\r\n"
            f"X-Token: {token}\r\n\r\nHello {token}.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as smtp:
        smtp.sendmail("carol@gw.test", ["bob@remote.test", JOURNAL], body)
    wait_for(lambda: any(r["token"] == token for r in sink.records()), what="delivery")
    wait_for(lambda: len(_search(cfg, f"subject:{token} direction:journal")) == 1,
             what="the journal copy to be indexed")
    [journaled] = _search(cfg, f"subject:{token} direction:journal")
    assert journaled["copy"] == ""
    # Archived with the transaction's other recipients, never the journal address.
    assert [h["id"] for h in _search(cfg, f"participant:bob@remote.test direction:journal "
                                          f"subject:{token}")] == [journaled["id"]]
    assert _search(cfg, f"participant:{JOURNAL} subject:{token}") == []
    shown = _coffer(cfg, "show", str(journaled["id"])).stdout.decode()
    assert "journaled: BCC copy" in shown
    # Delivered to bob only, exactly once; the journal address got nothing.
    rcpts = [r["rcpt"] for r in sink.records() if r["token"] == token]
    assert rcpts == ["bob@remote.test"]


def test_untrusted_client_is_refused_at_rcpt_to_journal_address(
        relay: tuple[Path, Gateway, Sink]) -> None:
    _, gw, _ = relay
    # 127.0.0.2 is outside relay.trusted_networks (127.0.0.1/32) and not authenticated.
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10,
                      source_address=("127.0.0.2", 0)) as smtp:
        smtp.ehlo()
        smtp.mail("forger@evil.test")
        code, text = smtp.rcpt(JOURNAL)
        assert (code, text[:5]) == (550, b"5.7.1")
        code, _ = smtp.rcpt("someone@gw.test")  # ordinary local mail still accepted
        assert code == 250


def test_malformed_report_is_archived_flagged(relay: tuple[Path, Gateway, Sink]) -> None:
    cfg, gw, _ = relay
    token = uuid.uuid4().hex
    broken = report(EXCHANGE_TEXT, attach=False, subject=f"broken {token}")
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as smtp:
        smtp.sendmail("exchange@corp.example", [JOURNAL], broken)
    wait_for(lambda: len(_search(cfg, f"subject:{token} direction:journal")) == 1,
             what="the malformed report to be indexed")
    [hit] = _search(cfg, f"subject:{token} direction:journal")
    raw = _coffer(cfg, "show", "--raw", str(hit["id"])).stdout
    assert raw.endswith(broken)
    shown = _coffer(cfg, "show", str(hit["id"])).stdout.decode()
    assert "journal_unparsed: no attached original message" in shown
    assert gw.wait_event("journal_unparsed")["error"] == "no attached original message"
