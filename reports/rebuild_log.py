"""Legal holds and the audit log, back from the ledger and its documents (a rebuild step).

``hold_placed`` / ``hold_released`` and ``audit`` ledger entries name encrypted
ledger documents (archive.documents) holding what the database held in clear:
a hold's case, query, reason, creator, time and frozen message ids, its release;
an audit event's officer, query, target and detail.  Holds and events come back
with their original ids (PostgreSQL's sequences are moved past them), so a
``hold:CASE`` search, ``coffer hold list`` and ``coffer audit log`` answer as
before the loss.

A catch-up (``coffer archive rebuild --missing``) keeps the database, so what it
restores must fit beside what is there: :func:`restore_lost_holds` brings back the
holds (and releases) whose case the database lacks, under their recorded id unless
another hold has it since, and finds each held message by the blob SHA-256 its
document records: the message's row may be back under a new id, and its old id may
now be another message's.

Entries written before documents existed are counted, never fatal: their audit
events come back as the ledger knows them (ids, time, action, counts; officer,
query, target and detail as SHA-256 only), and their holds are listed so each
case can be re-created with ``coffer hold create``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from archive.audit import AUDIT_DOCUMENT
from archive.documents import DOCUMENT, DocumentError, read_document
from archive.facade import Archive
from archive.holds import HOLD_DOCUMENT, RELEASE_DOCUMENT
from archive.ledger import LedgerEntry
from archive.metadata import AuditEvent, Hold, HoldItem, Message, Metadata
from reports.common import parse_utc

__all__ = ["LogRestore", "event_id", "restore_audit", "restore_holds", "restore_lost_holds"]


@dataclass
class LogRestore:
    """What one restore step brought back, and what it could only report."""

    restored: int = 0
    released: int = 0  # releases restored for holds that stayed (restore_lost_holds)
    without_document: int = 0  # entries older than ledger documents
    warnings: list[str] = field(default_factory=list)


def _document(archive: Archive, entry: LedgerEntry, kind: str, out: LogRestore
              ) -> dict[str, Any] | None:
    """The entry's document, or None (counted as old, or warned about as unreadable)."""
    if DOCUMENT not in entry.fields:
        out.without_document += 1
        return None
    try:
        return read_document(archive, entry, kind)
    except DocumentError as exc:
        out.warnings.append(str(exc))
        return None


def _advance_sequence(meta: Metadata, table: str) -> None:
    """PostgreSQL: explicit ids do not advance the sequence; move it past them."""
    if meta.dialect != "postgresql":
        return
    with meta.session() as s:
        s.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                       f"(SELECT max(id) FROM {table}))"))


def event_id(entry: LedgerEntry) -> int | None:
    """The audit event an ``audit`` entry records: ``event``, or ``audit_id`` in the
    entries the IMAP server wrote before ledger documents (with the officer in clear)."""
    for key in ("event", "audit_id"):
        value = entry.fields.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _hashed_event(entry: LedgerEntry) -> AuditEvent:
    """An event as the ledger alone knows it: names and queries as SHA-256 only."""
    f = entry.fields
    target = f.get("target")
    who = str(f["who"]) if isinstance(f.get("who"), str) else f"sha256:{f.get('who_sha256', '')}"
    return AuditEvent(
        id=event_id(entry), at=parse_utc(str(f.get("at", entry.time))),
        who=who[:255], action=str(f.get("action", ""))[:32],
        query=None, result_count=f.get("result_count"),
        target=str(target) if target is not None else None,
        detail={"restored_from_ledger_seq": entry.seq,
                **{k: f[k] for k in ("query_sha256", "target_sha256", "detail_sha256")
                   if k in f}})


def _documented_event(doc: dict[str, Any]) -> AuditEvent:
    count = doc.get("result_count")
    target = doc.get("target")
    query = doc.get("query")
    return AuditEvent(
        id=int(doc["event"]), at=parse_utc(str(doc["at"])), who=str(doc.get("who", ""))[:255],
        action=str(doc.get("action", ""))[:32], query=str(query) if query is not None else None,
        result_count=int(count) if count is not None else None,
        target=str(target) if target is not None else None, detail=doc.get("detail") or {})


