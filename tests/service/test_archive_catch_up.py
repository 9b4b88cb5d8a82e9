"""`coffer serve` restores, at start, the metadata rows a power loss took from its database."""

from __future__ import annotations

import signal
import smtplib
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

from svcproc import REPO, Gateway, Sink, free_port, wait_for, write_config


def _rows(db: Path) -> int:
    with sqlite3.connect(db) as c:
        return int(c.execute("SELECT count(*) FROM messages").fetchone()[0])


def _lose_newest_row(db: Path) -> None:
    """The newest transaction gone, as after a power loss (WAL, synchronous=NORMAL)."""
    with sqlite3.connect(db) as c:
        (pk, blob), = c.execute("SELECT id, blob_id FROM messages ORDER BY id DESC LIMIT 1")
        for table in ("rule_hits", "decisions", "verdicts", "participants", "hold_items"):
            c.execute(f"DELETE FROM {table} WHERE message_pk = ?", (pk,))
        c.execute("DELETE FROM messages WHERE id = ?", (pk,))
        c.execute("DELETE FROM attachments WHERE blob_id = ?", (blob,))
        c.execute("DELETE FROM blobs WHERE id = ?", (blob,))


def test_serve_restores_the_rows_the_database_lost_at_start(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    port = free_port()
    cfg = write_config(tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
                       routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"},
                       trusted=["127.0.0.1/32"])
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    tokens = [uuid.uuid4().hex for _ in range(2)]
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        for token in tokens:
            smtp.sendmail("alice@src.test", ["bob@remote.test", "carol@remote.test"],
                          f"From: alice@src.test\r\nTo: bob@remote.test\r\nSubject: {token}\r\n"
                          f"X-Token: {token}\r\n\r\nhello\r\n".encode())
    db = tmp_path / "archive" / "meta.db"
    wait_for(lambda: db.exists() and _rows(db) == 2, what="two archived rows")
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0
    assert gw.events("archive_caught_up") == []  # nothing was missing: no line

    _lose_newest_row(db)
    assert _rows(db) == 1
    gw.start()
    line = gw.wait_event("archive_caught_up")
    assert line["restored"] == 1 and line["warnings"] == []
    assert _rows(db) == 2
    audit = subprocess.run([sys.executable, "-m", "gateway", "archive", "audit-db",
                            "--config", str(cfg)], cwd=REPO, capture_output=True, timeout=60,
                           check=False)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    # The restored Bcc recipient is searchable again.
    found = subprocess.run([sys.executable, "-m", "gateway", "search", "--config", str(cfg),
                            "--json", "bcc:carol@remote.test"], cwd=REPO, capture_output=True,
                           timeout=60, check=False)
    assert len(found.stdout.splitlines()) == 2, found.stderr
