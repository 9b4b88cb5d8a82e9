"""`coffer serve` archives every message before delivering it, searchable and verifiable."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import uuid
from pathlib import Path

from svcproc import REPO, Gateway, Sink, free_port, wait_for, write_config

POLICY = """\
version: 1
rules:
  - name: keep-seven-years
    then:
      - retain: 7y
"""


def _coffer(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO,
                          capture_output=True, check=False, timeout=60)


def test_relayed_message_is_archived_searchable_byte_exact_and_verifiable(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    (tmp_path / "policy.yaml").write_text(POLICY)
    port = free_port()
    cfg = write_config(
        tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
        routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"}, trusted=["127.0.0.1/32"],
        extra='policy: "policy.yaml"\n',
    )
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())

    token = uuid.uuid4().hex
    body = (f"From: alice@src.test\r\nTo: bob@remote.test\r\nSubject: quarterly {token}\r\n"
            f"Message-ID: <{token}@src.test>\r\nX-Token: {token}\r\n\r\n"
            f"The zeppelin numbers for {token} are ready.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        # Bcc: carol is an envelope recipient named in no header.
        smtp.sendmail("alice@src.test", ["bob@remote.test", "carol@remote.test"], body)
    wait_for(lambda: len([r for r in sink.records() if r["token"] == token]) == 2,
             what="delivery")

    def found() -> list[dict[str, object]]:
        out = _coffer("search", "--config", str(cfg), "--json", f"body:zeppelin subject:{token}")
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    wait_for(lambda: len(found()) == 1, what="the message to be indexed")
    [hit] = found()
    assert hit["message_id"] == f"{token}@src.test"  # stored without the angle brackets

    bcc = _coffer("search", "--config", str(cfg), "--json", "bcc:carol@remote.test")
    assert [json.loads(x)["id"] for x in bcc.stdout.splitlines()] == [hit["id"]]

    raw = _coffer("show", "--config", str(cfg), "--raw", str(hit["id"]))
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout.endswith(body)  # the received bytes, behind our trace headers
    trace = b"\r\n" + raw.stdout[: -len(body)]
    assert b"\r\nReceived: " in trace and b"\r\nX-Spam-Status: " in trace

    verify = _coffer("archive", "verify", "--config", str(cfg), "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
