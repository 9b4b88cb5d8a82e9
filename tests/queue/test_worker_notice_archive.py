"""A notice a crash left ``spooling`` and the spool no longer has is settled from the archive.

Real spool, real archive (store, ledger, metadata on SQLite and on PostgreSQL), a
real loopback next hop.  The crash is the worker's spool write of the notice
raising, before or after the write, exactly where a kill -9 would stop it; the
restart is a new worker on the same spool and archive.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import test_worker
from nexthop import NextHop
from queuekit import FakeClock
from reportparse import parse_report
from test_worker import Rig

from archive.facade import Archive
from archive.metadata import Metadata
from gateway.archive_health import ARCHIVE_UNAVAILABLE
from gateway.archive_stage import ArchivePending, ArchiveStage
from gateway.envelope import Envelope
from gateway.queue import worker as worker_module
from gateway.queue.spool import queue_id_time

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "archive"))
from archive_db import PgAdmin, backend, pg_admin, pg_metadata

__all__ = ["backend", "pg_admin"]  # fixtures this module uses

make_rig = test_worker.make_rig  # the fixture, shared with the worker's own tests

BOUNCED = "550 5.1.1 No such user"


@dataclass
class Kept:
    """The archive the worker's archive stage writes into, and its metadata database."""

    archive: Archive
    meta: Metadata
    stage: ArchiveStage


@pytest.fixture
async def kept(backend: str, tmp_path: Path, pg_admin: PgAdmin, clock: FakeClock
               ) -> AsyncIterator[Kept]:
    meta = Metadata.for_data_dir(tmp_path) if backend == "sqlite" else pg_metadata(pg_admin)
    meta.migrate()
    # The ledger stamps its entries with the same (wall) clock the worker's queue ids
    # carry, as in a running gateway.
    archive = Archive.open(tmp_path, clock=lambda: datetime.fromtimestamp(clock.now, UTC))
    stage = ArchiveStage(archive, meta)
    yield Kept(archive, meta, stage)
    await stage.writer.close()
    archive.close()
    pg_admin.close(meta)



def _bounce(rig: Rig) -> str:
    env = Envelope(mail_from="alice@src.test", rcpt_to=["b@dst.test"],
                   received_at=rig.clock.now)
    return rig.spool.store(env, test_worker.MSG)


async def _crash_at_the_notice(rig: Rig, monkeypatch: pytest.MonkeyPatch, *,
                               written: bool, qid: str = "") -> tuple[str, str]:
    """Try a message (default: one that bounces); the process dies as it spools the
    notice, before the spool ``written`` it or after.  (message qid, notice qid) as the
    crash left them."""
    real = worker_module.store_from_loop

    async def killed(*args: Any, **kwargs: Any) -> str:
        if written:
            await real(*args, **kwargs)
        raise RuntimeError("killed at the notice's spool write")

    qid = qid or _bounce(rig)
    monkeypatch.setattr(worker_module, "store_from_loop", killed)
    await rig.worker.run_due()
    monkeypatch.undo()
    (dsn_qid,) = [e["dsn_qid"] for e in rig.spool.events(qid) if e["ev"] == "notice"]
    assert rig.spool.load(qid).state.unsettled_notices == [dsn_qid]
    assert rig.spool.exists(dsn_qid) is written
    await rig.worker.stop(0)
    rig.worker = rig.new_worker()  # the restart
    return qid, dsn_qid


def _notices_to_sender(hop: NextHop) -> list[str]:
    return [parse_report(m.data).top["Subject"] for m in hop.received
            if m.rcpt_tos == ["alice@src.test"]]


async def test_a_notice_never_written_before_the_crash_is_made_again_once_and_delivered(
    make_rig: Callable[..., Rig], nexthop: NextHop, kept: Kept,
    monkeypatch: pytest.MonkeyPatch, events: Callable[[str], list[dict[str, Any]]],
) -> None:
    nexthop.rules = {"b@dst.test": BOUNCED}
    rig = make_rig(stages=[kept.stage])
    qid, dsn_qid = await _crash_at_the_notice(rig, monkeypatch, written=False)
    for _ in range(3):
        await rig.worker.run_due()
    assert rig.spool.queue_ids() == []
    assert _notices_to_sender(nexthop) == ["Undelivered Mail Returned to Sender"]
    # Under the queue id the log gave it: the one the archive now holds.
    assert [(e["qid"], e["dsn_qid"], e["state"]) for e in events("dsn_remade")] == [
        (qid, dsn_qid, "spooled")]
    assert kept.archive.stored_queue_id(
        dsn_qid, datetime.fromtimestamp(queue_id_time(dsn_qid), UTC))
    assert events("dsn_unconfirmed") == []


async def test_a_delay_notice_never_written_is_made_again_and_the_message_retried_as_before(
    make_rig: Callable[..., Rig], nexthop: NextHop, kept: Kept, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch, events: Callable[[str], list[dict[str, Any]]],
) -> None:
    nexthop.rules = {"b@dst.test": "451 4.3.0 Try later"}
    rig = make_rig(stages=[kept.stage], retry_initial=300.0, retry_max=300.0,
                   delay_warning=600.0)
    qid = rig.store("b@dst.test")
    await rig.worker.run_due()
    clock.advance(600)  # the next attempt owes the sender a "delayed" notice
    _, dsn_qid = await _crash_at_the_notice(rig, monkeypatch, written=False, qid=qid)
    clock.advance(300)
    for _ in range(2):
        await rig.worker.run_due()
    [remade] = events("dsn_remade")
    assert (remade["dsn_qid"], remade["kind"]) == (dsn_qid, "delay")
    [notice] = [m for m in nexthop.received if m.rcpt_tos == ["alice@src.test"]]
    report = parse_report(notice.data)
    assert report.top["Subject"] == "Delayed Mail (still being retried)"
    assert [(r["Final-Recipient"], r["Action"]) for r in report.recipients] == [
        ("rfc822; b@dst.test", "delayed")]
    assert rig.spool.queue_ids() == [qid]  # still retried, and warned once only
    nexthop.rules.clear()
    clock.advance(300)
    await rig.worker.run_due()
    assert rig.spool.queue_ids() == [] and len(_notices_to_sender(nexthop)) == 1


