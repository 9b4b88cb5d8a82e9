"""A cluster-wide job runs on one process at a time, and moves on when its holder dies:
two real processes on one PostgreSQL database (advisory lock) or one data directory (flock)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import PG_URL

from archive.joblock import JobLock
from archive.metadata import Metadata

REPO = Path(__file__).resolve().parents[2]

# A process that takes the job lock and runs the job: ``hold`` keeps it until stdin
# closes; ``count`` takes it N times, each time a read-modify-write of a counter file
# that two holders at once would corrupt (a lost update).
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from archive.joblock import JobLock
    from archive.metadata import Metadata

    mode, url, data_dir, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    meta = Metadata(url)
    lock = JobLock("index", meta, data_dir)
    if mode == "hold":
        with lock.attempt() as mine:
            print("held" if mine else "busy", flush=True)
            sys.stdin.read()
    else:
        counter, runs = data_dir / "counter", 0
        for _ in range(n):
            with lock.attempt() as mine:
                if mine:
                    value = int(counter.read_text())
                    time.sleep(0.002)  # widen the window a second holder would need
                    counter.write_text(str(value + 1))
                    runs += 1
        print(runs, flush=True)
""")


@pytest.fixture
def url(meta: Metadata, tmp_path: Path) -> Iterator[str]:
    """The test's database as a URL another process can open (its own schema on PG)."""
    if meta.dialect == "postgresql":
        yield f"{PG_URL}?options={quote(f'-csearch_path={meta.schema}')}"
    else:
        yield f"sqlite:///{tmp_path / 'archive' / 'meta.db'}"


def child(mode: str, url: str, data_dir: Path, n: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, url, str(data_dir), str(n)],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_a_second_process_is_refused_until_the_holder_is_killed(
        meta: Metadata, url: str, tmp_path: Path) -> None:
    holder = child("hold", url, tmp_path)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    lock = JobLock("index", meta, tmp_path)
    with lock.attempt() as mine:
        assert not mine
    with JobLock("retention-expire", meta, tmp_path).attempt() as other_job:
        assert other_job  # each job has its own lock
    holder.kill()  # kill -9: no unlock, the connection or the file just closes
    holder.communicate(timeout=10)  # reaps it and closes its pipes
    with lock.attempt() as mine:
        assert mine


def test_two_processes_never_run_the_job_at_the_same_time(
        meta: Metadata, url: str, tmp_path: Path) -> None:
    (tmp_path / "counter").write_text("0")
    procs = [child("count", url, tmp_path, 60) for _ in range(2)]
    runs = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        runs.append(int(out))
    assert min(runs) >= 0 and sum(runs) > 0
    assert int((tmp_path / "counter").read_text()) == sum(runs)  # no lost update
