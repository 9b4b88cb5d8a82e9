"""`coffer serve` with two worker processes: one rate limit, not one per worker."""

from __future__ import annotations

import smtplib
from pathlib import Path

from svcproc import Gateway, Sink, free_port, write_config

RULES = ("rate_limits:\n"
         "  - {key: client_ip, messages: 5/1h, roles: [inbound]}\n")
CLIENTS = 16


def _send(s: smtplib.SMTP, i: int) -> int:
    s.ehlo()
    code, _ = s.mail("a@gw.test")
    if code != 250:
        return code
    s.rcpt("x@gw.test")
    code, _ = s.data(f"Subject: {i}\r\n\r\nhi\r\n".encode())
    return code


def test_two_workers_accept_no_more_than_one_limit_from_one_client(
    tmp_path: Path, procs: list[Gateway | Sink],
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
                       routes={"*": "maildir:mail"}, workers=2, extra=RULES)
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    gw.wait_event("started", count=2)
    # All connections first: SO_REUSEPORT spreads them over both workers (by the
    # client's port), so per-process counters would let about twice the limit through.
    clients = [smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
               for _ in range(CLIENTS)]
    try:
        codes = [_send(s, i) for i, s in enumerate(clients)]
    finally:
        for s in clients:
            s.close()
    assert codes.count(250) == 5, codes
    assert codes.count(450) == CLIENTS - 5, codes
    warnings = gw.events("rate_limit_exceeded")
    assert len(warnings) == 1 and warnings[0]["key"] == "127.0.0.1"  # once, by one worker
    gw.signal(15)
    assert gw.wait_exit() == 0