async def test_a_notice_archived_delivered_and_removed_before_the_restart_is_not_made_again(
    make_rig: Callable[..., Rig], nexthop: NextHop, kept: Kept,
    monkeypatch: pytest.MonkeyPatch, events: Callable[[str], list[dict[str, Any]]],
) -> None:
    nexthop.rules = {"b@dst.test": BOUNCED}
    rig = make_rig(stages=[kept.stage])
    qid, dsn_qid = await _crash_at_the_notice(rig, monkeypatch, written=True)
    await rig.worker.process(dsn_qid)  # archived, delivered, removed: gone from the spool
    assert not rig.spool.exists(dsn_qid)
    assert rig.spool.load(qid).state.unsettled_notices == [dsn_qid]
    for _ in range(3):
        await rig.worker.run_due()
    assert rig.spool.queue_ids() == []
    assert _notices_to_sender(nexthop) == ["Undelivered Mail Returned to Sender"]
    assert [(e["qid"], e["dsn_qid"]) for e in events("dsn_archived")] == [(qid, dsn_qid)]
    assert events("dsn_remade") == [] and events("dsn_unconfirmed") == []


async def test_while_the_archive_cannot_answer_the_message_waits_and_is_settled_once_it_can(
    make_rig: Callable[..., Rig], nexthop: NextHop, kept: Kept, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch, events: Callable[[str], list[dict[str, Any]]],
) -> None:
    nexthop.rules = {"b@dst.test": BOUNCED}
    rig = make_rig(stages=[kept.stage])
    qid, dsn_qid = await _crash_at_the_notice(rig, monkeypatch, written=True)
    await rig.worker.process(dsn_qid)  # sent before the crash's process went down
    # The restarted process finds the archive's backend down: the archive stays unopened.
    pending = ArchivePending(rig.cfg, "OperationalError: connection refused")
    rig.worker.stages = [pending]
    for _ in range(2):
        await rig.worker.run_due()
    st = rig.spool.load(qid).state
    assert st.unsettled_notices == [dsn_qid]  # neither made again nor given up
    assert st.last_error == str(ARCHIVE_UNAVAILABLE) and st.next_attempt_at > clock.now
    [deferred] = events("dsn_settle_deferred")
    assert deferred["dsn_qids"] == [dsn_qid] and "not open yet" in deferred["error"]
    # The archive opens (gateway.service puts the stage in the pending one's place and
    # retries what the outage deferred).
    pending.health.mark_up()
    rig.worker.stages = [kept.stage]
    rig.spool.append_event(qid, {"ev": "retry", "by": "archive-health"})
    await rig.worker.run_due()
    assert rig.spool.queue_ids() == []
    assert _notices_to_sender(nexthop) == ["Undelivered Mail Returned to Sender"]
    assert len(events("dsn_archived")) == 1 and events("dsn_remade") == []


async def test_an_archive_that_cannot_answer_until_max_age_leaves_the_notice_unconfirmed(
    make_rig: Callable[..., Rig], nexthop: NextHop, kept: Kept, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch, events: Callable[[str], list[dict[str, Any]]],
) -> None:
    nexthop.rules = {"b@dst.test": BOUNCED}
    rig = make_rig(stages=[kept.stage], max_age=3600.0)
    qid, dsn_qid = await _crash_at_the_notice(rig, monkeypatch, written=False)
    pending = ArchivePending(rig.cfg, "OperationalError: connection refused")
    rig.worker.stages = [pending]
    await rig.worker.run_due()
    assert rig.spool.load(qid).state.unsettled_notices == [dsn_qid]
    clock.advance(3600.0)
    await rig.worker.run_due()
    # Given up as before the archive could be asked: a lost notice, not a duplicate.
    assert rig.spool.queue_ids() == [] and nexthop.received == []
    [lost] = events("dsn_unconfirmed")
    assert (lost["dsn_qid"], lost["recipients"]) == (dsn_qid, ["b@dst.test"])
    pending.health.mark_up()


async def test_without_an_archive_stage_a_notice_gone_from_the_spool_stays_unconfirmed(
    make_rig: Callable[..., Rig], nexthop: NextHop,
    monkeypatch: pytest.MonkeyPatch, events: Callable[[str], list[dict[str, Any]]],
) -> None:
    nexthop.rules = {"b@dst.test": BOUNCED}
    rig = make_rig()  # nothing could prove the notice was never sent
    _qid, dsn_qid = await _crash_at_the_notice(rig, monkeypatch, written=False)
    await rig.worker.run_due()
    assert rig.spool.queue_ids() == [] and nexthop.received == []
    [lost] = events("dsn_unconfirmed")
    assert (lost["dsn_qid"], lost["reason"]) == (dsn_qid, "no archive stage")
