"""Rate-limit counter benchmark: prints one JSON line.

    .venv/bin/python bench/ratelimit.py [--takes N] [--keys K]

What a submission pays per MAIL FROM (and per RCPT TO) for the default rule: one
charge of DATA_DIR/ratelimit.db (``BEGIN IMMEDIATE``, one SELECT, one upsert, COMMIT
in WAL mode) through :class:`gateway.receive.rate_limits.RateLimiter`, on a
temporary file (``TMPDIR`` chooses its file system).

* ``take_median_us`` / ``take_p99_us``: one process, ``--keys`` users in turn;
* ``two_process_takes_per_s``: two processes charging the same file at once (the
  lock they share is the file's), total charges per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.config import RateLimitRule  # noqa: E402
from gateway.receive.rate_limits import Client, RateLimiter, RateRules  # noqa: E402
from gateway.receive.rate_store import RateStore  # noqa: E402

RULE = RateLimitRule(key="auth_user", messages="1000000000/1h", recipients="2000/1h",
                     roles=["submission"])
_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[3])
from gateway.receive.rate_limits import Charge
from gateway.receive.rate_store import RateStore
store = RateStore(__import__("pathlib").Path(sys.argv[1]))
n = int(sys.argv[2])
sys.stdin.readline()
t = time.perf_counter()
for i in range(n):
    store.take(time.time(), [Charge("u", "messages", "auth_user", f"u{i % 50}", 10**9, 3600.0)])
print(time.perf_counter() - t)
"""


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def one_process(db: Path, takes: int, keys: int) -> list[float]:
    limiter = RateLimiter(RateRules([RULE]), RateStore(db), time.time)
    clients = [Client("submission", "submission", "192.0.2.1", f"user{i}@example.com", False)
               for i in range(keys)]
    times = []
    for i in range(takes):
        t = time.perf_counter()
        refused = limiter.check(clients[i % keys], "messages", "x@example.com")
        times.append(time.perf_counter() - t)
        assert refused is None
    return times


def two_processes(db: Path, takes: int) -> float:
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(db), str(takes), str(REPO)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    seconds = [float(p.communicate("go\n", timeout=300)[0]) for p in procs]
    return 2 * takes / max(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--takes", type=int, default=20000)
    parser.add_argument("--keys", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        times = one_process(Path(d) / "one.db", args.takes, args.keys)
        rate2 = two_processes(Path(d) / "two.db", args.takes // 2)
    print(json.dumps({
        "bench": "ratelimit",
        "takes": args.takes,
        "keys": args.keys,
        "take_median_us": round(statistics.median(times) * 1e6, 1),
        "take_p99_us": round(_pct(times, 0.99) * 1e6, 1),
        "two_process_takes_per_s": round(rate2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
