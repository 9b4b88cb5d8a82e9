"""The pipeline: named stages in order, and the runner that alone acts on their results.

    receive ─▶ check ─▶ decide ─▶ [spool, 250] ─▶ transform ─▶ archive ─▶ deliver
    (SMTP)     (auth,    (policy)                 (sign,        (store,     (next hop,
                spam)                               encrypt)      ledger)     maildir)

*Before-queue* stages (check, decide) run while the client waits for the reply
to DATA, so a rejection is an SMTP reply and nothing is queued.  *After-queue*
stages (transform, archive, deliver) run on the spooled copy, so a crash between
them only repeats work; a stage that already completed (``once``) is recorded in
the spool and is not run again.

A stage returns a :class:`StageResult`; it never replies to a client nor touches
the queue itself.  An unexpected exception inside a stage becomes a held message
with the stage name and the error (never a dropped one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from gateway.envelope import Envelope
from gateway.replies import Reply


class Action(StrEnum):
    CONTINUE = "continue"
    REJECT = "reject"  # 5xx to the client (before queue) or a bounce (after queue)
    TEMPFAIL = "tempfail"  # 4xx to the client, or retry later
    QUARANTINE = "quarantine"  # archive and hold, do not deliver
    DISCARD = "discard"  # accept, archive, do not deliver
    HOLD = "hold"  # keep in the held area for an operator


TERMINAL = frozenset({Action.REJECT, Action.TEMPFAIL, Action.QUARANTINE, Action.DISCARD})


@dataclass(slots=True)
class StageResult:
    action: Action = Action.CONTINUE
    reply: Reply | None = None  # what the client (or the DSN) is told, for reject/tempfail
    reason: str = ""  # internal explanation, logged and archived
    headers: list[tuple[str, str]] = field(default_factory=list)  # to prepend to the message
    facts: dict[str, Any] = field(default_factory=dict)  # verdicts, decisions: stored with it
    data: bytes | None = None  # a transformed message body (transform stage)
    # Envelope changes (policy redirect / bcc / journal), applied before the spool write:
    recipients: list[str] | None = None  # replaces RCPT TO when not None
    extra_recipients: list[str] = field(default_factory=list)  # added to RCPT TO
    # Separate messages to spool after this one (policy notify): (recipient, bytes).
    notify: list[tuple[str, bytes]] = field(default_factory=list)
    # After-queue only: recipients this stage refuses, with the reply for each.  The
    # worker bounces them (like a 5xx from the next hop: one DSN names them all) and
    # goes on with the rest, so a stage can serve some recipients and refuse others
    # (the encryption gateway: a copy for those with keys, a bounce for the rest).
    rejected: dict[str, Reply] = field(default_factory=dict)
    # Before-queue only: spool the message once per recipient group instead of once
    # (gateway.transform.encrypt_split: keyed and keyless recipients of an
    # opportunistic encryption); every group is fsynced before the one 250.
    split: list[list[str]] = field(default_factory=list)


@dataclass(slots=True)
class MessageContext:
    """One message as the stages see it.  Stages read it; only the runner changes it."""

    envelope: Envelope
    data: bytes
    facts: dict[str, Any] = field(default_factory=dict)
    qid: str = ""
    trace: list[dict[str, Any]] = field(default_factory=list)
    notices: list[tuple[str, bytes]] = field(default_factory=list)  # spooled after the message
    # After the queue: the bytes as spooled at the 250, before any transform replaced
    # ``data`` (the archive keeps both, issue 3); None before the queue.
    received: bytes | None = None
    # Before the queue: recipient groups to spool as separate messages (StageResult.split).
    groups: list[list[str]] = field(default_factory=list)


class Stage(Protocol):
    """A named step of the pipeline."""

    name: str
    once: bool  # after-queue only: recorded when done, skipped on retries

    async def run(self, ctx: MessageContext) -> StageResult: ...


def apply(ctx: MessageContext, stage: str, result: StageResult) -> None:
    """Merge a stage's result into the context (the runner's job, not the stage's)."""
    # Replaced data first, then prepended headers: a stage may do both (the check
    # stage removes forged Authentication-Results and adds its own).
    if result.data is not None:
        ctx.data = result.data
    if result.headers:
        prefix = b"".join(
            f"{name}: {value}\r\n".encode() for name, value in result.headers
        )
        ctx.data = prefix + ctx.data
    if result.recipients is not None:
        # RFC 3461 §4.1, §4.2: NOTIFY and ORCPT belong to the recipient they were given
        # for, so they stay with each recipient that is still in the new list.  A
        # recipient a stage adds never asked for anything: it gets none (the §4.1
        # default applies to it: a notice on failure only).
        kept = ctx.envelope.options_by_recipient()
        ctx.envelope.rcpt_to = list(result.recipients)
        ctx.envelope.rcpt_options = [list(kept.get(r, [])) for r in result.recipients]
    if result.extra_recipients:
        known = {r.lower() for r in ctx.envelope.rcpt_to}
        for rcpt in result.extra_recipients:
            if rcpt.lower() not in known:
                known.add(rcpt.lower())
                aligned = len(ctx.envelope.rcpt_options) == len(ctx.envelope.rcpt_to)
                ctx.envelope.rcpt_to.append(rcpt)
                if aligned:
                    ctx.envelope.rcpt_options.append([])
    ctx.notices.extend(result.notify)
    if result.split:
        ctx.groups = [list(g) for g in result.split if g]
    if result.facts:
        ctx.facts.setdefault(stage, {}).update(result.facts)
    ctx.trace.append({"stage": stage, "action": str(result.action), "reason": result.reason})
