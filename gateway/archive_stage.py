"""The archive stage: every message that passes the gateway is kept, before delivery.

Runs after the queue, once per message (``once``: a retry of the delivery does
not archive again).  The exact bytes about to be delivered go into the
encrypted write-once store (archive.facade, group-committed with their ledger
entry) together with a small receipt blob holding the envelope, verdicts,
decision and retention end (archive.receipts: what a rebuild needs that the
bytes do not carry); the same envelope, verdicts, policy decision with its rule
trace and retention end go into the metadata database, batched into one
transaction per burst.  Indexing happens later, off this path (archive.index.Indexer).

Copies (issue 3 item 1; archive.metadata.COPIES): when a transform changed the
message, both the bytes as received (``ctx.received``: the spooled plaintext) and
the bytes as sent are archived, each with its own receipt, as two rows linked to
each other; an inbound encrypted message the transform could decrypt
(``facts["transform"]["decrypted"]``) is kept as received (ciphertext) and as
decrypted.  The readable copy (received plaintext, decrypted) comes first and is
the one search lists; ``coffer show`` names the other.  Rows, receipts and links
are one mechanism for both cases (:func:`copies_of`).

A failure here raises: the worker holds the message with stage "archive", so
nothing is delivered that was not archived.  An outage of the backend (PostgreSQL
or S3 unreachable, gateway.archive_health) is not a failure of the message: the
stage answers TEMPFAIL, the worker defers it in the spool, and the health flag
makes the before-queue path refuse new mail with 451 until a probe sees the
backend again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from archive.errors import ArchiveError
from archive.extract import Extracted, extract
from archive.facade import Archive, BatchWriter
from archive.location import location_from_config
from archive.metadata import (
    DECRYPTED,
    ENCRYPTED,
    JOURNAL_REPORT,
    RECEIVED,
    SENT,
    MessageRecord,
    Metadata,
    StoredMessage,
)
from archive.receipts import RECEIPT, RECEIPT_OF, receipt_document
from gateway import log
from gateway.archive_health import (
    ARCHIVE_UNAVAILABLE,
    BackendHealth,
    backend_unavailable,
    check_room,
    describe,
    refused_by_server,
    unavailable_at_start,
)
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.journal_archive import DIRECTION as JOURNAL_DIRECTION
from gateway.journal_archive import STATE as JOURNAL_STATE
from gateway.journal_archive import JournalPlan
from gateway.journal_archive import plan as journal_plan
from gateway.journal_archive import source as journal_source
from gateway.journal_intake import is_journal_copy
from gateway.mailparse import ValueMemo
from gateway.offload import cpu_bound
from gateway.pipeline import Action, MessageContext, StageResult
from gateway.transform import mime

_PERIOD = re.compile(r"^(\d+)(y|mo|w|d)$")


def retention_end(start: datetime, label: str | None) -> datetime | None:
    """When a retention period that began at ``start`` ends; None for forever/unset.

    Years and months are counted on the calendar (a message received on
    29 February and kept one year expires on 28 February).
    """
    if not label or label == "forever":
        return None
    period = _PERIODS.get(label) if type(label) is str else None
    if period is None:
        m = _PERIOD.match(label.strip().lower())
        if not m:
            raise ValueError(f"unknown retention period {label!r}")
        period = (int(m.group(1)), m.group(2))
        if type(label) is str:
            _PERIODS.keep(label, period)
    n, unit = period
    if unit in ("y", "mo"):
        months = start.month - 1 + (n * 12 if unit == "y" else n)
        year, month = start.year + months // 12, months % 12 + 1
        # Every month has 28 days: the calendar is asked only about the days after.
        day = start.day if start.day <= 28 else min(start.day,
                                                     calendar.monthrange(year, month)[1])
        return start.replace(year=year, month=month, day=day)
    return start + timedelta(days=n * (7 if unit == "w" else 1))


# A retention label -> (count, unit): the policy names a handful of periods.
_PERIODS: ValueMemo[str, tuple[int, str]] = ValueMemo(limit=256)


@dataclass(frozen=True, slots=True)
class Copy:
    """One copy of a message to archive: which one (archive.metadata.COPIES), its bytes."""

    kind: str
    data: bytes


def _decrypted(ctx: MessageContext, received: bytes) -> bytes | None:
    """The message as its recipient reads it, when the transform decrypted it (issue 6):
    the outer non-Content fields and the decrypted entity, never merged with
    unencrypted parts (mime.unwrap; EFAIL)."""
    facts = ctx.facts.get("transform")
    entity_b64 = facts.get("decrypted") if isinstance(facts, dict) else None
    if not isinstance(entity_b64, str):
        return None
    try:
        return mime.unwrap(received, base64.b64decode(entity_b64, validate=True))
    except (binascii.Error, mime.MimeError) as exc:
        # The ciphertext is still archived; the officer sees it was not readable here.
        log.event("archive_decrypted_copy_skipped", qid=ctx.qid, error=str(exc))
        return None


def copies_of(ctx: MessageContext) -> list[Copy]:
    """The copies of a message to archive, the readable one first (pure)."""
    sent = ctx.data
    received = sent if ctx.received is None else ctx.received
    decrypted = _decrypted(ctx, received)
    if decrypted is not None:
        out = [Copy(DECRYPTED, decrypted), Copy(ENCRYPTED, received)]
        return out + ([Copy(SENT, sent)] if sent != received else [])
    if sent != received:
        return [Copy(RECEIVED, received), Copy(SENT, sent)]
    return [Copy("", sent)]


def linked(copies: list[Copy], shas: list[str]) -> list[str | None]:
    """The SHA-256 each copy links to: the first (readable) one to the second, every
    other one to the first, so each row names the copy an officer wants next."""
    if len(copies) < 2:
        return [None]
    return [shas[1], *[shas[0]] * (len(copies) - 1)]


def delivered(copies: list[Copy]) -> int:
    """The position of the copy whose bytes the next hop gets."""
    kinds = [c.kind for c in copies]
    for kind in (SENT, ENCRYPTED, JOURNAL_REPORT, ""):
        if kind in kinds:
            return kinds.index(kind)
    raise ValueError(f"no delivered copy among {kinds}")


_STATES = {"accept": "accepted", "quarantine": "quarantined", "discard": "discarded",
           "reject": "rejected", "tempfail": "tempfailed"}


def archive_state(ctx: MessageContext) -> str:
    """What happened to the message, for Message.state (pure): a quarantine or discard
    by any stage (before or after the queue) wins over the policy's plain decision."""
    steps = [*(ctx.facts.get("trace") or []), *ctx.trace]
    actions = {str(s.get("action")) for s in steps if isinstance(s, dict)}
    runner = ctx.facts.get("runner")
    if isinstance(runner, dict):
        actions.add(str(runner.get("action")))
    for action in ("reject", "quarantine", "discard"):
        if action in actions:
            return _STATES[action]
    decision = str((ctx.facts.get("decide") or {}).get("decision") or "accept")
    return _STATES.get(decision, decision[:16])


