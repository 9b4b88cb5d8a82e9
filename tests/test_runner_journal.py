"""Journal recipients are spooled as their own copy, which no before-queue stage sees."""

from __future__ import annotations

from pathlib import Path

from test_runner import FixedStage

from gateway import replies
from gateway.envelope import Envelope
from gateway.journal_intake import is_journal_copy
from gateway.pipeline import Action, StageResult
from gateway.queue.spool import Spool
from gateway.runner import Runner

DATA = b"Subject: memo\r\n\r\nhi\r\n"


def _env(*rcpts: str) -> Envelope:
    return Envelope(mail_from="a@corp.example", rcpt_to=list(rcpts), client_ip="192.0.2.1",
                    rcpt_options=[["NOTIFY=NEVER"] for _ in rcpts])


def _runner(spool: Spool, *stages: FixedStage, queued: list[str] | None = None) -> Runner:
    return Runner(spool, list(stages), journal_addresses=["Journal@corp.example"],
                  journal_retention="7y", on_queued=None if queued is None else queued.append)


async def test_journal_only_transaction_skips_every_stage_and_is_discarded_after_archive(
        tmp_path: Path) -> None:
    spool, queued, check = Spool(tmp_path), [], FixedStage("check")
    reply = await _runner(spool, check, queued=queued).accept(
        _env("journal@corp.example"), DATA)
    assert reply.code == 250 and check.seen == []
    [qid] = queued
    msg = spool.load(qid)
    assert msg.envelope.rcpt_to == ["journal@corp.example"] and msg.data == DATA
    assert is_journal_copy(msg.facts)
    assert msg.facts["runner"] == {"action": "discard"}
    assert msg.facts["journal"] == {"addresses": ["journal@corp.example"], "recipients": [],
                                    "retention": "7y"}


async def test_mixed_transaction_spools_the_journal_copy_and_the_rest_through_the_stages(
        tmp_path: Path) -> None:
    spool, queued = Spool(tmp_path), []
    check = FixedStage("check", StageResult(headers=[("X-Checked", "yes")]))
    reply = await _runner(spool, check, queued=queued).accept(
        _env("bob@remote.example", "journal@corp.example"), DATA)
    assert reply.code == 250 and len(queued) == 2
    assert all(q in reply.text for q in queued)
    by_kind = {is_journal_copy(spool.load(q).facts): spool.load(q) for q in queued}
    journal, normal = by_kind[True], by_kind[False]
    assert journal.data == DATA and journal.envelope.rcpt_to == ["journal@corp.example"]
    assert journal.facts["journal"]["recipients"] == ["bob@remote.example"]
    assert normal.envelope.rcpt_to == ["bob@remote.example"]
    assert normal.envelope.rcpt_options == [["NOTIFY=NEVER"]]
    assert normal.data.startswith(b"X-Checked: yes\r\n")
    assert len(check.seen) == 1


async def test_refused_rest_of_the_transaction_leaves_no_journal_copy(tmp_path: Path) -> None:
    for action in (Action.REJECT, Action.TEMPFAIL):
        spool, queued = Spool(tmp_path / str(action)), []
        deny = FixedStage("decide", StageResult(action, reason="no"))
        reply = await _runner(spool, deny, queued=queued).accept(
            _env("bob@remote.example", "journal@corp.example"), DATA)
        assert not reply.is_positive
        assert spool.queue_ids() == [] and queued == []


async def test_no_journal_address_configured_changes_nothing(tmp_path: Path) -> None:
    spool, queued = Spool(tmp_path), []
    reply = await Runner(spool, [], on_queued=queued.append).accept(
        _env("journal@corp.example"), DATA)
    assert reply.code == 250
    assert not is_journal_copy(spool.load(queued[0]).facts)


async def test_journal_copy_that_cannot_be_spooled_is_a_452_and_nothing_is_queued(
        tmp_path: Path) -> None:
    spool, queued = Spool(tmp_path, min_free_bytes=2**62), []
    check = FixedStage("check")
    reply = await _runner(spool, check, queued=queued).accept(
        _env("bob@remote.example", "journal@corp.example"), DATA)
    assert reply == replies.SPOOL_FULL
    assert spool.queue_ids() == [] and queued == [] and check.seen == []
