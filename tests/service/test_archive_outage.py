"""An archive backend outage is a tempfail, never a loss: `coffer serve` on a PostgreSQL
and on a SeaweedFS server of the test's own, each stopped for real mid-traffic and
started again."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from cluster_env import ARCHIVE_451, archived, message, s3_section, send
from private_pg import *  # noqa: F403 - fixture: private_pg
from private_pg import PrivatePostgres
from seaweed import seaweed_server
from svcproc import REPO, Gateway, Sink, free_port, wait_for, write_config


def node_config(path: Path, port: int, sink: Sink, extra: str) -> Path:
    return write_config(
        path, port=port, local_domains=["gw.test"], trusted=["127.0.0.1/32"],
        routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"},
        extra="archive:\n  health_probe: 0.3s\n" + extra)


def outage_then_recovery(gw: Gateway, sink: Sink, port: int, url: str,
                         stop: Callable[[], None], start: Callable[[], None]) -> list[str]:
    """Mail before, during and after an outage of the backend ``stop``/``start`` control:
    nothing accepted is lost, held, delivered unarchived, or delivered twice."""
    before = [uuid.uuid4().hex for _ in range(3)]
    assert [send(port, t) for t in before] == [250] * 3
    wait_for(lambda: len(sink.records()) == 3, what="delivery before the outage")
    # The start-up's background database work is done: the outage below is one at run time.
    gw.wait_event("archive_catch_up_done")
    gw.wait_event("index_opened")

    stop()
    accepted: list[str] = []
    refused: list[str] = []

    def one_more() -> bool:
        token = uuid.uuid4().hex
        (accepted if send(port, token) == 250 else refused).append(token)
        return bool(refused)

    # The first message after the stop is taken (250: it is safe in the spool) and
    # its archive write fails; from then on new transactions are refused at MAIL FROM.
    wait_for(one_more, timeout=30, what="a 451 while the backend is down")
    assert accepted, "the outage is noticed by a failed archive write, not before"
    gw.wait_event("archive_backend_down")
    assert send(port, uuid.uuid4().hex) == 451  # still down: still refused
    # Nothing accepted during the outage was delivered (it could not be archived) and
    # nothing was held for an operator: it is deferred, waiting for the backend.
    # The health flag goes down (new mail: 451) before the worker has recorded and logged
    # the deferral of the message whose write failed: wait for that line.
    wait_for(lambda: any(e.get("result") == "deferred" for e in gw.events("delivery")),
             what="the deferral of the message accepted as the backend went down")
    assert {r["token"] for r in sink.records()} == set(before)
    assert gw.events("held") == []
    deferred = [e for e in gw.events("delivery") if e.get("result") == "deferred"]
    assert deferred and all(e["reply"] == ARCHIVE_451 for e in deferred)

    start()
    gw.wait_event("archive_backend_up", timeout=30)
    after = [uuid.uuid4().hex for _ in range(2)]
    assert [send(port, t) for t in after] == [250, 250]
    everything = before + accepted + after
    wait_for(lambda: {r["token"] for r in sink.records()} == set(everything), timeout=30,
             what="every accepted message delivered after the outage")
    tokens = [r["token"] for r in sink.records()]
    assert sorted(tokens) == sorted(everything)  # once each; the refused never
    for token in everything:
        assert archived(url, token) == 1, token
    for token in refused:
        assert archived(url, token) == 0
    assert gw.events("held") == []
    return everything


def test_postgresql_outage_defers_and_refuses_then_everything_is_archived_and_delivered_once(
    tmp_path: Path, procs: list[Gateway | Sink], private_pg: PrivatePostgres,
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    port = free_port()
    cfg = node_config(tmp_path / "coffer.yaml", port, sink,
                      f"  database: {private_pg.url}\n")
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    outage_then_recovery(gw, sink, port, private_pg.url, private_pg.stop, private_pg.start)


def test_object_storage_outage_defers_and_refuses_then_everything_is_stored_once(
    tmp_path: Path, procs: list[Gateway | Sink],
) -> None:
    (tmp_path / "sw").mkdir()
    with seaweed_server(tmp_path / "sw") as server:
        sink = Sink(free_port(), tmp_path / "sink.jsonl")
        procs.append(sink.start())
        port = free_port()
        bucket = server.info.bucket_name("arch")
        s3 = s3_section(server.info, bucket,
                        server.info.bucket_name("keys"), tmp_path / "s3.secret")
        cfg = node_config(tmp_path / "coffer.yaml", port, sink, s3)
        gw = Gateway(cfg, port, tmp_path / "coffer.log")
        procs.append(gw.start())
        url = f"sqlite:///{tmp_path / 'archive' / 'meta.db'}"
        everything = outage_then_recovery(gw, sink, port, url, server.stop, server.start)
        # Each message and its receipt are one object each in the locked bucket, and
        # a command given only the configuration reads them back from there.
        client = server.info.client()
        listed = client.list_objects_v2(Bucket=bucket, Prefix="blobs/").get("Contents", [])
        client.close()
        assert len(listed) == 2 * len(everything)
        shown = subprocess.run(
            [sys.executable, "-m", "gateway", "show", "--config", str(cfg), "--raw",
             f"<{everything[-1]}@src.test>"], cwd=REPO, capture_output=True, timeout=60,
            check=False)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.endswith(message(everything[-1]))
    assert server.info.secret_key not in (tmp_path / "coffer.log").read_text()
