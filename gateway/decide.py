"""The decide stage: apply the policy and turn its Decision into a StageResult.

All policy logic lives in :mod:`policies`; this adapter only builds the inputs
(envelope, message bytes, the check stage's facts, local domains, the clock)
and maps the outcome onto the pipeline's vocabulary:

    accept      -> CONTINUE (with headers to add)
    reject      -> REJECT   + Reply(code, enhanced, text)   5xx before queue
    tempfail    -> TEMPFAIL + Reply(code, enhanced, text)   4xx before queue
    quarantine  -> QUARANTINE
    discard     -> DISCARD
    (engine failure) -> HOLD: an operator looks at it; it is neither lost nor passed unchecked

The message actions are carried out here, before the queue, by the pure
functions of :mod:`gateway.decide_actions`: header edits (remove_header,
rewrite_header, tag_subject) become the result's ``data``; redirect replaces
and bcc/journal add envelope recipients; notify becomes notices the runner
spools after the message.  They run for accept, quarantine and discard (a
refused message is not queued, so nothing is changed or sent); audit-mode rules
never reach ``Decision.actions`` and so never run.

The full decision (actions, retention, holds, the trace of every rule) goes
into the facts, which the archive stores with the message, with what was
carried out under ``executed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from gateway import decide_actions
from gateway.offload import cpu_bound
from gateway.pipeline import Action, MessageContext, StageResult
from gateway.replies import REJECTED_POLICY, TEMPFAIL_POLICY
from policies.engine import Decision, evaluate
from policies.schema import Policy

_ACTIONS = {
    "accept": Action.CONTINUE,
    "reject": Action.REJECT,
    "tempfail": Action.TEMPFAIL,
    "quarantine": Action.QUARANTINE,
    "discard": Action.DISCARD,
}


class DecideStage:
    name = "decide"
    once = False

    def __init__(
        self,
        policy: Policy | Callable[[], Policy | None] | None,
        local_domains: Iterable[str] = (),
        clock: Callable[[], float] | None = None,
        *,
        hostname: str = "localhost",
        notify_from: str | None = None,
    ) -> None:
        # A callable lets the service swap in a reloaded policy atomically: each
        # message is evaluated against whichever complete policy is current.
        self._policy = policy
        self._local_domains = tuple(local_domains)
        self._clock = clock
        self._hostname = hostname
        # RFC 5321 §4.5.5: notices go with the null reverse-path; From names the system.
        self._notify_from = notify_from or f"MAILER-DAEMON@{hostname}"

    def current_policy(self) -> Policy | None:
        return self._policy() if callable(self._policy) else self._policy

    async def run(self, ctx: MessageContext) -> StageResult:
        policy = self.current_policy()
        if policy is None:
            return StageResult(reason="no policy configured", facts={"decision": "accept",
                                                                    "policy": None})
        now = datetime.fromtimestamp(self._clock(), UTC) if self._clock else None
        # DLP scanning of a large message is CPU work: that one goes to a thread.
        decision = await cpu_bound(
            len(ctx.data), None, evaluate, policy, ctx.envelope, ctx.data, dict(ctx.facts),
            local_domains=self._local_domains, now=now,
        )
        return to_result(decision, ctx, hostname=self._hostname, notify_from=self._notify_from,
                         now=self._clock() if self._clock else None)


# The actions _execute carries out: header edits, routing, notices.
_EXECUTED = decide_actions.HEADER_ACTIONS | {"redirect", "bcc", "journal", "notify"}


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
    # Most mail gets no action that is carried out here (add_header goes out as the
    # result's headers): then there is nothing to do and nothing to record.
    if not any(a["action"] in _EXECUTED for a in actions):
        return
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


__all__ = ["DecideStage", "to_result"]