def _event(doc: dict[str, Any], e: LedgerEntry, out: LogRestore) -> AuditEvent:
    """The event in clear from its document; hashed (with a warning) if it does not fit."""
    try:
        if doc.get("event") != event_id(e):
            raise ValueError(f"the document is for event {doc.get('event')!r}")
        return _documented_event(doc)
    except (KeyError, TypeError, ValueError) as exc:
        out.warnings.append(f"ledger seq {e.seq}: audit event {event_id(e)}: {exc}; "
                            "restored with hashed names only")
        return _hashed_event(e)


def restore_audit(meta: Metadata, archive: Archive, entries: list[LedgerEntry]) -> LogRestore:
    """One row per ``audit`` entry: in clear from its document, else hashed."""
    out = LogRestore()
    if not entries:
        return out
    seen: set[int] = set()
    reused: list[AuditEvent] = []
    with meta.session() as s:
        for e in entries:
            doc = _document(archive, e, AUDIT_DOCUMENT, out)
            event = _event(doc, e, out) if doc is not None else _hashed_event(e)
            out.restored += 1
            if event.id in seen:
                reused.append(event)
                continue
            seen.add(event.id)
            s.add(event)
    _advance_sequence(meta, "audit_events")
    if reused:
        _add_with_new_ids(meta, reused, out)
    return out


def _add_with_new_ids(meta: Metadata, events: list[AuditEvent], out: LogRestore) -> None:
    """Events whose id an earlier entry already has: a database restored from a backup
    hands out again the ids of events that reached the ledger after its snapshot.  Both
    are real events; the later ones get new ids rather than failing the rebuild."""
    out.warnings.append(f"{len(events)} audit event id(s) appear twice in the ledger "
                        f"({', '.join(str(e.id) for e in events)}); the later event(s) got "
                        "new ids")
    with meta.session() as s:
        for event in events:
            event.detail = {**(event.detail or {}), "ledger_event_id": event.id}
            event.id = None  # type: ignore[assignment]
            s.add(event)


def restore_holds(meta: Metadata, archive: Archive, entries: list[LedgerEntry]) -> LogRestore:
    """Holds (with their frozen messages) and their releases, in ledger order."""
    out = LogRestore()
    docs = _hold_documents(archive, entries, out)
    ids = _HoldIds(max((int(d["hold"]) for e, d in docs
                        if e.kind == "hold_placed" and isinstance(d.get("hold"), int)),
                       default=0))
    _apply(meta, docs, out,
           lambda s, e, doc: _place(meta, s, ids, doc, e, out),
           lambda s, e, doc: _release(s, ids, doc, e, out))
    return out


_Step = Callable[[Session, LedgerEntry, dict[str, Any]], None]


def _apply(meta: Metadata, docs: list[tuple[LedgerEntry, dict[str, Any]]], out: LogRestore,
           place: _Step, release: _Step) -> None:
    """Each hold document in ledger order, in one transaction; a malformed one is warned
    about and skipped.  PostgreSQL's sequence is moved past the restored ids."""
    with meta.session() as s:
        for e, doc in docs:
            try:
                (place if e.kind == "hold_placed" else release)(s, e, doc)
            except (KeyError, TypeError, ValueError) as exc:
                out.warnings.append(f"ledger seq {e.seq}: malformed {e.kind} document "
                                    f"({exc!r})")
    if out.restored:
        _advance_sequence(meta, "holds")


def _hold_documents(archive: Archive, entries: list[LedgerEntry], out: LogRestore
                    ) -> list[tuple[LedgerEntry, dict[str, Any]]]:
    """(entry, document) in ledger order; entries older than documents are listed."""
    found: list[tuple[LedgerEntry, dict[str, Any]]] = []
    old: list[str] = []
    for e in entries:
        before = out.without_document
        doc = _document(archive, e, HOLD_DOCUMENT if e.kind == "hold_placed"
                        else RELEASE_DOCUMENT, out)
        if doc is not None:
            found.append((e, doc))
        elif out.without_document > before:
            old.append(f"{e.kind} {e.fields.get('case', '?')} (seq {e.seq})")
    if old:
        out.warnings.append(f"{len(old)} hold entries predate ledger documents and are NOT "
                            "restored (re-create them with `coffer hold create`): "
                            + "; ".join(old))
    return found


