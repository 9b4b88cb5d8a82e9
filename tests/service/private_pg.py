"""A PostgreSQL server of the test's own, on a loopback port, that a test may stop and start.

The shared server on 127.0.0.1:5432 must never be stopped (other helpers use it),
so the outage tests run ``initdb`` + ``pg_ctl`` from the PostgreSQL server
binaries ($COFFER_PG_BIN, default /usr/lib/postgresql/15/bin) in a directory of
their own.  PostgreSQL refuses to run as root: as root the cluster belongs to the
``postgres`` user.  ``fsync=off``: the data is thrown away after the test, and a
stopped server is not a crashed kernel (the WAL it wrote stays).  synchronous_commit
stays on, so a commit that returned survives the immediate stop, as on a real server.

The fixture skips, saying why, only when the binaries (or the postgres user, as
root) are missing; a server that does not start is a failure with its log.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["PrivatePostgres", "private_pg"]

PG_BIN = Path(os.environ.get("COFFER_PG_BIN", "/usr/lib/postgresql/15/bin"))


@dataclass
class PrivatePostgres:
    root: Path
    port: int
    user: str | None  # run the server as this user (we are root), else as ourselves

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str, timeout: float = 60) -> None:
        res = subprocess.run([str(PG_BIN / cmd[0]), *cmd[1:]], user=self.user,
                             capture_output=True, text=True, timeout=timeout, check=False,
                             cwd=self.root)
        if res.returncode != 0:
            log = (self.root / "pg.log")
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise AssertionError(f"{cmd[0]} failed ({res.returncode}): {res.stderr}\n{tail}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync", "--no-instructions")

    def start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
                "-c fsync=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "pg.log"),
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        """Stop now: sessions are cut, as when the database host goes away."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} (set COFFER_PG_BIN)")
    user: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        user = "postgres"
    from svcproc import free_port

    # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="coffer-pg-"))
    if user is not None:
        shutil.chown(root, user, user)
    pg = PrivatePostgres(root, free_port(), user)
    pg.init()
    pg.start()
    try:
        yield pg
    finally:
        subprocess.run([str(PG_BIN / "pg_ctl"), "-D", str(pg.data), "-m", "immediate",
                        "stop"], user=user, capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)
