"""The runner archives a message it rejects after DATA before answering (issue 3 item 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway import replies
from gateway.envelope import Envelope
from gateway.pipeline import Action, MessageContext, StageResult
from gateway.queue.spool import Spool
from gateway.runner import Runner

DENY = replies.Reply(550, "5.7.1", "Spam score too high")


class Stage:
    name = "spam"
    once = False

    def __init__(self, action: Action) -> None:
        self.action = action

    async def run(self, ctx: MessageContext) -> StageResult:
        return StageResult(self.action, reply=DENY if self.action is Action.REJECT else None,
                           reason="score 14.2")


class Evidence:
    """Where the runner hands rejected messages (in the service: ArchiveStage.run)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.kept: list[dict[str, Any]] = []

    async def __call__(self, ctx: MessageContext) -> None:
        if self.error is not None:
            raise self.error
        self.kept.append(dict(ctx.facts))


def _env() -> Envelope:
    return Envelope(mail_from="a@src.example", rcpt_to=["b@dst.example"])


async def test_spam_reject_is_handed_to_the_archive_marked_with_stage_reply_and_reason(
        tmp_path: Path) -> None:
    evidence = Evidence()
    reply = await Runner(Spool(tmp_path), [Stage(Action.REJECT)],
                         archive_rejected=evidence).accept(_env(), b"x")
    assert reply == DENY
    [facts] = evidence.kept
    assert facts["runner"] == {"action": "reject", "stage": "spam",
                               "reply": "550 5.7.1 Spam score too high", "reason": "score 14.2"}
    assert facts["trace"][-1]["action"] == "reject"


async def test_archive_failure_during_reject_answers_451_and_spools_nothing(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    reply = await Runner(spool, [Stage(Action.REJECT)],
                         archive_rejected=Evidence(OSError("disk gone"))).accept(_env(), b"x")
    assert reply == replies.ARCHIVE_FAILED and str(reply).startswith("451 4.3.0")
    assert spool.queue_ids() == []


async def test_an_archive_outage_during_reject_answers_451_not_the_5xx(
        tmp_path: Path) -> None:
    """The archive stage answers its backend's outage with a tempfail, not an exception."""
    async def outage(ctx: MessageContext) -> StageResult:
        return StageResult(Action.TEMPFAIL, reply=replies.ARCHIVE_FAILED,
                           reason="archive backend unavailable: connection refused")

    spool = Spool(tmp_path)
    reply = await Runner(spool, [Stage(Action.REJECT)],
                         archive_rejected=outage).accept(_env(), b"x")
    assert reply == replies.ARCHIVE_FAILED and spool.queue_ids() == []


async def test_tempfail_is_not_archived(tmp_path: Path) -> None:
    evidence = Evidence()
    reply = await Runner(Spool(tmp_path), [Stage(Action.TEMPFAIL)],
                         archive_rejected=evidence).accept(_env(), b"x")
    assert reply == replies.TEMPFAIL_POLICY and evidence.kept == []
