"""`coffer serve` with relay.recipients.file: SIGHUP re-reads the list; a bad one is refused."""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

from svcproc import Gateway, Sink, free_port, write_config


def _rcpt(port: int, addr: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("alice@src.test")
        return smtp.rcpt(addr)


def test_sighup_rereads_the_recipient_list_and_a_bad_one_keeps_the_old(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    listed = tmp_path / "recipients.txt"
    listed.write_text("bob@gw.test\n")
    port = free_port()
    cfg = write_config(tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
                       routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"})
    cfg.write_text(cfg.read_text().replace(
        "  trusted_networks: []\n",
        "  trusted_networks: []\n  recipients:\n    file: recipients.txt\n"))
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())

    assert _rcpt(port, "bob@gw.test")[0] == 250
    assert _rcpt(port, "carol@gw.test") == (
        550, b"5.1.1 <carol@gw.test>: Recipient address rejected: user unknown")

    listed.write_text("bob@gw.test\ncarol@gw.test\ncarol at gw.test\n")
    gw.signal(signal.SIGHUP)
    failed = gw.wait_event("config_reload_failed")
    assert (failed["file"], failed["line"]) == (str(listed), 3)
    assert _rcpt(port, "carol@gw.test")[0] == 550  # the running list stays

    listed.write_text("bob@gw.test\ncarol@gw.test\n")
    gw.signal(signal.SIGHUP)
    gw.wait_event("config_reloaded")
    assert _rcpt(port, "carol@gw.test")[0] == 250
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0
