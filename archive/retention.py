"""Retention: ``coffer archive expire`` removes what the law no longer requires us to keep.

Each message row carries its retention end (``messages.retention_until``,
computed from the policy decision by gateway.archive_stage.retention_end; NULL
means keep forever).  A message is *due* when that end has passed.  A due
message is expired only when no hold covers it:

* it is not an item of an active hold (the matches recorded at creation);
* it does not match the query of any active hold NOW (holds are dynamic, see
  archive.holds): the full-text index is brought up to date first, and a
  message whose blob is not indexed yet is kept, since we cannot tell;
* its policy decision names no hold (``holds: [CASE]``) that is still active
  (a named case is active until a hold of that case exists and is released).

Single instance: one blob may back several message rows.  Expiring a row marks
it (``expired_at``, ``state = "expired"``, a flag naming the rule and the
retention end): the row stays, so reports can say what was expired, when and
under which rule.  The blob is crypto-shredded (archive.facade.Archive.shred:
ledger tombstone first, then the wrapped data key is destroyed) and its file
deleted only when every row that references it is expired; the tombstone keeps
the SHA-256 provable while the content is gone.  The full-text documents of a
shredded blob are deleted too, and so are its receipt blobs (archive.receipts:
envelope, Bcc recipients, decision), each with its own tombstone.

There is deliberately no way to delete a message before its retention ends, or
while held: :func:`expire` is the only path to Archive.shred outside tests, and
it re-checks, for every blob just before shredding it, that each of its rows is
due and neither a recorded item of an active hold nor under a policy hold (the
hold queries were run moments before, for the whole plan).

A crash part way leaves tombstoned blobs whose rows are not marked yet; the next
run marks them (and ``coffer archive audit-db`` reports them meanwhile).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update

from archive.audit import record
from archive.errors import ArchiveError
from archive.facade import Archive
from archive.holds import active_holds, list_holds
from archive.index import Index, Indexer
from archive.metadata import Blob, Decision, Hold, HoldItem, Message, Metadata
from archive.receipts import receipts_of
from archive.search import Searcher

__all__ = [
    "Expired",
    "ExpiryReport",
    "Kept",
    "RetentionError",
    "expire",
    "plan_expiry",
    "refuse_unless_expirable",
]

_CHUNK = 500
_SHRED_CHUNK = 1000  # blobs per archive.shred_many (one ledger append, one pass)


class RetentionError(ArchiveError):
    """Expiry refused: a message is still within retention or held."""


@dataclass(frozen=True, slots=True)
class Expired:
    message_id: int
    sha256: str
    retention_until: datetime
    rule: str | None
    blob_shredded: bool  # False: another live message still uses the same bytes

    def to_json(self) -> dict[str, Any]:
        return {"type": "expired", "id": self.message_id, "sha256": self.sha256,
                "retention_until": self.retention_until.isoformat(), "rule": self.rule,
                "blob_shredded": self.blob_shredded}


@dataclass(frozen=True, slots=True)
class Kept:
    """A due message that is not expired, and why."""

    message_id: int
    reason: str  # "hold:CASE", "hold-query:CASE", "policy-hold:CASE", "not indexed"

    def to_json(self) -> dict[str, Any]:
        return {"type": "kept", "id": self.message_id, "reason": self.reason}


@dataclass
class ExpiryReport:
    now: datetime
    dry_run: bool
    expired: list[Expired] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    blobs_shredded: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"type": "summary", "now": self.now.isoformat(), "dry_run": self.dry_run,
                "expired": len(self.expired), "kept": len(self.kept),
                "blobs_shredded": self.blobs_shredded}


@dataclass(frozen=True, slots=True)
class _Due:
    id: int
    blob_id: int
    sha256: str
    retention_until: datetime
    indexed: bool
    trace: Any


def _due(meta: Metadata, now: datetime, blob_id: int | None = None) -> list[_Due]:
    with meta.session() as s:
        q = (select(Message.id, Message.blob_id, Message.sha256, Message.retention_until,
                    Blob.indexed_at, Decision.trace)
             .join(Blob, Blob.id == Message.blob_id)
             .outerjoin(Decision, Decision.message_pk == Message.id)
             .where(Message.retention_until.is_not(None), Message.retention_until <= now,
                    Message.expired_at.is_(None))
             .order_by(Message.id))
        if blob_id is not None:
            q = q.where(Message.blob_id == blob_id)
        rows = s.execute(q)
        out = []
        for r in rows:
            until = r[3] if r[3].tzinfo else r[3].replace(tzinfo=UTC)
            out.append(_Due(r[0], r[1], r[2], until, r[4] is not None, r[5]))
        return out


def _policy_holds(trace: Any) -> list[str]:
    if isinstance(trace, dict):
        holds = trace.get("holds")
        if isinstance(holds, list):
            return [str(h) for h in holds if h]
    return []


def _rule(trace: Any) -> str | None:
    if isinstance(trace, dict):
        detail = trace.get("retention_detail")
        if isinstance(detail, dict) and detail.get("rule"):
            return str(detail["rule"])
    return None


def _held(meta: Metadata, searcher: Searcher | None, due: list[_Due]) -> dict[int, str]:
    """Message id -> the first reason it is held, for the due messages (without a
    searcher, the hold queries are not run again: only recorded facts count)."""
    ids = [d.id for d in due]
    reasons: dict[int, str] = {}
    if not ids:
        return reasons
    with meta.session() as s:
        for pk, case in s.execute(
                select(HoldItem.message_pk, Hold.case).join(Hold, Hold.id == HoldItem.hold_id)
                .where(Hold.released_at.is_(None),
                       meta.ids_condition(HoldItem.message_pk, ids))):
            reasons.setdefault(pk, f"hold:{case}")
    due_set = set(ids)
    if searcher is not None:
        for hold in active_holds(meta):
            # Dynamic holds: a message that matches the query today is held today.
            for pk in due_set.intersection(searcher.message_ids(hold.query)):
                reasons.setdefault(pk, f"hold-query:{hold.case}")
    released = {h.case for h in list_holds(meta) if not h.active}
    for d in due:
        for case in _policy_holds(d.trace):
            if case not in released:
                reasons.setdefault(d.id, f"policy-hold:{case}")
    for d in due:
        if not d.indexed:
            reasons.setdefault(d.id, "not indexed: cannot tell whether a hold's query matches")
    return reasons


def plan_expiry(meta: Metadata, searcher: Searcher, now: datetime
                ) -> tuple[list[Expired], list[Kept]]:
    """What an expiry at ``now`` would do (pure reading: nothing is changed)."""
    due = _due(meta, now)
    held = _held(meta, searcher, due)
    expiring = [d for d in due if d.id not in held]
    kept = [Kept(d.id, held[d.id]) for d in due if d.id in held]
    live_users = _live_rows(meta, {d.blob_id for d in expiring})
    going = {d.id for d in expiring}
    out = []
    for d in expiring:
        shred = live_users[d.blob_id] <= going
        out.append(Expired(d.id, d.sha256, d.retention_until, _rule(d.trace), shred))
    return out, kept


def _live_rows(meta: Metadata, blob_ids: Iterable[int]) -> dict[int, set[int]]:
    """Blob id -> ids of its message rows not yet expired."""
    users: dict[int, set[int]] = defaultdict(set)
    blobs = sorted(set(blob_ids))
    for i in range(0, len(blobs), _CHUNK * 4):
        chunk = blobs[i:i + _CHUNK * 4]
        with meta.session() as s:
            for pk, blob_id in s.execute(
                    select(Message.id, Message.blob_id)
                    .where(meta.ids_condition(Message.blob_id, chunk),
                           Message.expired_at.is_(None))):
                users[blob_id].add(pk)
    return users


def expire(meta: Metadata, archive: Archive, index: Index, who: str, *,
           now: datetime | None = None, dry_run: bool = False,
           clock: Callable[[], datetime] | None = None) -> ExpiryReport:
    """Expire every due, unheld message at ``now`` (default: the clock).

    The index is brought up to date first, so dynamic holds see every message.
    ``dry_run``: report what would happen and change nothing (not even the index,
    which is why unindexed messages are then reported as kept).
    """
    clock = clock or (lambda: datetime.now(UTC))
    now = now or clock()
    searcher = Searcher(meta, index, archive.get)
    if not dry_run:
        Indexer(meta, index, archive.get, clock=clock).run()
    expired, kept = plan_expiry(meta, searcher, now)
    report = ExpiryReport(now, dry_run, expired, kept)
    if dry_run or not expired:
        if not dry_run:
            record(meta, archive, who, "expire", result_count=0,
                   detail={"now": now.isoformat(), "kept": len(kept), "blobs_shredded": 0},
                   clock=lambda: now)
        return report
    by_sha: dict[str, list[Expired]] = defaultdict(list)
    for e in expired:
        by_sha[e.sha256].append(e)
    ids_by_blob = _blob_ids(meta, list(by_sha))
    # Each receipt blob (archive.receipts: the envelope, Bcc included) goes with its
    # message's content; one ledger pass finds them.
    receipts = receipts_of(archive.ledger,
                           [sha for sha, items in by_sha.items() if items[0].blob_shredded])
    shredded: list[int] = []
    # Tombstones and key destruction for the whole run at once (archive.shred_many:
    # one key table rewrite per store segment); the rows are marked only after it,
    # so a crash in between leaves them due and the next run finishes the job.
    doomed: list[tuple[str, dict[str, Any]]] = []
    for sha, items in by_sha.items():
        if not items[0].blob_shredded:
            continue
        blob_id = ids_by_blob[sha]
        refused = _recheck(meta, blob_id, {e.message_id for e in items}, now)
        if refused is not None:
            # Something changed since the plan: keep this blob and its rows for now.
            gone = {e.message_id for e in items}
            report.expired = [e for e in report.expired if e.message_id not in gone]
            report.kept.extend(Kept(pk, refused) for pk in sorted(gone))
            continue
        # Receipts first: after a crash in between, the rows are still due, so
        # the next run finishes the message and no receipt outlives its content.
        for receipt in receipts.get(sha, []):
            if archive.store.data_key_present(receipt) or archive.exists(receipt):
                doomed.append((receipt, {"receipt_of": sha}))
        if archive.store.data_key_present(sha) or archive.exists(sha):
            doomed.append((sha, {
                "messages": sorted(e.message_id for e in items),
                "rules": sorted({e.rule for e in items if e.rule}),
                "retention_until": max(e.retention_until for e in items).isoformat()}))
        shredded.append(blob_id)
    for i in range(0, len(doomed), _SHRED_CHUNK):
        archive.shred_many(doomed[i:i + _SHRED_CHUNK], reason="retention", delete_blob=True)
    expired = report.expired
    index.delete(shredded)
    _mark(meta, expired, shredded, now)
    ids = [e.message_id for e in expired]
    for i in range(0, len(ids), 1000):
        archive.append("retention_expired", messages=ids[i:i + 1000], at=now.isoformat())
    report.blobs_shredded = len(shredded)
    record(meta, archive, who, "expire", result_count=len(expired),
           detail={"now": now.isoformat(), "kept": len(kept), "blobs_shredded": len(shredded)},
           clock=lambda: now)
    return report


def _blob_ids(meta: Metadata, shas: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in range(0, len(shas), _CHUNK):
        with meta.session() as s:
            out.update({sha: bid for sha, bid in s.execute(
                select(Blob.sha256, Blob.id).where(Blob.sha256.in_(shas[i:i + _CHUNK])))})
    return out


def _recheck(meta: Metadata, blob_id: int, expiring: set[int], now: datetime) -> str | None:
    """The last guard before content is destroyed: every row of the blob is due and
    unheld right now (a copy may have arrived, or a hold been placed, since the
    plan).  Returns why the blob must be kept, or None."""
    with meta.session() as s:
        rows = list(s.execute(select(Message.id, Message.retention_until, Message.expired_at)
                              .where(Message.blob_id == blob_id)))
    for pk, until, expired_at in rows:
        if expired_at is not None:
            continue
        if pk not in expiring or until is None or until.replace(tzinfo=UTC) > now:
            return f"another copy (message {pk}) must be kept"
    held = _held(meta, None, _due(meta, now, blob_id))
    if held:
        return next(iter(held.values()))
    return None


def refuse_unless_expirable(meta: Metadata, message_id: int, now: datetime) -> None:
    """Raise RetentionError unless ``message_id`` is due and unheld at ``now`` (the
    check behind every shred; exposed so that callers can ask before acting)."""
    msg = meta.get(message_id)
    if msg is None:
        raise RetentionError(f"no archived message with id {message_id}")
    if msg.retention_until is None:
        raise RetentionError(f"message {message_id} is kept forever (no retention end)")
    if msg.retention_until > now:
        raise RetentionError(f"message {message_id} is within retention until "
                             f"{msg.retention_until.isoformat()}")
    held = _held(meta, None, _due(meta, now, msg.blob_id))
    if message_id in held:
        raise RetentionError(f"message {message_id} is held ({held[message_id]})")


def _mark(meta: Metadata, expired: list[Expired], shredded: list[int], now: datetime) -> None:
    info = {e.message_id: e for e in expired}
    ids = sorted(info)
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i:i + _CHUNK]
        with meta.session() as s:
            for msg in s.scalars(select(Message).where(meta.ids_condition(Message.id, chunk))):
                e = info[msg.id]
                note = (f"expired {now.isoformat()}: retention ended "
                        f"{e.retention_until.isoformat()}"
                        + (f" (rule {e.rule})" if e.rule else "")
                        + ("" if e.blob_shredded else "; content kept for another live copy"))
                msg.flags = [*msg.flags, note]
                msg.state = "expired"
                msg.expired_at = now
    for i in range(0, len(shredded), _CHUNK):
        with meta.session() as s:
            s.execute(update(Blob).where(meta.ids_condition(Blob.id, shredded[i:i + _CHUNK]))
                      .values(shredded_at=now))
