"""`coffer serve` carries out the policy's message actions before the queue.

A real gateway process and a real next-hop sink on loopback: a message that a
rule redirects reaches the review address (not the original recipient) with
its subject tagged, a bcc copy reaches the journal address, and a notice from
the null sender reaches the security address — all through the relay.
"""

from __future__ import annotations

import smtplib
import uuid
from pathlib import Path

from svcproc import Gateway, Sink, free_port, wait_for, write_config

POLICY = """\
version: 1
rules:
  - name: tag-external
    when: {direction: inbound}
    then: [{tag_subject: "[EXTERNAL]"}]
  - name: review-invoices
    when: {subject: {contains: invoice}}
    then:
      - redirect: review@gw.test
      - notify: {to: sec@gw.test, subject: "Invoice sent to review"}
  - name: journal
    then: [{bcc: journal@gw.test}]
"""


def test_redirect_bcc_tag_and_notify_reach_the_next_hop(
    tmp_path: Path, procs: list[Gateway | Sink]
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
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())

    token = uuid.uuid4().hex
    data = (f"From: alice@outside.test\r\nTo: user@gw.test\r\nSubject: invoice {token}\r\n"
            f"Message-ID: <{token}@outside.test>\r\nX-Token: {token}\r\n\r\n"
            "secret body text\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        smtp.sendmail("alice@outside.test", ["user@gw.test"], data)

    def done() -> bool:
        rcpts = {r["rcpt"] for r in sink.records()}
        return {"review@gw.test", "journal@gw.test", "sec@gw.test"} <= rcpts

    wait_for(done, what="redirected copy, journal copy and notice")
    records = sink.records()
    copies = {r["rcpt"]: r for r in records if r["token"] == token}
    assert set(copies) == {"review@gw.test", "journal@gw.test"}  # not user@gw.test
    assert all(r["subject"] == f"[EXTERNAL] invoice {token}" for r in copies.values())
    assert all(r["mail_from"] == "alice@outside.test" for r in copies.values())
    [notice] = [r for r in records if r["rcpt"] == "sec@gw.test"]
    # aiosmtpd records the null reverse-path (RFC 5321 §4.5.5) as "<>".
    assert notice["mail_from"] == "<>" and notice["subject"] == "Invoice sent to review"
