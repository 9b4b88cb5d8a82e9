"""Audit: every search, view, export, hold, release and expiry, in the database AND the ledger.

archive.search.audit writes the event to the metadata database, then calls each
registered hook.  :func:`connect_audit_to_ledger` registers the hook that
appends an ``audit`` entry to the archive's hash-chained ledger, so an event
deleted from the database is still provable from the ledger (and its absence
from the database is visible to :func:`check_database`).

Ledger entries hold ids and hashes, never personal data: the officer's name,
the query text (which may hold addresses) and the detail are committed to by
their SHA-256 only; the database row keeps them in clear for ``coffer audit log``,
and so does an encrypted ledger document (archive.documents, kind
``coffer-audit/1``) the entry names, from which ``coffer archive rebuild``
restores the event after the database is lost.

:func:`check_database` is the other direction of the proof: it cross-checks the
metadata database against the ledger (``coffer archive audit-db``), finding a
message row someone deleted to hide a message, a row the ledger never saw, or an
audit event missing from the database.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import func, select

from archive.documents import append_documented, is_message_entry
from archive.facade import Archive
from archive.ledger import Ledger
from archive.metadata import AuditEvent, Message, Metadata
from archive.receipts import receipt_key
from archive.search import AuditHook, audit, register_audit_hook, unregister_audit_hook

__all__ = [
    "AUDIT_DOCUMENT", "DbFinding", "append_audit", "audit_document", "audit_ledger_fields",
    "check_database", "connect_audit_to_ledger", "ledger_audit", "record", "sha256_text",
]

AUDIT_DOCUMENT = "coffer-audit/1"


def sha256_text(text: str | None) -> str | None:
    """The SHA-256 of a text (UTF-8), or None: how the ledger refers to personal data."""
    if text is None:
        return None
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def audit_ledger_fields(event: AuditEvent) -> dict[str, Any]:
    """The ledger fields of one audit event: ids, counts and hashes only."""
    fields: dict[str, Any] = {
        "event": event.id,
        "action": event.action,
        "at": event.at.isoformat(),
        "who_sha256": sha256_text(event.who),
    }
    if event.query is not None:
        fields["query_sha256"] = sha256_text(event.query)
    if event.result_count is not None:
        fields["result_count"] = event.result_count
    if event.target is not None:
        # An archive id (digits) is not personal data; anything else goes in hashed.
        if event.target.isdigit():
            fields["target"] = event.target
        else:
            fields["target_sha256"] = sha256_text(event.target)
    if event.detail:
        fields["detail_sha256"] = sha256_text(
            json.dumps(event.detail, sort_keys=True, ensure_ascii=False, default=str))
    return fields


def audit_document(event: AuditEvent) -> dict[str, Any]:
    """The event in clear, for its encrypted ledger document (pure)."""
    return {"kind": AUDIT_DOCUMENT, "event": event.id, "at": event.at.isoformat(),
            "who": event.who, "action": event.action, "query": event.query,
            "result_count": event.result_count, "target": event.target,
            "detail": event.detail or {}}


def append_audit(archive: Archive, event: AuditEvent) -> None:
    """The event's encrypted document, then its ``audit`` ledger entry naming it."""
    append_documented(archive, "audit", audit_document(event), **audit_ledger_fields(event))


# id(archive) -> its hook; one hook per archive however often it is connected.
_CONNECTED: dict[int, AuditHook] = {}


def connect_audit_to_ledger(archive: Archive) -> Callable[[], None]:
    """Append every audit event (after its database row) to ``archive``'s ledger.

    Returns the function that disconnects it.  Connecting the same archive twice
    registers one hook, so no event is written to the ledger twice.
    """
    key = id(archive)
    if key not in _CONNECTED:
        def hook(event: AuditEvent) -> None:
            append_audit(archive, event)

        _CONNECTED[key] = hook
        register_audit_hook(hook)

    def disconnect() -> None:
        hook = _CONNECTED.pop(key, None)
        if hook is not None:
            unregister_audit_hook(hook)

    return disconnect


@contextmanager
def ledger_audit(archive_or_dir: Archive | Path) -> Iterator[Archive]:
    """Audit events inside the block also go to the ledger of this archive.

    Given a data directory, the archive is opened (it must exist: an audit that
    cannot reach the ledger fails before anything is shown) and closed again.
    """
    if isinstance(archive_or_dir, Archive):
        archive, owned = archive_or_dir, False
    else:
        archive, owned = Archive.open(archive_or_dir, create=False), True
    already = id(archive) in _CONNECTED
    disconnect = connect_audit_to_ledger(archive)
    try:
        yield archive
    finally:
        if not already:
            disconnect()
        if owned:
            archive.close()


