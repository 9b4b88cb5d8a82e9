"""Sender-authentication benchmark (issue 4): prints one JSON line.

    .venv/bin/python bench/auth.py [--corpus DIR] [--messages N]

Against a DNS server on loopback (dnslib, from tests/check/authdns.py) serving
SPF, DKIM (RSA 2048 and Ed25519) and DMARC records for the sending domain:

* ``cold_median_ms`` / ``cold_p95_ms``: time the check stage adds to one message
  (SPF + two DKIM signatures + ARC + DMARC, Authentication-Results), every
  lookup going to the DNS server (no cache);
* ``warm_median_ms`` / ``warm_p95_ms``: the same with a warm TTL cache;
* ``warm_concurrent_msgs_per_s``: 32 messages checked at a time on one event loop
  (the checks run in worker threads), warm cache;
* ``cli_msgs_per_s``: ``coffer auth check --json`` over every file of the MIME
  corpus, in-process (interpreter start-up excluded), and
  ``cli_startup_ms``: one real ``python -m gateway auth check`` process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "check"))

from authdns import DnsTestServer, Zone  # noqa: E402

from gateway.check.dns import Resolver, TtlCache  # noqa: E402
from gateway.check.stage import CheckStage  # noqa: E402
from gateway.cli import main as coffer_main  # noqa: E402
from gateway.envelope import Envelope  # noqa: E402
from gateway.pipeline import MessageContext  # noqa: E402
from gateway.transform.dkim_sign import generate_key, public_record, sign  # noqa: E402

BODY = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: figures\r\n"
        b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <b1@example.com>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        + b"Quarterly figures are attached, please review.\r\n" * 60)


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def _corpus(arg: str | None) -> Path | None:
    path = Path(arg or os.environ.get("COFFER_CORPUS") or REPO.parent / "shared" / "corpus")
    return path if path.is_dir() else None


async def _stage_times(stage_for: object, message: bytes, n: int) -> list[float]:
    times = []
    for _ in range(n):
        stage = stage_for()  # type: ignore[operator]
        ctx = MessageContext(Envelope("alice@example.com", ["bob@example.org"],
                                      client_ip="192.0.2.10", helo="mx.example.com"), message)
        t0 = time.perf_counter()
        await stage.run(ctx)
        times.append((time.perf_counter() - t0) * 1000)
    return times


async def _concurrent(stage: CheckStage, message: bytes, n: int, width: int) -> float:
    sem = asyncio.Semaphore(width)

    async def one() -> None:
        async with sem:
            await stage.run(MessageContext(Envelope(
                "alice@example.com", ["bob@example.org"], client_ip="192.0.2.10",
                helo="mx.example.com"), message))

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t0)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", help="corpus directory (default: ../shared/corpus)")
    ap.add_argument("--messages", type=int, default=200, help="messages per measurement")
    args = ap.parse_args(argv)

    rsa, ed = generate_key("rsa-sha256"), generate_key("ed25519-sha256")
    zone = Zone()
    # the client matches only after the include: two SPF lookups
    zone.txt("example.com", "v=spf1 include:_spf.example.net ip4:192.0.2.0/24 -all")
    zone.txt("_spf.example.net", "v=spf1 ip4:198.51.100.0/24 -all")
    zone.txt("r1._domainkey.example.com", public_record(rsa))
    zone.txt("e1._domainkey.example.com", public_record(ed))
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    message = sign(sign(BODY, "example.com", "r1", rsa), "example.com", "e1", ed)
    server = DnsTestServer(zone).start()
    out: dict[str, object] = {"bench": "auth", "messages": args.messages}
    try:
        ns = [server.hostport]
        cache = TtlCache()
        pool = ThreadPoolExecutor(32)  # as CheckStage.from_config does (check.threads)
        warm_stage = CheckStage(Resolver(ns, 2.0, cache, pool), authserv_id="bench.test")

        async def run() -> None:
            before = len(zone.queries)
            cold = await _stage_times(
                lambda: CheckStage(Resolver(ns, 2.0, None), authserv_id="bench.test"),
                message, args.messages)
            cold_queries = len(zone.queries) - before
            await _stage_times(lambda: warm_stage, message, 5)  # fill the cache
            warm = await _stage_times(lambda: warm_stage, message, args.messages)
            out.update(
                cold_median_ms=round(statistics.median(cold), 2),
                cold_p95_ms=round(_pct(cold, 0.95), 2),
                warm_median_ms=round(statistics.median(warm), 2),
                warm_p95_ms=round(_pct(warm, 0.95), 2),
                dns_queries_per_cold_message=round(cold_queries / args.messages, 1),
                warm_concurrent_msgs_per_s=round(
                    await _concurrent(warm_stage, message, args.messages, 32), 1),
            )

        asyncio.run(run())
        pool.shutdown()

        corpus = _corpus(args.corpus)
        if corpus is not None:
            files = sorted(p for p in (corpus / "mime").rglob("*") if p.is_file())
            t0 = time.perf_counter()
            ok = 0
            for f in files:
                with contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    rc = coffer_main(["auth", "check", str(f), "--ip", "192.0.2.10",
                                      "--mail-from", "alice@example.com", "--dns",
                                      server.hostport, "--dns-timeout", "1", "--json"])
                ok += rc == 0
            elapsed = time.perf_counter() - t0
            out.update(cli_files=len(files), cli_ok=ok,
                       cli_msgs_per_s=round(len(files) / elapsed, 1))
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "m.eml"
            path.write_bytes(message)
            starts = []
            for _ in range(3):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "gateway", "auth", "check", str(path),
                                "--ip", "192.0.2.10", "--mail-from", "alice@example.com",
                                "--dns", server.hostport, "--json"], cwd=d, check=True,
                               capture_output=True)
                starts.append((time.perf_counter() - t0) * 1000)
            out["cli_startup_ms"] = round(statistics.median(starts), 1)
    finally:
        server.stop()
    out["cpus"] = os.cpu_count()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