def record_for(ctx: MessageContext, sha256: str, now: datetime,
               data: bytes | None = None, *, copy: str = "",
               link_sha256: str | None = None) -> MessageRecord:
    """The metadata row of one receipt of ``data`` (default: ``ctx.data``), pure:
    ``copy`` and ``link_sha256`` as :func:`copies_of` and :func:`linked` say."""
    env = ctx.envelope
    decide: dict[str, Any] = ctx.facts.get("decide") or {}
    runner = ctx.facts.get("runner")
    if isinstance(runner, dict) and runner.get("action") == "reject":
        # Rejected after DATA (gateway.runner): which stage, the reply, why.
        decide = {**decide, "rejected": {k: runner.get(k) for k in ("stage", "reply", "reason")}}
    received = datetime.fromtimestamp(env.received_at, UTC) if env.received_at else now
    verdicts = dict(ctx.facts.get("check") or {})
    if "spam" in ctx.facts:
        verdicts["spam"] = ctx.facts["spam"]
    return MessageRecord(
        sha256=sha256,
        extracted=extract(ctx.data if data is None else data),
        received_at=received,
        direction=str(decide.get("direction") or env.role),
        source="smtp",
        state=archive_state(ctx),
        mail_from=env.mail_from,
        rcpt_to=list(env.rcpt_to),
        client_ip=env.client_ip,
        helo=env.helo,
        tls=f"{env.tls.version} {env.tls.cipher}" if env.tls else "",
        auth_user=env.auth_user or "",
        retention_until=retention_end(received, decide.get("retention")),
        verdicts=verdicts,
        decision=decide or None,
        rules=[r["name"] for r in decide.get("rules", []) if r.get("matched")],
        once=env.received_at > 0,  # the transaction's own time: a re-run is this receipt
        copy=copy,
        link_sha256=link_sha256,
    )


