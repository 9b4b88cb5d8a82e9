"""The before-queue runner: check and decide while the client waits, then spool.

The SMTP adapter (gateway.receive) hands each complete message to
:meth:`Runner.accept` and sends back exactly the reply it returns.  The runner
alone turns stage results into replies: a reject becomes 5xx, a tempfail 4xx,
anything else is spooled durably (fsync) and only then answered 250.  An
unexpected exception in a stage does not lose the message: it is spooled in the
held area with the stage name and the error, and the client still gets 250 —
the message is safe, and an operator decides (``coffer queue``).

A message rejected after DATA (5xx) is archived first when ``archive_rejected`` is
set (config ``archive.rejected``; issue 3: the rejected message is evidence too),
marked by ``facts["runner"]`` (action "reject", stage, reply, reason).  The write
is part of the transaction: if it fails, the client gets 451 4.3.0, never the 5xx
(it retries; we never answer for a message we could not record) and never a 250.
A 4xx is not archived: the client sends the message again.

Journal recipients (``archive.journal.addresses``, gateway.journal_intake) are
spooled first as a message of their own, which no stage here sees: it is
archived and never delivered.  The other recipients go through the stages; if
their part is not accepted (4xx or 5xx), the journal copy is removed again, so
the client's retry cannot archive it twice and a refused transaction leaves
nothing behind.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

from gateway import log, metrics, replies
from gateway.envelope import Envelope
from gateway.errors import SpoolError, SpoolFullError
from gateway.journal_intake import journal_copy, journal_recipients, without_journal
from gateway.pipeline import Action, MessageContext, Stage, StageResult, apply
from gateway.queue.spool import Spool, new_queue_id, store_from_loop
from gateway.replies import Reply


class Acceptor(Protocol):
    """What the SMTP adapter needs from the rest of the gateway."""

    def room_for(self, size: int) -> Reply | None:
        """None if a message of ``size`` bytes can be taken now, else the 4xx to answer."""

    async def accept(self, envelope: Envelope, data: bytes) -> Reply:
        """Run the before-queue stages and spool the message; the reply to DATA."""


class Runner:
    def __init__(
        self,
        spool: Spool,
        stages: Sequence[Stage] = (),
        *,
        on_queued: Callable[[str], None] | None = None,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.time,
        archive_rejected: Callable[[MessageContext], Awaitable[object]] | None = None,
        refuse: Callable[[], Reply | None] | None = None,
        journal_addresses: Collection[str] = (),
        journal_retention: str | None = None,
    ) -> None:
        self.spool = spool
        # Lower-cased (config.JournalConfig); replaced as a whole on SIGHUP.
        self.journal_addresses = frozenset(a.lower() for a in journal_addresses)
        self.journal_retention = journal_retention
        # A reason to refuse new transactions now (the archive backend is down:
        # gateway.archive_health), checked at MAIL FROM with the spool's room.
        self.refuse = refuse
        self.stages = list(stages)
        self.on_queued = on_queued
        self.executor = executor
        self.clock = clock
        self.archive_rejected = archive_rejected

    def room_for(self, size: int) -> Reply | None:
        if self.refuse is not None and (reply := self.refuse()) is not None:
            return reply
        return None if self.spool.has_room(size) else replies.SPOOL_FULL

    async def accept(self, envelope: Envelope, data: bytes) -> Reply:
        journal = journal_recipients(envelope, self.journal_addresses)
        if journal:
            return await self._accept_with_journal(envelope, data, journal)
        return await self._accept(envelope, data)

    async def _accept_with_journal(self, envelope: Envelope, data: bytes,
                                   journal: list[str]) -> Reply:
        """Spool the journal copy, then run the rest through the stages (module doc)."""
        copy, facts = journal_copy(envelope, journal, self.journal_retention)
        try:
            jqid = await store_from_loop(self.spool, self.executor, copy, data, facts)
        except SpoolError as exc:
            full = isinstance(exc, SpoolFullError)
            log.event("spool_full" if full else "spool_error", error=str(exc),
                      sender=envelope.mail_from)
            metrics.REJECTED.labels("spool_full" if full else "spool_error").inc()
            return replies.SPOOL_FULL if full else replies.LOCAL_ERROR
        rest = without_journal(envelope, journal)
        if rest.rcpt_to:
            reply = await self._accept(rest, data)  # counted and logged there
            if not reply.is_positive:
                self.spool.remove(jqid)  # refused as a whole: nothing stays behind
                return reply
            reply = reply.with_text(f"{reply.text} {jqid}")
        else:
            metrics.accepted(envelope.listener).inc()
            reply = replies.QUEUED.with_text(f"OK: queued as {jqid}")
        log.event("journal_accepted", qid=jqid, sender=envelope.mail_from, journal=journal,
                  size=len(data), client=envelope.client_ip)
        if self.on_queued is not None:
            self.on_queued(jqid)
        return reply

    async def _accept(self, envelope: Envelope, data: bytes) -> Reply:
        ctx = MessageContext(envelope=envelope, data=data)
        held: tuple[str, str] | None = None
        for stage in self.stages:
            started = time.perf_counter()
            try:
                result = await stage.run(ctx)
            except Exception as exc:
                held = (stage.name, f"{type(exc).__name__}: {exc}")
                log.event("stage_error", stage=stage.name, error=held[1])
                break
            finally:
                metrics.stage_seconds(stage.name).observe(time.perf_counter() - started)
            apply(ctx, stage.name, result)
            if result.action in (Action.REJECT, Action.TEMPFAIL):
                reply = result.reply or (
                    replies.REJECTED_POLICY if result.action is Action.REJECT
                    else replies.TEMPFAIL_POLICY
                )
                if result.action is Action.REJECT:
                    reply = await self._keep_rejected(ctx, stage.name, reply, result.reason)
                metrics.REJECTED.labels(f"{stage.name}:{result.action}").inc()
                log.event("rejected", stage=stage.name, reply=str(reply), reason=result.reason,
                          sender=envelope.mail_from, recipients=envelope.rcpt_to,
                          client=envelope.client_ip)
                return reply
            if result.action is not Action.CONTINUE:
                # quarantine / discard / hold are carried out after the queue.
                ctx.facts.setdefault("runner", {})["action"] = str(result.action)
                break
        ctx.facts["trace"] = ctx.trace
        try:
            qids = await self._store_groups(ctx) if ctx.groups and held is None else []
            qid = qids[0] if qids else await self._store(ctx)
        except SpoolFullError as exc:
            log.event("spool_full", error=str(exc), sender=envelope.mail_from)
            metrics.REJECTED.labels("spool_full").inc()
            return replies.SPOOL_FULL
        except SpoolError as exc:
            log.event("spool_error", error=str(exc), sender=envelope.mail_from)
            metrics.REJECTED.labels("spool_error").inc()
            return replies.LOCAL_ERROR
        if held is not None:
            self.spool.append_event(
                qid, {"ev": "held", "stage": held[0], "error": held[1], "reason": "error"})
            metrics.HELD.labels(held[0]).inc()
        metrics.accepted(envelope.listener).inc()
        log.event("accepted", qid=qid, sender=envelope.mail_from, recipients=envelope.rcpt_to,
                  size=len(ctx.data), client=envelope.client_ip, held=held is not None)
        if self.on_queued is not None and held is None:
            for q in qids or [qid]:
                self.on_queued(q)
        if ctx.notices:
            await self._store_notices(qid, ctx)
        return replies.QUEUED.with_text(f"OK: queued as {' '.join(qids or [qid])}")

    async def _keep_rejected(self, ctx: MessageContext, stage: str, reply: Reply,
                             reason: str) -> Reply:
        """Archive a message about to be rejected; the reply to send (see module doc)."""
        if self.archive_rejected is None:
            return reply
        ctx.facts["runner"] = {"action": str(Action.REJECT), "stage": stage,
                               "reply": str(reply), "reason": reason}
        ctx.facts["trace"] = ctx.trace
        try:
            kept = await self.archive_rejected(ctx)
        except Exception as exc:
            log.event("archive_rejected_failed", stage=stage, reply=str(reply),
                      error=f"{type(exc).__name__}: {exc}", sender=ctx.envelope.mail_from)
            return replies.ARCHIVE_FAILED
        if isinstance(kept, StageResult) and kept.action is Action.TEMPFAIL:
            # The archive stage answers an outage (its backend down, a full disk) with a
            # tempfail rather than an exception: nothing was recorded either.
            log.event("archive_rejected_failed", stage=stage, reply=str(reply),
                      error=kept.reason or str(kept.reply), sender=ctx.envelope.mail_from)
            return replies.ARCHIVE_FAILED
        return reply

    async def _store_notices(self, qid: str, ctx: MessageContext) -> None:
        """Spool the policy's notices, each its own message from the null sender.

        RFC 5321 §4.5.5: like a DSN, a notice has the null reverse-path so that it
        can never cause another notice or a bounce.  The message itself is already
        safe in the spool: a notice that cannot be stored is logged, not fatal.
        """
        for to, data in ctx.notices:
            env = Envelope(mail_from="", rcpt_to=[to], received_at=self.clock(),
                           listener="notify", role="local",
                           mail_options=[] if to.isascii() else ["SMTPUTF8"])
            try:
                notice_qid = await store_from_loop(
                    self.spool, self.executor, env, data, {"notify": {"of": qid}})
            except SpoolError as exc:
                log.event("notify_error", qid=qid, to=to, error=str(exc))
                continue
            log.event("notify", qid=qid, notice_qid=notice_qid, to=to)
            if self.on_queued is not None:
                self.on_queued(notice_qid)

    async def _store_groups(self, ctx: MessageContext) -> list[str]:
        """Spool one message per recipient group (StageResult.split); all or none.

        Every copy is fsynced before the one 250; if any write fails, the copies
        already written are removed before the 4xx, so the client's retry cannot
        deliver a group twice.
        """
        qids = [new_queue_id(ctx.envelope.received_at or None) for _ in ctx.groups]
        done: list[str] = []
        try:
            for i, (group, qid) in enumerate(zip(ctx.groups, qids, strict=True)):
                env, facts = split_copy(ctx, group, i, qids)
                done.append(await store_from_loop(
                    self.spool, self.executor, env, ctx.data, facts, qid))
        except SpoolError:
            for q in done:
                self.spool.remove(q)
            raise
        log.event("split", qids=qids, groups=[len(g) for g in ctx.groups])
        return done

    async def _store(self, ctx: MessageContext) -> str:
        # fsync blocks: it runs in a thread so other sessions keep moving, and so
        # concurrent fsyncs are merged by the file system's journal.
        return await store_from_loop(self.spool, self.executor, ctx.envelope, ctx.data,
                                     ctx.facts)


def split_copy(ctx: MessageContext, group: list[str], index: int,
               qids: list[str]) -> tuple[Envelope, dict[str, Any]]:
    """The envelope and facts of one group's spooled copy (pure)."""
    env = ctx.envelope
    options = env.options_by_recipient()
    copy = dataclasses.replace(env, rcpt_to=list(group),
                               rcpt_options=[list(options.get(r, [])) for r in group])
    facts = dict(ctx.facts)
    facts["split"] = {"group": index + 1, "of": len(qids), "queue_ids": qids}
    return copy, facts
