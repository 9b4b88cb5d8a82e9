"""Helpers for the service tests: `coffer serve` and a next-hop sink, each its own process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopback_ports import stable_ports

SINK = Path(__file__).with_name("sink.py")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port for a server this test may stop and start again on it (outside
    the ephemeral range, where client connections could take it meanwhile)."""
    return stable_ports(1)[0]


def wait_for(pred: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Sink:
    port: int
    out: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None

    def start(self) -> Sink:
        self.proc = subprocess.Popen(
            [sys.executable, str(SINK), str(self.port), str(self.out), *self.args],
            stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.proc = None

    def records(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]


@dataclass
class Gateway:
    """`coffer serve --config FILE` in a subprocess, its log in a file."""

    config: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self, wait: bool = True) -> Gateway:
        self._log_fh = open(self.log, "ab")  # noqa: SIM115 - closed in wait_exit
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
            stdout=self._log_fh, stderr=self._log_fh, cwd=REPO,
            env={**os.environ, **self.env},
            start_new_session=True,  # its own process group: kill9() takes the workers too
        )
        if wait:
            wait_for(lambda: self.alive() and port_open(self.port), what="coffer serve to listen")
        return self

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"coffer serve exited:\n{self.log.read_text()[-3000:]}")
        return True

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout)
        self.proc = None
        self._log_fh.close()
        return rc

    def kill9(self) -> None:
        """SIGKILL the gateway and every worker process it forked: a crash."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait_exit()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and (name is None or obj.get("event") == name):
                    out.append(obj)
        return out

    def wait_event(self, name: str, count: int = 1, timeout: float = 15.0) -> dict[str, Any]:
        wait_for(lambda: self.alive() and len(self.events(name)) >= count, timeout,
                 what=f"log event {name!r} #{count}")
        return self.events(name)[count - 1]


def write_config(
    path: Path, *, port: int, routes: dict[str, str], local_domains: list[str],
    trusted: list[str] | None = None, metrics_port: int | None = None, workers: int = 1,
    extra: str = "",
) -> Path:
    """A test configuration: plain-text SMTP (no TLS), fast retries, no fsync shortcuts."""
    metrics = f'"127.0.0.1:{metrics_port}"' if metrics_port else "null"
    routes_yaml = "".join(f'    "{k}": "{v}"\n' for k, v in routes.items())
    path.write_text(
        "hostname: gw.test\n"
        'data_dir: "."\n'
        "relay:\n"
        f"  local_domains: {json.dumps(local_domains)}\n"
        f"  trusted_networks: {json.dumps(trusted or [])}\n"
        "listeners:\n"
        f'  - {{name: inbound, role: inbound, address: "127.0.0.1:{port}", tls: none}}\n'
        "queue:\n"
        f"  workers: {workers}\n"
        "  retry_initial: 1s\n  retry_max: 2s\n  retry_jitter: 0\n  scan_interval: 0.5s\n"
        "  min_free_space: 0\n"
        "delivery:\n"
        "  connect_timeout: 2s\n  command_timeout: 10s\n"
        "  routes:\n" + routes_yaml +
        # Loopback only: no lookup may leave the machine; the check stage is exercised
        # with its own loopback DNS server in test_pipeline_wiring.
        'dns:\n  nameservers: ["127.0.0.1:9"]\n  timeout: 1s\n'
        "check:\n  checks: []\n"
        f"metrics:\n  address: {metrics}\n"
        "log:\n  level: INFO\n  format: json\n" + extra
        # IMAP is on by default on the fixed port 1143: off here unless a test configures it.
        + ("" if "imap:" in extra else "imap:\n  enabled: false\n")
    )
    return path


def start_relay(
    tmp_path: Path, procs: list[Gateway | Sink], *, policy: str | None = None,
    extra: str = "", configure: Callable[[Path], None] | None = None,
) -> tuple[Path, Gateway]:
    """A next-hop sink and `coffer serve` relaying everything from loopback to it.

    ``policy``: the text of a policy file to use; ``configure``: edits the written
    configuration file before the gateway starts.  Both end up in ``procs``.
    """
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    if policy is not None:
        (tmp_path / "policy.yaml").write_text(policy)
        extra = 'policy: "policy.yaml"\n' + extra
    port = free_port()
    cfg = write_config(
        tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
        routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"}, trusted=["127.0.0.1/32"],
        extra=extra,
    )
    if configure is not None:
        configure(cfg)
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    return cfg, gw