def record(meta: Metadata, archive: Archive, who: str, action: str, *,
           query: str | None = None, result_count: int | None = None,
           target: str | None = None, detail: dict[str, Any] | None = None,
           clock: Callable[[], datetime] | None = None) -> AuditEvent:
    """Record one audit event in the database and in ``archive``'s ledger."""
    with ledger_audit(archive):
        return audit(meta, who, action, query=query, result_count=result_count,
                     target=target, detail=detail, clock=clock)


# -- the database against the ledger ------------------------------------------------

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class DbFinding:
    """One disagreement between the metadata database and the ledger.

    Codes: ``db_message_missing`` (error: the ledger stored a message the database
    has fewer rows for: a deleted row), ``db_message_unlisted`` (error: a row for
    bytes the ledger never stored), ``db_expiry_unmarked`` (warning: the blob is
    tombstoned but a row is not marked expired: an interrupted expiry),
    ``db_audit_missing`` (error: an audit event in the ledger, not in the
    database), ``db_blob_recovered`` (info: a blob recovered after a crash, whose
    database row was never written).
    """

    severity: Severity
    code: str
    message: str
    sha256: str | None = None
    seq: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"type": "finding", **{k: v for k, v in asdict(self).items() if v is not None}}

    def __str__(self) -> str:
        return f"{self.severity.upper()} {self.code}: {self.message}"


def check_database(meta: Metadata, ledger_dir: Path) -> list[DbFinding]:
    """Cross-check the metadata database against the ledger (not the other way round:
    ``coffer archive verify`` proves the ledger itself)."""
    stored: Counter[str] = Counter()
    first_seq: dict[str, int] = {}
    receipts: set[str] = set()
    recovered: set[str] = set()
    tombstoned: set[str] = set()
    audit_events: dict[int, int] = {}
    for entry in Ledger(ledger_dir).entries():
        sha = entry.fields.get("sha256")
        if entry.kind == "message_stored" and not is_message_entry(entry):
            continue  # a receipt or ledger document has no row of its own
        if entry.kind == "message_stored" and isinstance(sha, str):
            # A re-run of one receipt (the archive stage retried after its metadata write
            # failed: the same bytes, the same receipt) is one row, as the database keeps
            # it (Metadata: once per receipt); an entry without a receipt counts alone.
            key = receipt_key(entry)
            if key in receipts:
                continue
            receipts.add(key)
            stored[sha] += 1
            first_seq.setdefault(sha, entry.seq)
        elif entry.kind == "blob_recovered" and isinstance(sha, str):
            recovered.add(sha)
        elif entry.kind == "tombstone" and isinstance(sha, str):
            tombstoned.add(sha)
        elif entry.kind == "audit" and isinstance(entry.fields.get("event"), int):
            audit_events[int(entry.fields["event"])] = entry.seq
    with meta.session() as s:
        rows: Counter[str] = Counter({sha: int(n) for sha, n in s.execute(
            select(Message.sha256, func.count()).group_by(Message.sha256))})
        unmarked = set(s.scalars(select(Message.sha256).where(Message.expired_at.is_(None))))
        events = set(s.scalars(select(AuditEvent.id)))
    out: list[DbFinding] = []
    for sha in sorted(stored, key=lambda k: first_seq[k]):
        if rows[sha] < stored[sha]:
            out.append(DbFinding(
                "error", "db_message_missing",
                f"blob {sha}: the ledger stored it {stored[sha]} time(s) (first at entry "
                f"{first_seq[sha]}) but the database has {rows[sha]} message row(s) "
                "(a row was deleted)", sha256=sha, seq=first_seq[sha]))
    for sha in sorted(rows):
        if sha not in stored and sha not in recovered:
            out.append(DbFinding("error", "db_message_unlisted",
                                 f"blob {sha}: {rows[sha]} database row(s) but no ledger entry "
                                 "stored it (a row added outside the archive)", sha256=sha))
    for sha in sorted(recovered - set(rows)):
        out.append(DbFinding("info", "db_blob_recovered",
                             f"blob {sha}: recovered after a crash, never recorded in the "
                             "database", sha256=sha))
    for sha in sorted(tombstoned & unmarked):
        out.append(DbFinding("warning", "db_expiry_unmarked",
                             f"blob {sha}: tombstoned in the ledger but a database row is not "
                             "marked expired (run `coffer archive expire` again)", sha256=sha))
    for ev, seq in sorted(audit_events.items(), key=lambda kv: kv[1]):
        if ev not in events:
            out.append(DbFinding("error", "db_audit_missing",
                                 f"audit event {ev} (ledger entry {seq}) is not in the database "
                                 "(deleted)", seq=seq))
    return out


def now_utc() -> datetime:
    return datetime.now(UTC)
