"""The decide stage maps the policy's Decision onto the pipeline's StageResult."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import pytest

from gateway.decide import DecideStage, to_result
from gateway.envelope import Envelope
from gateway.pipeline import Action, MessageContext, Stage, apply
from gateway.replies import Reply
from policies.loader import load_policy
from policies.schema import Policy

POLICY = """
version: 1
rules:
  - name: reject-blocked
    when: {subject: {contains: blocked}}
    then: [{reject: {code: 554, enhanced: 5.7.1, text: "Blocked by policy"}}]
  - name: defer
    when: {subject: {contains: later}}
    then: [tempfail]
  - name: quarantine-dmarc
    when: {dmarc: fail}
    then: [quarantine]
  - name: drop
    when: {subject: {contains: drop}}
    then: [discard]
  - name: tag-inbound
    when: {direction: inbound}
    then: [{add_header: {name: X-Coffer-External, value: "yes"}}, {encrypt: {method: pgp}}]
  - name: keep
    then: [{retain: 7y}]
"""


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(POLICY), encoding="utf-8")
    return load_policy(path)


def ctx(subject: str, facts: dict[str, object] | None = None,
        sender: str = "a@outside.example") -> MessageContext:
    data = f"From: {sender}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
    return MessageContext(Envelope(sender, ["bob@example.com"], received_at=1741170600.0),
                          data, facts=dict(facts or {}))


def test_stage_satisfies_the_protocol(policy: Policy) -> None:
    stage: Stage = DecideStage(policy, ["example.com"])
    assert stage.name == "decide" and stage.once is False


async def test_accept_adds_headers_and_records_the_decision(policy: Policy) -> None:
    stage = DecideStage(policy, ["example.com"])
    c = ctx("hello")
    result = await stage.run(c)
    assert result.action is Action.CONTINUE and result.reply is None
    assert result.headers == [("X-Coffer-External", "yes")]
    facts = result.facts
    assert facts["decision"] == "accept" and facts["retention"] == "7y"
    assert facts["direction"] == "inbound"
    assert [a["action"] for a in facts["actions"]] == ["add_header", "encrypt"]
    assert [(r["name"], r["matched"]) for r in facts["rules"]] == [
        ("reject-blocked", False), ("defer", False), ("quarantine-dmarc", False),
        ("drop", False), ("tag-inbound", True), ("keep", True)]
    assert all(r["why"] for r in facts["rules"])
    json.dumps(facts)  # archived with the message
    apply(c, "decide", result)
    assert c.data.startswith(b"X-Coffer-External: yes\r\n")
    assert c.facts["decide"]["decision"] == "accept"


async def test_reject_carries_the_rules_reply(policy: Policy) -> None:
    result = await DecideStage(policy, ["example.com"]).run(ctx("blocked offer"))
    assert result.action is Action.REJECT
    assert result.reply == Reply(554, "5.7.1", "Blocked by policy")
    assert "reject-blocked" in result.reason


async def test_tempfail_gets_the_default_policy_deferral(policy: Policy) -> None:
    result = await DecideStage(policy, ["example.com"]).run(ctx("later please"))
    assert result.action is Action.TEMPFAIL
    assert result.reply == Reply(451, "4.7.1", "Message deferred by policy")


async def test_quarantine_reads_the_check_stage_facts(policy: Policy) -> None:
    facts: dict[str, object] = {"check": {"dmarc": {"result": "fail", "disposition": "none"}}}
    result = await DecideStage(policy, ["example.com"]).run(ctx("hi", facts))
    assert result.action is Action.QUARANTINE and result.reply is None
    assert result.facts["decided_by"] == "quarantine-dmarc"


async def test_discard(policy: Policy) -> None:
    result = await DecideStage(policy, ["example.com"]).run(ctx("drop it"))
    assert result.action is Action.DISCARD
    assert result.facts["retention"] == "7y"  # discarded mail is still archived


async def test_the_local_domains_decide_the_direction(policy: Policy) -> None:
    result = await DecideStage(policy, ["example.com"]).run(ctx("hi", sender="x@example.com"))
    assert result.facts["direction"] == "internal"
    assert result.headers == []


async def test_a_policy_provider_lets_the_service_swap_policies(policy: Policy,
                                                               tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("version: 1\nrules:\n  - name: all\n    then: [quarantine]\n")
    current = {"policy": policy}
    stage = DecideStage(lambda: current["policy"], ["example.com"])
    assert (await stage.run(ctx("hi"))).action is Action.CONTINUE
    current["policy"] = load_policy(other)
    assert (await stage.run(ctx("hi"))).action is Action.QUARANTINE


async def test_no_policy_accepts_and_says_so() -> None:
    result = await DecideStage(None).run(ctx("hi"))
    assert result.action is Action.CONTINUE
    assert result.facts == {"decision": "accept", "policy": None}


async def test_the_injected_clock_is_the_evaluation_time(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n  - name: from-2030\n    active_from: 2030-01-01\n"
                    "    then: [quarantine]\n")
    stage = DecideStage(load_policy(path), clock=lambda: 1893456000.0)  # 2030-01-01
    assert (await stage.run(ctx("hi"))).action is Action.QUARANTINE
    assert (await DecideStage(load_policy(path)).run(ctx("hi"))).action is Action.CONTINUE


async def test_garbage_message_and_facts_never_raise(policy: Policy) -> None:
    c = MessageContext(Envelope("", []), b"\xff\x00garbage", facts={"check": "nonsense",
                                                                     "spam": [1, 2]})
    result = await DecideStage(policy).run(c)
    assert result.action is Action.CONTINUE
    assert result.facts["errors"] == []


def test_an_engine_failure_holds_the_message() -> None:
    from policies.engine import Decision

    decision = Decision(failed=True, errors=["evaluation failed: RuntimeError: bug"])
    result = to_result(decision)
    assert result.action is Action.HOLD
    assert "RuntimeError: bug" in result.reason
    assert result.facts["failed"] is True


async def test_an_engine_bug_is_caught_by_evaluate_and_becomes_a_hold(policy: Policy) -> None:
    class Exploding:
        """A stand-in rule list whose iteration fails, as a bug in the engine would."""

        def __iter__(self) -> object:
            raise RuntimeError("bug")

    broken = dataclasses.replace(policy, rules=Exploding())  # type: ignore[arg-type]
    result = await DecideStage(broken).run(ctx("hi"))
    assert result.action is Action.HOLD and "bug" in result.reason
