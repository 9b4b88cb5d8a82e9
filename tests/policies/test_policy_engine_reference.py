"""The policy engine and the decide stage's mapping equal the reference copies kept from
before rules were compiled for speed: the same decision, reply, actions, retention,
holds, errors and trace (its text and order: the archive keeps it), and the same
StageResult, for every policy here over every message.

The references are policy_reference_engine.py and policy_reference_conditions.py
(frozen).  The policies are the shipped rule sets, every golden-case policy
(tests/policies/cases, which use every condition and action of the language) and the
lazy-view test's content and attachment policies; the messages are the golden cases
(with their envelopes, facts and clocks), bench generator messages and the shared
corpus, each under a rotating set of envelopes and check/spam facts.
"""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import policy_reference_engine as reference
import pytest
import test_policy_cases as cases
import test_policy_message_lazy as lazy
import yaml

from bench.relay import make_messages, message_sizes
from gateway.decide import to_result
from gateway.envelope import Envelope, TlsInfo
from gateway.pipeline import MessageContext, StageResult
from policies import SHIPPED
from policies.engine import Decision, evaluate
from policies.loader import load_policy
from policies.schema import Policy

PREFIX = lazy.PREFIX
LOCAL = ("example.com", "dst.example", "xn--mnchen-3ya.example")
AT = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _rules(conditions: list[str], extra: str = "") -> str:
    return lazy._policy_text(conditions) + extra


# Rule-level semantics on real mail: stop, override, audit, unless, on_error, windows.
SEMANTICS = """\
  - name: audit-big
    mode: audit
    when: {size: {gt: 4000}}
    then: [quarantine, {add_header: {name: X-Big, value: "1"}}]
  - name: inactive
    active_until: 2020-01-01
    then: [discard]
  - name: future
    active_from: 2099-01-01
    then: [discard]
  - name: tag
    when: {any: [{subject: {contains: a}}, {not: {body: {contains: zzz}}}]}
    unless: {all: [{header.X-Spam-Status: {exists: true}}, {size: {lt: 3000}}]}
    then: [{tag_subject: "[ext]"}, {add_header: {name: X-Tag, value: "1"}}, accept]
  - name: later-reject
    when: {size: {gt: 20000}}
    override: true
    then: [{reject: {code: 550, enhanced: 5.7.1, text: "too big"}}]
  - name: defer-timeout
    on_error: defer
    when: {body: {regex: '(a|aa)+$'}}
    then: [quarantine]
  - name: hold
    when: {from.domain: {glob: '*.example'}}
    then: [{hold: case-1}, {retain: forever}, {bcc: [audit@example.com]}]
  - name: stopper
    when: {recipients.count: {ge: 2}}
    stop: true
    then: [{redirect: [x@example.com]}]
  - name: after-stop
    then: [{notify: {to: [admin@example.com]}}]
"""


def _case_policies(tmp: Path) -> list[Policy]:
    out = []
    for file in cases._files():
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
        if "policy" in doc:
            out.append(cases._policy(file, doc, tmp))
    return out


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> list[Policy]:
    out = [load_policy(path) for path in sorted(SHIPPED.glob("*.yaml"))]
    tmp = tmp_path_factory.mktemp("reference")
    out += _case_policies(tmp)
    for name, conds in (("attachments-first", lazy.ATTACHMENT_RULES + lazy.CONTENT_RULES),
                        ("content-first", lazy.CONTENT_RULES + lazy.ATTACHMENT_RULES)):
        path = tmp / f"{name}.yaml"
        path.write_text(_rules(conds, SEMANTICS))
        out.append(load_policy(path))
    return out


ENVELOPES: list[dict[str, Any]] = [
    {"mail_from": "bench@src.example", "rcpt_to": ["rcpt1@dst.example"]},
    {"mail_from": "me@example.com", "rcpt_to": ["you@partner.example"], "auth_user": "me"},
    {"mail_from": "me@example.com", "rcpt_to": ["a@example.com", "b@Example.COM"],
     "tls": True},
    {"mail_from": "", "rcpt_to": ["x@elsewhere.example", "y@xn--mnchen-3ya.example"],
     "client_ip": "[2001:db8::1]"},
    {"mail_from": "s@outside.example", "rcpt_to": ["c@other.example"],
     "client_ip": "not-an-ip"},
]

FACTS: list[dict[str, Any]] = [
    {"check": {"spf": {"result": "none"}, "dkim": [], "dmarc": {"result": "none"},
               "arc": {"result": "none"}},
     "spam": {"score": 0.1, "verdict": "ham", "symbols": {"BAYES_00": -1.0}}},
    {"check": {"spf": "pass", "dkim": [{"result": "pass", "domain": "example.com"},
                                       {"result": "fail"}],
               "dmarc": {"result": "fail", "disposition": "reject"}, "arc": "pass"},
     "spam": {"score": 16, "verdict": "spam", "symbols": ["GTUBE"]}},
    {"check": {"dmarc": {"result": "FAIL", "disposition": "quarantine"}, "dkim": "odd"},
     "spam": {"score": True, "verdict": 3}},
    {"check": "not a mapping", "spam": None},
    {},
]


