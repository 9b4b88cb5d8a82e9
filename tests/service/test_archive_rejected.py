"""`coffer serve` archives a message it rejects after DATA before the 5xx (issue 3 item 1).

The archive write is part of the SMTP transaction: when it fails the client gets
451 4.3.0 (it retries; the evidence is never lost), never the 550 and never a 250.
With ``archive.rejected: false`` a rejected message is not kept.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import subprocess
import sys
import uuid
from pathlib import Path

from svcproc import REPO, Gateway, Sink, start_relay

POLICY = """\
version: 1
rules:
  - name: no-tenders
    when: {subject: {contains: "tender"}}
    then:
      - reject: {code: 550, enhanced: 5.7.1, text: "Tenders go through the portal"}
"""


def _coffer(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO,
                          capture_output=True, check=False, timeout=120)


def _gateway(tmp_path: Path, procs: list[Gateway | Sink], extra: str = "") -> tuple[Path, int]:
    cfg, gw = start_relay(tmp_path, procs, policy=POLICY, extra=extra)
    return cfg, gw.port


def _send(port: int, token: str) -> tuple[int, bytes]:
    body = (f"From: carol@src.test\r\nTo: dana@remote.test\r\nSubject: tender {token}\r\n"
            f"Message-ID: <{token}@src.test>\r\n\r\nOur offer for {token}.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("carol@src.test")
        smtp.rcpt("dana@remote.test")
        return smtp.data(body)


def _shown(cfg: Path, token: str) -> bytes | None:
    """`coffer show <Message-ID>` (metadata only: no wait for the indexer); None if absent."""
    out = _coffer("show", "--config", str(cfg), f"<{token}@src.test>")
    if out.returncode != 0:
        assert b"no archived message with Message-ID" in out.stderr, out.stderr
        return None
    return out.stdout


def test_policy_reject_after_data_is_archived_marked_rejected_before_550(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    cfg, port = _gateway(tmp_path, procs)
    token = uuid.uuid4().hex
    code, text = _send(port, token)
    assert (code, text) == (550, b"5.7.1 Tenders go through the portal")
    # In the archive the moment the 550 came: it was written before the reply.
    shown = _shown(cfg, token)
    assert shown is not None
    assert b"State:            rejected\n" in shown
    assert (b"Rejected:         550 5.7.1 Tenders go through the portal (stage decide: "
            b"policy: reject by rule 'no-tenders')") in shown
    assert shown.rstrip().endswith(f"Our offer for {token}.".encode())


def test_archive_failure_during_reject_answers_451(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    cfg, port = _gateway(tmp_path, procs)
    # The store's segment directory becomes a file before the first write: creating a
    # segment fails (even as root), so every archive write fails.
    packs = tmp_path / "archive" / "store" / "packs"
    shutil.rmtree(packs, ignore_errors=True)
    packs.write_bytes(b"")
    lost = uuid.uuid4().hex
    code, _ = _send(port, lost)
    assert code == 451  # not 550 (no evidence), not 250
    logged = [json.loads(x) for x in (tmp_path / "coffer.log").read_text().splitlines()
              if x.startswith("{")]
    assert any(e.get("event") == "archive_rejected_failed" for e in logged)
    os.unlink(packs)
    packs.mkdir()
    token = uuid.uuid4().hex
    assert _send(port, token)[0] == 550  # the client's retry, once the archive is back
    assert _shown(cfg, token) is not None
    assert _shown(cfg, lost) is None


def test_rejected_message_is_not_archived_when_switched_off(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    cfg, port = _gateway(tmp_path, procs, extra="archive:\n  rejected: false\n")
    token = uuid.uuid4().hex
    assert _send(port, token)[0] == 550
    assert _shown(cfg, token) is None