def journaled(rec: MessageRecord, ctx: MessageContext, plan: JournalPlan, index: int,
              ) -> MessageRecord:
    """``rec`` (record_for) as the row of a journal copy's ``index``-th copy (pure): the
    envelope the journal gave, direction journal, source journal:LISTENER, the
    retention of archive.journal (the policy did not run), the journal facts as the
    decision trace (gateway.journal_archive)."""
    jc = plan.copies[index]
    facts = ctx.facts.get("journal") or {}
    label = facts.get("retention") if isinstance(facts, dict) else None
    return replace(
        rec, mail_from=jc.mail_from, rcpt_to=list(jc.rcpt_to), direction=JOURNAL_DIRECTION,
        source=journal_source(ctx.envelope), state=JOURNAL_STATE, flags=list(jc.flags),
        decision={"action": "journal", "journal": {**plan.facts,
                                                   "addresses": facts.get("addresses", [])}},
        rules=[], retention_until=retention_end(rec.received_at, label))


class _MetadataBatcher:
    """Concurrent archive stages share one database transaction per burst.

    A message's copies arrive as one group and are never split between two
    transactions: their links are resolved inside the batch (Metadata.add_messages).
    """

    def __init__(self, meta: Metadata, max_batch: int = 256) -> None:
        self.meta = meta
        self.max_batch = max_batch
        self._pending: list[tuple[list[MessageRecord],
                                  asyncio.Future[list[StoredMessage]]]] = []
        self._running: asyncio.Task[None] | None = None

    async def add(self, recs: list[MessageRecord]) -> list[StoredMessage]:
        fut: asyncio.Future[list[StoredMessage]] = asyncio.get_running_loop().create_future()
        self._pending.append((recs, fut))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._drain(), name="archive-metadata")
        return await fut

    def _next_batch(self) -> list[tuple[list[MessageRecord],
                                        asyncio.Future[list[StoredMessage]]]]:
        size, n = 0, 0
        for recs, _ in self._pending:
            if n and size + len(recs) > self.max_batch:
                break
            size, n = size + len(recs), n + 1
        batch, self._pending = self._pending[:n], self._pending[n:]
        return batch

    async def _drain(self) -> None:
        while self._pending:
            batch = self._next_batch()
            flat = [r for recs, _ in batch for r in recs]
            try:
                stored = await asyncio.to_thread(self.meta.add_messages, flat)
            except Exception as exc:  # every waiter sees the failure; none is lost
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            at = 0
            for recs, fut in batch:
                if not fut.done():
                    fut.set_result(stored[at:at + len(recs)])
                at += len(recs)


