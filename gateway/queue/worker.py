"""The queue worker: drains the spool through the after-queue stages and delivery.

For each due message (not held, not locked by another process: ``Spool.claim``):

1. run the after-queue stages in order (transform, archive, ...).  A ``once``
   stage already recorded as done is skipped; when a once-stage succeeds its
   completion (and facts) are recorded, and if it changed the message the new
   bytes are saved first (``Spool.save_data``), so a retry delivers exactly what
   was archived.  Stage results become queue actions here and only here:

   ===========  =========================================================
   exception    held with the stage name and the error (never dropped)
   HOLD         held with the stage name and its reason
   QUARANTINE   the remaining stages run (archive), then held ("quarantine")
   DISCARD      the remaining stages run, then every recipient is recorded
                ``discarded`` (a final status that is not a failure: no DSN)
                and the message is removed
   REJECT       every pending recipient bounces with the stage's reply
   TEMPFAIL     the whole message is deferred like a 4xx from the next hop
   ===========  =========================================================

   Besides its action, a stage may refuse some recipients (``StageResult.rejected``,
   honoured for every action but HOLD): each pending one is recorded ``bounced``
   with the stage's reply for it, exactly like a 5xx from the next hop, durably
   (one fsync) before the stage's output is saved, and the rest go on.  The
   message's one DSN names them.  A restart never delivers to them: their final
   status is in the log before anything could carry the stage's output to them.

   A quarantine/discard/hold decided before the queue (``facts["runner"]``) is
   carried out the same way; an operator's release skips quarantine and hold.
   A journal copy (gateway.journal_intake) runs the archive stage only, then is
   discarded that way: archived, never delivered.

2. deliver the pending recipients (gateway.deliver.Deliverer) and persist every
   outcome with one fsync (``Spool.append_events``) before anything relies on it.
   A recipient with a final status is never tried again.  4xx and network
   errors are retried with the scheduler's backoff until ``queue.max_age``, then
   bounced; 5xx bounce at once.

3. when every recipient is final: one DSN (RFC 3464) for all bounced recipients
   is spooled as a new message from the null sender (never to the null sender),
   then the message is removed.  Each notice (failure, success, delay) is recorded
   in the message's log with the queue id it will have before it is spooled, and
   as spooled (or refused) after: a retry makes only the notices the spool refused,
   and a crash in between never makes a second copy (``state.NoticeState``).  A
   notice a crash left unsettled that the spool no longer has is asked of the
   archive, which every spooled message passes before delivery: archived, it was
   sent; unknown there, it was never written, and is made again
   (:meth:`QueueWorker._settle_notices`).  If
   the delivery attempt itself made every recipient final without a bounce,
   removing the message is the durable record: the window in which a crash
   repeats the delivery is the same as with a log write first, and it saves an
   fsync per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol, TypeVar, runtime_checkable

from gateway import log, metrics, replies
from gateway.archive_health import ARCHIVE_UNAVAILABLE, describe
from gateway.config import Config
from gateway.deliver.deliverer import Outcome
from gateway.deliver.dsn import ReportedRecipient, build_dsn
from gateway.dsn_params import RecipientRequest, message_request, recipient_requests
from gateway.envelope import Envelope
from gateway.errors import SpoolError
from gateway.journal_intake import is_journal_copy
from gateway.offload import in_thread
from gateway.pipeline import Action, MessageContext, Stage, apply
from gateway.queue import scheduler
from gateway.queue.spool import (
    Spool,
    SpooledMessage,
    new_queue_id,
    queue_id_time,
    store_from_loop,
)
from gateway.queue.state import (
    FINAL_STATUSES,
    NoticeState,
    QueueState,
    RcptStatus,
    RecipientState,
    fold,
    parse_events,
)

T = TypeVar("T")

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)\r?$", re.IGNORECASE | re.MULTILINE)


class DeliveryBackend(Protocol):
    """What the worker needs from gateway.deliver.Deliverer."""

    async def deliver(
        self, envelope: Envelope, data: bytes, rcpts: Sequence[str], *, qid: str = ""
    ) -> list[Outcome]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class NoticeArchive(Protocol):
    """What the worker asks the archive stage (gateway.archive_stage) about a notice a
    crash left unsettled and the spool no longer has."""

    def archived(self, qid: str, since: float) -> bool:
        """Whether the message spooled under ``qid`` was archived at or after ``since``
        (seconds since the epoch).  Blocking; raises when the archive cannot answer."""
        ...


# How far before a notice's queue id time its archiving is looked for: the wall clock
# may be stepped back (NTP) between the id's making and the ledger's entry, both
# stamped from it.  The ledger is searched from there on only (Ledger.entries_since).
NOTICE_CLOCK_SLACK = 600.0


def message_id(data: bytes) -> str:
    """The Message-ID of a message ("" if none), looked up in the header section only."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    m = _MESSAGE_ID.search(head)
    return m.group(1).decode("utf-8", "replace").strip() if m else ""


