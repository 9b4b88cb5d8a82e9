"""Evaluating a policy against one message: rules in order, one Decision out.

Semantics (docs/policy.md has the long form):

* Rules are evaluated in order.  A rule matches when its ``when`` holds, its
  ``unless`` does not, and it is active at the message's time.
* The first *deciding* action — reject, tempfail, discard, quarantine, or
  accept — settles the decision; a later one is recorded in the trace as
  ignored, unless its rule says ``override: true``.
* Non-terminal actions (headers, subject tag, redirect, bcc, journal, notify,
  encrypt, sign) accumulate, in rule order, without duplicates.
* The longest retention of all matching rules applies (``forever`` is the
  longest; immutability is kept if any matching rule asks for it).
* A legal hold overrides retention: held messages are kept until every hold
  is released, and are archived even under an ``archive: false`` exemption.
* ``stop: true`` ends evaluation after the rule (when it matched).
* Audit-mode rules are evaluated and recorded with what they would have done,
  and change nothing (nor stop evaluation).
* Every rule is recorded as matched or not, with the reason.
* A rule with ``on_error: defer`` whose conditions could not be evaluated (a
  regex timeout, say) defers the message (4xx) instead of counting as a miss.

:func:`evaluate` never raises: a condition that fails on odd input is a miss
with its error as the reason, and the error is listed in ``Decision.errors``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.envelope import Envelope
from gateway.replies import Reply
from policies.actions import ARCHIVAL, DECIDING, PolicyAction, Retention
from policies.conditions import EvalContext, Result, derive_direction, failed
from policies.message import MessageView
from policies.schema import Policy, Rule

# RFC 3463 §3.8: X.7.0 other security or policy status, transient.
TEMPFAIL_ERROR = Reply(451, "4.7.0", "Policy check could not be completed, try again later")


@dataclass(slots=True)
class RuleTrace:
    name: str
    matched: bool
    why: str
    mode: str = "enforce"
    evaluated: bool = True
    actions: list[dict[str, Any]] = field(default_factory=list)  # done (or would be, in audit)
    notes: list[str] = field(default_factory=list)  # e.g. an action ignored, and why

    @property
    def summary(self) -> str:
        """The reason with the effect, as the CLI and the golden files print it."""
        text = self.why
        if self.mode == "audit" and self.matched:
            would = ", ".join(_describe(a) for a in self.actions) or "nothing"
            text = f"[audit, would: {would}] {text}"
        if self.notes:
            text += " (" + "; ".join(self.notes) + ")"
        return text

    def to_dict(self) -> dict[str, Any]:
        # Decision.to_facts builds the same dict inline: keep the two in step.
        return {
            "name": self.name, "matched": self.matched, "why": self.why, "mode": self.mode,
            "evaluated": self.evaluated, "actions": self.actions, "notes": self.notes,
        }


def _describe(action: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v}" for k, v in action.items() if k not in ("action", "rule"))
    return f"{action['action']}({args})" if args else str(action["action"])


@dataclass(slots=True)
class Decision:
    decision: str = "accept"  # accept | reject | tempfail | quarantine | discard
    decided_by: str | None = None  # the rule whose action settled it
    reply: Reply | None = None  # for reject and tempfail
    reason: str = ""
    actions: list[dict[str, Any]] = field(default_factory=list)
    retention: Retention | None = None
    retention_rule: str | None = None
    holds: list[str] = field(default_factory=list)
    archive: bool = True
    rules: list[RuleTrace] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    direction: str = ""
    policy_digest: str = ""
    failed: bool = False  # the engine itself failed (a bug): the message must not pass unchecked

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Header fields the policy adds, for StageResult.headers."""
        return [(a["name"], a["value"]) for a in self.actions if a["action"] == "add_header"]

    def to_json(self) -> dict[str, Any]:
        """The shape of ``coffer policy test --json`` (issue 5)."""
        out: dict[str, Any] = {
            "decision": self.decision,
            "actions": [{k: v for k, v in a.items() if k != "rule"} for a in self.actions],
            "retention": self.retention.label if self.retention else None,
            "holds": list(self.holds),
            "rules": [{"name": r.name, "matched": r.matched, "why": r.summary}
                      for r in self.rules],
        }
        return out

    def to_facts(self) -> dict[str, Any]:
        """Everything the archive keeps with the message: the answer to "why"."""
        return {
            "decision": self.decision,
            "decided_by": self.decided_by,
            "reply": (
                {"code": self.reply.code, "enhanced": self.reply.enhanced, "text": self.reply.text}
                if self.reply else None
            ),
            "actions": [dict(a) for a in self.actions],
            "retention": self.retention.label if self.retention else None,
            "retention_detail": (
                {**self.retention.to_dict(), "rule": self.retention_rule}
                if self.retention else None
            ),
            "holds": list(self.holds),
            "archive": self.archive,
            "direction": self.direction,
            "policy": self.policy_digest,
            "errors": list(self.errors),
            "failed": self.failed,
            # RuleTrace.to_dict, inlined: one dict per rule of every message.
            "rules": [{"name": r.name, "matched": r.matched, "why": r.why, "mode": r.mode,
                       "evaluated": r.evaluated, "actions": r.actions, "notes": r.notes}
                      for r in self.rules],
        }


