"""`coffer serve` with TLS reporting on: every worker starts its report job and stops
cleanly, and mail still flows."""

from __future__ import annotations

import smtplib
from pathlib import Path

from svcproc import Gateway, Sink, free_port, wait_for, write_config


def test_two_workers_with_tls_reports_start_deliver_and_stop_cleanly(
    tmp_path: Path, procs: list[Gateway | Sink],
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
                       routes={"*": "maildir:mail"}, workers=2)
    cfg.write_text(cfg.read_text().replace(
        "delivery:\n", "delivery:\n  tls_rpt: {enabled: true, organization: GW Test}\n", 1))
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    gw.wait_event("started", count=2)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as s:
        s.sendmail("a@gw.test", ["x@gw.test"], b"Subject: hi\r\n\r\nhi\r\n")
    wait_for(lambda: any((tmp_path / "mail").rglob("new/*")), what="maildir delivery")
    gw.signal(15)
    assert gw.wait_exit() == 0
    assert gw.events("tlsrpt_error") == []
