"""Opportunistic encryption to mixed recipients: ciphertext for the keyed, clear for the rest.

Issue 6: "those with a valid key get an encrypted copy, the rest are handled by the
rule ... opportunistic (sent in clear and recorded)".  The runner spools one copy
per group before its 250; the real queue worker, transform stage and gpg do the rest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptokit import Identities, gpg, message
from test_fail_closed import SECRET, SENDER, Rig

from gateway.envelope import Envelope
from gateway.errors import SpoolError
from gateway.pipeline import MessageContext, StageResult
from gateway.queue.spool import PendingStore, Spool
from gateway.runner import Runner, split_copy
from gateway.transform import mime
from gateway.transform.encrypt_split import EncryptSplitStage, groups, wants_split

OPPORTUNISTIC = [{"action": "encrypt", "method": "pgp", "require": False, "rule": "tls-or-pgp"}]


class Decided:
    """The decide stage's output for this test: the policy said encrypt, opportunistic."""

    name = "decide"
    once = True

    def __init__(self, actions: list[dict[str, Any]]) -> None:
        self.actions = actions

    async def run(self, ctx: MessageContext) -> StageResult:
        return StageResult(facts={"actions": self.actions, "direction": "outbound"})


@pytest.fixture
async def rig(data_dir: Path) -> AsyncIterator[Rig]:
    r = Rig(data_dir)
    yield r
    await r.worker.stop(0)
    r.stage.close()


def runner(r: Rig, actions: list[dict[str, Any]]) -> Runner:
    return Runner(r.spool, [Decided(actions), EncryptSplitStage(r.stage)])


async def test_keyed_recipient_gets_ciphertext_and_keyless_one_gets_clear_text(
        rig: Rig, identities: Identities) -> None:
    rcpts = ["bob@partner.test", "nokey@partner.test"]
    original = message(to=", ".join(rcpts))
    reply = await runner(rig, OPPORTUNISTIC).accept(Envelope(SENDER, list(rcpts)), original)
    assert reply.code == 250
    qids = rig.spool.queue_ids()
    assert len(qids) == 2 and all(q in reply.text for q in qids)
    await rig.worker.run_due()
    (clear,) = rig.received("nokey@partner.test")
    assert SECRET in clear
    (got,) = rig.received("bob@partner.test")
    assert SECRET not in got
    out = gpg(identities.pgp["bob@partner.test"].home, "--decrypt",
              input=mime.pgp_ciphertext(got)).stdout
    assert out == mime.protect(original).entity
    assert rig.spool.queue_ids() == []


async def test_all_keyed_or_all_keyless_recipients_are_spooled_once(rig: Rig) -> None:
    for rcpts in (["bob@partner.test", "carol@partner.test"],
                  ["nokey@partner.test", "other@partner.test"]):
        reply = await runner(rig, OPPORTUNISTIC).accept(
            Envelope(SENDER, list(rcpts)), message(to=", ".join(rcpts)))
        assert reply.code == 250
        assert len(rig.spool.queue_ids()) == 1
        await rig.worker.run_due()
        assert rig.spool.queue_ids() == []


async def test_require_is_not_split_the_transform_stage_bounces_the_keyless(rig: Rig) -> None:
    required = [dict(OPPORTUNISTIC[0], require=True)]
    await runner(rig, required).accept(
        Envelope(SENDER, ["bob@partner.test", "nokey@partner.test"]), message())
    assert len(rig.spool.queue_ids()) == 1


async def test_a_failed_second_copy_removes_the_first_and_answers_4xx(rig: Rig) -> None:
    class FailSecond(Spool):
        calls = 0

        def begin(self, *a: Any, **kw: Any) -> PendingStore:  # the first half of store()
            FailSecond.calls += 1
            if FailSecond.calls == 2:
                raise SpoolError("spool write failed: injected")
            return super().begin(*a, **kw)

    rig.spool = FailSecond(rig.spool.root)
    reply = await runner(rig, OPPORTUNISTIC).accept(
        Envelope(SENDER, ["bob@partner.test", "nokey@partner.test"]), message())
    assert reply.code == 451
    assert rig.spool.queue_ids() == []


def test_groups_and_copies_keep_order_and_per_recipient_options() -> None:
    assert groups(["a@x", "b@y", "c@x"], {"a@x", "c@x"}) == [["a@x", "c@x"], ["b@y"]]
    assert groups(["a@x"], {"a@x"}) == []
    assert groups(["a@x", "b@x"], set()) == []
    env = Envelope("s@x", ["a@x", "b@y"], rcpt_options=[["NOTIFY=NEVER"], []])
    ctx = MessageContext(envelope=env, data=b"", facts={"decide": {}})
    copy, facts = split_copy(ctx, ["b@y"], 1, ["Q1", "Q2"])
    assert (copy.rcpt_to, copy.rcpt_options) == (["b@y"], [[]])
    assert facts["split"] == {"group": 2, "of": 2, "queue_ids": ["Q1", "Q2"]}
    assert env.rcpt_to == ["a@x", "b@y"]  # the original envelope is untouched


def test_split_applies_only_to_opportunistic_encryption_of_clear_mail() -> None:
    facts = {"decide": {"actions": OPPORTUNISTIC}}
    assert wants_split(facts, ["a@x", "b@x"], message()) == "pgp"
    assert wants_split(facts, ["a@x"], message()) is None
    assert wants_split({"decide": {"actions": [dict(OPPORTUNISTIC[0], require=True)]}},
                       ["a@x", "b@x"], message()) is None
    assert wants_split({"decide": {"actions": []}}, ["a@x", "b@x"], message()) is None