def _envelope(i: int) -> Envelope:
    spec = dict(ENVELOPES[i % len(ENVELOPES)])
    tls = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384") if spec.pop("tls", False) else None
    return Envelope(**spec, tls=tls, received_at=AT.timestamp())


_NOTICE_ID = re.compile(rb"\r\nMessage-ID: <[0-9a-f]{32}@")


def _result_fields(r: StageResult) -> dict[str, Any]:
    # A notice's own Message-ID is random (uuid4): compare the notices without it.
    notify = [(to, _NOTICE_ID.sub(b"\r\nMessage-ID: <@", data)) for to, data in r.notify]
    return {"action": r.action, "reply": r.reply, "reason": r.reason, "headers": r.headers,
            "facts": r.facts, "data": r.data, "recipients": r.recipients,
            "extra_recipients": r.extra_recipients, "notify": notify}


def _same(policy: Policy, env: Envelope, data: bytes, facts: dict[str, Any],
          **kw: Any) -> Decision:
    got = evaluate(policy, env, data, facts, **kw)
    want = reference.evaluate(policy, env, data, facts, **kw)
    where = f"{policy.source}: {data[:60]!r}"
    assert got.to_facts() == want.to_facts(), where
    assert got.to_json() == want.to_json(), where
    assert [r.summary for r in got.rules] == [r.summary for r in want.rules], where
    assert got.headers == want.headers, where
    assert (got.reason, got.failed) == (want.reason, want.failed), where
    ctx = MessageContext(envelope=env, data=data, facts=dict(facts))
    live = to_result(got, ctx, hostname="mx.example", now=AT.timestamp())
    ref = reference.to_result(want, MessageContext(envelope=env, data=data, facts=dict(facts)),
                              hostname="mx.example", now=AT.timestamp())
    assert _result_fields(live) == _result_fields(ref), where
    return got


def test_the_golden_cases_evaluate_as_the_reference_does(tmp_path: Path) -> None:
    seen = 0
    for file in cases._files():
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
        policy = cases._policy(file, doc, tmp_path)
        for case in doc["cases"]:
            at = case.get("at", doc.get("at", datetime(2025, 3, 5, 10, 30, tzinfo=UTC)))
            if isinstance(at, str):
                at = datetime.fromisoformat(at)
            if at.tzinfo is None:
                at = at.replace(tzinfo=UTC)
            _same(policy, cases._envelope(case.get("envelope") or {}, at), cases._message(case),
                  case.get("facts") or {}, local_domains=doc.get("local_domains",
                                                                  ["example.com"]),
                  direction=case.get("direction"), now=at)
            seen += 1
    assert seen >= 70


def _messages() -> list[bytes]:
    bench = make_messages(message_sizes(40, 3), 3)
    return [PREFIX + m for m in bench] + lazy.corpus()


def test_every_policy_evaluates_mail_as_the_reference_does(policies: list[Policy]) -> None:
    outcomes: set[tuple[str, str]] = set()
    matched: set[str] = set()
    for i, data in enumerate(_messages()):
        env = _envelope(i)
        facts = FACTS[(i // len(ENVELOPES)) % len(FACTS)]
        for policy in policies:
            d = _same(policy, env, data, facts, local_domains=LOCAL)
            outcomes.add((d.decision, d.direction))
            matched.update(r.name for r in d.rules if r.matched)
    # Not a vacuous comparison: every decision, direction and many rules were reached.
    assert {o[0] for o in outcomes} >= {"accept", "reject", "quarantine"}
    assert {o[1] for o in outcomes} == {"inbound", "outbound", "internal", "relay"}
    assert len(matched) > 40


def test_an_engine_failure_is_reported_as_the_reference_reports_it(
        policies: list[Policy]) -> None:
    env = _envelope(0)
    rng = random.Random(5)
    for policy in rng.sample(policies, 3):
        # An envelope whose recipients are not a list makes the engine itself fail.
        odd = Envelope("a@b.example", None, received_at=AT.timestamp())  # type: ignore[arg-type]
        got = evaluate(policy, odd, b"Subject: x\r\n\r\nbody\r\n", {})
        want = reference.evaluate(policy, odd, b"Subject: x\r\n\r\nbody\r\n", {})
        assert got.to_facts() == want.to_facts()
        _same(policy, env, b"Subject: x\r\n\r\n", {}, local_domains=LOCAL)
