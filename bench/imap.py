"""IMAP benchmark: Coffer serving the real archive against Dovecot serving the same messages.

    .venv/bin/python bench/imap.py --messages 10000 [--json]

In ONE run, N messages of about 5 kB (fixed seed; To: the benchmark user) are:
  * archived: blob store (zstd + AES-256-GCM), metadata (SQLite), FTS5 index; served by
    ``ArchiveBackend`` through Coffer's IMAP server (in this process, its own thread);
  * written to a Maildir served by Dovecot (../shared/peers/dovecot-imap).
Then, against each server:
  * the first SELECT of INBOX on each server (Coffer: the CRLF size, RFC822.SIZE, is
    recorded with each message row when archived, so no message is read; Dovecot builds
    its index);
  * mbsync pulls INBOX into an empty Maildir;
  * an imaplib bulk ``UID FETCH 1:* (BODY.PEEK[])`` (messages/s);
  * ``FETCH 1:* (BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)])`` (messages/s);
  * ``SEARCH BODY <word>`` latency (median of 5; Coffer answers from the full-text index,
    Dovecot, without an FTS plugin, reads the messages).
Beside the wall time of each mbsync pull, the server's own CPU time per message (less
sensitive to a loaded machine) and the load average at the end.
Prints one JSON line (--json) or a table.  Loopback only; everything is stopped at the end.
Figures depend on the machine and its load: compare figures from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import imaplib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from archive.extract import extract  # noqa: E402
from archive.facade import Archive  # noqa: E402
from archive.imap.accounts import Accounts  # noqa: E402
from archive.imap.archive_backend import ArchiveBackend  # noqa: E402
from archive.imap.server import ImapConfig, ImapServer  # noqa: E402
from archive.index import Indexer, open_index  # noqa: E402
from archive.metadata import MessageRecord, Metadata  # noqa: E402

PEER = REPO.parent / "shared" / "peers" / "dovecot-imap"
USER, PASSWORD = "bench", "bench-pw"
WORDS = [
    "archive", "ledger", "budget", "invoice", "meeting", "quarterly", "report", "contract",
    "audit", "policy", "shipment", "delivery", "payment", "schedule", "review", "draft",
    "final", "summary", "project", "customer", "supplier", "account", "balance", "forecast",
    "revenue", "expense", "travel", "approval", "request",
]
NEEDLE = "zanzibar"  # in 1% of the messages


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def make_messages(n: int, seed: int = 7) -> list[bytes]:
    rnd = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    out = []
    for i in range(n):
        words = [rnd.choice(WORDS) for _ in range(700)]
        if i % 100 == 0:
            words[rnd.randrange(len(words))] = NEEDLE
        body = "\r\n".join(" ".join(words[j:j + 12]) for j in range(0, len(words), 12))
        date = (start + timedelta(minutes=i)).strftime("%a, %d %b %Y %H:%M:%S +0000")
        out.append((f"From: Sender {i % 50} <s{i % 50}@ext.example>\r\n"
                    f"To: Bench <{USER}@corp.example>\r\n"
                    f"Subject: {rnd.choice(WORDS)} {rnd.choice(WORDS)} #{i}\r\n"
                    f"Date: {date}\r\nMessage-ID: <{i}.bench@ext.example>\r\n\r\n"
                    f"{body}\r\n").encode())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_archive(root: Path, msgs: list[bytes]) -> tuple[Archive, Metadata, Any, float]:
    t0 = time.perf_counter()
    archive = Archive.open(root)
    meta = Metadata.for_data_dir(root)
    meta.migrate()
    index = open_index("fts5", data_dir=root, meta=meta)
    when = datetime(2024, 6, 1, tzinfo=UTC)
    for i in range(0, len(msgs), 500):
        batch = msgs[i:i + 500]
        archive.put_many(batch)
        meta.add_messages([MessageRecord(hashlib.sha256(m).hexdigest(), extract(m), when,
                                         rcpt_to=[f"{USER}@corp.example"]) for m in batch])
    Indexer(meta, index, archive.get).run()
    return archive, meta, index, time.perf_counter() - t0


class ServerThread:
    def __init__(self, server: ImapServer) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = server
        asyncio.run_coroutine_threadsafe(server.start(), self.loop).result(30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def dovecot_cpu(dov_dir: Path) -> float:
    """CPU seconds of the Dovecot instance: its master and every child it has reaped
    (imap and imap-login processes end with their session; /proc/PID/stat fields 14-17)."""
    pid = (dov_dir / "run" / "master.pid").read_text().strip()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def cpu_during(fn: Callable[[], object], cpu: Callable[[], float]) -> float:
    before = cpu()
    fn()
    time.sleep(0.5)  # let the server's session processes exit and be reaped
    return cpu() - before


def mbsync(port: int, root: Path, name: str) -> float:
    maildir = root / f"sync-{name}"
    maildir.mkdir()
    rc = root / f"mbsyncrc-{name}"
    rc.write_text(f"""IMAPAccount a
Host 127.0.0.1
Port {port}
User {USER}
Pass {PASSWORD}
SSLType None
AuthMechs LOGIN

IMAPStore r
Account a

MaildirStore l
Path {maildir}/
Inbox {maildir}/INBOX

