"""A changed policy file is picked up without a signal; a broken one is refused."""

from __future__ import annotations

import smtplib
import time
import uuid
from pathlib import Path

from svcproc import Gateway, Sink, free_port, wait_for, write_config

ACCEPT_ALL = "version: 1\nrules:\n  - name: keep\n    then:\n      - retain: 1y\n"
REJECT_SECRET = """\
version: 1
rules:
  - name: no-secrets
    when: {subject: {contains: secret}}
    then:
      - reject: {code: 550, enhanced: 5.7.1, text: "No secrets here"}
"""


def _send(port: int, subject: str) -> int:
    token = uuid.uuid4().hex
    msg = (f"From: a@src.test\r\nTo: b@remote.test\r\nSubject: {subject}\r\n"
           f"Message-ID: <{token}@x>\r\nX-Token: {token}\r\n\r\nhi\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        try:
            smtp.sendmail("a@src.test", ["b@remote.test"], msg)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code
    return 250


def _mtime_step(path: Path, text: str) -> None:
    # Some file systems keep coarse timestamps: make sure the change is visible.
    before = path.stat().st_mtime_ns
    path.write_text(text)
    if path.stat().st_mtime_ns == before:
        time.sleep(0.01)
        path.write_text(text)


def test_policy_file_change_applies_and_a_broken_file_keeps_the_running_policy(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    policy = tmp_path / "policy.yaml"
    policy.write_text(ACCEPT_ALL)
    port = free_port()
    cfg = write_config(
        tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
        routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"}, trusted=["127.0.0.1/32"],
        extra='policy: "policy.yaml"\n',
    )
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    assert _send(port, "the secret plan") == 250

    _mtime_step(policy, REJECT_SECRET)
    gw.wait_event("policy_reloaded", timeout=20)
    assert _send(port, "the secret plan") == 550
    assert _send(port, "lunch") == 250

    _mtime_step(policy, REJECT_SECRET + "  - name: broken\n    then: [explode]\n")
    failed = gw.wait_event("policy_reload_failed", timeout=20)
    assert failed["file"].endswith("policy.yaml") and failed["line"] is not None
    assert _send(port, "the secret plan") == 550  # the running policy stayed
    wait_for(lambda: len(sink.records()) == 2, what="the accepted messages to arrive")


def test_policy_holder_stamp_changes_with_the_file(tmp_path: Path) -> None:
    from gateway.config import Config
    from gateway.service import PolicyHolder

    policy = tmp_path / "policy.yaml"
    policy.write_text(ACCEPT_ALL)
    holder = PolicyHolder(Config(data_dir=tmp_path, policy=Path("policy.yaml"),
                                 listeners=[]))
    first = holder.stamp()
    _mtime_step(policy, REJECT_SECRET)
    assert holder.stamp() != first
