"""Archive benchmark (issue 3, Performance): ingest, index, disk use and search latency.

    .venv/bin/python bench/archive.py [--messages 100000] [--engines fts5,whoosh,pg]
                                      [--database URL] [--sustain-seconds 20] [--rate 300]

The .eml files of the MIME corpus (../shared/corpus/mime, or $COFFER_CORPUS/mime)
are repeated until N messages; each copy gets its own ``X-Bench-Copy`` header
line, so every message is distinct (no single-instance savings).  One run:

1. **ingest** in batches of 500, as the archive stage does: ``Archive.put_many``
   (zstd + AES-256-GCM blobs, fsynced, one ledger entry each) is timed as
   *store*; parsing plus ``Metadata.add_messages`` as *metadata*; both as *ingest*.
2. **index** every engine from the store (decrypt, extract, add), timed per engine.
   Done at 10,000 messages and again at N.
3. **search**: a fixed set of officer queries (addresses, subject and body words,
   a phrase, attachments, dates, sizes, boolean), each run 5 times at 10k and at
   N: latency p50/p95 of the query alone (first page of 50, no snippets) and of
   the page as ``coffer search`` shows it (with snippets, which decrypts 50 messages).
4. **sustained**: messages arrive at ``--rate`` per second for
   ``--sustain-seconds`` while the indexer (default engine) runs in its own process; the
   index lag (age of the oldest unindexed message) is sampled every 0.5 s.
5. **disk**: store, ledger, index and database, by file size and by allocated
   blocks, per message and against the raw size.

Prints one JSON line.  Everything lives in a temporary directory, removed at the end
(``--keep DIR`` keeps it).  Figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from archive.extract import extract  # noqa: E402
from archive.facade import Archive  # noqa: E402
from archive.index import Index, Indexer, open_index  # noqa: E402
from archive.metadata import MessageRecord, Metadata  # noqa: E402
from archive.search import Searcher  # noqa: E402

BATCH = 500
TARGETS = {"store_msgs_per_s": 1000, "index_msgs_per_s": 300, "search_p95_ms": 200,
           "store_ratio": 0.60}


def corpus_messages() -> list[bytes]:
    root = os.environ.get("COFFER_CORPUS")
    base = Path(root) if root else REPO.parent / "shared" / "corpus"
    mime = base / "mime"
    if not mime.is_dir():
        sys.exit(f"bench/archive.py: MIME corpus not found at {mime} (set COFFER_CORPUS)")
    return [p.read_bytes() for p in sorted(mime.rglob("*.eml"))]


def copies(corpus: list[bytes], start: int, n: int) -> Iterator[bytes]:
    """Messages start..start+n-1: corpus message i % len, with its copy number prepended
    as a header field so every message (and its SHA-256) is distinct."""
    for i in range(start, start + n):
        raw = corpus[i % len(corpus)]
        nl = b"\r\n" if b"\r\n" in raw[:2000] else b"\n"
        yield b"X-Bench-Copy: %d" % i + nl + raw


def officer_queries(corpus: list[bytes]) -> list[str]:
    """A fixed set of queries built from the corpus itself (so each finds something)."""
    senders: Counter[str] = Counter()
    subj: Counter[str] = Counter()
    body: Counter[str] = Counter()
    for raw in corpus:
        ex = extract(raw)
        if ex.from_address and "@" in ex.from_address and " " not in ex.from_address:
            senders[ex.from_address] += 1
        subj.update(w.lower() for w in ex.subject.split() if w.isalpha() and len(w) > 4)
        body.update(w.lower() for w in ex.body.split() if w.isalpha() and len(w) > 6)
    sender = senders.most_common(1)[0][0]
    s1, s2 = [w for w, _ in subj.most_common(2)]
    b1, b2, b3 = [w for w, _ in body.most_common(30)][5:8]
    domain = sender.split("@", 1)[1]
    return [
        f"from:{sender}",
        f"participant:@{domain}",
        f"subject:{s1}",
        f"body:{b1}",
        f'"{b2} {b3}"',
        f"subject:{s2} OR body:{b3}",
        f"body:{b1} AND NOT subject:{s1}",
        "has:attachment",
        "filename:pdf OR filename:txt",
        "date:2000..2010",
        "size:>50k",
        f"from:{sender} date:2000..2030 body:{b2}",
    ]


def index_worker(root: str, database: str | None, engine: str,
                 stop: Any) -> None:
    """The indexer process of the sustained phase: index whatever waits, until told."""
    archive = Archive.open(Path(root), create=False)
    meta = Metadata(database) if database else Metadata.for_data_dir(root)
    index = open_index(engine, data_dir=Path(root), meta=meta)
    try:
        indexer = Indexer(meta, index, archive.get)
        while not stop.is_set():
            if indexer.run_once(BATCH) == 0:
                time.sleep(0.05)
    finally:
        index.close()
        archive.close()
        meta.close()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Bench:
    def __init__(self, root: Path, database: str | None, engines: list[str]) -> None:
        self.root = root
        self.archive = Archive.open(root)
        self.meta = Metadata(database) if database else Metadata.for_data_dir(root)
        self.meta.migrate()
        self.indexes: dict[str, Index] = {
            e: open_index(e, data_dir=root, meta=self.meta) for e in engines}
        self.done: dict[str, int] = dict.fromkeys(engines, 0)  # last blob id indexed
        self.count = 0
        self.raw_bytes = 0
        self.t_store = 0.0
        self.t_meta = 0.0

    def close(self) -> None:
        for idx in self.indexes.values():
            idx.close()
        self.archive.close()
        self.meta.close()

    def ingest(self, corpus: list[bytes], n: int) -> None:
        msgs = list(copies(corpus, self.count, n))
        for i in range(0, n, BATCH):
            self.ingest_batch(msgs[i:i + BATCH])

    def ingest_batch(self, batch: list[bytes]) -> None:
        t0 = time.perf_counter()
        refs = self.archive.put_many(batch, [{"bench": True}] * len(batch))
        t1 = time.perf_counter()
        now = datetime.now(UTC)
        recs = [MessageRecord(r.sha256, extract(raw), now, rcpt_to=["officer@bench.example"])
                for r, raw in zip(refs, batch, strict=True)]
        self.meta.add_messages(recs)
        t2 = time.perf_counter()
        self.t_store += t1 - t0
        self.t_meta += t2 - t1
        self.count += len(batch)
        self.raw_bytes += sum(map(len, batch))

    def index(self, engine: str) -> tuple[int, float]:
        """Index every blob not yet in ``engine``; (documents, seconds)."""
        idx = self.indexes[engine]
        indexer = Indexer(self.meta, idx, self.archive.get)
        t0 = time.perf_counter()
        n = 0
        chunk: list[tuple[int, str]] = []
        for item in self.meta.all_blobs():
            if item[0] <= self.done[engine]:
                continue
            chunk.append(item)
            if len(chunk) >= BATCH:
                n += self._index_chunk(engine, indexer, chunk)
                chunk = []
        if chunk:
            n += self._index_chunk(engine, indexer, chunk)
        return n, time.perf_counter() - t0

    def _index_chunk(self, engine: str, indexer: Indexer, chunk: list[tuple[int, str]]) -> int:
        indexer.index.add(indexer.docs(chunk))
        self.done[engine] = chunk[-1][0]
        if engine == next(iter(self.indexes)):
            self.meta.mark_indexed([b for b, _ in chunk], datetime.now(UTC))
        return len(chunk)

    def search(self, engine: str, queries: list[str], runs: int = 5) -> dict[str, Any]:
        searcher = Searcher(self.meta, self.indexes[engine], self.archive.get)
        bare: list[float] = []
        shown: list[float] = []
        hits: dict[str, int] = {}
        per_query: dict[str, list[float]] = {q: [] for q in queries}
        for q in queries:  # warm-up: the first query pays for cold caches
            hits[q] = searcher.search(q, limit=50, snippets=False).total
        for _ in range(runs):
            for q in queries:
                t0 = time.perf_counter()
                searcher.search(q, limit=50, snippets=False)
                t1 = time.perf_counter()
                searcher.search(q, limit=50, snippets=True)
                t2 = time.perf_counter()
                bare.append((t1 - t0) * 1000)
                per_query[q].append((t1 - t0) * 1000)
                shown.append((t2 - t1) * 1000)
        return {"p50_ms": round(statistics.median(bare), 1), "p95_ms": round(pct(bare, 95), 1),
                "with_snippets_p50_ms": round(statistics.median(shown), 1),
                "with_snippets_p95_ms": round(pct(shown, 95), 1),
                "slowest_query": max(queries, key=lambda q: statistics.median(per_query[q])),
                "hits": hits}

    def sustained(self, corpus: list[bytes], rate: float, seconds: float,
                  database: str | None) -> dict[str, Any]:
        """Ingest at ``rate`` msg/s while the default engine's indexer runs in its own
        process (off the ingest path, as in the gateway; a thread would share the GIL)."""
        engine = next(iter(self.indexes))
        ctx = multiprocessing.get_context("spawn")
        stop_indexer = ctx.Event()
        child = ctx.Process(target=index_worker,
                            args=(str(self.root), database, engine, stop_indexer))
        child.start()
        stop = threading.Event()
        lags: list[float] = []

        def sample_loop() -> None:
            while not stop.is_set():
                lags.append(self.meta.index_lag(datetime.now(UTC)))
                time.sleep(0.5)

        threads = [threading.Thread(target=sample_loop)]
        for t in threads:
            t.start()
        start = time.perf_counter()
        sent = 0
        per_tick = max(1, int(rate / 10))  # ten batches a second
        try:
            while time.perf_counter() - start < seconds:
                self.ingest_batch(list(copies(corpus, self.count, per_tick)))
                sent += per_tick
                ahead = sent / rate - (time.perf_counter() - start)
                if ahead > 0:
                    time.sleep(ahead)
            achieved = sent / (time.perf_counter() - start)
            drain0 = time.perf_counter()
            while self.meta.index_lag(datetime.now(UTC)) > 0:
                time.sleep(0.1)
            drain = time.perf_counter() - drain0
        finally:
            stop.set()
            stop_indexer.set()
            for t in threads:
                t.join()
            child.join()
        self.done[engine] = self.meta.approx_blobs()
        return {"rate_target": rate, "rate_achieved": round(achieved, 1), "messages": sent,
                "index_lag_p50_s": round(statistics.median(lags), 2) if lags else 0.0,
                "index_lag_max_s": round(max(lags), 2) if lags else 0.0,
                "drain_after_s": round(drain, 2)}

    def disk(self) -> dict[str, Any]:
        def usage(path: Path) -> tuple[int, int]:
            size = blocks = 0
            paths = [path] if path.is_file() else list(path.rglob("*")) if path.exists() else []
            for p in paths:
                if p.is_file():
                    st = p.stat()
                    size += st.st_size
                    blocks += st.st_blocks * 512
            return size, blocks

        arc = self.root / "archive"
        parts = {"store": usage(arc / "store"), "ledger": usage(arc / "ledger"),
                 "index": usage(arc / "index"),
                 "database": tuple(map(sum, zip(*(usage(p) for p in arc.glob("meta.db*")),
                                               strict=False))) or (0, 0)}
        n = max(self.count, 1)
        out: dict[str, Any] = {"raw_bytes_per_msg": round(self.raw_bytes / n)}
        for name, (size, blocks) in parts.items():
            out[f"{name}_bytes_per_msg"] = round(size / n)
            out[f"{name}_alloc_per_msg"] = round(blocks / n)
        out["store_ratio"] = round(parts["store"][0] / max(self.raw_bytes, 1), 3)
        out["store_alloc_ratio"] = round(parts["store"][1] / max(self.raw_bytes, 1), 3)
        out["index_ratio"] = round(parts["index"][0] / max(self.raw_bytes, 1), 3)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--engines", default="fts5",
                    help="comma-separated: fts5, whoosh, pg (pg needs --database postgresql://)")
    ap.add_argument("--database", metavar="URL", help="metadata database (default SQLite)")
    ap.add_argument("--sustain-seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=300.0, help="sustained arrival rate, msg/s")
    ap.add_argument("--keep", metavar="DIR", help="build the archive here and keep it")
    args = ap.parse_args()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    corpus = corpus_messages()
    queries = officer_queries(corpus)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="coffer-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    load_start = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    bench = Bench(root, args.database, engines)
    result: dict[str, Any] = {
        "bench": "archive", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "loadavg_at_start": load_start, "messages": args.messages,
        "corpus_messages": len(corpus), "engines": engines, "queries": queries,
        "database": bench.meta.dialect,
    }
    try:
        checkpoints = sorted({min(10_000, args.messages), args.messages})
        index_time = dict.fromkeys(engines, 0.0)
        for size in checkpoints:
            bench.ingest(corpus, size - bench.count)
            for engine in engines:
                _, secs = bench.index(engine)
                index_time[engine] += secs
            result[f"search_at_{size}"] = {e: bench.search(e, queries) for e in engines}
        n = bench.count
        result["store_msgs_per_s"] = round(n / bench.t_store, 1)
        result["metadata_msgs_per_s"] = round(n / bench.t_meta, 1)
        result["ingest_msgs_per_s"] = round(n / (bench.t_store + bench.t_meta), 1)
        result["index_msgs_per_s"] = {e: round(n / t, 1) for e, t in index_time.items()}
        result["disk"] = bench.disk()
        if args.sustain_seconds > 0:
            result["sustained"] = bench.sustained(corpus, args.rate, args.sustain_seconds,
                                                 args.database)
        result["index_lag_s"] = result.get("sustained", {}).get("index_lag_max_s")
        at_n = result[f"search_at_{args.messages}"][engines[0]]
        result["targets"] = {
            "store_msgs_per_s": result["store_msgs_per_s"] >= TARGETS["store_msgs_per_s"],
            "index_msgs_per_s": result["index_msgs_per_s"][engines[0]]
            >= TARGETS["index_msgs_per_s"],
            "search_p95_ms": at_n["p95_ms"] < TARGETS["search_p95_ms"],
            "store_ratio": result["disk"]["store_ratio"] <= TARGETS["store_ratio"],
        }
        result["wall_s"] = round(time.perf_counter() - started, 1)
        result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