@dataclass
class _HoldIds:
    """Row ids of restored holds: the recorded id, or one past every recorded id when an
    earlier hold has it already (a database restored from a backup hands out again the
    ids of holds placed after its snapshot)."""

    top: int
    rows: dict[int, int] = field(default_factory=dict)  # recorded id -> row id (latest)
    cases: set[str] = field(default_factory=set)

    def assign(self, recorded: int) -> int:
        row = recorded
        if recorded in self.rows:  # reassigned ids are above every recorded one
            self.top += 1
            row = self.top
        self.rows[recorded] = row
        return row


def _hold_row(doc: dict[str, Any]) -> Hold:
    """The holds row a document describes (pure; KeyError/ValueError if malformed)."""
    return Hold(id=int(doc["hold"]), case=str(doc["case"]), query=str(doc["query"]),
                reason=str(doc.get("reason") or ""), created_at=parse_utc(str(doc["created_at"])),
                created_by=str(doc.get("created_by") or ""))


def _place(meta: Metadata, s: Session, ids: _HoldIds, doc: dict[str, Any], e: LedgerEntry,
           out: LogRestore) -> None:
    hold = _hold_row(doc)
    if hold.case in ids.cases:
        out.warnings.append(f"ledger seq {e.seq}: hold {hold.case} placed a second time; "
                            "this later one is NOT restored (a case name is used once)")
        return
    ids.cases.add(hold.case)
    recorded, hold.id = hold.id, ids.assign(hold.id)
    if hold.id != recorded:
        out.warnings.append(f"ledger seq {e.seq}: hold {hold.case}: id {recorded} was "
                            f"already taken; restored as {hold.id}")
    wanted = sorted({int(i) for i in doc.get("message_ids") or []})
    present = set(s.scalars(select(Message.id).where(meta.ids_condition(Message.id, wanted)))
                  ) if wanted else set()
    s.add(hold)
    s.flush()  # the hold row before its items (foreign key)
    s.add_all(HoldItem(hold_id=hold.id, message_pk=pk) for pk in wanted if pk in present)
    if len(present) < len(wanted):
        out.warnings.append(f"ledger seq {e.seq}: hold {hold.case}: "
                            f"{len(wanted) - len(present)} held message id(s) are not in the "
                            "rebuilt database")
    out.restored += 1


def _release(s: Session, ids: _HoldIds, doc: dict[str, Any], e: LedgerEntry,
             out: LogRestore) -> None:
    row = ids.rows.get(int(doc["hold"]))
    hold = s.get(Hold, row) if row is not None else None
    if hold is None or hold.case != doc.get("case"):
        out.warnings.append(f"ledger seq {e.seq}: release of hold {doc.get('case')!r}, "
                            "which was not restored")
        return
    hold.released_at = parse_utc(str(doc["released_at"]))
    hold.released_by = str(doc.get("released_by") or "")


# -- catching up: holds the database lost, beside the ones it kept ---------------------

BATCH = 500  # SHA-256 values per IN list


def restore_lost_holds(meta: Metadata, archive: Archive, entries: list[LedgerEntry]
                       ) -> LogRestore:
    """The holds whose case the database lacks and the releases it lacks, in ledger order.

    A hold's case is used once, so a case the database does not know is a hold it
    lost.  Its frozen messages are matched by blob (:func:`held_rows`); a release is
    restored for a hold restored here, or for a kept hold whose id the release names
    and which the database still shows active (the release was lost, the hold was not).
    """
    out = LogRestore()
    with meta.session() as s:
        kept = {h.case: (h.id, h.released_at) for h in s.scalars(select(Hold))}
    lost = {str(e.fields.get("case")) for e in entries
            if e.kind == "hold_placed" and str(e.fields.get("case")) not in kept}
    wanted = [e for e in entries if str(e.fields.get("case")) in lost
              or (e.kind == "hold_released" and _release_lost(e, kept))]
    if not wanted:
        return out
    docs = _hold_documents(archive, wanted, out)
    taken = {hid for hid, _ in kept.values()}
    rows: dict[str, int] = {case: hid for case, (hid, _) in kept.items()}
    _apply(meta, docs, out,
           lambda s, e, doc: _place_lost(meta, s, doc, e, taken, rows, out),
           lambda s, e, doc: _release_by_case(s, rows, doc, e, out))
    return out