def _now(envelope: Envelope, now: datetime | None) -> datetime:
    if now is not None:
        return now if now.tzinfo else now.replace(tzinfo=UTC)
    if envelope.received_at:
        try:
            return datetime.fromtimestamp(float(envelope.received_at), UTC)
        except (OverflowError, OSError, ValueError, TypeError):
            pass
    return datetime.now(UTC)


def _active(rule: Rule, now: datetime) -> str | None:
    if rule.active_from is not None and now < rule.active_from:
        return f"inactive: starts {rule.active_from:%Y-%m-%d %H:%M %Z}"
    if rule.active_until is not None and now >= rule.active_until:
        return f"inactive: ended {rule.active_until:%Y-%m-%d %H:%M %Z}"
    return None


def evaluate(
    policy: Policy,
    envelope: Envelope,
    message: MessageView | bytes,
    facts: Mapping[str, Any] | None = None,
    *,
    local_domains: Iterable[str] = (),
    direction: str | None = None,
    now: datetime | None = None,
) -> Decision:
    """Apply ``policy`` to one message; never raises.

    ``facts`` are the earlier stages' facts (``{"check": ..., "spam": ...}``);
    ``local_domains`` (Config.relay.local_domains) decide the direction unless
    ``direction`` is given; ``now`` defaults to the envelope's received time.
    """
    decision = Decision(policy_digest=policy.digest)
    try:
        _evaluate(policy, envelope, message, facts, local_domains, direction, now, decision)
    except Exception as exc:  # a bug must neither raise into the pipeline nor pass mail unchecked
        decision.failed = True
        decision.errors.append(f"evaluation failed: {type(exc).__name__}: {exc}")
    return decision


# What evaluating a rule needs, worked out once per policy instead of per message:
# the conditions' bound evaluate methods, the mode tests, and each action's trace
# entry (a dict template copied per match: the archive keeps the entries, so each
# message gets its own).  The trace is the one the interpreting loop built, string
# for string (tests/policies/test_policy_engine_reference.py holds it to that loop).
@dataclass(frozen=True, slots=True)
class _Step:
    rule: Rule
    name: str
    mode: str
    windowed: bool  # active_from or active_until is set
    when: Callable[[EvalContext], Result] | None
    unless: Callable[[EvalContext], Result] | None
    audit: bool
    defer: bool  # on_error: defer, enforced
    stop: bool
    actions: tuple[tuple[PolicyAction, dict[str, Any]], ...]  # with the trace entry
    audit_actions: tuple[dict[str, Any], ...]  # what an audit rule would do


def _step(rule: Rule) -> _Step:
    return _Step(
        rule=rule, name=rule.name, mode=rule.mode,
        windowed=rule.active_from is not None or rule.active_until is not None,
        when=None if rule.when is None else rule.when.evaluate,
        unless=None if rule.unless is None else rule.unless.evaluate,
        audit=rule.mode == "audit",
        defer=rule.on_error == "defer" and rule.mode == "enforce",
        stop=rule.stop,
        actions=tuple((a, {**a.to_dict(), "rule": rule.name}) for a in rule.then),
        audit_actions=tuple(a.to_dict() for a in rule.then),
    )


# Plans by policy: a reload makes a new Policy, and the few last ones are kept (the
# Policy itself is held, so its id is not reused while its plan is here).
_PLANS_MAX = 8
_plans: dict[int, tuple[Policy, tuple[_Step, ...]]] = {}


def _plan(policy: Policy) -> tuple[_Step, ...]:
    entry = _plans.get(id(policy))
    if entry is not None and entry[0] is policy:
        return entry[1]
    steps = tuple(_step(rule) for rule in policy.rules)
    if len(_plans) >= _PLANS_MAX:
        _plans.clear()
    _plans[id(policy)] = (policy, steps)
    return steps


