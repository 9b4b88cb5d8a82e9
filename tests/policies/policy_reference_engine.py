"""The policy engine and the decide stage's result mapping as they were before rules were
compiled for speed (commit 1063a4a): the reference the differential test
(test_policy_engine_reference.py) holds the live ones to.  Frozen: do not edit, except
that :func:`reference_rules` rebuilds a live policy's conditions as reference objects.

Evaluating a policy against one message: rules in order, one Decision out.

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

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import policy_reference_conditions
from policy_reference_conditions import EvalContext, derive_direction, guarded

from gateway import decide_actions
from gateway.envelope import Envelope
from gateway.pipeline import Action, MessageContext, StageResult
from gateway.replies import REJECTED_POLICY, TEMPFAIL_POLICY, Reply
from policies.actions import ARCHIVAL, DECIDING, PolicyAction, Retention
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
            "rules": [r.to_dict() for r in self.rules],
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


def _matches(rule: Rule, ctx: EvalContext) -> tuple[bool, str]:
    if rule.when is None:
        ok, why = True, "always"
    else:
        ok, why = guarded(rule.when, ctx)
        if not ok:
            return False, why
    if rule.unless is not None:
        exc, exc_why = guarded(rule.unless, ctx)
        if exc:
            return False, f"{why}; but unless: {exc_why}"
        # Say why the exception did not apply: "why was my partner's mail quarantined?"
        return True, f"{why}; unless not met: {exc_why}"
    return True, why


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


def _evaluate(
    policy: Policy, envelope: Envelope, message: MessageView | bytes,
    facts: Mapping[str, Any] | None, local_domains: Iterable[str], direction: str | None,
    now: datetime | None, decision: Decision,
) -> None:
    view = message if isinstance(message, MessageView) else MessageView.from_bytes(message)
    try:
        direction = direction or derive_direction(envelope, local_domains)
    except Exception:
        direction = "relay"
    decision.direction = direction
    ctx = EvalContext(envelope=envelope, message=view,
                      facts=facts if isinstance(facts, Mapping) else {},
                      direction=direction, now=_now(envelope, now), errors=decision.errors)
    stopped_by: str | None = None
    seen_actions: set[str] = set()
    for rule in reference_rules(policy):
        if stopped_by is not None:
            decision.rules.append(RuleTrace(rule.name, False, f"not evaluated: rule "
                                            f"{stopped_by!r} stopped evaluation",
                                            rule.mode, evaluated=False))
            continue
        inactive = _active(rule, ctx.now)
        if inactive:
            decision.rules.append(RuleTrace(rule.name, False, inactive, rule.mode))
            continue
        errors_before = len(decision.errors)
        ok, why = _matches(rule, ctx)
        trace = RuleTrace(rule.name, ok, why, rule.mode)
        decision.rules.append(trace)
        if (not ok and rule.on_error == "defer" and rule.mode == "enforce"
                and len(decision.errors) > errors_before):
            _defer(decision, rule, trace)
            continue
        if not ok:
            continue
        if rule.mode == "audit":
            trace.actions = [a.to_dict() for a in rule.then]
            continue
        for action in rule.then:
            _apply(decision, rule, action, trace, seen_actions)
        if rule.stop:
            stopped_by = rule.name
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


def _apply(decision: Decision, rule: Rule, action: PolicyAction, trace: RuleTrace,
           seen: set[str]) -> None:
    entry = {**action.to_dict(), "rule": rule.name}
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



def reference_rules(policy: Policy) -> list[Rule]:
    """The policy's rules with their conditions rebuilt from the reference classes."""
    return [dataclasses.replace(rule, when=_ref(rule.when), unless=_ref(rule.unless))
            for rule in policy.rules]


