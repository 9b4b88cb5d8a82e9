"""Legal holds by case: ``coffer hold create|list|show|release``.

A hold is created from a query in the archive query language.  The query text
is kept with the hold as evidence of what was meant to be preserved, and the
messages it matched at creation are recorded as hold items.

Holds are DYNAMIC, as Exchange's query-based in-place holds are: a message
that arrives later and matches an active hold's query is held too.  Retention
(archive.retention) therefore re-evaluates every active hold's query at expiry
time, in addition to the recorded items, and a message matching any of them is
never expired.  The recorded items stay the proof of what the query matched on
the day the hold was placed (and keep holding those messages even if the
index changes).  A policy decision can also name holds (``holds: [CASE]``); such
a message is held until a hold of that case exists and is released.

Releasing a hold ends it but keeps it (released_at, released_by) as history, and
the case name stays taken.  Every create and release is audited (database and
ledger) and leaves its own ledger entry (``hold_placed`` / ``hold_released``)
holding the hold id, the case, the SHA-256 of the query and of the sorted item
ids: ids and hashes, never addresses.  Each of those entries names an encrypted
ledger document (archive.documents) with the hold in clear: case, query, reason,
who and when, and the archive ids it froze with each one's blob SHA-256
(``coffer-hold/1``), or who released it and when (``coffer-hold-release/1``):
``coffer archive rebuild`` restores the hold, its items and its release from them,
and ``coffer archive rebuild --missing`` (and ``coffer serve`` at start) the holds
and releases a database lost, finding the held messages by their blobs
(reports.rebuild_log).

On the S3 store (issue 10) the storage enforces a hold too: every blob a hold
records gets an S3 legal hold (Object Lock), so not even a direct DeleteObject
succeeds; a release lifts it from the blobs no other active hold still records.
Messages a dynamic hold catches later are protected by retention's re-check (and
their COMPLIANCE retention), not by an object hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update

from archive.audit import record, sha256_text
from archive.documents import append_documented
from archive.errors import ArchiveError
from archive.facade import Archive
from archive.metadata import Hold, HoldItem, Message, Metadata
from archive.query import parse, to_string
from archive.search import Searcher

__all__ = [
    "HOLD_DOCUMENT", "RELEASE_DOCUMENT", "HoldError", "HoldInfo", "create_hold", "get_hold",
    "list_holds", "release_hold",
]

HOLD_DOCUMENT = "coffer-hold/1"
RELEASE_DOCUMENT = "coffer-hold-release/1"


class HoldError(ArchiveError):
    """A hold cannot be created, found or released (unknown case, already released ...)."""


@dataclass(frozen=True, slots=True)
class HoldInfo:
    id: int
    case: str
    query: str
    reason: str
    created_at: datetime
    created_by: str
    released_at: datetime | None
    released_by: str | None
    items: int
    message_ids: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        return self.released_at is None

    def to_json(self, *, with_ids: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "case": self.case, "id": self.id, "query": self.query, "reason": self.reason,
            "created_at": self.created_at.isoformat(), "created_by": self.created_by,
            "released_at": self.released_at.isoformat() if self.released_at else None,
            "released_by": self.released_by, "active": self.active, "items": self.items,
        }
        if with_ids:
            out["message_ids"] = list(self.message_ids)
        return out


def _ids_sha256(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, sorted(ids))).encode()).hexdigest()


def _clock(clock: Callable[[], datetime] | None) -> datetime:
    return (clock or (lambda: datetime.now(UTC)))()


def create_hold(meta: Metadata, archive: Archive, searcher: Searcher, case: str, query: str,
                who: str, *, reason: str = "", clock: Callable[[], datetime] | None = None
                ) -> HoldInfo:
    """Place a hold: run the query, record the matches and the query as evidence."""
    case = case.strip()
    if not case:
        raise HoldError("a hold needs a case name")
    if len(case) > 255:
        raise HoldError("a case name has at most 255 characters")
    node = parse(query)  # QueryError (with its column) before anything is written
    canonical = to_string(node)
    existing = get_hold(meta, case, missing_ok=True)
    if existing is not None:
        state = ("active" if existing.released_at is None
                 else f"released {existing.released_at.isoformat()}")
        raise HoldError(f"hold {case!r} already exists ({state}); a case name is used once")
    ids = searcher.message_ids(node)
    now = _clock(clock)
    hold_id = meta.place_hold(case, query, who, ids, now, reason)
    doc = {"kind": HOLD_DOCUMENT, "hold": hold_id, "case": case, "query": query,
           "reason": reason, "created_at": now.isoformat(), "created_by": who,
           "message_ids": sorted(set(ids)),
           # Ids are not forever: a database that lost its newest rows gets them back
           # under new ids (coffer archive rebuild --missing), and hands the lost ids
           # out again.  Each id's blob lets a catch-up find the held messages anyway.
           "message_sha256": {str(pk): sha for pk, sha in sorted(_shas_of(meta, ids).items())}}
    _object_holds(meta, archive, ids, on=True)
    append_documented(archive, "hold_placed", doc, hold=hold_id, case=case,
                      query_sha256=sha256_text(query), items=len(ids),
                      items_sha256=_ids_sha256(ids))
    record(meta, archive, who, "hold", query=canonical, result_count=len(ids), target=case,
           detail={"hold": hold_id, "reason": reason}, clock=lambda: now)
    info = get_hold(meta, case)
    assert info is not None
    return info


def release_hold(meta: Metadata, archive: Archive, case: str, who: str, *,
                 clock: Callable[[], datetime] | None = None) -> HoldInfo:
    """End a hold; it is kept, with who released it and when."""
    info = get_hold(meta, case)
    if info is None:
        raise HoldError(f"no hold for case {case!r}")
    if not info.active:
        assert info.released_at is not None
        raise HoldError(f"hold {case!r} was already released on "
                        f"{info.released_at.isoformat()} by {info.released_by}")
    now = _clock(clock)
    with meta.session() as s:
        s.execute(update(Hold).where(Hold.id == info.id, Hold.released_at.is_(None))
                  .values(released_at=now, released_by=who[:255]))
    _object_holds(meta, archive, _item_ids(meta, info.id), on=False, keep_hold=info.id)
    doc = {"kind": RELEASE_DOCUMENT, "hold": info.id, "case": info.case,
           "released_at": now.isoformat(), "released_by": who[:255]}
    append_documented(archive, "hold_released", doc, hold=info.id, case=info.case,
                      items=info.items)
    record(meta, archive, who, "release", query=info.query, result_count=info.items,
           target=info.case, detail={"hold": info.id}, clock=lambda: now)
    released = get_hold(meta, case)
    assert released is not None
    return released


def _object_holds(meta: Metadata, archive: Archive, ids: Iterable[int], *, on: bool,
                  keep_hold: int | None = None) -> None:
    """Set (on) or lift the S3 legal hold of the blobs of these messages; S3 store only.
    Lifting skips blobs that a message of another active hold (not ``keep_hold``'s own
    id, the one being released) shares."""
    from archive.s3store import S3BlobStore

    store = archive.store
    if not isinstance(store, S3BlobStore):
        return  # local files: the hold is enforced by retention (no command deletes early)
    ids = list(ids)
    if not ids:
        return
    with meta.session() as s:
        shas = set(s.scalars(select(Message.sha256).where(
            meta.ids_condition(Message.id, ids), Message.expired_at.is_(None))))
        if not on:
            shas -= set(s.scalars(
                select(Message.sha256).join(HoldItem, HoldItem.message_pk == Message.id)
                .join(Hold, Hold.id == HoldItem.hold_id)
                .where(Hold.id != keep_hold, Hold.released_at.is_(None))))
    for sha in sorted(shas):
        if on:
            store.place_hold(sha)
        else:
            store.release_hold(sha)


def _shas_of(meta: Metadata, ids: Iterable[int]) -> dict[int, str]:
    ids = list(ids)
    if not ids:
        return {}
    with meta.session() as s:
        return {int(pk): str(sha) for pk, sha in s.execute(
            select(Message.id, Message.sha256).where(meta.ids_condition(Message.id, ids)))}


def _item_ids(meta: Metadata, hold_id: int) -> list[int]:
    with meta.session() as s:
        return list(s.scalars(select(HoldItem.message_pk).where(HoldItem.hold_id == hold_id)))


def get_hold(meta: Metadata, case: str, *, missing_ok: bool = True, with_ids: bool = False
             ) -> HoldInfo | None:
    with meta.session() as s:
        hold = s.scalar(select(Hold).where(Hold.case == case))
        if hold is None:
            if missing_ok:
                return None
            raise HoldError(f"no hold for case {case!r}")
        if with_ids:
            ids = tuple(s.scalars(select(HoldItem.message_pk).where(HoldItem.hold_id == hold.id)
                                  .order_by(HoldItem.message_pk)))
            n = len(ids)
        else:
            ids = ()
            n = int(s.scalar(select(func.count()).select_from(HoldItem)
                             .where(HoldItem.hold_id == hold.id)) or 0)
        return _info(hold, n, ids)


def list_holds(meta: Metadata, *, include_released: bool = True) -> list[HoldInfo]:
    with meta.session() as s:
        counts = {int(hid): int(n) for hid, n in s.execute(
            select(HoldItem.hold_id, func.count()).group_by(HoldItem.hold_id))}
        q = select(Hold).order_by(Hold.id)
        if not include_released:
            q = q.where(Hold.released_at.is_(None))
        return [_info(h, int(counts.get(h.id, 0))) for h in s.scalars(q)]


def active_holds(meta: Metadata) -> list[HoldInfo]:
    return list_holds(meta, include_released=False)


def _info(h: Hold, n: int, ids: tuple[int, ...] = ()) -> HoldInfo:
    return HoldInfo(h.id, h.case, h.query, h.reason, h.created_at, h.created_by,
                    h.released_at, h.released_by, n, ids)
