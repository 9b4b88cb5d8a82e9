"""The service's pure pieces: what a reload may change live, restarts, the pid file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway import config
from gateway.service import (
    AlreadyRunning,
    PidFile,
    Supervisor,
    effective_reload,
    restart_required,
)

BASE = (
    "relay:\n  local_domains: [one.test]\n"
    "listeners:\n  - {name: in, address: '127.0.0.1:2525', tls: none}\n"
    "queue:\n  workers: 2\n"
)


def _cfg(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "coffer.yaml"
    p.write_text(text)
    return config.load(p)


def test_relay_domains_apply_live_but_listeners_and_workers_need_a_restart(
    tmp_path: Path,
) -> None:
    old = _cfg(tmp_path, BASE)
    new = _cfg(tmp_path, BASE.replace("[one.test]", "[one.test, two.test]")
               .replace("2525", "2526").replace("workers: 2", "workers: 4"))
    assert restart_required(old, new) == ["listeners", "queue.workers"]
    live = effective_reload(old, new)
    assert live.relay.local_domains == ["one.test", "two.test"]
    assert live.listeners[0].address == "127.0.0.1:2525"  # kept until a restart
    assert live.queue.workers == 2
    assert restart_required(old, live) == []


def test_tls_reporting_settings_need_a_restart(tmp_path: Path) -> None:
    old = _cfg(tmp_path, BASE)
    new = _cfg(tmp_path, BASE + "delivery:\n  tls_rpt:\n    enabled: true\n"
               "  mta_sts: false\n")
    assert restart_required(old, new) == ["delivery.tls_rpt"]
    live = effective_reload(old, new)
    assert live.delivery.tls_rpt.enabled is False  # not counting until a restart
    assert live.delivery.mta_sts is False  # the rest of delivery applies live
    assert restart_required(old, live) == []


def test_the_archive_backend_needs_a_restart_but_its_timers_apply_live(
    tmp_path: Path,
) -> None:
    old = _cfg(tmp_path, BASE + "archive:\n  ledger_seal: 60s\n")
    new = _cfg(tmp_path, BASE + "archive:\n  database: postgresql://c@127.0.0.1/c\n"
               "  node: n2\n  ledger_seal: 5s\n")
    assert restart_required(old, new) == ["archive.database", "archive.node"]
    live = effective_reload(old, new)
    assert live.archive.database is None and live.archive.node is None  # until a restart
    assert live.archive.ledger_seal == 5.0
    assert restart_required(old, live) == []


def test_the_delivery_ca_file_needs_a_restart_but_mta_sts_applies_live(
    tmp_path: Path,
) -> None:
    (tmp_path / "ca.pem").write_text("not read by the loader\n")
    old = _cfg(tmp_path, BASE)
    new = _cfg(tmp_path, BASE + "delivery:\n  ca_file: ca.pem\n  mta_sts: false\n")
    assert restart_required(old, new) == ["delivery.ca_file"]
    live = effective_reload(old, new)
    assert live.delivery.ca_file is None  # until a restart
    assert live.delivery.mta_sts is False
    assert restart_required(old, live) == []


def test_a_failing_worker_is_restarted_with_growing_delays(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "coffer.yaml", _cfg(tmp_path, BASE), drain_timeout=1.0)
    sup.started_at[0] = time.monotonic()  # died at once
    delays = [sup._restart_delay(0) for _ in range(8)]
    assert delays[:3] == [1.0, 2.0, 4.0]
    assert max(delays) == Supervisor.MAX_RESTART_INTERVAL
    sup.started_at[0] = time.monotonic() - Supervisor.HEALTHY_AFTER  # ran a while
    assert sup._restart_delay(0) == 0.0
    sup.started_at[0] = time.monotonic()
    assert sup._restart_delay(0) == 1.0  # the backoff started over


def test_pid_file_refuses_a_second_holder_and_ignores_a_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "coffer.pid"
    # A pid file left behind by a process that died (kill -9): not locked, so stale.
    subprocess.run([sys.executable, "-c", f"open({str(path)!r}, 'w').write('999999\\n')"],
                   check=True)
    first = PidFile(path)
    first.acquire()
    try:
        assert path.read_text().strip().isdigit()
        with pytest.raises(AlreadyRunning, match="another coffer serve"):
            PidFile(path).acquire()
    finally:
        first.release()
    assert not path.exists()