def _ref(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return tuple(_ref(x) for x in obj)
    if dataclasses.is_dataclass(obj) and type(obj).__module__ == "policies.conditions":
        # A class added since (KeywordPattern) becomes the reference class it derives
        # from (SafePattern: the scan of every position), with that class's fields.
        cls = next(getattr(policy_reference_conditions, k.__name__) for k in type(obj).__mro__
                   if hasattr(policy_reference_conditions, k.__name__))
        return cls(**{f.name: _ref(getattr(obj, f.name))
                      for f in dataclasses.fields(cls) if f.init})
    return obj


# gateway/decide.py's mapping onto the pipeline, as it was.

_ACTIONS = {
    "accept": Action.CONTINUE,
    "reject": Action.REJECT,
    "tempfail": Action.TEMPFAIL,
    "quarantine": Action.QUARANTINE,
    "discard": Action.DISCARD,
}


def to_result(
    decision: Decision, ctx: MessageContext | None = None, *, hostname: str = "localhost",
    notify_from: str | None = None, now: float | None = None,
) -> StageResult:
    """The pipeline's result for ``decision``; with ``ctx``, the message actions too."""
    if decision.failed:
        return StageResult(action=Action.HOLD, reason="policy evaluation failed: "
                           + "; ".join(decision.errors), facts=decision.to_facts())
    action = _ACTIONS.get(decision.decision, Action.CONTINUE)
    reply = decision.reply
    if reply is None and action is Action.REJECT:
        reply = REJECTED_POLICY
    if reply is None and action is Action.TEMPFAIL:
        reply = TEMPFAIL_POLICY
    reason = f"policy: {decision.decision}" + (
        f" by rule {decision.decided_by!r}" if decision.decided_by else "")
    result = StageResult(
        action=action, reply=reply, reason=reason, headers=decision.headers,
        facts=decision.to_facts(),
    )
    if ctx is not None and action not in (Action.REJECT, Action.TEMPFAIL):
        _execute(decision, ctx, result, hostname, notify_from or f"MAILER-DAEMON@{hostname}",
                 time.time() if now is None else now)
    return result


def _execute(decision: Decision, ctx: MessageContext, result: StageResult, hostname: str,
             notify_from: str, now: float) -> None:
    """Carry out header edits, routing and notices; record what was done in the facts."""
    actions = decision.actions
    done: dict[str, Any] = {}
    edits = [a for a in actions if a["action"] in decide_actions.HEADER_ACTIONS]
    if edits:
        data, errors = decide_actions.apply_header_actions(ctx.data, edits)
        if data != ctx.data:
            result.data = data
        done["headers"] = [dict(a) for a in edits]
        done["headers_changed"] = data != ctx.data
        if errors:
            done["errors"] = errors
    route = decide_actions.routing(ctx.envelope.rcpt_to, actions)
    if route.recipients is not None or route.extra:
        done["original_recipients"] = list(ctx.envelope.rcpt_to)
    if route.recipients is not None:
        result.recipients = route.recipients
        done["redirected_to"] = list(route.recipients)
    if route.extra:
        result.extra_recipients = route.extra
        done["copied_to"] = list(route.extra)
    notices = [a for a in actions if a["action"] == "notify"]
    if notices and decide_actions.header_value(ctx.data, decide_actions.NOTICE_HEADER):
        # A notice about a notice could loop between two gateways: say so, send none.
        done["notify_skipped"] = "the message is itself a policy notice"
    elif notices:
        message_id = decide_actions.header_value(ctx.data, "Message-ID")
        sent = []
        for a in notices:
            for to in a["to"]:
                result.notify.append((to, decide_actions.build_notice(
                    to=to, rule=str(a.get("rule", "")), decision=decision.decision,
                    message_id=message_id, sender=ctx.envelope.mail_from,
                    sender_from=notify_from, hostname=hostname, now=now,
                    subject=a.get("subject"), text=a.get("text"))))
                sent.append({"to": to, "rule": a.get("rule")})
        done["notified"] = sent
    if done:
        result.facts["executed"] = done
