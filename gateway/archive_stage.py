"""The archive stage: every message that passes the gateway is kept, before delivery.

Runs after the queue, once per message (``once``: a retry of the delivery does
not archive again).  The exact bytes about to be delivered go into the
encrypted write-once store (archive.facade, group-committed with their ledger
entry) together with a small receipt blob holding the envelope, verdicts,
decision and retention end (archive.receipts: what a rebuild needs that the
bytes do not carry); the same envelope, verdicts, policy decision with its rule
trace and retention end go into the metadata database, batched into one
transaction per burst.  Indexing happens later, off this path (archive.index.Indexer).

A failure here raises: the worker holds the message with stage "archive", so
nothing is delivered that was not archived.  An outage of the backend (PostgreSQL
or S3 unreachable, gateway.archive_health) is not a failure of the message: the
stage answers TEMPFAIL, the worker defers it in the spool, and the health flag
makes the before-queue path refuse new mail with 451 until a probe sees the
backend again.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from archive.errors import ArchiveError
from archive.extract import Extracted, extract
from archive.facade import Archive, BatchWriter
from archive.location import location_from_config
from archive.metadata import MessageRecord, Metadata, StoredMessage
from archive.receipts import RECEIPT, RECEIPT_OF, receipt_document
from gateway import log
from gateway.archive_health import (
    ARCHIVE_UNAVAILABLE,
    BackendHealth,
    backend_unavailable,
    describe,
)
from gateway.config import Config
from gateway.pipeline import Action, MessageContext, StageResult

_PERIOD = re.compile(r"^(\d+)(y|mo|w|d)$")


def retention_end(start: datetime, label: str | None) -> datetime | None:
    """When a retention period that began at ``start`` ends; None for forever/unset.

    Years and months are counted on the calendar (a message received on
    29 February and kept one year expires on 28 February).
    """
    if not label or label == "forever":
        return None
    m = _PERIOD.match(label.strip().lower())
    if not m:
        raise ValueError(f"unknown retention period {label!r}")
    n, unit = int(m.group(1)), m.group(2)
    if unit in ("y", "mo"):
        months = start.month - 1 + (n * 12 if unit == "y" else n)
        year, month = start.year + months // 12, months % 12 + 1
        day = min(start.day, calendar.monthrange(year, month)[1])
        return start.replace(year=year, month=month, day=day)
    return start + timedelta(days=n * (7 if unit == "w" else 1))


def record_for(ctx: MessageContext, sha256: str, now: datetime) -> MessageRecord:
    """The metadata row of one receipt (pure: the caller did the I/O)."""
    env = ctx.envelope
    decide: dict[str, Any] = ctx.facts.get("decide") or {}
    received = datetime.fromtimestamp(env.received_at, UTC) if env.received_at else now
    verdicts = dict(ctx.facts.get("check") or {})
    if "spam" in ctx.facts:
        verdicts["spam"] = ctx.facts["spam"]
    return MessageRecord(
        sha256=sha256,
        extracted=extract(ctx.data),
        received_at=received,
        direction=str(decide.get("direction") or env.role),
        source="smtp",
        state=str(decide.get("decision") or "accepted"),
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
    )


class _MetadataBatcher:
    """Concurrent archive stages share one database transaction per burst."""

    def __init__(self, meta: Metadata, max_batch: int = 256) -> None:
        self.meta = meta
        self.max_batch = max_batch
        self._pending: list[tuple[MessageRecord, asyncio.Future[StoredMessage]]] = []
        self._running: asyncio.Task[None] | None = None

    async def add(self, rec: MessageRecord) -> StoredMessage:
        fut: asyncio.Future[StoredMessage] = asyncio.get_running_loop().create_future()
        self._pending.append((rec, fut))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._drain(), name="archive-metadata")
        return await fut

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = (self._pending[: self.max_batch],
                                    self._pending[self.max_batch :])
            try:
                stored = await asyncio.to_thread(self.meta.add_messages, [r for r, _ in batch])
            except Exception as exc:  # every waiter sees the failure; none is lost
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), row in zip(batch, stored, strict=True):
                if not fut.done():
                    fut.set_result(row)


class ArchiveStage:
    name = "archive"
    once = True

    def __init__(self, archive: Archive, meta: Metadata,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.archive = archive
        self.meta = meta
        self.health = BackendHealth()
        self.writer = BatchWriter(archive)
        self.batcher = _MetadataBatcher(meta)
        self.clock = clock or (lambda: datetime.now(UTC))
        # sha256 -> what extract() found, kept for this process's indexer (0: none
        # runs here).  Parsing the MIME once instead of twice, and not reading the
        # blob back (decrypt + decompress), halves the archive's CPU per message.
        self.keep_extracted = 0
        self._extracted: OrderedDict[str, Extracted] = OrderedDict()

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
    def open(cls, cfg: Config) -> ArchiveStage:
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
        return cls(archive, meta)

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

    def probe(self) -> None:
        """Raise unless the metadata database and the blob store answer (a cheap request)."""
        with self.meta.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        self.archive.probe()

    async def _archive(self, ctx: MessageContext) -> StageResult:
        rec, receipt = await asyncio.to_thread(self._prepare, ctx)
        # The receipt first, in the same ledger append: the message's entry names it.
        _, ref = await self.writer.put_many(
            [receipt, ctx.data],
            [{RECEIPT_OF: rec.sha256},
             {"qid": ctx.qid, RECEIPT: hashlib.sha256(receipt).hexdigest()}])
        if ref.sha256 != rec.sha256:  # the store hashes the same bytes
            raise ArchiveError(f"archived {ref.sha256}, expected {rec.sha256}")
        self._keep(ref.sha256, rec.extracted)
        row = await self.batcher.add(rec)
        return StageResult(
            reason=f"archived {ref.sha256[:16]} as message {row.id}",
            facts={"sha256": ref.sha256, "message": row.id, "new_blob": ref.new,
                   "retention_until": rec.retention_until.isoformat()
                   if rec.retention_until else None},
        )

    def _prepare(self, ctx: MessageContext) -> tuple[MessageRecord, bytes]:
        """The metadata record and the receipt blob (archive.receipts) of one message."""
        rec = record_for(ctx, hashlib.sha256(ctx.data).hexdigest(), self.clock())
        return rec, receipt_document(rec, ctx.envelope.to_dict(), ctx.qid)

    async def close(self) -> None:
        await self.writer.close()
        self.meta.close()

