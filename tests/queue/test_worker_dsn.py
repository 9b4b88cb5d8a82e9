"""Notices honour the sender's RFC 3461 request: NOTIFY, ORCPT, RET, ENVID (real next hop)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_worker
from nexthop import NextHop
from queuekit import FakeClock
from reportparse import parse_report
from test_worker import MSG, Rig

from gateway.envelope import Envelope
from gateway.queue import worker as worker_module
from gateway.queue.spool import _FreeSpace

make_rig = test_worker.make_rig  # the fixture, shared with the worker's own tests


def _store(rig: Rig, rcpts: dict[str, list[str]], *, mail_options: list[str] | None = None,
           sender: str = "alice@src.test", data: bytes = MSG) -> str:
    env = Envelope(mail_from=sender, rcpt_to=list(rcpts), received_at=rig.clock.now,
                   mail_options=mail_options or [], rcpt_options=list(rcpts.values()))
    return rig.spool.store(env, data)


async def test_a_bounce_goes_only_to_recipients_that_did_not_decline_it(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    nexthop.rules = {r: "550 5.1.1 No such user"
                     for r in ("never@dst.test", "failure@dst.test", "plain@dst.test",
                               "success@dst.test")}
    rig = make_rig()
    qid = _store(rig, {
        "never@dst.test": ["NOTIFY=NEVER"],
        "failure@dst.test": ["NOTIFY=FAILURE", "ORCPT=rfc822;Failure+2Bx@dst.test"],
        "plain@dst.test": [],  # RFC 3461 §4.1: no NOTIFY behaves as FAILURE
        "success@dst.test": ["NOTIFY=SUCCESS"],  # a success notice only: no bounce
        "ok@dst.test": ["NOTIFY=NEVER"],
    }, mail_options=["ENVID=QQ314159"])
    await rig.worker.run_due()  # bounces, DSN spooled
    assert not rig.spool.exists(qid)
    await rig.worker.run_due()  # the DSN goes out through the next hop
    assert rig.spool.queue_ids() == []
    delivered, bounce = nexthop.received
    assert delivered.rcpt_tos == ["ok@dst.test"]
    assert bounce.mail_from == "" and bounce.rcpt_tos == ["alice@src.test"]
    report = parse_report(bounce.data)
    assert report.top["Subject"] == "Undelivered Mail Returned to Sender"
    assert report.per_message["Original-Envelope-Id"] == "QQ314159"
    failure, plain = report.recipients
    assert failure["Final-Recipient"] == "rfc822; failure@dst.test"
    assert failure["Original-Recipient"] == "rfc822; Failure+x@dst.test"
    assert failure["Action"] == "failed" and failure["Status"] == "5.1.1"
    assert plain["Final-Recipient"] == "rfc822; plain@dst.test"
    assert "Original-Recipient" not in plain
    assert "never@dst.test" not in report.human and "success@dst.test" not in report.human


async def test_no_bounce_at_all_when_every_failed_recipient_said_never(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    nexthop.rules = {"never@dst.test": "550 5.1.1 No such user"}
    rig = make_rig()
    qid = _store(rig, {"never@dst.test": ["NOTIFY=NEVER"]})
    await rig.worker.run_due()
    assert not rig.spool.exists(qid)
    assert rig.dsns() == []


async def test_ret_full_returns_the_message_up_to_the_size_limit(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    nexthop.rules = {"b@dst.test": "550 5.1.1 No such user"}
    rig = make_rig()
    _store(rig, {"b@dst.test": []}, mail_options=["RET=FULL"])
    await rig.worker.run_due()
    (dsn_qid,) = rig.dsns()
    report = parse_report(rig.spool.load(dsn_qid).data)
    assert report.returned is not None
    assert report.returned.get_payload() == "See you at nine.\r\n"
    rig.spool.remove(dsn_qid)

    big = MSG + b"x" * 200 + b"\r\n"
    rig = make_rig(bounce_size_limit=len(big) - 1)
    _store(rig, {"b@dst.test": []}, mail_options=["RET=FULL"], data=big)
    await rig.worker.run_due()
    (dsn_qid,) = rig.dsns()
    report = parse_report(rig.spool.load(dsn_qid).data)
    assert report.returned is None and "Subject: plans" in report.headers
    assert "See you at nine." not in report.headers


async def test_ret_hdrs_and_no_ret_return_the_header_section(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    nexthop.rules = {"b@dst.test": "550 5.1.1 No such user"}
    rig = make_rig()
    for options in (["RET=HDRS"], []):
        _store(rig, {"b@dst.test": []}, mail_options=options)
        await rig.worker.run_due()
        (dsn_qid,) = rig.dsns()
        report = parse_report(rig.spool.load(dsn_qid).data)
        assert report.returned is None and "Subject: plans" in report.headers
        assert "See you at nine." not in report.headers
        rig.spool.remove(dsn_qid)


async def test_notify_success_through_a_next_hop_without_dsn_gives_a_relayed_notice(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    rig = make_rig()
    qid = _store(rig, {"b@dst.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;b@dst.test"],
                       "c@dst.test": ["NOTIFY=FAILURE"], "d@dst.test": []},
                 mail_options=["ENVID=E1", "RET=FULL"])
    await rig.worker.run_due()  # delivered; the notice spooled
    assert not rig.spool.exists(qid)
    await rig.worker.run_due()  # the notice goes out
    original, notice = nexthop.received
    assert original.rcpt_tos == ["b@dst.test", "c@dst.test", "d@dst.test"]
    assert notice.mail_from == "" and notice.rcpt_tos == ["alice@src.test"]
    report = parse_report(notice.data)
    assert report.top["Subject"] == "Successful Mail Delivery Report"
    assert report.per_message["Original-Envelope-Id"] == "E1"
    (block,) = report.recipients  # only the recipient that asked
    assert block["Final-Recipient"] == "rfc822; b@dst.test"
    assert block["Original-Recipient"] == "rfc822; b@dst.test"
    assert block["Action"] == "relayed" and block["Status"] == "2.0.0"
    assert block["Remote-MTA"] == f"dns; 127.0.0.1[127.0.0.1]:{nexthop.port}"
    # RET=FULL is about failure notices: a success notice carries the headers.
    assert report.returned is None and "Subject: plans" in report.headers


async def test_notify_success_through_a_dsn_next_hop_is_left_to_the_next_hop(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    nexthop.dsn = True
    rig = make_rig()
    _store(rig, {"b@dst.test": ["NOTIFY=SUCCESS"]}, mail_options=["ENVID=E1"])
    await rig.worker.run_due()
    assert rig.spool.queue_ids() == []  # delivered, and no notice of ours
    assert nexthop.rcpt_args == ["TO:<b@dst.test> NOTIFY=SUCCESS"]
    assert nexthop.mail_args[0].endswith(" ENVID=E1")


async def test_a_success_notice_waits_for_the_message_to_finish_and_survives_a_restart(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    nexthop.rules = {"c@dst.test": "451 4.3.0 Try later"}
    rig = make_rig()
    qid = _store(rig, {"b@dst.test": ["NOTIFY=SUCCESS"], "c@dst.test": ["NOTIFY=SUCCESS"]})
    await rig.worker.run_due()
    assert rig.dsns() == []  # c still pending: one notice when the message is done
    await rig.worker.stop(0)
    nexthop.rules.clear()
    clock.advance(3600)
    rig.worker = rig.new_worker()  # a new process: b's notice comes from the log
    await rig.worker.run_due()
    assert not rig.spool.exists(qid)
    (dsn_qid,) = rig.dsns()
    blocks = parse_report(rig.spool.load(dsn_qid).data).recipients
    assert [(b["Final-Recipient"], b["Action"]) for b in blocks] == [
        ("rfc822; b@dst.test", "relayed"), ("rfc822; c@dst.test", "relayed")]


async def test_notify_success_to_a_local_maildir_gives_a_delivered_notice(
    make_rig: Callable[..., Rig], nexthop: NextHop, tmp_path: Path
) -> None:
    rig = make_rig()
    routes = {"local.test": "maildir:mail", "*": f"smtp://127.0.0.1:{nexthop.port}?tls=off"}
    rig.cfg = rig.cfg.model_copy(
        update={"delivery": rig.cfg.delivery.model_copy(update={"routes": routes})})
    await rig.worker.stop(0)
    rig.worker = rig.new_worker()
    qid = _store(rig, {"bob@local.test": ["NOTIFY=SUCCESS,FAILURE"],
                       "carol@local.test": ["NOTIFY=FAILURE"]})
    await rig.worker.run_due()
    assert not rig.spool.exists(qid)
    assert len(list((tmp_path / "mail" / "bob@local.test" / "new").iterdir())) == 1
    await rig.worker.run_due()  # the notice goes to the sender through the next hop
    (notice,) = nexthop.received
    assert notice.mail_from == "" and notice.rcpt_tos == ["alice@src.test"]
    report = parse_report(notice.data)
    assert report.top["Subject"] == "Successful Mail Delivery Report"
    (block,) = report.recipients
    assert block["Final-Recipient"] == "rfc822; bob@local.test"
    assert block["Action"] == "delivered" and block["Status"] == "2.0.0"
    assert "Remote-MTA" not in block
    assert "<bob@local.test>: delivery successful" in report.human


async def test_delay_warning_once_per_recipient_that_did_not_decline_it(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    busy = {r: "451 4.3.0 Try later"
            for r in ("delay@dst.test", "failure@dst.test", "plain@dst.test", "never@dst.test")}
    nexthop.rules = dict(busy)
    rig = make_rig(retry_initial=300.0, retry_max=300.0, delay_warning=600.0)
    qid = _store(rig, {"delay@dst.test": ["NOTIFY=DELAY", "ORCPT=rfc822;Delay@dst.test"],
                       "failure@dst.test": ["NOTIFY=FAILURE"],
                       "plain@dst.test": [],  # no NOTIFY: as FAILURE,DELAY (RFC 3461 §4.1)
                       "never@dst.test": ["NOTIFY=NEVER"]})
    await rig.worker.run_due()
    clock.advance(300)
    await rig.worker.run_due()
    assert rig.dsns() == []  # deferred for 300 s only
    clock.advance(300)
    await rig.worker.run_due()  # 600 s: the warning
    (dsn_qid,) = rig.dsns()
    report = parse_report(rig.spool.load(dsn_qid).data)
    assert report.top["Subject"] == "Delayed Mail (still being retried)"
    delay, plain = report.recipients
    assert delay["Final-Recipient"] == "rfc822; delay@dst.test"
    assert delay["Original-Recipient"] == "rfc822; Delay@dst.test"
    assert delay["Action"] == "delayed" and delay["Status"] == "4.3.0"
    assert delay["Will-Retry-Until"]
    assert plain["Final-Recipient"] == "rfc822; plain@dst.test"
    assert report.returned is None and "Subject: plans" in report.headers
    rig.spool.remove(dsn_qid)

    await rig.worker.stop(0)
    rig.worker = rig.new_worker()  # a restart does not warn again
    clock.advance(300)
    await rig.worker.run_due()
    assert rig.dsns() == []
    nexthop.rules.clear()
    clock.advance(300)
    await rig.worker.run_due()
    assert not rig.spool.exists(qid) and rig.dsns() == []


async def test_no_delay_warning_by_default(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    nexthop.rules = {"b@dst.test": "451 4.3.0 Try later"}
    rig = make_rig(retry_initial=300.0, retry_max=300.0)
    _store(rig, {"b@dst.test": ["NOTIFY=DELAY"]})
    for _ in range(5):
        await rig.worker.run_due()
        clock.advance(3600)
    assert rig.dsns() == []


# -- notices are made once: recorded after the spool took them -------------------------

def _spool_takes(rig: Rig, stores: int) -> list[int]:
    """The worker's spool takes ``stores`` more messages, then is below its free-space
    reserve (as on a full disk) until the returned counter is raised."""
    left = [stores]

    def measure(_path: Path) -> int:
        left[0] -= 1
        return 1 << 40 if left[0] >= 0 else 0

    spool = rig.worker.spool
    spool.min_free_bytes = 1 << 20
    spool.free_space = _FreeSpace(spool.root, ttl=0.0, measure=measure)
    return left


def _notice_states(rig: Rig, qid: str) -> list[tuple[str, str]]:
    return [(e["kind"], e["state"]) for e in rig.spool.events(qid) if e["ev"] == "notice"]


async def test_a_notice_the_spool_refused_is_made_on_retry_and_only_that_one(
    make_rig: Callable[..., Rig], nexthop: NextHop
) -> None:
    nexthop.rules = {"b@dst.test": "550 5.1.1 No such user"}
    rig = make_rig()
    qid = _store(rig, {"b@dst.test": [], "c@dst.test": ["NOTIFY=SUCCESS"]})
    room = _spool_takes(rig, 1)  # the failure notice, then full for the success notice
    await rig.worker.run_due()
    assert len(rig.dsns()) == 1 and rig.spool.exists(qid)  # kept: a notice is owed
    assert _notice_states(rig, qid) == [("failure", "spooling"), ("success", "spooling"),
                                        ("failure", "spooled"), ("success", "refused")]
    room[0] = 10
    for _ in range(3):
        await rig.worker.run_due()
    assert rig.spool.queue_ids() == []
    notices = [parse_report(m.data).top["Subject"] for m in nexthop.received if not m.mail_from]
    assert sorted(notices) == ["Successful Mail Delivery Report",
                               "Undelivered Mail Returned to Sender"]


@pytest.mark.parametrize("notice_delivered_first", [False, True])
async def test_a_crash_between_spooling_a_notice_and_recording_it_sends_it_once(
    make_rig: Callable[..., Rig], nexthop: NextHop, monkeypatch: pytest.MonkeyPatch,
    notice_delivered_first: bool,
) -> None:
    nexthop.rules = {"b@dst.test": "550 5.1.1 No such user"}
    rig = make_rig()
    qid = _store(rig, {"b@dst.test": []})
    real = worker_module.store_from_loop

    async def spooled_then_killed(*args: Any, **kwargs: Any) -> str:
        await real(*args, **kwargs)
        raise RuntimeError("killed after the notice was spooled")

    monkeypatch.setattr(worker_module, "store_from_loop", spooled_then_killed)
    await rig.worker.run_due()
    (dsn_qid,) = rig.dsns()
    assert rig.spool.exists(qid)  # the crash left the bounced message behind
    monkeypatch.undo()
    await rig.worker.stop(0)
    rig.worker = rig.new_worker()  # the restart
    if notice_delivered_first:
        await rig.worker.process(dsn_qid)  # gone before the message is looked at again
        assert not rig.spool.exists(dsn_qid)
    for _ in range(3):
        await rig.worker.run_due()
    assert rig.spool.queue_ids() == []
    assert [m.rcpt_tos for m in nexthop.received] == [["alice@src.test"]]


async def test_a_delay_notice_the_spool_refused_is_made_at_the_next_attempt(
    make_rig: Callable[..., Rig], nexthop: NextHop, clock: FakeClock
) -> None:
    nexthop.rules = {"b@dst.test": "451 4.3.0 Try later"}
    rig = make_rig(retry_initial=300.0, retry_max=300.0, delay_warning=600.0)
    qid = _store(rig, {"b@dst.test": []})
    await rig.worker.run_due()
    clock.advance(600)
    room = _spool_takes(rig, 0)
    await rig.worker.run_due()  # the warning is due, and the spool refuses it
    assert rig.dsns() == []
    assert _notice_states(rig, qid) == [("delay", "spooling"), ("delay", "refused")]
    room[0] = 10
    clock.advance(300)
    await rig.worker.run_due()
    (dsn_qid,) = rig.dsns()
    assert parse_report(rig.spool.load(dsn_qid).data).top["Subject"] == (
        "Delayed Mail (still being retried)")
    assert _notice_states(rig, qid)[2:] == [("delay", "spooling"), ("delay", "spooled")]
    rig.spool.remove(dsn_qid)
    clock.advance(300)
    await rig.worker.run_due()
    assert rig.dsns() == []  # once