def _release_lost(e: LedgerEntry, kept: dict[str, tuple[int, Any]]) -> bool:
    """A release entry for a hold the database kept and still shows active."""
    known = kept.get(str(e.fields.get("case")))
    return known is not None and known[1] is None and e.fields.get("hold") == known[0]


def _place_lost(meta: Metadata, s: Session, doc: dict[str, Any], e: LedgerEntry,
                taken: set[int], rows: dict[str, int], out: LogRestore) -> None:
    hold = _hold_row(doc)
    if hold.case in rows:
        out.warnings.append(f"ledger seq {e.seq}: hold {hold.case} placed a second time; "
                            "this later one is NOT restored (a case name is used once)")
        return
    if hold.id in taken:  # handed out again since the loss, to another case
        recorded, hold.id = hold.id, max(taken) + 1
        out.warnings.append(f"ledger seq {e.seq}: hold {hold.case}: id {recorded} is "
                            f"another hold's now; restored as {hold.id}")
    taken.add(hold.id)
    rows[hold.case] = hold.id
    held, unmatched = held_rows(meta, s, doc)
    s.add(hold)
    s.flush()  # the hold row before its items (foreign key)
    s.add_all(HoldItem(hold_id=hold.id, message_pk=pk) for pk in held)
    if unmatched:
        out.warnings.append(
            f"ledger seq {e.seq}: hold {hold.case}: {unmatched} of its "
            f"{len(doc.get('message_ids') or [])} held message(s) could not be found by "
            "their blob (a document from before blob hashes were recorded, or a message "
            "not restored); the hold's query still keeps every message it matches")
    out.restored += 1


def held_rows(meta: Metadata, s: Session, doc: dict[str, Any]) -> tuple[list[int], int]:
    """(the row ids a hold document's frozen messages have now, how many were not found).

    A recorded id is trusted only while its row still holds the recorded blob; else
    every row of that blob is held (the restored row, and any other copy of the same
    bytes: holding more than was frozen is safe, less is not).  Documents without the
    blob hashes (written before them) find nothing.
    """
    ids = sorted({int(i) for i in doc.get("message_ids") or []})
    shas = {int(k): str(v) for k, v in (doc.get("message_sha256") or {}).items()}
    wanted = sorted({shas[i] for i in ids if i in shas})
    now: dict[int, str] = {}
    by_sha: dict[str, list[int]] = {}
    if shas:
        now = {int(pk): str(sha) for pk, sha in s.execute(
            select(Message.id, Message.sha256).where(
                meta.ids_condition(Message.id, list(shas))))}
    for i in range(0, len(wanted), BATCH):
        for pk, blob in s.execute(select(Message.id, Message.sha256)
                                  .where(Message.sha256.in_(wanted[i:i + BATCH]))):
            by_sha.setdefault(str(blob), []).append(int(pk))
    held: set[int] = set()
    unmatched = 0
    for pk in ids:
        sha = shas.get(pk)
        if sha is not None and now.get(pk) == sha:
            held.add(pk)
        elif sha is not None and by_sha.get(sha):
            held.update(by_sha[sha])
        else:
            unmatched += 1
    return sorted(held), unmatched


def _release_by_case(s: Session, rows: dict[str, int], doc: dict[str, Any], e: LedgerEntry,
                     out: LogRestore) -> None:
    case = str(doc["case"])
    hold = s.get(Hold, rows[case]) if case in rows else None
    if hold is None or hold.case != case:
        out.warnings.append(f"ledger seq {e.seq}: release of hold {case!r}, "
                            "which was not restored")
        return
    if hold.released_at is None:
        hold.released_at = parse_utc(str(doc["released_at"]))
        hold.released_by = str(doc.get("released_by") or "")
        out.released += 1
