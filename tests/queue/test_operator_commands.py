"""An operator's hold, retry or release never lands in the middle of a delivery attempt.

The worker delivers while holding the message's claim (its flock); the queue CLI
used to append its event beside that, and what the worker wrote after it lost or
contradicted it.  Here a real worker delivers to the loopback next hop, which holds
the end of DATA until the test lets it answer, and the CLI runs in another thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nexthop import NextHop
from queuekit import FakeClock

from gateway.cli import main
from gateway.config import Config, DeliveryConfig, QueueConfig
from gateway.deliver.deliverer import Deliverer
from gateway.envelope import Envelope
from gateway.queue.spool import Spool
from gateway.queue.worker import QueueWorker

MSG = b"From: alice@src.test\r\nSubject: plans\r\n\r\nSee you at nine.\r\n"


class Rig:
    def __init__(self, tmp_path: Path, hop: NextHop, clock: FakeClock) -> None:
        self.config_file = tmp_path / "coffer.yaml"
        self.config_file.write_text("listeners:\n  - name: in\n    tls: none\n"
                                    "queue:\n  fsync: false\nmetrics:\n  address: null\n")
        cfg = Config(hostname="coffer.test", data_dir=tmp_path,
                     queue=QueueConfig(fsync=False, retry_initial=60.0),
                     delivery=DeliveryConfig(
                         routes={"*": f"smtp://127.0.0.1:{hop.port}?tls=off"},
                         connect_timeout=5.0, command_timeout=5.0))
        self.spool = Spool(tmp_path / "spool", fsync=False)
        self.worker = QueueWorker(cfg, Spool(self.spool.root, fsync=False), [],
                                  Deliverer(cfg), clock=clock, rand=lambda: 0.5)
        self.hop, self.clock = hop, clock
        hop.data_gate = asyncio.Event()

    def store(self) -> str:
        env = Envelope(mail_from="alice@src.test", rcpt_to=["bob@dst.test"],
                       received_at=self.clock.now)
        return self.spool.store(env, MSG)

    async def cli_during_delivery(self, qid: str, *command: str) -> int:
        """Run ``coffer queue COMMAND QID`` while the worker's attempt waits for the
        next hop's DATA reply, then let the next hop answer; the CLI's exit code."""
        attempt = asyncio.create_task(self.worker.process(qid))
        await asyncio.wait_for(self.hop.in_data.wait(), 10)
        cli = asyncio.create_task(asyncio.to_thread(
            main, ["queue", *command, qid, "--wait", "10", "--config", str(self.config_file)]))
        await asyncio.sleep(0.3)
        assert not cli.done(), "the command acted while the delivery attempt held the message"
        assert self.hop.data_gate is not None
        self.hop.data_gate.set()
        await attempt
        return await asyncio.wait_for(cli, 10)


@pytest.fixture
async def rig(tmp_path: Path, nexthop: NextHop, clock: FakeClock) -> AsyncIterator[Rig]:
    r = Rig(tmp_path, nexthop, clock)
    yield r
    if nexthop.data_gate is not None:
        nexthop.data_gate.set()
    await r.worker.stop(0)


async def test_a_hold_during_a_delivery_that_succeeds_says_it_was_not_held(
        rig: Rig, nexthop: NextHop, capsys: pytest.CaptureFixture[str]) -> None:
    qid = rig.store()
    assert await rig.cli_during_delivery(qid, "hold") == 1
    assert f"{qid}: delivered or removed meanwhile; not held" in capsys.readouterr().err
    assert nexthop.delivered_to("bob@dst.test") == 1
    # Nothing left behind: the hold was never written beside a removed message.
    assert not rig.spool.state_path(qid).exists()
    assert rig.spool.queue_ids() == []


async def test_a_hold_during_a_delivery_that_is_deferred_holds_the_message(
        rig: Rig, nexthop: NextHop, clock: FakeClock) -> None:
    nexthop.data_reply = "451 4.3.0 Try again later"
    qid = rig.store()
    assert await rig.cli_during_delivery(qid, "hold") == 0
    state = rig.spool.load(qid).state
    assert state.held and state.held_reason == "operator" and state.attempts == 1
    nexthop.data_reply, nexthop.data_gate = "250 2.0.0 Ok: queued", None
    clock.advance(3600)
    await rig.worker.run_due()
    assert nexthop.received == [] and rig.spool.load(qid).state.held


async def test_a_retry_during_a_delivery_that_is_deferred_is_not_undone_by_it(
        rig: Rig, nexthop: NextHop) -> None:
    nexthop.data_reply = "451 4.3.0 Try again later"
    qid = rig.store()
    assert await rig.cli_during_delivery(qid, "retry") == 0
    # The attempt's deferral (next attempt in a minute) came first, the retry after.
    state = rig.spool.load(qid).state
    assert state.attempts == 1 and state.next_attempt_at == 0.0
    nexthop.data_reply, nexthop.data_gate = "250 2.0.0 Ok: queued", None
    assert await rig.worker.run_due() == 1  # due now, not in a minute
    assert nexthop.delivered_to("bob@dst.test") == 1


async def test_a_hold_of_a_message_its_gateway_spooled_and_has_not_begun_stops_it(
        rig: Rig, nexthop: NextHop, capsys: pytest.CaptureFixture[str]) -> None:
    """The gateway keeps the claim of what it just spooled for its worker (a message
    waiting for a delivery slot): the hold cannot wait for that claim, which is let go
    only after delivery, so it is written at once and the worker reads it."""
    rig.worker.spool.keep_claims(8)
    env = Envelope(mail_from="alice@src.test", rcpt_to=["bob@dst.test"],
                   received_at=rig.clock.now)
    qid = rig.worker.spool.commit(rig.worker.spool.begin(env, MSG))
    cli = asyncio.create_task(asyncio.to_thread(
        main, ["queue", "hold", qid, "--wait", "10", "--config", str(rig.config_file)]))
    await asyncio.sleep(0.3)
    assert not cli.done()  # the claim is the gateway's
    await rig.worker.process(qid)  # the worker takes it over, reads the hold, lets it go
    assert await asyncio.wait_for(cli, 10) == 0
    assert f"{qid}: held" in capsys.readouterr().out
    assert nexthop.received == [] and not nexthop.in_data.is_set()
    assert rig.spool.load(qid).state.held