class ArchiveStage:
    name = "archive"
    once = True

    def __init__(self, archive: Archive, meta: Metadata,
                 clock: Callable[[], datetime] | None = None,
                 health: BackendHealth | None = None) -> None:
        self.archive = archive
        self.meta = meta
        self.health = health or BackendHealth()
        self.writer = BatchWriter(archive)
        self.batcher = _MetadataBatcher(meta)
        self.clock = clock or (lambda: datetime.now(UTC))
        # sha256 -> what extract() found, kept for this process's indexer (0: none
        # runs here).  Parsing the MIME once instead of twice, and not reading the
        # blob back (decrypt + decompress), halves the archive's CPU per message.
        self.keep_extracted = 0
        self._extracted: OrderedDict[str, Extracted] = OrderedDict()

    def holds_extracted(self, sha256: str) -> bool:
        """Whether this stage kept the extraction of that blob for its indexer."""
        return sha256 in self._extracted

    def take_extracted(self, sha256: str) -> Extracted | None:
        """The extraction of a blob this stage just archived, once (None if not kept)."""
        return self._extracted.pop(sha256, None)

    def _keep(self, sha256: str, extracted: Extracted) -> None:
        if self.keep_extracted <= 0:
            return
        self._extracted[sha256] = extracted
        while len(self._extracted) > self.keep_extracted:
            self._extracted.popitem(last=False)  # the indexer fetches and extracts it

    @classmethod
    def open(cls, cfg: Config, health: BackendHealth | None = None) -> ArchiveStage:
        """The configured archive: embedded under the data directory by default, or the
        ``archive.database`` (PostgreSQL) and ``s3`` bucket a cluster shares."""
        loc = location_from_config(cfg)
        if loc.shared and loc.s3 is not None and loc.s3.key_bucket is None:
            # Legal for one node on PostgreSQL; a second node could not read our blobs.
            log.event("archive_keys_local", level=logging.WARNING,
                      detail="s3.key_bucket is not set: the wrapped data keys stay in this "
                      "node's data_dir, so no other node can read the blobs it stores")
        meta = loc.open_metadata()
        try:
            archive = loc.open_archive(create=True)
        except BaseException:
            meta.close()
            raise
        for name, reason in archive.damaged_segments().items():
            # Kept by recover() because it holds committed messages (archive.store):
            # mail goes on into new segments, and the operator must hear of it now.
            log.event("archive_segment_damaged", level=logging.ERROR, segment=name,
                      error=reason, detail="its header does not parse; run coffer archive "
                      "repair, or restore the segment from a backup (docs/recovery.md)")
        return cls(archive, meta, health=health)

    async def run(self, ctx: MessageContext) -> StageResult:
        decide = ctx.facts.get("decide") or {}
        if decide.get("archive") is False:
            # Only a policy that explicitly allows exemptions can say this (policies/).
            return StageResult(reason="not archived: exempted by policy rule")
        try:
            return await self._archive(ctx)
        except Exception as exc:
            if not backend_unavailable(exc):
                raise  # the worker holds the message: an operator looks at it
            reason = describe(exc)
            self.health.mark_down(reason)
            return StageResult(action=Action.TEMPFAIL, reply=ARCHIVE_UNAVAILABLE,
                               reason=f"archive backend unavailable: {reason}")

    def archived(self, qid: str, since: float) -> bool:
        """Whether the message spooled under ``qid`` was archived at or after ``since``
        (seconds since the epoch).  Blocking (reads the ledger: run it in a thread).

        The queue worker asks this about a notice a crash left unsettled and the
        spool no longer has: nothing is delivered before this stage stored it, so a
        queue id the archive does not know was never delivered (gateway.queue.worker).
        The ledger is this node's own files: the answer needs neither the metadata
        database nor the object storage.
        """
        return self.archive.stored_queue_id(qid, datetime.fromtimestamp(since, UTC))

    def probe(self) -> None:
        """Raise unless the metadata database and the blob store answer (a cheap request)
        and the archive's local files have room to grow (after a full disk)."""
        with self.meta.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        self.archive.probe()
        check_room(self._local_dirs())

    def _local_dirs(self) -> list[Path]:
        """The directories whose file systems the archive writes: ledger and keys always,
        the store unless it is S3, the metadata when it is an SQLite file."""
        dirs = [self.archive.paths.root]
        db = self.meta.engine.url.database
        if self.meta.dialect == "sqlite" and db and db != ":memory:":
            dirs.append(Path(db).parent)
        return dirs

    async def _archive(self, ctx: MessageContext) -> StageResult:
        plan = journal_plan(ctx.envelope, ctx.data, ctx.facts["journal"]) \
            if is_journal_copy(ctx.facts) else None
        if plan is not None and plan.warning:
            log.event("journal_unparsed", level=logging.WARNING, qid=ctx.qid,
                      error=plan.warning, sender=ctx.envelope.mail_from)
        copies = [Copy(c.kind, c.data) for c in plan.copies] if plan else copies_of(ctx)
        recs, receipts = await cpu_bound(sum(len(c.data) for c in copies), None,
                                         self._prepare, ctx, copies, plan)
        # Each receipt first, in the same ledger append: the message's entry names it.
        blobs: list[bytes] = []
        fields: list[dict[str, Any]] = []
        for copy, rec, receipt in zip(copies, recs, receipts, strict=True):
            blobs += [receipt, copy.data]
            fields += [{RECEIPT_OF: rec.sha256},
                       {"qid": ctx.qid, RECEIPT: hashlib.sha256(receipt).hexdigest()}]
        refs = (await self.writer.put_many(blobs, fields))[1::2]
        for ref, rec in zip(refs, recs, strict=True):
            if ref.sha256 != rec.sha256:  # the store hashes the same bytes
                raise ArchiveError(f"archived {ref.sha256}, expected {rec.sha256}")
            self._keep(ref.sha256, rec.extracted)
        rows = await self.batcher.add(recs)
        # The facts name the copy that is delivered (the exact bytes the next hop gets).
        sent = delivered(copies)
        facts: dict[str, Any] = {
            "sha256": refs[sent].sha256, "message": rows[sent].id, "new_blob": refs[sent].new,
            "retention_until": recs[0].retention_until.isoformat()
            if recs[0].retention_until else None}
        if len(copies) > 1:
            facts["copies"] = {c.kind: {"sha256": ref.sha256, "message": row.id}
                               for c, ref, row in zip(copies, refs, rows, strict=True)}
        names = ", ".join(f"{c.kind or 'message'} {ref.sha256[:16]} as message {row.id}"
                          for c, ref, row in zip(copies, refs, rows, strict=True))
        return StageResult(reason=f"archived {names}", facts=facts)

    def _prepare(self, ctx: MessageContext, copies: list[Copy],
                 plan: JournalPlan | None = None) -> tuple[list[MessageRecord], list[bytes]]:
        """The metadata records and receipt blobs (archive.receipts) of a message's copies."""
        now = self.clock()
        shas = [hashlib.sha256(c.data).hexdigest() for c in copies]
        envelope = ctx.envelope.to_dict()
        recs = [record_for(ctx, sha, now, c.data, copy=c.kind, link_sha256=link)
                for c, sha, link in zip(copies, shas, linked(copies, shas), strict=True)]
        if plan is None:
            return recs, [receipt_document(r, envelope, ctx.qid) for r in recs]
        recs = [journaled(r, ctx, plan, i) for i, r in enumerate(recs)]
        # Each receipt's envelope is the one its row has: a rebuild gives the original
        # the report's sender and recipients, not the journal address.
        return recs, [receipt_document(r, {**envelope, "mail_from": r.mail_from,
                                           "rcpt_to": list(r.rcpt_to)}, ctx.qid)
                      for r in recs]

    async def close(self) -> None:
        await self.writer.close()
        self.meta.close()


