"""coffer recover: archived originals spooled again and delivered by the real queue worker."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Populated

from archive.metadata import Metadata
from gateway.cli import main
from gateway.config import Config, DeliveryConfig
from gateway.deliver.deliverer import Deliverer
from gateway.queue.spool import Spool
from gateway.queue.worker import QueueWorker
from reports.recover import HEADER

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deliver"))
from nexthop import NextHop


@pytest.fixture
async def nexthop() -> AsyncIterator[NextHop]:
    hop = NextHop()
    await hop.start()
    yield hop
    await hop.stop()


async def test_recovered_originals_are_delivered_byte_identical_with_the_header(
        archive_dir: Populated, nexthop: NextHop, capsys: pytest.CaptureFixture[str]) -> None:
    data = archive_dir.data_dir
    assert main(["recover", "merger", "--to", "restore@example.com", "--data-dir", str(data),
                 "--officer", "olivia", "--json"]) == 0
    items = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [i["archive_id"] for i in items] == [1, 4]
    cfg = Config(hostname="coffer.test", data_dir=data, delivery=DeliveryConfig(
        routes={"*": f"smtp://127.0.0.1:{nexthop.port}?tls=off"},
        connect_timeout=5.0, command_timeout=5.0))
    spool = Spool(data / "spool")
    env = spool.read_header(items[0]["qid"])[0]
    assert (env.mail_from, env.role, env.rcpt_to) == ("", "local", ["restore@example.com"])
    worker = QueueWorker(cfg, spool, [], Deliverer(cfg))
    try:
        assert await worker.run_due() == 2
    finally:
        await worker.stop(0)
    assert spool.queue_ids() == []
    assert [r.mail_from for r in nexthop.received] == ["", ""]  # null reverse-path
    assert all(r.rcpt_tos == ["restore@example.com"] for r in nexthop.received)
    delivered = {}
    for r in nexthop.received:
        head, _, rest = r.data.partition(b"\r\n")
        name, _, value = head.decode().partition(": ")
        assert name == HEADER
        delivered[int(value.split(";")[0])] = rest
    for item in items:
        original = archive_dir.receipts[item["archive_id"] - 1].raw
        assert delivered[item["archive_id"]] == original  # byte for byte
    with Metadata.for_data_dir(data) as meta:
        (ev,) = [e for e in meta.audit_events() if e.action == "recover"]
        assert ev.who == "olivia" and ev.result_count == 2 and ev.query == "merger"


def test_original_recipients_include_bcc_and_dry_run_spools_nothing(
        archive_dir: Populated, capsys: pytest.CaptureFixture[str]) -> None:
    data = archive_dir.data_dir
    assert main(["recover", "subject:\"quarterly report\"", "--original-recipients",
                 "--dry-run", "--json", "--data-dir", str(data)]) == 0
    (item,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert item["rcpt_to"] == ["bob@example.org", "secret@example.org"] and item["qid"] == ""
    assert not (data / "spool" / "queue").exists() or not list(
        (data / "spool" / "queue").iterdir())
    with Metadata.for_data_dir(data) as meta:
        assert [e.action for e in meta.audit_events()] == ["recover-dry-run"]


def test_recover_needs_a_recipient(archive_dir: Populated) -> None:
    assert main(["recover", "merger", "--data-dir", str(archive_dir.data_dir)]) == 2
