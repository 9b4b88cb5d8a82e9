"""The queue worker against a real loopback next hop: retries, bounces, DSNs, holds, restarts."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nexthop import NextHop
from queuekit import FakeClock, RecordingStage
from reportparse import parse_report

from gateway import metrics, replies
from gateway.config import Config, DeliveryConfig, QueueConfig
from gateway.deliver.deliverer import Deliverer
from gateway.envelope import Envelope
from gateway.errors import SpoolFullError
from gateway.pipeline import Action, Stage, StageResult
from gateway.queue.spool import Spool
from gateway.queue.state import RcptStatus
from gateway.queue.worker import QueueWorker, message_id
from gateway.runner import Runner

MSG = (b"From: alice@src.test\r\nTo: team@dst.test\r\nSubject: plans\r\n"
       b"Message-ID: <plans-1@src.test>\r\n\r\nSee you at nine.\r\n")


class Rig:
    """A spool, a worker and a deliverer pointed at the loopback next hop."""

    def __init__(self, tmp_path: Path, hop: NextHop, clock: FakeClock,
                 stages: list[Stage] | None = None, **queue: Any) -> None:
        queue.setdefault("retry_initial", 60.0)
        queue.setdefault("retry_max", 3600.0)
        queue.setdefault("max_age", 86400.0)
        self.cfg = Config(
            hostname="coffer.test", data_dir=tmp_path, queue=QueueConfig(**queue),
            delivery=DeliveryConfig(routes={"*": f"smtp://127.0.0.1:{hop.port}?tls=off"},
                                    connect_timeout=5.0, command_timeout=5.0),
        )
        self.clock = clock
        self.spool = Spool(tmp_path / "spool")
        self.stages = stages or []
        self.worker = self.new_worker()

    def new_worker(self) -> QueueWorker:
        return QueueWorker(self.cfg, Spool(self.spool.root), self.stages, Deliverer(self.cfg),
                           clock=self.clock, rand=lambda: 0.5)

    def store(self, *rcpts: str, sender: str = "alice@src.test", data: bytes = MSG,
              facts: dict[str, Any] | None = None) -> str:
        env = Envelope(mail_from=sender, rcpt_to=list(rcpts), received_at=self.clock.now)
        return self.spool.store(env, data, facts)

    def statuses(self, qid: str) -> dict[str, str]:
        msg = self.spool.load(qid)
        return {r: s.status.value for r, s in msg.state.recipients.items()}

    def dsns(self) -> list[str]:
        out = []
        for qid in self.spool.queue_ids():
            if self.spool.read_header(qid)[0].mail_from == "":
                out.append(qid)
        return out


@pytest.fixture
async def make_rig(
    tmp_path: Path, nexthop: NextHop, clock: FakeClock
) -> AsyncIterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def make(**kw: Any) -> Rig:
        rig = Rig(tmp_path, nexthop, clock, **kw)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.worker.stop(0)


async def test_delivered_message_is_removed_from_the_spool(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    rig = make_rig()
    qid = rig.store("a@dst.test", "b@dst.test")
    assert await rig.worker.run_due() == 1
    assert rig.spool.queue_ids() == []
    assert len(nexthop.received) == 1
    assert nexthop.received[0].rcpt_tos == ["a@dst.test", "b@dst.test"]
    assert nexthop.received[0].data.rstrip() == MSG.rstrip()
    assert not rig.spool.state_path(qid).exists()


async def test_mixed_results_are_persisted_and_only_the_deferred_recipient_is_retried(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    nexthop.rules = {"b@dst.test": "450 4.2.0 Mailbox busy",
                     "c@dst.test": "550 5.1.1 No such user"}
    rig = make_rig()
    qid = rig.store("a@dst.test", "b@dst.test", "c@dst.test")
    await rig.worker.run_due()
    assert rig.statuses(qid) == {"a@dst.test": "delivered", "b@dst.test": "deferred",
                                 "c@dst.test": "bounced"}
    state = rig.spool.load(qid).state
    assert state.attempts == 1 and state.next_attempt_at == clock.now + 60
    assert rig.dsns() == []  # one DSN, sent only when every recipient is final

    await rig.worker.run_due()  # not due yet: nothing happens
    assert nexthop.mail_commands == 1

    nexthop.rules.pop("b@dst.test")
    clock.advance(61)
    await rig.worker.run_due()
    assert nexthop.delivered_to("a@dst.test") == 1
    assert nexthop.delivered_to("b@dst.test") == 1
    assert not rig.spool.exists(qid)
    (dsn_qid,) = rig.dsns()
    dsn = rig.spool.load(dsn_qid)
    assert dsn.envelope.rcpt_to == ["alice@src.test"]
    blocks = parse_report(dsn.data).recipients
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; c@dst.test"]


async def test_restart_never_redelivers_to_a_recipient_that_got_250(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    nexthop.rules = {"b@dst.test": "451 4.3.0 Try later"}
    rig = make_rig()
    qid = rig.store("a@dst.test", "b@dst.test")
    await rig.worker.run_due()
    await rig.worker.stop(0)  # the process goes away

    nexthop.rules.clear()
    clock.advance(3600)
    fresh = rig.new_worker()  # a new process on the same spool
    try:
        await fresh.run_due()
    finally:
        await fresh.stop(0)
    assert nexthop.delivered_to("a@dst.test") == 1
    assert nexthop.delivered_to("b@dst.test") == 1
    assert [m.rcpt_tos for m in nexthop.received] == [["a@dst.test"], ["b@dst.test"]]
    assert not rig.spool.exists(qid)


async def test_retries_back_off_exponentially_by_the_injected_clock(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    nexthop.rules = {"b@dst.test": "450 4.2.0 Busy"}
    rig = make_rig(retry_initial=60.0, retry_max=240.0)
    qid = rig.store("b@dst.test")
    gaps = []
    for _ in range(4):
        before = clock.now
        await rig.worker.run_due()
        next_at = rig.spool.load(qid).state.next_attempt_at
        gaps.append(next_at - before)
        clock.now = next_at - 1
        tried = nexthop.mail_commands
        await rig.worker.run_due()  # one second early: no attempt
        assert nexthop.mail_commands == tried
        clock.now = next_at
    assert gaps == [60, 120, 240, 240]
    assert rig.spool.load(qid).state.attempts == 4


async def test_temporary_failure_bounces_after_max_age_with_expired_status(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    nexthop.rules = {"b@dst.test": "450 4.2.0 Busy"}
    rig = make_rig(retry_initial=300.0, max_age=600.0)
    qid = rig.store("b@dst.test")
    await rig.worker.run_due()
    assert rig.statuses(qid) == {"b@dst.test": "deferred"}
    # The last retry is scheduled at the expiry, not beyond it.
    assert rig.spool.load(qid).state.next_attempt_at == clock.now + 300
    clock.advance(600)
    await rig.worker.run_due()
    assert not rig.spool.exists(qid)
    (dsn_qid,) = rig.dsns()
    (block,) = parse_report(rig.spool.load(dsn_qid).data).recipients
    assert block["Action"] == "failed" and block["Status"] == "4.4.7"
    assert block["Diagnostic-Code"] == "smtp; 450 4.2.0 Busy"


async def test_permanent_failure_bounces_at_once_and_the_dsn_is_delivered_from_null_sender(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    nexthop.rules = {"c@dst.test": "550 5.1.1 No such user"}
    rig = make_rig()
    qid = rig.store("c@dst.test", sender="alice@dst.test")
    await rig.worker.run_due()  # bounce, DSN spooled
    assert not rig.spool.exists(qid)
    assert len(rig.dsns()) == 1
    await rig.worker.run_due()  # the DSN itself goes out
    assert rig.spool.queue_ids() == []
    (bounce,) = nexthop.received
    assert bounce.mail_from == "" and bounce.rcpt_tos == ["alice@dst.test"]
    report = parse_report(bounce.data)
    assert report.top.get_content_type() == "multipart/report"
    assert report.top.get_param("report-type") == "delivery-status"
    (block,) = report.recipients
    assert report.per_message["Reporting-MTA"] == "dns; coffer.test"
    assert block["Final-Recipient"] == "rfc822; c@dst.test"
    assert block["Status"] == "5.1.1"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert "Message-ID: <plans-1@src.test>" in report.headers


async def test_failed_message_from_the_null_sender_is_dropped_without_a_dsn(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    nexthop.rules = {"c@dst.test": "550 5.1.1 No such user"}
    rig = make_rig()
    qid = rig.store("c@dst.test", sender="")
    await rig.worker.run_due()
    assert not rig.spool.exists(qid)
    assert rig.spool.queue_ids() == []  # no bounce of a bounce
    assert nexthop.received == []


async def test_stage_that_raises_holds_the_message_with_stage_and_error(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    archive = RecordingStage("archive", error=RuntimeError("blob store unreachable"), once=True)
    rig = make_rig(stages=[RecordingStage("transform"), archive])
    qid = rig.store("a@dst.test")
    await rig.worker.run_due()
    assert rig.spool.exists(qid)
    state = rig.spool.load(qid).state
    assert state.held and state.held_stage == "archive"
    assert state.held_error == "RuntimeError: blob store unreachable"
    assert nexthop.received == []
    clock.advance(86400)
    await rig.worker.run_due()  # held messages wait for an operator
    assert archive.runs == 1 and nexthop.received == []

    archive.error = None
    rig.spool.append_event(qid, {"ev": "released"})
    await rig.worker.run_due()
    assert nexthop.delivered_to("a@dst.test") == 1
    assert not rig.spool.exists(qid)


async def test_once_stage_runs_once_and_its_output_is_what_is_retried(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    sign = RecordingStage("transform", once=True, result=StageResult(
        headers=[("X-Signed", "yes")], facts={"signed": True}))
    archive = RecordingStage("archive", once=True)
    nexthop.rules = {"a@dst.test": "451 4.3.0 Later"}
    rig = make_rig(stages=[sign, archive])
    qid = rig.store("a@dst.test")
    await rig.worker.run_due()
    assert rig.spool.load(qid).state.stages_done == {"transform", "archive"}
    nexthop.rules.clear()
    clock.advance(3600)
    fresh = rig.new_worker()  # even after a restart
    try:
        await fresh.run_due()
    finally:
        await fresh.stop(0)
    assert sign.runs == 1 and archive.runs == 1
    (got,) = nexthop.received
    assert got.data.startswith(b"X-Signed: yes\r\n")
    assert got.data.count(b"X-Signed") == 1


async def test_skipped_once_stage_gives_its_facts_to_later_stages(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    sign = RecordingStage("transform", once=True, result=StageResult(facts={"signed": True}))
    later = RecordingStage("archive")
    rig = make_rig(stages=[sign, later])
    nexthop.rules = {"a@dst.test": "451 4.3.0 Later"}
    rig.store("a@dst.test")
    await rig.worker.run_due()
    clock.advance(3600)
    await rig.worker.run_due()
    assert sign.runs == 1 and later.runs == 2
    assert later.seen_facts[1]["transform"] == {"signed": True}


async def test_quarantine_runs_the_remaining_stages_then_holds(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    archive = RecordingStage("archive", once=True)
    rig = make_rig(stages=[
        RecordingStage("transform", result=StageResult(Action.QUARANTINE, reason="no key")),
        archive,
    ])
    qid = rig.store("a@dst.test")
    await rig.worker.run_due()
    state = rig.spool.load(qid).state
    assert archive.runs == 1
    assert state.held and state.held_stage == "transform"
    assert state.held_error == "quarantine: no key"
    assert nexthop.received == []
    rig.spool.append_event(qid, {"ev": "released"})  # an operator lets it go
    await rig.worker.run_due()
    assert nexthop.delivered_to("a@dst.test") == 1


async def test_quarantine_decided_before_the_queue_is_carried_out(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    rig = make_rig()
    facts = {"runner": {"action": "quarantine"},
             "trace": [{"stage": "decide", "action": "quarantine", "reason": "rule p7"}]}
    qid = rig.store("a@dst.test", facts=facts)
    await rig.worker.run_due()
    state = rig.spool.load(qid).state
    assert state.held and state.held_stage == "decide"
    assert "rule p7" in state.held_error
    assert nexthop.received == []


async def test_discard_removes_the_message_without_delivery_or_dsn(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    rig = make_rig(stages=[RecordingStage("decide", result=StageResult(Action.DISCARD))])
    qid = rig.store("a@dst.test")
    await rig.worker.run_due()
    assert not rig.spool.exists(qid)
    assert rig.spool.queue_ids() == [] and nexthop.received == []


async def test_reject_after_the_queue_bounces_every_recipient_with_the_reply(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    deny = replies.Reply(550, "5.7.1", "Encryption policy forbids this")
    rig = make_rig(stages=[RecordingStage("transform", result=StageResult(
        Action.REJECT, reply=deny))])
    rig.store("a@dst.test", "b@dst.test")
    await rig.worker.run_due()
    (dsn_qid,) = rig.dsns()
    blocks = parse_report(rig.spool.load(dsn_qid).data).recipients
    assert [b["Status"] for b in blocks] == ["5.7.1", "5.7.1"]
    assert blocks[0]["Diagnostic-Code"] == "smtp; 550 5.7.1 Encryption policy forbids this"
    assert nexthop.received == []


async def test_message_claimed_by_another_process_is_left_alone(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    rig = make_rig()
    qid = rig.store("a@dst.test")
    with rig.spool.claim(qid) as mine:
        assert mine
        await rig.worker.run_due()
        assert nexthop.received == []
    await rig.worker.run_due()
    assert nexthop.delivered_to("a@dst.test") == 1


async def test_run_delivers_notified_and_spooled_messages_then_stop_drains(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    rig = make_rig(scan_interval=60.0)
    old = rig.store("old@dst.test")  # spooled before the worker started (a restart)
    task = asyncio.create_task(rig.worker.run())
    new = rig.store("new@dst.test")
    rig.worker.notify(new)
    for _ in range(500):
        if len(nexthop.received) == 2:
            break
        await asyncio.sleep(0.01)
    await rig.worker.stop(5.0)
    await task
    assert sorted(m.rcpt_tos[0] for m in nexthop.received) == ["new@dst.test", "old@dst.test"]
    assert not rig.spool.exists(old) and not rig.spool.exists(new)


def test_message_id_is_read_from_the_header_section_only() -> None:
    assert message_id(MSG) == "<plans-1@src.test>"
    assert message_id(b"Subject: x\r\n\r\nMessage-ID: <body@x>\r\n") == ""


async def test_wake_scans_at_once_instead_of_waiting_for_the_interval(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    rig = make_rig(scan_interval=3600.0)
    task = asyncio.create_task(rig.worker.run())
    await asyncio.sleep(0.05)  # the first scan found an empty spool
    rig.store("late@dst.test")  # e.g. released by an operator, no notify
    rig.worker.wake()
    for _ in range(500):
        if nexthop.received:
            break
        await asyncio.sleep(0.01)
    await rig.worker.stop(5.0)
    await task
    assert nexthop.delivered_to("late@dst.test") == 1


async def test_each_attempt_is_logged_per_recipient_and_counted(
    make_rig: Callable[..., Rig], nexthop: NextHop, caplog: pytest.LogCaptureFixture
) -> None:
    nexthop.rules = {"b@dst.test": "450 4.2.0 Busy"}
    rig = make_rig()
    route = f"smtp:127.0.0.1:{nexthop.port}"
    before = metrics.REGISTRY.get_sample_value(
        "coffer_recipients_deferred_total", {"route": route}) or 0.0
    logger = logging.getLogger("coffer")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="coffer")
    try:
        qid = rig.store("a@dst.test", "b@dst.test")
        await rig.worker.run_due()
    finally:
        logger.removeHandler(caplog.handler)
    # The handler may see a record twice (directly and through propagation).
    records = {id(r): r for r in caplog.records}.values()
    lines = [r.__dict__["fields"] for r in records if r.getMessage() == "delivery"]
    assert [(f["rcpt"], f["result"]) for f in lines] == [
        ("a@dst.test", "delivered"), ("b@dst.test", "deferred")]
    assert lines[1] == {"qid": qid, "message_id": "<plans-1@src.test>",
                        "sender": "alice@src.test", "rcpt": "b@dst.test", "result": "deferred",
                        "reply": "450 4.2.0 Busy", "route": route, "attempt": 1}
    after = metrics.REGISTRY.get_sample_value(
        "coffer_recipients_deferred_total", {"route": route})
    assert after == before + 1


async def test_hold_decided_before_the_queue_holds_before_any_stage_runs(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    archive = RecordingStage("archive", once=True)
    rig = make_rig(stages=[archive])
    facts = {"runner": {"action": "hold"},
             "trace": [{"stage": "decide", "action": "hold", "reason": "manual review"}]}
    qid = rig.store("a@dst.test", facts=facts)
    await rig.worker.run_due()
    state = rig.spool.load(qid).state
    assert state.held and state.held_stage == "decide"
    assert state.held_error == "hold: manual review"
    assert archive.runs == 0 and nexthop.received == []


async def test_tempfail_after_the_queue_defers_like_a_4xx(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    stage = RecordingStage("transform", result=StageResult(Action.TEMPFAIL, reason="keyserver"))
    rig = make_rig(stages=[stage])
    qid = rig.store("a@dst.test")
    await rig.worker.run_due()
    state = rig.spool.load(qid).state
    assert state.recipients["a@dst.test"].status is RcptStatus.DEFERRED
    assert state.recipients["a@dst.test"].reply == str(replies.TEMPFAIL_POLICY)
    assert state.next_attempt_at == clock.now + 60
    stage.result = StageResult()
    clock.advance(60)
    await rig.worker.run_due()
    assert nexthop.delivered_to("a@dst.test") == 1 and not rig.spool.exists(qid)


async def test_message_left_finished_by_a_crash_is_bounced_once_and_removed(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    rig = make_rig()
    qid = rig.store("a@dst.test", "c@dst.test")
    # The previous process recorded both results, then died before removing it.
    rig.spool.append_events(qid, [
        {"ev": "rcpt", "rcpt": "a@dst.test", "status": "delivered", "reply": "250 ok"},
        {"ev": "rcpt", "rcpt": "c@dst.test", "status": "bounced", "reply": "550 5.1.1 gone"},
    ])
    await rig.worker.run_due()
    assert not rig.spool.exists(qid)
    assert nexthop.received == []  # nobody is delivered to again
    (dsn_qid,) = rig.dsns()
    (block,) = parse_report(rig.spool.load(dsn_qid).data).recipients
    assert block["Final-Recipient"] == "rfc822; c@dst.test"


async def test_damaged_spool_file_is_held_not_delivered(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    rig = make_rig()
    qid = rig.store("a@dst.test")
    path = rig.spool.msg_path(qid)
    path.write_bytes(path.read_bytes()[:-5])  # truncated
    await rig.worker.run_due()
    state = rig.spool.read_state(qid, [])
    assert state.held and state.held_stage == "spool"
    assert "truncated" in state.held_error
    assert nexthop.received == []


async def test_runner_hands_accepted_mail_to_the_worker_which_delivers_it(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    rig = make_rig(scan_interval=3600.0)  # only the notification can trigger delivery
    runner = Runner(rig.spool, [], on_queued=rig.worker.notify)
    task = asyncio.create_task(rig.worker.run())
    await asyncio.sleep(0.05)
    reply = await runner.accept(Envelope("alice@src.test", ["a@dst.test"]), MSG)
    assert reply.code == 250
    for _ in range(500):
        if nexthop.received and not rig.spool.queue_ids():
            break
        await asyncio.sleep(0.01)
    await rig.worker.stop(5.0)
    await task
    assert nexthop.delivered_to("a@dst.test") == 1
    assert rig.spool.queue_ids() == []


async def test_releasing_a_stage_error_does_not_override_a_later_quarantine(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    check = RecordingStage("transform", error=RuntimeError("flaky"))
    rig = make_rig(stages=[check])
    qid = rig.store("a@dst.test")
    await rig.worker.run_due()
    rig.spool.append_event(qid, {"ev": "released"})  # retry after the error
    check.error = None
    check.result = StageResult(Action.QUARANTINE, reason="now it is suspicious")
    await rig.worker.run_due()
    state = rig.spool.load(qid).state
    assert state.held and state.held_error == "quarantine: now it is suspicious"
    assert nexthop.received == []


async def test_recipients_a_stage_refuses_bounce_in_one_dsn_and_the_rest_get_its_output(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    deny = replies.Reply(550, "5.7.1", "Encryption required but no usable key for: b@dst.test")
    stage = RecordingStage("transform", once=True, result=StageResult(
        data=MSG.replace(b"See you at nine.", b"(transformed)"), rejected={"b@dst.test": deny}))
    rig = make_rig(stages=[stage])
    qid = rig.store("a@dst.test", "b@dst.test", "c@dst.test")
    await rig.worker.run_due()
    (got,) = nexthop.received
    assert got.rcpt_tos == ["a@dst.test", "c@dst.test"]
    assert b"(transformed)" in got.data
    assert not rig.spool.exists(qid)
    (dsn_qid,) = rig.dsns()
    (block,) = parse_report(rig.spool.load(dsn_qid).data).recipients
    assert block["Final-Recipient"] == "rfc822; b@dst.test"
    assert block["Status"] == "5.7.1"
    assert block["Diagnostic-Code"] == f"smtp; {deny}"


async def test_refused_recipient_stays_bounced_across_a_restart_and_gets_one_dsn(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    deny = replies.Reply(550, "5.7.1", "Not for you")
    stage = RecordingStage("transform", once=True, result=StageResult(
        headers=[("X-Encrypted", "yes")], rejected={"b@dst.test": deny}))
    nexthop.rules = {"a@dst.test": "451 4.3.0 Later"}
    rig = make_rig(stages=[stage])
    qid = rig.store("a@dst.test", "b@dst.test")
    await rig.worker.run_due()
    assert rig.statuses(qid) == {"a@dst.test": "deferred", "b@dst.test": "bounced"}
    assert rig.dsns() == []  # one DSN, when every recipient is final
    await rig.worker.stop(0)  # the process goes away

    nexthop.rules.clear()
    clock.advance(3600)
    fresh = rig.new_worker()
    try:
        await fresh.run_due()
    finally:
        await fresh.stop(0)
    assert stage.runs == 1
    assert nexthop.delivered_to("a@dst.test") == 1
    assert nexthop.delivered_to("b@dst.test") == 0
    (dsn_qid,) = rig.dsns()
    (block,) = parse_report(rig.spool.load(dsn_qid).data).recipients
    assert block["Final-Recipient"] == "rfc822; b@dst.test"
    assert not rig.spool.exists(qid)


async def test_stage_refusing_every_recipient_bounces_them_without_a_delivery_attempt(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    deny = replies.Reply(550, "5.7.1", "No usable key")
    rig = make_rig(stages=[RecordingStage("transform", once=True, result=StageResult(
        rejected={"a@dst.test": deny, "B@DST.TEST": deny, "stranger@dst.test": deny}))])
    qid = rig.store("a@dst.test", "b@dst.test")
    await rig.worker.run_due()
    assert nexthop.mail_commands == 0
    assert not rig.spool.exists(qid)
    (dsn_qid,) = rig.dsns()
    blocks = parse_report(rig.spool.load(dsn_qid).data).recipients
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; a@dst.test", "rfc822; b@dst.test"]


@pytest.mark.parametrize("first_try", ["delivered", "deferred"])
async def test_a_transformed_copy_is_removed_with_its_message(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock, first_try: str
) -> None:
    sign = RecordingStage("transform", once=True, result=StageResult(
        headers=[("X-Signed", "yes")]))
    if first_try == "deferred":
        nexthop.rules = {"a@dst.test": "451 4.3.0 Later"}
    rig = make_rig(stages=[sign])
    qid = rig.store("a@dst.test")
    await rig.worker.run_due()
    if first_try == "deferred":  # the retry loads the saved copy instead of saving it
        assert rig.spool.data_path(qid).exists()
        nexthop.rules.clear()
        clock.advance(3600)
        await rig.worker.run_due()
    assert rig.spool.queue_ids() == []
    assert not rig.spool.data_path(qid).exists()
    assert list(rig.spool.queue_dir.iterdir()) == []


async def test_a_message_never_transformed_is_removed_without_touching_a_data_file(
    make_rig: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig(stages=[RecordingStage("archive", once=True)])
    qid = rig.store("a@dst.test")
    unlinked: list[str] = []
    real = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p, *a, **kw: (unlinked.append(str(p)),
                                                           real(p, *a, **kw))[1])
    await rig.worker.run_due()
    assert rig.spool.queue_ids() == []
    # The .msg is kept in free/ for the next message (Spool's _Recycler), not unlinked.
    assert [Path(p).name for p in unlinked] == [f"{qid}.state"]
    assert len(list((rig.spool.root / "free").iterdir())) == 1


async def test_results_a_full_spool_could_not_take_are_written_before_any_retry(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The next hop took a@ (250) and deferred b@, and the disk was full when the worker
    # recorded that: no retry, by this worker or another process's, may deliver to a@
    # again (RFC 1047's window is for a crash, not for a full disk).
    nexthop.rules = {"b@dst.test": "450 4.2.0 Mailbox busy"}
    rig = make_rig()
    qid = rig.store("a@dst.test", "b@dst.test")
    real = rig.worker.spool.append_events
    disk_full = True

    def append_events(q: str, events: list[dict[str, Any]]) -> None:
        if disk_full:
            raise SpoolFullError("state write failed: [Errno 28] No space left on device")
        real(q, events)

    monkeypatch.setattr(rig.worker.spool, "append_events", append_events)
    await rig.worker.run_due()
    assert nexthop.delivered_to("a@dst.test") == 1
    clock.advance(61)
    await rig.worker.run_due()  # still full: nothing is tried before the results are kept
    assert nexthop.mail_commands == 1
    other = rig.new_worker()  # another worker process on the same spool
    try:
        await other.run_due()  # the claim is still held by the worker that knows a@
    finally:
        await other.stop(0)
    assert nexthop.mail_commands == 1

    disk_full = False
    nexthop.rules.clear()
    clock.advance(61)
    for _ in range(3):
        await rig.worker.run_due()
        clock.advance(3600)
    assert nexthop.delivered_to("a@dst.test") == 1
    assert nexthop.delivered_to("b@dst.test") == 1
    assert not rig.spool.exists(qid)


async def test_journal_copy_runs_only_the_archive_stage_and_is_never_delivered(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    transform = RecordingStage("transform", once=True,
                               result=StageResult(data=b"X-Changed: 1\r\n" + MSG))
    archive = RecordingStage("archive", once=True)
    rig = make_rig(stages=[transform, archive])
    facts = {"journal": {"addresses": ["journal@dst.test"], "recipients": []},
             "runner": {"action": "discard"},
             "trace": [{"stage": "journal", "action": "discard", "reason": "journal copy"}]}
    qid = rig.store("journal@dst.test", facts=facts)
    await rig.worker.run_due()
    # A transform would change the evidence: the archive sees the bytes as received.
    assert transform.runs == 0 and archive.runs == 1
    assert not rig.spool.exists(qid) and nexthop.received == [] and rig.dsns() == []
