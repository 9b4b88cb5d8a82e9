"""`coffer serve` archives a message it changed twice: as received and as sent, linked.

Issue 3 item 1: an outbound message the gateway DKIM-signs is kept as the plaintext the
sender submitted and as the exact bytes delivered; search lists it once, `coffer show`
names the other copy, and `coffer archive rebuild` links the two again.
"""

from __future__ import annotations

import json
import shutil
import signal
import smtplib
import subprocess
import sys
import uuid
from pathlib import Path

from svcproc import REPO, Gateway, Sink, start_relay, wait_for

from gateway.transform.dkim_sign import generate_key


def _coffer(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO,
                          capture_output=True, check=False, timeout=120)


def _json_lines(out: subprocess.CompletedProcess[bytes]) -> list[dict[str, object]]:
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def _sign_submissions(cfg: Path) -> None:
    """A submission listener (no AUTH needed from loopback) that DKIM-signs src.test."""
    (cfg.parent / "keys").mkdir()
    (cfg.parent / "keys" / "src.pem").write_bytes(generate_key("ed25519-sha256"))
    text = cfg.read_text().replace(
        "role: inbound,", "role: submission, require_auth: false,").replace(
        "check:\n  checks: []\n",
        "check:\n  checks: []\n  dkim_signing:\n"
        "    src.test: {selector: s1, key_file: keys/src.pem}\n")
    assert "dkim_signing" in text and "role: submission" in text
    cfg.write_text(text)


def test_outbound_signed_message_archives_received_and_sent_copies_linked(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    cfg, gw = start_relay(tmp_path, procs, configure=_sign_submissions)
    sink, port = procs[0], gw.port
    assert isinstance(sink, Sink)

    token = uuid.uuid4().hex
    body = (f"From: alice@src.test\r\nTo: bob@remote.test\r\nSubject: board {token}\r\n"
            f"Message-ID: <{token}@src.test>\r\nX-Token: {token}\r\n\r\n"
            f"The hovercraft minutes for {token}.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("alice@src.test", ["bob@remote.test"], body)
    wait_for(lambda: any(r["token"] == token for r in sink.records()), what="delivery")

    query = f"body:hovercraft subject:{token}"
    wait_for(lambda: len(_json_lines(_coffer("search", "--config", str(cfg), "--json", query)))
             == 1, what="the message to be indexed")
    [hit] = _json_lines(_coffer("search", "--config", str(cfg), "--json", query))
    # Listed once, as the plaintext the sender submitted, naming the copy as sent.
    assert hit["copy"] == "received" and isinstance(hit["linked_id"], int)
    both = _json_lines(_coffer("search", "--config", str(cfg), "--json", "--all-copies",
                               f"subject:{token}"))
    assert sorted(h["copy"] for h in both) == ["received", "sent"]
    sent = next(h for h in both if h["copy"] == "sent")
    table = _coffer("search", "--config", str(cfg), "--all-copies", "--no-snippets",
                    f"subject:{token}").stdout.decode()
    assert f"[sent] board {token}" in table and table.count(f"board {token}") == 2
    assert sent["id"] == hit["linked_id"] and sent["linked_id"] == hit["id"]

    received_raw = _coffer("show", "--config", str(cfg), "--raw", str(hit["id"])).stdout
    sent_raw = _coffer("show", "--config", str(cfg), "--raw", str(sent["id"])).stdout
    assert received_raw.endswith(body) and b"DKIM-Signature:" not in received_raw
    assert sent_raw.startswith(b"DKIM-Signature:") and sent_raw.endswith(received_raw)

    shown = _coffer("show", "--config", str(cfg), str(sent["id"]))
    assert shown.returncode == 0, shown.stderr
    assert (f"as sent (after signing/encryption: the exact bytes delivered); "
            f"other copy: archive id {hit['id']}").encode() in shown.stdout

    # Rebuild from store + ledger alone: the link comes back from the receipts.
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0
    db = tmp_path / "archive" / "meta.db"
    shutil.move(db, tmp_path / "meta.db.lost")
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    rebuilt = _coffer("archive", "rebuild", "--config", str(cfg))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert b"2 copies linked" in rebuilt.stderr
    again = _json_lines(_coffer("search", "--config", str(cfg), "--json", "--all-copies",
                                f"subject:{token}"))
    by_copy = {h["copy"]: h for h in again}
    assert by_copy["received"]["linked_id"] == by_copy["sent"]["id"]
    assert by_copy["sent"]["linked_id"] == by_copy["received"]["id"]
