"""The before-queue runner turns stage results into replies and never loses a message."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway import replies
from gateway.envelope import Envelope
from gateway.pipeline import Action, MessageContext, StageResult
from gateway.queue.spool import FREE_SPACE_TTL, Spool, _FreeSpace
from gateway.runner import Runner


@dataclass
class FixedStage:
    name: str
    result: StageResult | None = None
    error: Exception | None = None
    once: bool = False
    seen: list[bytes] = field(default_factory=list)

    async def run(self, ctx: MessageContext) -> StageResult:
        self.seen.append(ctx.data)
        if self.error is not None:
            raise self.error
        return self.result or StageResult()


def _env() -> Envelope:
    return Envelope(mail_from="a@src.example", rcpt_to=["b@dst.example"], client_ip="192.0.2.1")


async def test_clean_message_is_spooled_then_answered_250(tmp_path: Path) -> None:
    queued: list[str] = []
    runner = Runner(Spool(tmp_path), [FixedStage("check")], on_queued=queued.append)
    reply = await runner.accept(_env(), b"Subject: x\r\n\r\nhi\r\n")
    assert reply.code == 250 and queued and queued[0] in reply.text
    assert Spool(tmp_path).load(queued[0]).data == b"Subject: x\r\n\r\nhi\r\n"


async def test_reject_returns_the_stage_reply_and_spools_nothing(tmp_path: Path) -> None:
    deny = replies.Reply(550, "5.7.1", "DMARC policy reject")
    stage = FixedStage("decide", StageResult(Action.REJECT, reply=deny, reason="dmarc"))
    spool = Spool(tmp_path)
    reply = await Runner(spool, [stage]).accept(_env(), b"x")
    assert reply == deny
    assert spool.queue_ids() == []


async def test_tempfail_without_reply_uses_default_4xx(tmp_path: Path) -> None:
    stage = FixedStage("check", StageResult(Action.TEMPFAIL, reason="dns timeout"))
    reply = await Runner(Spool(tmp_path), [stage]).accept(_env(), b"x")
    assert reply == replies.TEMPFAIL_POLICY


async def test_raising_stage_holds_the_message_with_stage_and_error(tmp_path: Path) -> None:
    queued: list[str] = []
    boom = FixedStage("check", error=RuntimeError("resolver exploded"))
    after = FixedStage("decide")
    spool = Spool(tmp_path)
    reply = await Runner(spool, [boom, after], on_queued=queued.append).accept(_env(), b"x")
    assert reply.code == 250
    assert after.seen == []  # later stages do not run on a broken context
    assert queued == []  # held messages are not handed to the worker
    (qid,) = spool.queue_ids()
    state = spool.load(qid).state
    assert state.held and state.held_stage == "check"
    assert "resolver exploded" in state.held_error


async def test_stage_headers_and_facts_are_kept_with_the_message(tmp_path: Path) -> None:
    stage = FixedStage("check", StageResult(
        headers=[("Authentication-Results", "mx.example; spf=pass")], facts={"spf": "pass"}))
    spool = Spool(tmp_path)
    await Runner(spool, [stage]).accept(_env(), b"Subject: x\r\n\r\nhi\r\n")
    msg = spool.load(spool.queue_ids()[0])
    assert msg.data.startswith(b"Authentication-Results: mx.example; spf=pass\r\nSubject: x")
    assert msg.facts["check"] == {"spf": "pass"}
    assert msg.facts["trace"][0]["stage"] == "check"


async def test_full_spool_answers_452_not_250(tmp_path: Path) -> None:
    runner = Runner(Spool(tmp_path, min_free_bytes=1 << 62))
    assert runner.room_for(100) == replies.SPOOL_FULL
    assert await runner.accept(_env(), b"x") == replies.SPOOL_FULL


async def test_stage_envelope_changes_and_notices_are_spooled(tmp_path: Path) -> None:
    queued: list[str] = []
    stage = FixedStage("decide", StageResult(
        Action.QUARANTINE, recipients=["review@dst.example"],
        extra_recipients=["journal@dst.example"],
        notify=[("sec@dst.example", b"Subject: notice\r\n\r\nn\r\n")]))
    spool = Spool(tmp_path)
    reply = await Runner(spool, [stage], on_queued=queued.append).accept(
        _env(), b"Subject: x\r\n\r\nhi\r\n")
    assert reply.code == 250
    msgs = [spool.load(q) for q in spool.queue_ids()]
    [original] = [m for m in msgs if m.envelope.mail_from]
    [notice] = [m for m in msgs if not m.envelope.mail_from]
    assert original.envelope.rcpt_to == ["review@dst.example", "journal@dst.example"]
    assert original.facts["runner"]["action"] == "quarantine"
    assert notice.envelope.rcpt_to == ["sec@dst.example"] and notice.envelope.role == "local"
    assert notice.data == b"Subject: notice\r\n\r\nn\r\n"
    assert notice.facts["notify"]["of"] == original.qid
    assert queued[-1] == notice.qid


async def test_mail_is_refused_once_the_free_space_reserve_is_crossed(tmp_path: Path) -> None:
    free, now = [10 << 30], [0.0]
    spool = Spool(tmp_path, min_free_bytes=100 << 20)
    spool.free_space = _FreeSpace(tmp_path, measure=lambda _p: free[0], clock=lambda: now[0])
    runner = Runner(spool)
    assert runner.room_for(100) is None
    free[0] = 50 << 20  # another process filled the disk below the reserve
    now[0] += FREE_SPACE_TTL  # noticed at the next measurement, a second later at most
    assert runner.room_for(100) == replies.SPOOL_FULL
    assert await runner.accept(_env(), b"x") == replies.SPOOL_FULL


def test_the_accepted_counter_child_is_the_labelled_one() -> None:
    # runner.accept counts through metrics.accepted(): the same child (and so the same
    # exported sample) as ACCEPTED.labels(listener), looked up once.
    from gateway import metrics

    child = metrics.accepted("runner-test")
    assert child is metrics.accepted("runner-test")
    before = metrics.ACCEPTED.labels("runner-test")._value.get()
    child.inc()
    assert metrics.ACCEPTED.labels("runner-test")._value.get() == before + 1