def arrival_time(qid: str, envelope: Envelope) -> float:
    """When the message was received: the envelope's time, else the queue id's."""
    if envelope.received_at:
        return envelope.received_at
    try:
        return queue_id_time(qid)
    except ValueError:
        return 0.0


# Messages up to this size are read on the event loop: they were just written and
# sit in the page cache, so the read is cheaper than a hop to a thread.
INLINE_READ_BYTES = 256 * 1024

# While the worker runs, the spool keeps up to this many claims on messages this
# process just spooled, for the worker to take over (Spool.keep_claims): no open,
# flock, fstat, read or header parse of a file it wrote a moment ago.  Enough for
# the messages waiting for a delivery slot under load; each is one descriptor.
KEEP_CLAIMS = 256


class _GroupSync:
    """Coalesces fsyncs: while one runs, every new request is served by the next one."""

    def __init__(self, run: Callable[[], Any], executor: Executor | None = None) -> None:
        self._run = run
        self._executor = executor
        self._dirty = False
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        self._dirty = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="queue-dir-sync")

    async def _loop(self) -> None:
        while self._dirty:
            self._dirty = False
            await in_thread(self._executor, self._run)

    async def flush(self) -> None:
        if self._task is not None:
            await self._task


class QueueWorker:
    def __init__(
        self,
        cfg: Config,
        spool: Spool,
        stages: Sequence[Stage],
        deliverer: DeliveryBackend,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        executor: Executor | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.stages = list(stages)
        self.deliverer = deliverer
        self.clock = clock
        self.rand = rand
        self.executor = executor
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._pending: set[str] = set()  # waiting in _ready or being processed here
        # Delivery results the spool could not take (a full disk), by queue id: written
        # before the message is tried again, so that no recipient that got 250 gets it
        # twice from this process.
        self._unrecorded: dict[str, list[dict[str, Any]]] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(cfg.queue.delivery_concurrency)
        # qid -> (state log mtime_ns, held, next attempt): saves re-reading the logs of
        # deferred messages at every scan; a changed mtime (CLI retry/release) re-reads.
        self._due: dict[str, tuple[int, bool, float]] = {}
        self._stopping = False
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._dir_sync = _GroupSync(spool.sync_queue_dir, executor)

    # -- entry points ------------------------------------------------------------
    def notify(self, qid: str) -> None:
        """A message was just spooled: process it as soon as a slot is free."""
        if self._stopping or qid in self._pending:
            return
        self._pending.add(qid)
        self._ready.put_nowait(qid)

    def wake(self) -> None:
        """Scan the spool now rather than at the next interval (e.g. after a CLI retry)."""
        self._wake.set()

    async def run(self) -> None:
        """Scan now and every ``queue.scan_interval``; deliver until :meth:`stop`."""
        self.spool.keep_claims(KEEP_CLAIMS)
        self._tasks = [
            asyncio.create_task(self._dispatch(), name="queue-dispatch"),
            asyncio.create_task(self._scan_loop(), name="queue-scan"),
        ]
        try:
            await self._stopped.wait()
        except asyncio.CancelledError:
            await self._shutdown(0.0)
            raise

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Finish in-flight deliveries (up to ``drain_timeout`` s), leave the rest queued."""
        await self._shutdown(drain_timeout)

    async def run_due(self) -> int:
        """Scan once and process every due message; returns how many were processed."""
        due = await self._io(self._scan_sync, self.clock())
        for qid in due:
            self.notify(qid)
        work: list[str] = []
        while not self._ready.empty():
            work.append(self._ready.get_nowait())

        async def one(qid: str) -> None:
            async with self._slots:
                await self._process_guarded(qid)

        await asyncio.gather(*(one(q) for q in work))
        return len(work)

    async def process(self, qid: str) -> None:
        """Process one message now (if due and not claimed elsewhere)."""
        with self.spool.claimed_sized(qid) as claim:
            if claim is None:
                return
            fd, size = claim
            try:
                await self._process_fd(qid, fd, size)
            except BaseException:
                if qid in self._unrecorded:
                    # Results the disk refused: no other worker process may take the
                    # message before they are written (this one knows them).
                    self.spool.retain(qid, fd)
                raise

    async def _process_fd(self, qid: str, fd: int, size: int) -> None:
        if qid in self._unrecorded:
            # Raises while the disk is still full: nothing is tried before this is on
            # disk (the message waits for the next scan, its claim kept).
            await self._io(self.spool.append_events, qid, self._unrecorded[qid])
            del self._unrecorded[qid]
        try:
            # Read through the claim's descriptor: the file cannot go away now (and
            # only its holder appends to it: the size is still right).
            if size <= INLINE_READ_BYTES:
                msg = self.spool.load(qid, fd, size)
            else:
                msg = await self._io(self.spool.load, qid, fd, size)
        except SpoolError as exc:
            # A damaged spool file: keep it for an operator, never guess.
            await self._hold(qid, "spool", str(exc))
            return
        await self._process_claimed(msg, fd)

    # -- the loop ------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                qid = await self._ready.get()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._process_guarded(qid), name=f"deliver-{qid}")
            self._inflight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    async def _process_guarded(self, qid: str) -> None:
        try:
            await self.process(qid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not a stage failure (those hold the message): a bug or an I/O error in
            # the queue itself.  The message stays in the spool for the next scan.
            log.event("queue_error", qid=qid, error=f"{type(exc).__name__}: {exc}")
        finally:
            self._pending.discard(qid)

    async def _scan_loop(self) -> None:
        while not self._stopping:
            try:
                due = await self._io(self._scan_sync, self.clock())
            except Exception as exc:
                log.event("queue_scan_error", error=f"{type(exc).__name__}: {exc}")
                due = []
            for qid in due:
                self.notify(qid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.queue.scan_interval)
            if not self._stopping:
                self._wake.clear()

    def _scan_sync(self, now: float) -> list[str]:
        """The queue ids due now, oldest first; updates the queue depth gauge."""
        due: list[str] = []
        counts = {"active": 0, "deferred": 0, "held": 0}
        ids = self.spool.queue_ids()
        for qid in ids:
            if qid in self._pending:
                counts["active"] += 1
                continue
            try:
                mtime = self.spool.state_path(qid).stat().st_mtime_ns
            except FileNotFoundError:
                mtime = -1
            cached = self._due.get(qid)
            if cached is None or cached[0] != mtime:
                raw = b""
                if mtime >= 0:
                    with contextlib.suppress(FileNotFoundError):
                        raw = self.spool.state_path(qid).read_bytes()
                st = fold([], parse_events(raw))
                cached = (mtime, st.held, st.next_attempt_at)
                self._due[qid] = cached
            _, held, next_at = cached
            if held:
                counts["held"] += 1
            elif next_at > now:
                counts["deferred"] += 1
            else:
                counts["active"] += 1
                due.append(qid)
        live = set(ids)
        for gone in [q for q in self._due if q not in live]:
            del self._due[gone]
        for status, n in counts.items():
            metrics.QUEUE_DEPTH.labels(status).set(n)
        return due

    async def _shutdown(self, drain_timeout: float) -> None:
        if self._stopped.is_set():
            return
        self._stopping = True
        self.spool.keep_claims(0)  # notify() ignores new messages now: let them go
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        inflight = set(self._inflight)
        if inflight:
            _, late = await asyncio.wait(inflight, timeout=max(drain_timeout, 0.0))
            for task in late:
                task.cancel()  # left queued; a recipient mid-transaction may see it twice
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._dir_sync.flush()
        await self.deliverer.aclose()
        self._stopped.set()

    # -- one message ---------------------------------------------------------------
    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await in_thread(self.executor, fn, *args)

    async def _process_claimed(self, msg: SpooledMessage, fd: int) -> None:
        """Stages, delivery and records of a claimed message (``fd``: the claim's
        descriptor of its ``.msg`` file, which the stage records are appended to)."""
        qid, st = msg.qid, msg.state
        if st.deleted:
            await self._remove(msg, recycle=False)  # its bytes must not stay in free/
            return
        if st.held:
            return
        now = self.clock()
        if st.next_attempt_at > now:
            return  # not due: a stale notification, or another process deferred it
        if st.unsettled_notices and not await self._settle_notices(msg, st):
            return  # deferred: the archive cannot tell yet whether a notice was sent
        if st.finished:
            # Every recipient is final but the message is still here: a crash
            # between the last record and the removal.  Finish it.
            await self._finish(msg, st, {})
            return

        ctx = MessageContext(envelope=msg.envelope, data=msg.data, facts=dict(msg.facts),
                             qid=qid, received=msg.data if msg.received is None else msg.received)
        disposition = self._prequeue_disposition(msg, st)
        if disposition is not None and disposition[0] is Action.HOLD:
            # A hold waits for an operator before anything else runs.
            await self._hold(qid, disposition[1], f"hold: {disposition[2]}", reason="hold")
            return
        # Stage completions written but not yet fsynced (at the end of the .msg file):
        # one fsync covers them all, before delivery or whatever else ends this pass.
        unsynced = False
        for stage in self._stages_for(msg):
            if stage.once and stage.name in st.stages_done:
                if stage.name in st.stage_facts:
                    ctx.facts.setdefault(stage.name, {}).update(st.stage_facts[stage.name])
                continue
            started = time.perf_counter()
            before = ctx.data
            try:
                result = await stage.run(ctx)
            except Exception as exc:
                await self._sync_stages(fd, unsynced)
                await self._hold(qid, stage.name, f"{type(exc).__name__}: {exc}")
                return
            finally:
                metrics.stage_seconds(stage.name).observe(time.perf_counter() - started)
            apply(ctx, stage.name, result)
            action = result.action
            if result.rejected and action is not Action.HOLD:
                # Durable before the stage's output is saved or marked done: a message
                # transformed for the others (encrypted to their keys only) must never
                # reach a refused recipient after a restart that skips this stage.
                refused = self._refuse(st, stage.name, result.rejected)
                if refused:
                    await self._io(self.spool.append_events, qid, refused)
                    self._log_attempt(msg, message_id(ctx.data), st.attempts + 1, refused)
            if action in (Action.CONTINUE, Action.QUARANTINE, Action.DISCARD) and stage.once:
                # False: it was fsynced, and that fsync covered the earlier ones too.
                unsynced = await self._record_stage(
                    msg, fd, stage.name, ctx.data, before, result.facts)
            if action is Action.HOLD:
                if not st.released:
                    await self._sync_stages(fd, unsynced)
                    await self._hold(qid, stage.name, f"hold: {result.reason}", reason="hold")
                    return
            elif action in (Action.QUARANTINE, Action.DISCARD):
                if action is Action.DISCARD or not st.released:
                    disposition = (action, stage.name, result.reason)
            elif action is Action.REJECT:
                reply = str(result.reply or replies.REJECTED_POLICY)
                outcomes = [Outcome(r, RcptStatus.BOUNCED, reply, f"stage:{stage.name}")
                            for r in st.pending]
                await self._sync_stages(fd, unsynced)
                await self._record(msg, st, ctx, outcomes)
                return
            elif action is Action.TEMPFAIL:
                reply = str(result.reply or replies.TEMPFAIL_POLICY)
                outcomes = [Outcome(r, RcptStatus.DEFERRED, reply, f"stage:{stage.name}")
                            for r in st.pending]
                await self._sync_stages(fd, unsynced)
                await self._record(msg, st, ctx, outcomes)
                return

        if disposition is not None:
            action, stage_name, reason = disposition
            if action is Action.DISCARD:
                outcomes = [Outcome(r, RcptStatus.DISCARDED, f"discarded by {stage_name}: {reason}",
                                    f"stage:{stage_name}") for r in st.pending]
                await self._sync_stages(fd, unsynced)
                await self._record(msg, st, ctx, outcomes)
                return
            await self._sync_stages(fd, unsynced)
            await self._hold(qid, stage_name, f"{action}: {reason}", reason=str(action))
            return

        if st.finished:
            # A stage refused every recipient that was left: nothing to deliver.
            await self._sync_stages(fd, unsynced)
            await self._finish(msg, st, {})
            return
        # One fsync for every stage completed in this pass, before delivery relies
        # on them (a restart after this point never runs those stages again).
        await self._sync_stages(fd, unsynced)
        outcomes = await self.deliverer.deliver(ctx.envelope, ctx.data, st.pending, qid=qid)
        await self._record(msg, st, ctx, outcomes)

    def _stages_for(self, msg: SpooledMessage) -> Sequence[Stage]:
        """The after-queue stages a message goes through: a journal copy
        (gateway.journal_intake) the archive stage only, since a transform (signing,
        encryption, sealing) would change the evidence it is kept as."""
        if is_journal_copy(msg.facts):
            return [st for st in self.stages if st.name == "archive"]
        return self.stages

    async def _sync_stages(self, fd: int, unsynced: bool) -> None:
        if unsynced:
            # Through the claim's descriptor: the thread does the fsync alone (an open
            # and a close there were two more GIL hand-offs per message).
            await self._io(self.spool.sync_file, fd)

    def _refuse(
        self, st: QueueState, stage: str, rejected: dict[str, replies.Reply]
    ) -> list[dict[str, Any]]:
        """Mark the pending recipients a stage refused as bounced; their log events."""
        # RFC 5321 §2.4: the local part may be case-sensitive, but the stage saw the
        # envelope's own spelling; the lower-case match only covers a stage that
        # normalised it.
        by_lower = {r.lower(): r for r in st.pending}
        now = self.clock()
        events: list[dict[str, Any]] = []
        for rcpt, reply in rejected.items():
            addr = rcpt if rcpt in st.recipients else by_lower.get(rcpt.lower(), "")
            rs = st.recipients.get(addr)
            if rs is None or rs.status in FINAL_STATUSES:
                continue  # only pending recipients: a final status is never revised
            rs.status, rs.reply, rs.updated_at = RcptStatus.BOUNCED, str(reply), now
            events.append({"ev": "rcpt", "rcpt": addr, "status": str(RcptStatus.BOUNCED),
                           "reply": str(reply), "route": f"stage:{stage}"})
        return events

    def _prequeue_disposition(
        self, msg: SpooledMessage, st: QueueState
    ) -> tuple[Action, str, str] | None:
        """A quarantine/discard/hold the before-queue runner decided, to carry out now."""
        runner = msg.facts.get("runner")
        if not isinstance(runner, dict) or "action" not in runner:
            return None
        try:
            action = Action(runner["action"])
        except ValueError:
            return None
        if action not in (Action.QUARANTINE, Action.DISCARD, Action.HOLD):
            return None
        if st.released and action is not Action.DISCARD:
            return None
        stage, reason = "decide", ""
        for step in reversed(msg.facts.get("trace") or []):
            if isinstance(step, dict) and step.get("action") == str(action):
                stage, reason = str(step.get("stage", stage)), str(step.get("reason", ""))
                break
        return action, stage, reason

    async def _record_stage(
        self, msg: SpooledMessage, fd: int, stage: str, data: bytes, before: bytes,
        facts: dict[str, Any],
    ) -> bool:
        """Record a once-stage as done; True if the record still needs an fsync.

        A stage that changed the message is recorded durably at once: its output
        (saved first) must never be transformed a second time after a restart.  A
        stage that left the bytes alone is only written (a kill -9 cannot lose it);
        its fsync is shared with the next one on this message's log.
        """
        qid = msg.qid
        changed = data is not before and data != before
        if changed:
            await self._io(self.spool.save_data, qid, data)
            msg.has_data = True
        event: dict[str, Any] = {"ev": "stage", "stage": stage}
        if facts:
            event["facts"] = facts
        # A small append to a page-cached file: cheaper here than a thread hop.
        try:
            # The facts are encoded once, with the record (the line is encoded
            # whole before anything is written).
            self.spool.append_stage(qid, event, sync=False, fd=fd)
        except UnicodeEncodeError:
            raise  # the line itself (a lone surrogate), not the facts' types: as before
        except (TypeError, ValueError):
            if "facts" not in event:
                raise
            del event["facts"]  # not serialisable: the stage's completion still counts
            self.spool.append_stage(qid, event, sync=False, fd=fd)
        if changed:
            await self._io(self.spool.sync_file, fd)  # covers earlier records too
            return False
        return True

    async def _remove(self, msg: SpooledMessage, *, recycle: bool = True) -> None:
        # The removal is immediate (a restart after kill -9 never sees the message
        # again); its durability against power loss is group-committed: one
        # directory fsync covers every message finished meanwhile.  Always under
        # process()'s claim, whose end lets a recycled file be reused.
        self.spool.remove(msg.qid, sync=False, data=msg.has_data, recycle=recycle)
        if self.spool.fsync:
            self._dir_sync.request()

    async def _hold(self, qid: str, stage: str, error: str, *, reason: str = "error") -> None:
        event = {"ev": "held", "stage": stage, "error": error, "reason": reason}
        await self._io(self.spool.append_event, qid, event)
        metrics.HELD.labels(stage).inc()
        log.event("held", qid=qid, stage=stage, error=error, reason=reason)

    async def _record(
        self, msg: SpooledMessage, st: QueueState, ctx: MessageContext, outcomes: list[Outcome]
    ) -> None:
        """Persist one delivery attempt's outcomes, then retry, bounce or finish."""
        qid = msg.qid
        now = self.clock()
        arrived = arrival_time(qid, msg.envelope)
        too_old = scheduler.expired(arrived, now, self.cfg.queue)
        attempts = st.attempts + 1
        mid = message_id(ctx.data)
        seen = {o.rcpt for o in outcomes}
        outcomes = list(outcomes) + [
            Outcome(r, RcptStatus.DEFERRED, "451 4.3.0 No delivery result (internal)", "")
            for r in st.pending if r not in seen
        ]
        events: list[dict[str, Any]] = []
        remote: dict[str, str] = {}
        first_error = ""
        requests: dict[str, RecipientRequest] | None = None
        for o in outcomes:
            status = o.status
            if status is RcptStatus.DEFERRED and too_old:
                status = RcptStatus.BOUNCED  # RFC 5321 §4.5.4.1: give up after max_age
            elif status is RcptStatus.DEFERRED:
                first_error = first_error or o.reply
            event = {"ev": "rcpt", "rcpt": o.rcpt, "status": str(status),
                     "reply": o.reply, "route": o.route}
            notice = ""
            if status is RcptStatus.DELIVERED and o.notice:
                # RFC 3461 §4.1: a success notice only for NOTIFY=SUCCESS.  Recorded
                # with the delivery, so the notice survives until the message is done.
                if requests is None:
                    requests = recipient_requests(msg.envelope)
                if o.rcpt in requests and requests[o.rcpt].wants("SUCCESS"):
                    notice = event["notice"] = o.notice
                    event["remote"] = o.remote
            events.append(event)
            remote[o.rcpt] = o.remote
            rs = st.recipients.get(o.rcpt)
            if rs is not None and rs.status not in FINAL_STATUSES:
                rs.status, rs.reply, rs.updated_at = status, o.reply, now
                rs.notice, rs.remote = notice, o.remote if notice else ""
        next_at = 0.0
        if first_error:
            next_at = scheduler.next_attempt(arrived, attempts, now, self.cfg.queue, self.rand) \
                or now
            events.append({"ev": "attempt", "attempts": attempts, "next_at": next_at,
                           "error": first_error})
            st.attempts, st.next_attempt_at, st.last_error = attempts, next_at, first_error
        delayed = self._delay_due(msg, st, arrived, now) if first_error else []
        delay_notice: dict[str, Any] = {}
        if delayed:
            # Recorded with the attempt (no fsync of its own), as being spooled: see
            # NoticeState for what a crash before the outcome's record leaves.
            delay_notice = self._notice_event("delay", [r.address for r in delayed], now)
            events.append(delay_notice)
            for r in delayed:
                r.delay_warned = True

        # Record first, log after: the time between the next hop's 250 and our
        # record is the only window in which a crash repeats a delivery (RFC 1047).
        try:
            if st.finished and not any(
                r.status is RcptStatus.BOUNCED or r.notice for r in st.recipients.values()
            ):
                await self._remove(msg)
                self._log_attempt(msg, mid, attempts, events)
                log.event("done", qid=qid, message_id=mid, attempts=attempts)
                return
            # One fsync for the whole attempt, before a DSN or a retry relies on it.
            await self._io(self.spool.append_events, qid, events)
        except (SpoolError, OSError):
            # The next hop has these results and the spool has not: kept for process().
            self._unrecorded.setdefault(qid, []).extend(events)
            raise
        self._log_attempt(msg, mid, attempts, events)
        if delayed:
            outcome = await self._spool_notice(msg, delay_notice, self._reported(
                msg, st, "delay", [r.address for r in delayed], remote))
            await self._io(self.spool.append_events, qid, [outcome])
        if st.finished:
            await self._finish(msg, st, remote)

    def _delay_due(
        self, msg: SpooledMessage, st: QueueState, arrived: float, now: float
    ) -> list[RecipientState]:
        """The deferred recipients owed a "delayed" notice now (queue.delay_warning):
        the message is that old, the recipient did not decline it (RFC 3461 §4.1
        NOTIFY without DELAY), and it has not had one."""
        warn_after = self.cfg.queue.delay_warning
        if warn_after <= 0 or now - arrived < warn_after or not msg.envelope.mail_from:
            return []
        candidates = [r for r in st.recipients.values()
                      if r.status is RcptStatus.DEFERRED and not r.delay_warned]
        if not candidates:
            return []
        requests = recipient_requests(msg.envelope)
        return [r for r in candidates
                if requests.get(r.address, RecipientRequest()).wants("DELAY")]

    def _log_attempt(
        self, msg: SpooledMessage, mid: str, attempt: int, events: list[dict[str, Any]]
    ) -> None:
        for ev in events:
            if ev["ev"] != "rcpt":
                continue
            self._count(RcptStatus(ev["status"]), ev["route"])
            log.event("delivery", qid=msg.qid, message_id=mid, sender=msg.envelope.mail_from,
                      rcpt=ev["rcpt"], result=ev["status"], reply=ev["reply"],
                      route=ev["route"], attempt=attempt)

    def _count(self, status: RcptStatus, route: str) -> None:
        if status is RcptStatus.DELIVERED:
            metrics.DELIVERED.labels(route).inc()
        elif status is RcptStatus.DEFERRED:
            metrics.DEFERRED.labels(route).inc()
        elif status is RcptStatus.BOUNCED:
            metrics.BOUNCED.labels(route).inc()

    async def _finish(self, msg: SpooledMessage, st: QueueState, remote: dict[str, str]) -> None:
        """Every recipient is final: the notices the sender is owed, then forget it.

        One failure DSN for the bounced recipients that did not decline it (RFC 3461
        §4.1 NOTIFY without FAILURE, or NEVER), and one success notice for those that
        asked for it (NOTIFY=SUCCESS, recorded with their delivery)."""
        qid = msg.qid
        env = msg.envelope
        bounced = [r for r in st.recipients.values() if r.status is RcptStatus.BOUNCED]
        succeeded = [r for r in st.recipients.values()
                     if r.status is RcptStatus.DELIVERED and r.notice]
        requests = recipient_requests(env) if bounced or succeeded else {}
        declined = [r for r in bounced
                    if not requests.get(r.address, RecipientRequest()).wants("FAILURE")]
        if declined:
            log.event("dsn_suppressed", qid=qid, recipients=[r.address for r in declined],
                      reason="notify")
            bounced = [r for r in bounced if r not in declined]
        if (bounced or succeeded) and not env.mail_from:
            # RFC 5321 §4.5.5 / RFC 3464 §2: never a DSN to the null reverse-path.
            log.event("dsn_suppressed", qid=qid,
                      recipients=[r.address for r in bounced + succeeded], reason="null sender")
        elif bounced or succeeded:
            # Only the notices not made yet: a retry after a refusal makes the
            # missing one, never a second copy of one already spooled.
            notices: list[tuple[str, list[ReportedRecipient]]] = []
            if bounced and not st.notice_made("failure"):
                notices.append(("failure", self._reported(
                    msg, st, "failure", [r.address for r in bounced], remote, requests)))
            if succeeded and not st.notice_made("success"):
                notices.append(("success", self._reported(
                    msg, st, "success", [r.address for r in succeeded], remote, requests)))
            if notices and not await self._send_notices(msg, notices):
                return  # kept (every recipient is final): the next scan tries again
        await self._remove(msg)
        log.event("done", qid=qid, message_id=message_id(msg.data), attempts=st.attempts)

    def _reported(
        self, msg: SpooledMessage, st: QueueState, kind: str, addresses: list[str],
        remote: dict[str, str], requests: dict[str, RecipientRequest] | None = None,
    ) -> list[ReportedRecipient]:
        """What a notice of ``kind`` says about each of ``addresses`` (RFC 3464 §2.3),
        from their recorded state: a failure (its last reply; a 4xx one expired), a
        success ("delivered" or "relayed", RFC 3464 §2.3.3) or a delay (retried until
        ``queue.max_age``).  ``remote``: the host each one last reached, where known."""
        if requests is None:
            requests = recipient_requests(msg.envelope)
        until = arrival_time(msg.qid, msg.envelope) + self.cfg.queue.max_age
        out: list[ReportedRecipient] = []
        for addr in addresses:
            r = st.recipients.get(addr)
            if r is None:
                continue
            orcpt = requests.get(addr, RecipientRequest()).original_recipient
            if kind == "failure":
                out.append(ReportedRecipient(addr, r.reply, remote.get(addr, ""),
                                             expired=r.reply.startswith("4"),
                                             original_recipient=orcpt))
            elif kind == "success":
                out.append(ReportedRecipient(
                    addr, r.reply, r.remote,
                    action="delivered" if r.notice == "delivered" else "relayed",
                    original_recipient=orcpt))
            else:
                out.append(ReportedRecipient(addr, r.reply, remote.get(addr, ""),
                                             action="delayed", will_retry_until=until,
                                             original_recipient=orcpt))
        return out

    def _notice_event(self, kind: str, rcpts: list[str], now: float) -> dict[str, Any]:
        """The record of a notice about to be spooled, with the queue id it will have."""
        return {"ev": "notice", "kind": kind, "dsn_qid": new_queue_id(now), "rcpts": rcpts,
                "state": str(NoticeState.SPOOLING)}

    async def _send_notices(
        self, msg: SpooledMessage, notices: list[tuple[str, list[ReportedRecipient]]]
    ) -> bool:
        """Record, spool, and record the outcome of each notice; False if any was refused.

        Two fsyncs for all of them: the records before (a crash after a spool write
        then finds the notice by its queue id, see NoticeState) and the outcomes after."""
        now = self.clock()
        records = [self._notice_event(kind, [r.address for r in reported], now)
                   for kind, reported in notices]
        await self._io(self.spool.append_events, msg.qid, records)
        outcomes = [await self._spool_notice(msg, record, reported)
                    for record, (_, reported) in zip(records, notices, strict=True)]
        await self._io(self.spool.append_events, msg.qid, outcomes)
        return all(o["state"] == NoticeState.SPOOLED for o in outcomes)

    async def _settle_notices(self, msg: SpooledMessage, st: QueueState) -> bool:
        """Give each notice a crash left ``spooling`` its outcome; False when the
        message waits for the archive to answer (deferred, its log says until when).

        Still in the spool: ``spooled``.  Gone from it: sent (archived, delivered and
        removed), or never written.  Every spooled message passes the archive stage
        before it is delivered (nothing is delivered unarchived), and the archive's
        ledger records its queue id, so the archive tells them apart: archived, the
        notice is ``spooled``; unknown there, it never left and is made again under
        the same queue id (a crash during the remake settles the same way).

        When the archive cannot answer (not open yet: its backend was down at start;
        its ledger unreadable) the message is deferred like mail an archive outage
        deferred, and retried when the archive is back (gateway.service), until
        ``queue.max_age`` after the notice was made.  Then, or with no archive stage
        at all, the notice is ``unconfirmed`` and not made again: a lost notice is
        preferred to a duplicate.
        """
        archive = next((s for s in self.stages if isinstance(s, NoticeArchive)), None)
        now = self.clock()
        events: list[dict[str, Any]] = []
        waiting: dict[str, float] = {}  # unanswered notice -> when it was made
        waiting_why = ""
        for dsn_qid in st.unsettled_notices:
            notice = st.notices[dsn_qid]
            if await self._io(self.spool.exists, dsn_qid):
                notice.state = NoticeState.SPOOLED
                events.append(self._settled(notice.kind, dsn_qid, notice.state))
                continue
            try:
                made = queue_id_time(dsn_qid)
            except ValueError as exc:
                made, why = 0.0, str(exc)
                archived = None
            else:
                archived, why = await self._archived(archive, dsn_qid, made)
            if archived:
                notice.state = NoticeState.SPOOLED
                events.append(self._settled(notice.kind, dsn_qid, notice.state))
                log.event("dsn_archived", qid=msg.qid, dsn_qid=dsn_qid, kind=notice.kind)
            elif archived is not None:
                outcome = await self._remake(msg, st, dsn_qid, notice.kind, notice.rcpts)
                notice.state = NoticeState(outcome["state"])
                events.append(outcome)
            elif archive is not None and made and not scheduler.expired(
                    made, now, self.cfg.queue):
                waiting[dsn_qid], waiting_why = made, why
            else:
                # Spooled and already sent, or lost in the crash: not made again.
                notice.state = NoticeState.UNCONFIRMED
                events.append(self._settled(notice.kind, dsn_qid, notice.state))
                log.event("dsn_unconfirmed", level=logging.WARNING, qid=msg.qid,
                          dsn_qid=dsn_qid, kind=notice.kind, recipients=notice.rcpts,
                          reason=why)
        if waiting:
            # Like a TEMPFAIL of the archive stage, and with its reply: the archive's
            # return retries it at once (service._retry_deferred_by_archive).
            attempts = st.attempts + 1
            next_at = scheduler.next_attempt(min(waiting.values()), attempts, now,
                                             self.cfg.queue, self.rand) or now
            events.append({"ev": "attempt", "attempts": attempts, "next_at": next_at,
                           "error": str(ARCHIVE_UNAVAILABLE)})
            log.event("dsn_settle_deferred", level=logging.WARNING, qid=msg.qid,
                      dsn_qids=list(waiting), error=waiting_why, next_at=next_at)
        await self._io(self.spool.append_events, msg.qid, events)
        return not waiting

    @staticmethod
    def _settled(kind: str, dsn_qid: str, state: NoticeState) -> dict[str, Any]:
        return {"ev": "notice", "kind": kind, "dsn_qid": dsn_qid, "state": str(state)}

    async def _archived(
        self, archive: NoticeArchive | None, dsn_qid: str, made: float
    ) -> tuple[bool | None, str]:
        """Whether the archive stored the notice ``dsn_qid`` (made at ``made``); None
        when it cannot answer, with the reason."""
        if archive is None:
            return None, "no archive stage"
        try:
            # Bounded by the notice's time: the ledger is read from there on only.
            return await self._io(archive.archived, dsn_qid, made - NOTICE_CLOCK_SLACK), ""
        except Exception as exc:  # not an answer: never made again on a guess
            return None, describe(exc)

    async def _remake(
        self, msg: SpooledMessage, st: QueueState, dsn_qid: str, kind: str, rcpts: list[str]
    ) -> dict[str, Any]:
        """Make again a notice the crash kept from being written, under its queue id;
        the event recording the outcome (spooled, or refused by the spool)."""
        reported = self._reported(msg, st, kind, rcpts, {})
        if not reported:  # recipients this log does not know: nothing to report
            log.event("dsn_unconfirmed", level=logging.WARNING, qid=msg.qid,
                      dsn_qid=dsn_qid, kind=kind, recipients=rcpts,
                      reason="its recipients are not in the message's log")
            return self._settled(kind, dsn_qid, NoticeState.UNCONFIRMED)
        outcome = await self._spool_notice(msg, {"kind": kind, "dsn_qid": dsn_qid}, reported)
        outcome["remade"] = True
        log.event("dsn_remade", qid=msg.qid, dsn_qid=dsn_qid, kind=kind,
                  recipients=rcpts, state=outcome["state"])
        return outcome

    async def _spool_notice(
        self, msg: SpooledMessage, record: dict[str, Any], reported: list[ReportedRecipient]
    ) -> dict[str, Any]:
        """Spool one DSN about ``reported`` under the queue id ``record`` gave it, to
        the message's sender, from the null sender (RFC 3464 §2, RFC 5321 §4.5.5).
        The event that records the outcome: spooled, or refused by the spool."""
        qid = msg.qid
        dsn_qid = record["dsn_qid"]
        outcome = {"ev": "notice", "kind": record["kind"], "dsn_qid": dsn_qid,
                   "state": str(NoticeState.SPOOLED)}
        sender = msg.envelope.mail_from
        request = message_request(msg.envelope.mail_options)
        now = self.clock()
        data = build_dsn(
            sender=sender, original=msg.data, recipients=reported,
            reporting_mta=self.cfg.hostname, arrival=arrival_time(qid, msg.envelope),
            now=now, qid=qid, ret=request.ret, envid=request.envid,
            full_limit=self.cfg.queue.bounce_size_limit,
        )
        env = Envelope(
            mail_from="", rcpt_to=[sender], received_at=now, helo=self.cfg.hostname,
            listener="dsn", role="local",
            mail_options=[] if sender.isascii() else ["SMTPUTF8"],
        )
        try:
            await store_from_loop(self.spool, self.executor, env, data,
                                  {"dsn": {"of": qid}}, dsn_qid)
        except SpoolError as exc:
            log.event("dsn_error", qid=qid, dsn_qid=dsn_qid, error=str(exc))
            outcome["state"] = str(NoticeState.REFUSED)
            return outcome
        log.event("dsn", qid=qid, dsn_qid=dsn_qid, to=sender,
                  action=reported[0].action, recipients=[r.address for r in reported])
        self.notify(dsn_qid)
        return outcome
