"""`coffer serve` with two worker processes and relay.recipients.verify: the next hop is
asked once about an address, not once per worker, and not again after a restart."""

from __future__ import annotations

import signal
import smtplib
from pathlib import Path

from svcproc import Gateway, Sink, start_relay

CLIENTS = 12


def _rcpts(port: int, address: str) -> list[int]:
    # All connections first: SO_REUSEPORT spreads them over both workers (by the
    # client's port); then one RCPT on each, in turn, so each answer is stored first.
    clients = [smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
               for _ in range(CLIENTS)]
    try:
        codes = []
        for s in clients:
            s.ehlo()
            s.mail("a@src.test")
            codes.append(s.rcpt(address)[0])
        return codes
    finally:
        for s in clients:
            s.close()


def _two_workers_verifying(cfg: Path) -> None:
    text = cfg.read_text().replace("  workers: 1\n", "  workers: 2\n")
    cfg.write_text(text.replace('  local_domains: ["gw.test"]\n',
                                '  local_domains: ["gw.test"]\n  recipients: {verify: true}\n'))


def test_two_workers_and_a_restart_probe_an_address_once(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    _cfg, gw = start_relay(tmp_path, procs, configure=_two_workers_verifying)
    gw.wait_event("started", count=2)
    port = gw.port
    assert _rcpts(port, "alice@gw.test") == [250] * CLIENTS
    assert {e.get("worker") for e in gw.events("smtp_connect")} == {0, 1}
    assert len(gw.events("recipient_verified")) == 1

    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0
    procs.append(gw.start())
    gw.wait_event("started", count=4)
    assert _rcpts(port, "alice@gw.test") == [250] * CLIENTS
    assert len(gw.events("recipient_verified")) == 1
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0
