"""The worker and the archive stage: the received copy beside the sent one; quarantine.

A transform (once) that changed the message saves its output beside the spooled
original; the archive stage, even when it runs only after a restart, still sees
both (Spool.load: ``received``), and archives both, linked.
"""

from __future__ import annotations

from pathlib import Path

from nexthop import NextHop
from queuekit import FakeClock, RecordingStage

from archive.facade import Archive
from archive.metadata import Message, Metadata
from gateway.archive_stage import ArchiveStage
from gateway.config import Config, DeliveryConfig, QueueConfig
from gateway.deliver.deliverer import Deliverer
from gateway.envelope import Envelope
from gateway.pipeline import Stage, StageResult
from gateway.queue.spool import Spool
from gateway.queue.worker import QueueWorker

MSG = (b"From: alice@src.test\r\nTo: team@dst.test\r\nSubject: plans\r\n"
       b"Message-ID: <plans-7@src.test>\r\n\r\nSee you at nine.\r\n")
SIGNED = b"DKIM-Signature: v=1; d=src.test; b=xyz\r\n" + MSG


def _worker(tmp_path: Path, hop: NextHop, clock: FakeClock, stages: list[Stage]) -> QueueWorker:
    cfg = Config(hostname="coffer.test", data_dir=tmp_path, queue=QueueConfig(),
                 delivery=DeliveryConfig(routes={"*": f"smtp://127.0.0.1:{hop.port}?tls=off"},
                                         connect_timeout=5.0, command_timeout=5.0))
    return QueueWorker(cfg, Spool(tmp_path / "spool"), stages, Deliverer(cfg), clock=clock,
                       rand=lambda: 0.5)


def test_spool_load_keeps_the_received_bytes_beside_the_transformed_ones(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    qid = spool.store(Envelope("alice@src.test", ["a@dst.test"]), MSG)
    assert spool.load(qid).received is None  # nothing replaced them yet
    spool.save_data(qid, SIGNED)
    loaded = spool.load(qid)
    assert (loaded.data, loaded.received) == (SIGNED, MSG)


async def test_archive_after_a_restart_still_archives_the_received_and_the_sent_copy(
    tmp_path: Path, nexthop: NextHop, clock: FakeClock
) -> None:
    sign = RecordingStage("transform", once=True, result=StageResult(data=SIGNED))
    broken = RecordingStage("archive", once=True, error=OSError("archive disk gone"))
    first = _worker(tmp_path, nexthop, clock, [sign, broken])
    qid = first.spool.store(Envelope("alice@src.test", ["a@dst.test"], received_at=clock()), MSG)
    await first.run_due()
    assert first.spool.load(qid).state.held_stage == "archive"  # signed, not archived
    await first.stop(0)

    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    archive = Archive.open(tmp_path)
    stage = ArchiveStage(archive, meta)
    second = _worker(tmp_path, nexthop, clock, [sign, stage])
    try:
        second.spool.append_event(qid, {"ev": "released"})  # the operator fixed the disk
        await second.run_due()
        assert sign.runs == 1  # never signed twice
        assert nexthop.received[0].data.rstrip() == SIGNED.rstrip()
        with meta.session() as s:
            rows = {m.copy: (m.id, m.sha256, m.linked_id)
                    for m in s.query(Message).order_by(Message.id)}
        assert set(rows) == {"received", "sent"}
        assert archive.get(rows["received"][1]) == MSG
        assert archive.get(rows["sent"][1]) == SIGNED
        assert rows["received"][2] == rows["sent"][0] and rows["sent"][2] == rows["received"][0]
    finally:
        await second.stop(0)
        await stage.close()
        archive.close()


async def test_quarantined_message_is_archived_marked_quarantined_then_held(
    tmp_path: Path, nexthop: NextHop, clock: FakeClock
) -> None:
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    archive = Archive.open(tmp_path)
    stage = ArchiveStage(archive, meta)
    worker = _worker(tmp_path, nexthop, clock, [stage])
    facts = {"decide": {"decision": "quarantine"}, "runner": {"action": "quarantine"},
             "trace": [{"stage": "decide", "action": "quarantine", "reason": "rule q7"}]}
    try:
        qid = worker.spool.store(Envelope("alice@src.test", ["a@dst.test"],
                                          received_at=clock()), MSG, facts)
        await worker.run_due()
        state = worker.spool.load(qid).state
        assert state.held and state.held_error == "quarantine: rule q7"
        assert nexthop.received == []  # kept, not delivered
        with meta.session() as s:
            [(kept_state, sha)] = s.query(Message.state, Message.sha256).all()
        assert kept_state == "quarantined" and archive.get(sha) == MSG
    finally:
        await worker.stop(0)
        await stage.close()
        archive.close()