class ArchivePending:
    """The archive stage of a process whose archive backend was unreachable at start.

    Every message it sees is deferred exactly as in an outage at run time (TEMPFAIL,
    ``451 4.3.0``: it stays in the spool, never held, never delivered unarchived), and
    its health flag is down from the start, so the before-queue path refuses new
    transactions at MAIL FROM.  The service probes by trying :meth:`open` again; the
    stage that opens shares this flag, so clearing it (``archive_backend_up``) is what
    lets mail in again.
    """

    name = "archive"
    once = True

    def __init__(self, cfg: Config, reason: str, health: BackendHealth | None = None) -> None:
        self.cfg = cfg  # the archive keys a restart alone changes (service.restart_required)
        # ``health``: the flag of a stage that opened and lost its backend before the
        # start-up was complete (service.Service._start_archive); the runner reads it.
        self.health = health or BackendHealth()
        self.health.mark_down(reason)

    async def run(self, ctx: MessageContext) -> StageResult:
        return StageResult(action=Action.TEMPFAIL, reply=ARCHIVE_UNAVAILABLE,
                           reason=f"archive backend unavailable: {self.health.reason}")

    def archived(self, qid: str, since: float) -> bool:
        """ArchiveStage.archived, which cannot be answered before the archive opens."""
        raise ArchiveError(f"the archive is not open yet: {self.health.reason}")

    def open(self) -> ArchiveStage:
        """The real stage, sharing this health flag (blocking I/O: run it in a thread)."""
        return ArchiveStage.open(self.cfg, health=self.health)


def open_archive_stage(cfg: Config) -> ArchiveStage | ArchivePending:
    """The archive stage for ``coffer serve``: opened now, or pending when the backend
    cannot be reached (gateway.archive_health.unavailable_at_start).

    A backend that answers and refuses this configuration raises ConfigError naming
    the section (``s3`` or ``archive.database``); any other failure propagates.
    """
    try:
        return ArchiveStage.open(cfg)
    except Exception as exc:
        if unavailable_at_start(exc):
            return ArchivePending(cfg, describe(exc))
        key = _refused_section(exc)
        if key is None:
            raise  # a bug or a damaged archive: not for this function to name
        first = (str(exc).splitlines() or [""])[0]  # the whole reason, no SQL parameters
        raise ConfigError("the archive backend refused this configuration: "
                          f"{type(exc).__name__}: {first}", file=cfg.source, key=key) from exc


def _refused_section(exc: BaseException) -> str | None:
    """The configuration section a backend's refusal is about, or None when ``exc`` is
    no such refusal: S3 refused a request (credentials, bucket, Object Lock) -> ``s3``;
    PostgreSQL refused the connection -> ``archive.database``."""
    from archive.s3store import ObjectStoreError

    if isinstance(exc, ObjectStoreError):
        return "s3"
    if refused_by_server(exc):
        return "archive.database"
    return None
