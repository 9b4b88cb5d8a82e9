"""A delivery attempt in progress, for the operator commands' tests: another process
holding a queued message's claim (the flock a queue worker holds while it delivers)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator

from gateway.queue.spool import Spool

_CLAIMER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_APPEND)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a worker holds while it delivers
    print("claimed", flush=True)
    sys.stdin.readline()  # until the test lets go
""")


@contextlib.contextmanager
def claimed_by_another_process(spool: Spool, qid: str) -> Iterator[subprocess.Popen[str]]:
    """The claim is held until the block ends or the process is killed (a kill -9
    releases it too, as it does a worker's)."""
    proc = subprocess.Popen([sys.executable, "-c", _CLAIMER, str(spool.msg_path(qid))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "claimed\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()