Channel c
Far :r:INBOX
Near :l:INBOX
Create Near
Sync Pull
SyncState *
""")
    # The server is measured, not the local disk: no fsync per file on the Maildir side.
    rc.write_text("FSync no\n\n" + rc.read_text())
    t0 = time.perf_counter()
    res = subprocess.run(["mbsync", "-q", "-c", str(rc), "-a"], capture_output=True,
                         timeout=3600, check=False)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"mbsync against {name}: {res.stderr.decode(errors='replace')}")
    got = sum(1 for _ in (maildir / "INBOX" / "new").iterdir()) + sum(
        1 for _ in (maildir / "INBOX" / "cur").iterdir())
    log(f"mbsync {name}: {got} messages in {elapsed:.1f}s")
    return elapsed


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def first_select(port: int) -> None:
    c = imaplib.IMAP4("127.0.0.1", port)
    c.login(USER, PASSWORD)
    c.select("INBOX", readonly=True)
    c.logout()


def client_figures(port: int, n: int) -> dict[str, float]:
    c = imaplib.IMAP4("127.0.0.1", port)
    c.login(USER, PASSWORD)
    c.select("INBOX", readonly=True)
    bulk = timed(lambda: c.uid("FETCH", "1:*", "(BODY.PEEK[])"))
    headers = timed(lambda: c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)])"))
    searches = []
    hits = 0
    for _ in range(5):
        t0 = time.perf_counter()
        _typ, data = c.search(None, "BODY", NEEDLE)
        searches.append(time.perf_counter() - t0)
        hits = len(data[0].split())
    c.logout()
    return {"bulk_fetch_msgs_per_s": round(n / bulk, 1),
            "header_fetch_msgs_per_s": round(n / headers, 1),
            "search_body_ms_p50": round(statistics.median(searches) * 1000, 1),
            "search_body_hits": hits}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if shutil.which("mbsync") is None or shutil.which("dovecot") is None or not PEER.exists():
        log("needs mbsync (isync), dovecot-imapd and ../shared/peers/dovecot-imap")
        return 2
    msgs = make_messages(args.messages)
    root = Path(tempfile.mkdtemp(prefix="coffer-bench-imap-"))
    root.chmod(0o755)  # Dovecot reads the Maildir as "nobody"
    dov_dir = root / "dovecot"
    srv: ServerThread | None = None
    result: dict[str, Any] = {"messages": args.messages,
                              "avg_size": sum(map(len, msgs)) // len(msgs)}
    try:
        log(f"archiving {args.messages} messages")
        archive, meta, index, ingest = build_archive(root / "coffer", msgs)
        result["archive_build_s"] = round(ingest, 1)
        accounts = Accounts.for_data_dir(root / "coffer")
        accounts.add(USER, "user", PASSWORD, [f"{USER}@corp.example"])
        backend = ArchiveBackend(meta, archive, accounts, index)
        srv = ServerThread(ImapServer(backend, ImapConfig(
            port=0, allow_plaintext_loopback=True)))
        maildir = root / "maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        for i, m in enumerate(msgs):
            (maildir / "cur" / f"{1000000 + i}.bench:2,").write_bytes(m)
        dport = free_port()
        with open(root / "dovecot-start.log", "wb") as out:
            subprocess.run([str(PEER), "start", str(dov_dir), str(dport), USER, PASSWORD,
                            str(maildir)], check=True, stdout=out, stderr=out, timeout=60)
        # Warm both: Dovecot builds its index, Coffer assigns the folder's UIDs (its
        # RFC822.SIZEs were recorded at archive time); both happen once per message.
        cport = srv.server.port
        result["first_select_s"] = {
            "coffer": round(timed(lambda: first_select(cport)), 2),
            "dovecot": round(timed(lambda: first_select(dport)), 2)}
        client_figures(dport, args.messages)
        # Wall time depends on what else the machine runs; CPU time much less: the
        # server's own CPU per message is reported beside it (Coffer: this process,
        # which only waits for mbsync meanwhile; Dovecot: its master and reaped children).
        times: dict[str, float] = {}
        coffer_cpu = cpu_during(lambda: times.update(coffer=mbsync(cport, root, "coffer")),
                                time.process_time)
        dovecot_cpu_s = cpu_during(lambda: times.update(dovecot=mbsync(dport, root, "dovecot")),
                                   lambda: dovecot_cpu(dov_dir))
        coffer_sync, dovecot_sync = times["coffer"], times["dovecot"]
        result["mbsync_s"] = {"coffer": round(coffer_sync, 2), "dovecot": round(dovecot_sync, 2),
                              "ratio": round(coffer_sync / dovecot_sync, 2)}
        result["mbsync_server_cpu_ms_per_msg"] = {
            "coffer": round(coffer_cpu * 1000 / args.messages, 3),
            "dovecot": round(dovecot_cpu_s * 1000 / args.messages, 3),
            "ratio": round(coffer_cpu / max(dovecot_cpu_s, 1e-9), 2)}
        result["load_average"] = [round(x, 1) for x in os.getloadavg()]
        result["mbsync_msgs_per_s"] = {"coffer": round(args.messages / coffer_sync, 1),
                                       "dovecot": round(args.messages / dovecot_sync, 1)}
        result["coffer"] = client_figures(cport, args.messages)
        result["dovecot"] = client_figures(dport, args.messages)
    finally:
        if srv is not None:
            srv.stop()
        subprocess.run([str(PEER), "stop", str(dov_dir)], capture_output=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:24} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
