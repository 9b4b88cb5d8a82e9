"""eDiscovery export benchmark: ``coffer export`` of N archived messages, in messages/s.

    .venv/bin/python bench/export.py [--messages 10000] [--formats eml,mbox] [--json]

Builds an archive in a temporary directory the way the archive stage does
(Archive.put_many: zstd + AES-256-GCM blobs with their ledger entries; metadata
in SQLite), from the MIME corpus (../shared/corpus/mime, or $COFFER_CORPUS)
repeated to N messages, each made unique by a header.  Then times one complete
export of all of them (query ``size:>0``): decrypting each blob, writing
the EML files and the mbox, the manifest (JSON, CSV, DAT), the ledger excerpt,
signatures, the custody report (HTML and PDF) and SHA256SUMS; and then
``coffer export verify`` of the package.  Prints one JSON line (--json) or a table.
Target: export >= 500 messages/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archive.extract import extract
from archive.facade import Archive
from archive.index import open_index
from archive.metadata import MessageRecord, Metadata
from reports.export import ExportRequest, export
from reports.export_verify import verify_package


def corpus() -> list[bytes]:
    base = Path(os.environ.get("COFFER_CORPUS") or
                Path(__file__).resolve().parents[2] / "shared" / "corpus")
    files = sorted((base / "mime").rglob("*.eml"))
    if not files:
        sys.exit(f"bench/export.py: no MIME corpus under {base}/mime (set COFFER_CORPUS)")
    return [p.read_bytes() for p in files]


def build(data: Path, n: int) -> None:
    msgs = corpus()
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    archive = Archive.open(data)
    meta = Metadata.for_data_dir(data)
    meta.migrate()
    try:
        for start in range(0, n, 256):
            raws = [f"X-Bench: {i}\r\n".encode() + msgs[i % len(msgs)]
                    for i in range(start, min(n, start + 256))]
            refs = archive.put_many(raws, [{"qid": f"b{start + j}"} for j in range(len(raws))])
            meta.add_messages([
                MessageRecord(ref.sha256, extract(raw), t0 + timedelta(minutes=start + j),
                              rcpt_to=["user@example.com"], mail_from="sender@example.net")
                for j, (raw, ref) in enumerate(zip(raws, refs, strict=True))])
    finally:
        meta.close()
        archive.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--formats", default="eml,mbox")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="coffer-bench-export-") as tmp:
        data = Path(tmp) / "data"
        t = time.perf_counter()
        build(data, args.messages)
        build_s = time.perf_counter() - t
        archive = Archive.open(data, create=False)
        meta = Metadata.for_data_dir(data)
        index = open_index("fts5", data_dir=data)
        out = Path(tmp) / "package"
        try:
            t = time.perf_counter()
            res = export(archive, meta, index, ExportRequest(
                "BENCH-1", "size:>0", out, "bench",
                frozenset(args.formats.split(",")) | {"eml"}))
            export_s = time.perf_counter() - t
        finally:
            index.close()
            meta.close()
            archive.close()
        t = time.perf_counter()
        rep = verify_package(out)
        verify_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    result = {
        "bench": "export", "messages": res.count, "formats": args.formats,
        "build_s": round(build_s, 2), "export_s": round(export_s, 2),
        "export_msgs_per_s": round(res.count / export_s, 1),
        "verify_s": round(verify_s, 2), "verify_msgs_per_s": round(res.count / verify_s, 1),
        "verify_ok": rep.ok, "package_bytes": size, "target_msgs_per_s": 500,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:22} {v}")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
