"""Three `coffer serve` nodes on one PostgreSQL database and one SeaweedFS bucket.

A burst of messages is spread across the nodes; one node is killed with SIGKILL in the
middle of it and started again.  Then every acknowledged message was delivered once and
archived once, is searchable from every node, readable over IMAP on a node that did not
receive it, and `coffer archive verify` passes on every node (their ledger chains joined
in the bucket).
"""

from __future__ import annotations

import imaplib
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa
from cluster_env import DatabaseUnavailable, fresh_database, s3_section, send
from seaweed import SeaweedServer, seaweed_server
from svcproc import REPO, Gateway, Sink, free_port, port_open, wait_for, write_config

from archive.keys import KeyRing

PG_ADMIN = os.environ.get("COFFER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
OFFICER, PASSWORD = "olivia", "correct horse battery staple"
BURST = 45  # messages; the victim is killed after a third of them were acknowledged


def coffer(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, input=stdin,
                          capture_output=True, check=False, timeout=120)


@pytest.fixture
def cluster_db() -> Iterator[str]:
    """A PostgreSQL database of this test run alone (advisory locks are per database)."""
    try:
        with fresh_database(PG_ADMIN) as url:
            yield url
    except DatabaseUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def bucket_server(tmp_path: Path) -> Iterator[SeaweedServer]:
    (tmp_path / "seaweed").mkdir()
    with seaweed_server(tmp_path / "seaweed") as server:
        yield server


def start_nodes(tmp_path: Path, db: str, server: SeaweedServer, sink: Sink,
                procs: list[Gateway | Sink]) -> tuple[list[Gateway], int]:
    """Three nodes sharing the database and the bucket; node 3's IMAP port is returned."""
    bucket, keys = server.info.bucket_name("arch"), server.info.bucket_name("keys")
    dirs = [tmp_path / f"n{i}" for i in (1, 2, 3)]
    KeyRing.open(dirs[0] / "archive" / "keys", create=True)
    for d in dirs[1:]:  # every node holds the same archive keys (docs/deployment.md §5)
        shutil.copytree(dirs[0] / "archive" / "keys", d / "archive" / "keys")
    nodes = []
    for i, d in enumerate(dirs, 1):
        port, imap_port = free_port(), free_port()
        # Every node serves IMAP from the shared account table (all three create it at once).
        extra = ("archive:\n"
                 f"  database: {db}\n  node: n{i}\n  ledger_seal: 1s\n  health_probe: 0.5s\n"
                 + s3_section(server.info, bucket, keys, d / "s3.secret")
                 + f'imap:\n  address: "127.0.0.1:{imap_port}"\n  tls: none\n'
                 "  allow_plaintext_loopback: true\n"
                 f"  accounts_database: {db}\n")
        cfg = write_config(d / "coffer.yaml", port=port, local_domains=["gw.test"],
                           routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"},
                           trusted=["127.0.0.1/32"], extra=extra)
        gw = Gateway(cfg, port, d / "coffer.log")
        procs.append(gw.start(wait=False))
        nodes.append(gw)
    for gw in nodes:
        wait_for(lambda gw=gw: gw.alive() and port_open(gw.port), timeout=60,  # type: ignore[misc]
                 what=f"{gw.config.parent.name} to listen")
    wait_for(lambda: port_open(imap_port), what="node 3's IMAP port")
    return nodes, imap_port


class Burst:
    """Messages spread round-robin across the nodes by several clients at once.  A node
    that does not answer is skipped like an MX host that is down (RFC 5321 §5.1): the
    client sends the message to the next node -- as a new message with a new token,
    because the unanswered transaction may or may not have been spooled."""

    def __init__(self, nodes: list[Gateway]) -> None:
        self.nodes = nodes
        self.acked: dict[str, int] = {}  # token -> index of the node that answered 250
        self.unknown: set[str] = set()  # sent, no 250: delivered at most once
        self.lock = threading.Lock()

    def one(self, i: int) -> None:
        for attempt in range(len(self.nodes)):
            node = (i + attempt) % len(self.nodes)
            token = uuid.uuid4().hex
            code = send(self.nodes[node].port, token, timeout=30)
            with self.lock:
                if code == 250:
                    self.acked[token] = node
                    return
                self.unknown.add(token)
        raise AssertionError(f"message {i}: no node accepted it")


def test_three_nodes_burst_with_a_node_killed_lose_nothing_and_share_one_archive(
    tmp_path: Path, procs: list[Gateway | Sink], cluster_db: str,
    bucket_server: SeaweedServer,
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    nodes, imap_port = start_nodes(tmp_path, cluster_db, bucket_server, sink, procs)
    victim = nodes[1]

    burst = Burst(nodes)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(burst.one, i) for i in range(BURST)]
        wait_for(lambda: len(burst.acked) >= BURST // 3, timeout=60, what="a third acked")
        victim.kill9()  # mid-burst: whatever it had acknowledged is only in its spool
        for f in futures:
            f.result()
    victim.start()  # drains its spool (archive, then deliver)

    acked = set(burst.acked)
    assert len(acked) == BURST
    assert 1 in burst.acked.values()  # the victim acknowledged some before it was killed

    def delivered() -> list[str]:
        return [r["token"] for r in sink.records()]

    wait_for(lambda: acked <= set(delivered()), timeout=60,
             what="every acknowledged message delivered")
    tokens = delivered()
    assert not set(tokens) - acked - burst.unknown  # nothing we did not send
    twice = {t for t in tokens if tokens.count(t) > 1}
    assert not twice, f"delivered more than once: {twice}"

    # Archived once: one metadata row per delivered message, none for the others.
    engine = sa.create_engine(cluster_db)
    with engine.connect() as c:
        rows = dict(c.execute(sa.text(
            "SELECT message_id, count(*) FROM messages GROUP BY message_id")).all())
    engine.dispose()
    assert rows == {f"{t}@src.test": 1 for t in tokens}

    # Searchable from every node, whichever node archived it.
    want = {f"{t}@src.test" for t in tokens}

    def found(gw: Gateway) -> set[str]:
        out = coffer("search", "--config", str(gw.config), "--json", "--limit", "1000",
                     "--no-snippets", "body:zeppelin")
        assert out.returncode == 0, out.stderr
        return {json.loads(line)["message_id"] for line in out.stdout.splitlines() if line}

    wait_for(lambda: found(nodes[0]) == want, timeout=30, what="everything indexed")
    assert found(nodes[1]) == want and found(nodes[2]) == want

    # Readable over IMAP on node 3, a message node 1 accepted.
    added = coffer("users", "add", OFFICER, "--role", "officer", "--password-stdin",
                   "--config", str(nodes[0].config), stdin=PASSWORD.encode() + b"\n")
    assert added.returncode == 0, added.stderr
    token = next(t for t, n in burst.acked.items() if n == 0)
    imap = imaplib.IMAP4("127.0.0.1", imap_port, timeout=15)
    try:
        imap.login(OFFICER, PASSWORD)
        assert imap.select('"All Mail"', readonly=True)[0] == "OK"
        typ, data = imap.uid("SEARCH", "HEADER", "Message-ID", f"<{token}@src.test>")
        assert typ == "OK" and len(data[0].split()) == 1
        typ, fetched = imap.uid("FETCH", data[0].split()[0], "(BODY.PEEK[])")
        assert typ == "OK" and f"X-Token: {token}".encode() in fetched[0][1]
    finally:
        imap.logout()

    # Every node's ledger chain, joined in the bucket, accounts for every blob.
    for gw in nodes:
        gw.signal(15)  # SIGTERM: drain, seal and mirror the chain
        assert gw.wait_exit() == 0
    def audit_events() -> int:
        # Each audit event (the searches above, IMAP reads, verify itself) keeps its text
        # in an encrypted ledger document: a blob of its own (archive.documents).
        engine = sa.create_engine(cluster_db)
        with engine.connect() as c:
            n = int(c.execute(sa.text("SELECT count(*) FROM audit_events")).scalar_one())
        engine.dispose()
        return n

    for gw in (nodes[0], victim):  # any node checks every chain; the victim's included
        documents = audit_events()
        out = coffer("archive", "verify", "--config", str(gw.config), "--json")
        lines = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
        problems = [x for x in lines if x.get("severity") in ("error", "warning")]
        assert out.returncode == 0 and not problems, (out.stderr, problems)
        summary = lines[-1]
        # message + receipt each, and the audit documents
        assert summary["ok"] and summary["blobs"] == 2 * len(tokens) + documents
