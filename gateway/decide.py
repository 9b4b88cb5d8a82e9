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

The full decision (actions, retention, holds, the trace of every rule) goes
into the facts, which the archive stores with the message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

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
    ) -> None:
        # A callable lets the service swap in a reloaded policy atomically: each
        # message is evaluated against whichever complete policy is current.
        self._policy = policy
        self._local_domains = tuple(local_domains)
        self._clock = clock

    def current_policy(self) -> Policy | None:
        return self._policy() if callable(self._policy) else self._policy

    async def run(self, ctx: MessageContext) -> StageResult:
        policy = self.current_policy()
        if policy is None:
            return StageResult(reason="no policy configured", facts={"decision": "accept",
                                                                    "policy": None})
        now = datetime.fromtimestamp(self._clock(), UTC) if self._clock else None
        # DLP scanning of a large message is CPU work: keep it off the event loop.
        decision = await asyncio.to_thread(
            evaluate, policy, ctx.envelope, ctx.data, dict(ctx.facts),
            local_domains=self._local_domains, now=now,
        )
        return to_result(decision)


def to_result(decision: Decision) -> StageResult:
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
    return StageResult(
        action=action, reply=reply, reason=reason, headers=decision.headers,
        facts=decision.to_facts(),
    )


__all__ = ["DecideStage", "to_result"]
