"""`coffer serve` runs check and decide before the queue: verdicts and policy are live.

A real DNS server on loopback publishes SPF and DMARC records; the gateway (a
real process) is pointed at it.  A sender whose domain publishes p=reject and
fails SPF gets the policy's 550 at DATA and nothing is queued; a passing sender
is delivered with our Authentication-Results header and the policy's header.
"""

from __future__ import annotations

import smtplib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from svcproc import Gateway, Sink, free_port, wait_for, write_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "check"))
from authdns import DnsTestServer, Zone

POLICY = """\
version: 1
rules:
  - name: reject-dmarc-reject
    when: {dmarc: {result: fail, disposition: reject}}
    then:
      - reject: {code: 550, enhanced: 5.7.1, text: "Rejected by sender's DMARC policy"}
  - name: mark-external
    when: {direction: inbound}
    then:
      - add_header: {name: X-Coffer-External, value: "yes"}
"""


@pytest.fixture
def dns() -> Iterator[DnsTestServer]:
    zone = Zone()
    zone.txt("good.test", "v=spf1 ip4:127.0.0.1 -all")
    zone.txt("_dmarc.good.test", "v=DMARC1; p=reject")
    zone.txt("bad.test", "v=spf1 ip4:192.0.2.1 -all")
    zone.txt("_dmarc.bad.test", "v=DMARC1; p=reject")
    server = DnsTestServer(zone).start()
    try:
        yield server
    finally:
        server.stop()


def _message(sender: str, token: str) -> bytes:
    return (f"From: {sender}\r\nTo: user@gw.test\r\nSubject: wiring {token}\r\n"
            f"Message-ID: <{token}@x>\r\nX-Token: {token}\r\n\r\nhello\r\n").encode()


def test_check_and_policy_run_before_the_queue(
    tmp_path: Path, procs: list[Gateway | Sink], dns: DnsTestServer
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    (tmp_path / "policy.yaml").write_text(POLICY)
    port = free_port()
    cfg = write_config(
        tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
        routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"},
        extra='policy: "policy.yaml"\n',
    )
    text = cfg.read_text().replace('"127.0.0.1:9"', f'"{dns.hostport}"').replace(
        "checks: []", "checks: [spf, dkim, dmarc]")
    cfg.write_text(text)
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())

    bad = uuid.uuid4().hex
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as info:
            smtp.sendmail("alice@bad.test", ["user@gw.test"], _message("alice@bad.test", bad))
        assert info.value.smtp_code == 550
        assert b"5.7.1" in info.value.smtp_error and b"DMARC" in info.value.smtp_error
        good = uuid.uuid4().hex
        smtp.sendmail("alice@good.test", ["user@gw.test"], _message("alice@good.test", good))

    wait_for(lambda: any(r["token"] == good for r in sink.records()), what="delivery")
    [rec] = [r for r in sink.records() if r["token"] == good]
    assert rec["auth_results"].startswith("gw.test;")
    assert "spf=pass" in rec["auth_results"] and "dmarc=pass" in rec["auth_results"]
    assert rec["external"] == "yes"
    assert not any(r["token"] == bad for r in sink.records())