def _evaluate(
    policy: Policy, envelope: Envelope, message: MessageView | bytes,
    facts: Mapping[str, Any] | None, local_domains: Iterable[str], direction: str | None,
    now: datetime | None, decision: Decision,
) -> None:
    steps = _plan(policy)
    view = message if isinstance(message, MessageView) else MessageView.from_bytes(message)
    try:
        direction = direction or derive_direction(envelope, local_domains)
    except Exception:
        direction = "relay"
    decision.direction = direction
    errors = decision.errors
    ctx = EvalContext(envelope=envelope, message=view,
                      facts=facts if type(facts) is dict or isinstance(facts, Mapping) else {},
                      direction=direction, now=_now(envelope, now), errors=errors)
    traces = decision.rules
    seen_actions: set[str] = set()
    for index, step in enumerate(steps):
        if step.windowed:
            inactive = _active(step.rule, ctx.now)
            if inactive:
                traces.append(RuleTrace(step.name, False, inactive, step.mode))
                continue
        errors_before = len(errors)
        # _matches, with conditions.guarded inlined (a raising condition is a miss).
        if step.when is None:
            ok, why = True, "always"
        else:
            try:
                ok, why = step.when(ctx)
            except Exception as exc:
                ok, why = failed(exc, ctx)
        if ok and step.unless is not None:
            try:
                exc_ok, exc_why = step.unless(ctx)
            except Exception as exc:
                exc_ok, exc_why = failed(exc, ctx)
            if exc_ok:
                ok, why = False, f"{why}; but unless: {exc_why}"
            else:
                # Say why the exception did not apply: "why was my partner's mail quarantined?"
                why = f"{why}; unless not met: {exc_why}"
        trace = RuleTrace(step.name, ok, why, step.mode)
        traces.append(trace)
        if not ok:
            if step.defer and len(errors) > errors_before:
                _defer(decision, step.rule, trace)
            continue
        if step.audit:
            trace.actions = [dict(a) for a in step.audit_actions]
            continue
        for action, entry in step.actions:
            _apply(decision, step.rule, action, dict(entry), trace, seen_actions)
        if step.stop:
            why = f"not evaluated: rule {step.name!r} stopped evaluation"
            for rest in steps[index + 1:]:
                traces.append(RuleTrace(rest.name, False, why, rest.mode, evaluated=False))
            break
    if decision.holds:
        # A legal hold overrides retention and any archive exemption: keep everything.
        decision.archive = True


def _defer(decision: Decision, rule: Rule, trace: RuleTrace) -> None:
    """on_error: defer — a check that could not run must not be skipped silently.

    The message is deferred (4xx) so the sender retries, unless it is already
    rejected; an accept or quarantine decided earlier does not outrank it.
    """
    if decision.decision == "reject":
        trace.notes.append("could not be evaluated; already rejected")
        return
    if decision.decided_by is not None:
        trace.notes.append(f"overrides {decision.decision} by {decision.decided_by!r}")
    decision.decision = "tempfail"
    decision.decided_by = rule.name
    decision.reason = f"rule {rule.name!r} could not be evaluated"
    decision.reply = TEMPFAIL_ERROR
    trace.notes.append("could not be evaluated: deferred (on_error: defer)")
    trace.actions.append({"action": "tempfail", "code": TEMPFAIL_ERROR.code,
                          "enhanced": TEMPFAIL_ERROR.enhanced, "text": TEMPFAIL_ERROR.text,
                          "rule": rule.name})


def _apply(decision: Decision, rule: Rule, action: PolicyAction, entry: dict[str, Any],
           trace: RuleTrace, seen: set[str]) -> None:
    kind = action.kind
    if kind in DECIDING:
        if decision.decided_by is None or rule.override:
            if decision.decided_by is not None:
                trace.notes.append(f"overrides {decision.decision} by {decision.decided_by!r}")
            decision.decision = "accept" if kind == "accept" else kind
            decision.decided_by = rule.name
            decision.reason = f"rule {rule.name!r}"
            decision.reply = (
                Reply(int(action.params["code"]), str(action.params["enhanced"]),
                      str(action.params["text"]))
                if kind in ("reject", "tempfail") else None
            )
            trace.actions.append(entry)
        else:
            trace.notes.append(f"{kind} ignored: already {decision.decision} by "
                               f"{decision.decided_by!r}")
        return
    trace.actions.append(entry)
    if kind == "retain" and action.retention is not None:
        ret = action.retention
        cur = decision.retention
        if cur is None or ret.longer_than(cur):
            immutable = ret.immutable or bool(cur and cur.immutable)
            decision.retention = Retention(ret.label, ret.days, ret.retention_class, immutable)
            decision.retention_rule = rule.name
        elif ret.immutable and not cur.immutable:
            decision.retention = Retention(cur.label, cur.days, cur.retention_class, True)
        return
    if kind == "hold":
        case = str(action.params["case"])
        if case not in decision.holds:
            decision.holds.append(case)
        return
    if kind == "archive":
        decision.archive = False
        return
    if kind in ARCHIVAL:
        return
    key = action.dedupe_key
    if key not in seen:
        seen.add(key)
        decision.actions.append(entry)


__all__ = ["Decision", "RuleTrace", "evaluate"]
