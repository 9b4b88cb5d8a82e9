"""``coffer archive rebuild``: the metadata database and full-text index from store + ledger.

Disaster recovery after losing the database.  The ledger lists every receipt in
order (one ``message_stored`` entry per archived message: the blob's SHA-256,
size, and the caller's ids such as the queue id), the store holds the bytes, and
the bytes carry most of the rest in their own headers.

What a rebuild restores (for every message whose content still exists):

* archive ids, in ledger order (the archive stage appends the ledger entry just
  before it records the row, so this is the original order; an ``archive_id``
  field in the entry, when a writer records one, is checked against it);
* everything from the message itself: Message-ID, Date, Subject, From/To/Cc/
  Reply-To/Sender, attachments (names, types, sizes, hashes), size, body text,
  hence every full-text, header-address, date, size and ``has:`` search;
* from Coffer's own top ``Received:`` field (gateway/receive/received.py): the
  client IP, HELO, TLS version and cipher, the receive time, authentication
  (ESMTPA: direction "outbound"), and the envelope recipient when there was
  exactly one (``for <...>``);
* from Coffer's own ``Authentication-Results:`` (same authserv-id as the Received
  ``by`` host): SPF, DKIM and DMARC results and the MAIL FROM (``smtp.mailfrom``);
* the receive time of messages without a Received field: the ledger entry's time.

From the receipt blob (archive.receipts), for every message the archive stage
wrote since receipts exist (its ``message_stored`` entry names it as
``receipt``): the whole SMTP envelope, hence **Bcc recipients** and ``bcc:``
searches, client IP, HELO, TLS, authenticated user, receive time and direction;
the SPF/DKIM/DMARC and spam verdicts; the policy decision with its rule trace
and rule hits (``rule:`` searches); the retention end.  The receipt's own ledger
entry (``receipt_of``) gets no row, so archive ids are unchanged.  A message
whose receipt is missing or unreadable falls back to the headers, with a
warning.

What it cannot restore (not in the store or the ledger):

* for messages archived before receipt blobs existed (and for imports, which
  write none): envelope recipients of multi-recipient messages, hence Bcc
  (RFC 5321 §7.2: they are deliberately in no header), the policy decision, its
  rule hits, the spam verdict and the retention end (restored as "none":
  nothing expires until retention is applied again, the safe direction);
* links between sent and received copies archived before receipts named them;
* legal holds written before ledger documents existed (their entries are counted
  and listed in the warnings so each case can be re-created), and the text of
  audit events written before then: they come back from the ledger with their
  ids, times, actions and counts, but officer, query, target and detail only as
  SHA-256 (that is all the ledger held);
* the content facts of shredded messages: they come back as expired rows with
  only their hash, size and ledger time, so later archive ids stay the same
  (their receipts were shredded with them);
* the expiry of a row whose blob was kept for another live copy (no tombstone
  names it): it comes back live with its receipt's retention end, so the next
  ``coffer archive expire`` expires it again.

From the ledger documents (archive.documents; reports.rebuild_log): every legal
hold with its id, case, query, reason, creator, time, frozen message set and
release, hence ``hold:CASE`` searches, ``coffer hold list/show`` and the holds
report; every audit event with its id and, in clear, officer, query, target and
detail, hence ``coffer audit log`` and the audit report.

After a rebuild, archive.audit.check_database (``coffer archive audit-db``)
finds the database consistent with the ledger.

:func:`catch_up` (``coffer archive rebuild --missing``; ``coffer serve`` at start,
over the ledger tail) keeps the database and adds only the rows of ledger messages
it lacks, each restored as above (:func:`restored_record`) but with a new archive id.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from archive.documents import is_message_entry
from archive.errors import ArchiveError
from archive.extract import Extracted, extract
from archive.facade import Archive
from archive.index import Indexer, open_index
from archive.ledger import LedgerEntry
from archive.metadata import (
    AuditEvent,
    Blob,
    Message,
    MessageRecord,
    Metadata,
    resolve_links,
    safe_url,
)
from archive.receipts import RECEIPT, apply_receipt, parse_receipt, receipt_key
from gateway import mailparse
from reports.common import Progress, metadata_url, parse_utc, record_audit
from reports.errors import RebuildError
from reports.rebuild_log import (
    LogRestore,
    event_id,
    restore_audit,
    restore_holds,
    restore_lost_holds,
)

BATCH = 500
_RECEIVED = re.compile(
    r"from\s+(?P<helo>\S+)\s+\((?:\[(?:IPv6:)?(?P<ip>[0-9A-Fa-f:.]+)\]|[^)]*)\)\s+"
    r"by\s+(?P<host>\S+)\s+\(Coffer\)\s+with\s+(?P<proto>\S+)"
    r"(?:\s+\((?P<tls>[^)]*)\))?\s+id\s+[^\s;]+;?"
    r"(?:\s+for\s+<(?P<rcpt>[^>]*)>)?;?\s*(?P<date>.*)$", re.S)
_AR_METHOD = re.compile(r"(?:^|;)\s*(spf|dkim|dmarc|arc)\s*=\s*([A-Za-z]+)")
_AR_MAILFROM = re.compile(r"smtp\.mailfrom=\"?([^\s;\"]+)")


@dataclass
class Envelope:
    """What the headers say about the SMTP transaction (pure; see module docstring)."""

    client_ip: str = ""
    helo: str = ""
    tls: str = ""
    received_at: datetime | None = None
    rcpt_to: list[str] = field(default_factory=list)
    authenticated: bool = False
    host: str = ""
    mail_from: str = ""
    verdicts: dict[str, Any] = field(default_factory=dict)


def envelope_from_headers(raw: bytes) -> Envelope:
    """Parse Coffer's own Received and Authentication-Results fields (the top ones)."""
    # The header block only: the parser would otherwise read the whole body line by line.
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        mailparse.header_block(raw))
    env = Envelope()
    for value in msg.get_all("Received") or []:
        m = _RECEIVED.search(" ".join(str(value).split()))
        if m is None:
            continue  # another hop's field: Coffer's is the one naming "(Coffer)"
        env.helo = "" if m["helo"] == "unknown" else m["helo"]
        env.client_ip = m["ip"] or ""
        env.host = m["host"]
        env.tls = m["tls"] or ""
        env.authenticated = m["proto"].upper().endswith("A")
        if m["rcpt"]:
            env.rcpt_to = [m["rcpt"]]
        try:
            env.received_at = email.utils.parsedate_to_datetime(m["date"].strip())
        except (TypeError, ValueError):
            env.received_at = None
        break
    for value in msg.get_all("Authentication-Results") or []:
        text = " ".join(str(value).split())
        authserv = text.split(";", 1)[0].strip()
        if env.host and authserv.lower() != env.host.lower():
            continue  # RFC 8601 §5: only our own authserv-id is trustworthy
        dkim: list[dict[str, str]] = []
        for method, result in _AR_METHOD.findall(text):
            if method == "dkim":
                dkim.append({"result": result.lower()})
            else:
                env.verdicts[method] = {"result": result.lower()}
        if dkim:
            env.verdicts["dkim"] = dkim
        if (mf := _AR_MAILFROM.search(text)) and "@" in mf.group(1):
            env.mail_from = mf.group(1)
        env.verdicts["recovered_from"] = "Authentication-Results"
        break
    return env


@dataclass
class RebuildResult:
    messages: int = 0
    blobs: int = 0
    shredded: int = 0
    indexed: int = 0
    audit_events: int = 0
    audit_without_document: int = 0  # restored with hashed names only (older entries)
    holds: int = 0
    holds_without_document: int = 0  # hold entries older than ledger documents
    receipts: int = 0  # messages whose receipt blob restored envelope and decision
    links: int = 0  # rows linked again to another copy of their message
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Ledger:
    """What a rebuild takes from one pass over the ledger."""

    stored: list[LedgerEntry] = field(default_factory=list)
    tombstones: dict[str, datetime] = field(default_factory=dict)  # sha256 -> when
    audits: list[LedgerEntry] = field(default_factory=list)
    holds: list[LedgerEntry] = field(default_factory=list)


def _read_ledger(archive: Archive, entries: Iterable[LedgerEntry] | None = None) -> _Ledger:
    out = _Ledger()
    receipts: set[str] = set()
    for e in archive.ledger.entries() if entries is None else entries:
        if e.kind == "message_stored" and not is_message_entry(e):
            continue  # a receipt or ledger document: read through the entry naming it
        if e.kind == "message_stored":
            key = receipt_key(e)
            if key not in receipts:  # else the same receipt again: one row (receipt_key)
                receipts.add(key)
                out.stored.append(e)
        elif e.kind == "tombstone":
            out.tombstones.setdefault(str(e.fields.get("sha256")), parse_utc(e.time))
        elif e.kind in ("hold_placed", "hold_released"):
            out.holds.append(e)
        elif e.kind == "audit" and event_id(e) is not None:
            out.audits.append(e)
    return out


def shredded_record(entry: LedgerEntry) -> MessageRecord:
    """A receipt whose content is gone: only what the ledger says (hash, size, time)."""
    ex = Extracted(size=int(entry.fields.get("size", 0)),
                   flags=["content shredded; row rebuilt from the ledger"])
    return MessageRecord(sha256=str(entry.fields["sha256"]), extracted=ex,
                         received_at=parse_utc(entry.time), source="rebuild", state="expired",
                         ledger_ref=str(entry.seq))


def record_from(entry: LedgerEntry, raw: bytes) -> MessageRecord:
    env = envelope_from_headers(raw)
    received = env.received_at or datetime.fromisoformat(entry.time)
    if received.tzinfo is None:
        received = received.replace(tzinfo=UTC)
    return MessageRecord(
        sha256=str(entry.fields["sha256"]), extracted=extract(raw), received_at=received,
        direction="outbound" if env.authenticated else "inbound",
        # What the writers record: the archive stage a queue id, the importer a flag.
        source=("import" if entry.fields.get("import") else
                "smtp" if entry.fields.get("qid") else "rebuild"),
        state="accepted", mail_from=env.mail_from, rcpt_to=env.rcpt_to,
        client_ip=env.client_ip, helo=env.helo, tls=env.tls, verdicts=env.verdicts,
        ledger_ref=str(entry.seq),
    )


def _set_aside(url: str, force: bool) -> None:
    """An existing SQLite database is renamed (never deleted), with --force only."""
    if not url.startswith("sqlite:///"):
        return
    db = Path(url.removeprefix("sqlite:///"))
    if not db.exists():
        return
    if not force:
        raise RebuildError(f"{db}: a metadata database exists; rebuild replaces it only "
                           "with --force (it is kept as meta.db.before-rebuild-<time>)")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db) + suffix)
        if p.exists():
            os.replace(p, Path(f"{db}.before-rebuild-{stamp}{suffix}"))


def rebuild(data_dir: Path, *, database: str | None = None, index_engine: str | None = None,
            force: bool = False, officer: str = "unknown",
            progress: bool | None = None) -> RebuildResult:
    url = metadata_url(data_dir, database)
    _set_aside(url, force)
    archive = Archive.open(data_dir, create=False)
    result = RebuildResult()
    meta = Metadata(url)
    try:
        meta.migrate()
        if meta.count():
            # --force has already set a SQLite file aside; a server database is never
            # emptied here (restored ids would collide with the rows in it).
            raise RebuildError(f"{safe_url(url)}: the metadata database is not empty; rebuild "
                               "fills an empty one (--force sets a SQLite file aside; drop "
                               "and re-create a PostgreSQL database yourself)")
        bar = Progress("rebuild", enabled=progress)
        led = _read_ledger(archive)
        batch: list[MessageRecord] = []
        wanted: list[Any] = []  # the archive id a writer recorded in the entry, if any
        rows: list[tuple[int, str, str | None]] = []  # (id, sha256, linked sha256)
        for entry in led.stored:
            batch.append(restored_record(archive, entry, led.tombstones, result))
            wanted.append(entry.fields.get("archive_id"))
            if len(batch) >= BATCH:
                _flush(meta, batch, wanted, result, rows)
                bar.update(result.messages)
        _flush(meta, batch, wanted, result, rows)
        result.links = _relink(meta, rows)
        _mark_shredded(meta, led.tombstones)
        _restore_log(meta, archive, led, result)
        bar.done(result.messages)
        engine = index_engine or ("pg" if meta.dialect == "postgresql" else "fts5")
        index = open_index(engine, data_dir=data_dir, meta=meta)
        try:
            result.indexed = Indexer(meta, index, archive.get).rebuild()
        finally:
            index.close()
        record_audit(meta, archive, officer, "rebuild", result_count=result.messages,
                     detail={"blobs": result.blobs, "shredded": result.shredded,
                             "receipts": result.receipts, "links": result.links,
                             "holds": result.holds, "audit_events": result.audit_events,
                             "warnings": result.warnings})
    finally:
        meta.close()
        archive.close()
    return result


def restored_record(archive: Archive, entry: LedgerEntry, tombstones: dict[str, datetime],
                    result: RebuildResult | CatchUpResult) -> MessageRecord:
    """The row of one ``message_stored`` entry, from the store and its receipt."""
    sha = str(entry.fields["sha256"])
    if sha in tombstones:
        # Kept as an expired row, so later archive ids stay what they were.
        result.shredded += 1
        return shredded_record(entry)
    try:
        raw = archive.get(sha)
    except ArchiveError as exc:
        result.warnings.append(f"ledger seq {entry.seq}: {exc}")
        return shredded_record(entry)
    return _with_receipt(archive, entry, record_from(entry, raw), tombstones, result)


def _restore_log(meta: Metadata, archive: Archive, led: _Ledger,
                 result: RebuildResult) -> None:
    """Holds and audit events from their ledger documents (reports.rebuild_log)."""
    holds = restore_holds(meta, archive, led.holds)
    audit = restore_audit(meta, archive, led.audits)
    result.holds, result.holds_without_document = holds.restored, holds.without_document
    result.audit_events, result.audit_without_document = audit.restored, audit.without_document
    result.warnings += holds.warnings + audit.warnings
    if audit.without_document:
        result.warnings.append(f"{audit.without_document} audit events predate ledger "
                               "documents: restored with hashed officer names and no query "
                               "text")


def _with_receipt(archive: Archive, entry: LedgerEntry, rec: MessageRecord,
                  tombstones: dict[str, datetime],
                  result: RebuildResult | CatchUpResult) -> MessageRecord:
    """Overlay the receipt blob the entry names (archive.receipts), when there is one:
    the envelope (Bcc), verdicts, decision, rule hits and retention end."""
    sha = entry.fields.get(RECEIPT)
    if not isinstance(sha, str):
        return rec  # written before receipts existed: the headers are all there is
    if sha in tombstones:
        result.warnings.append(f"ledger seq {entry.seq}: receipt {sha[:16]} was shredded; "
                               "envelope restored from the headers only")
        return rec
    try:
        rec = apply_receipt(rec, parse_receipt(archive.get(sha), rec.sha256))
    except (ArchiveError, ValueError, TypeError) as exc:
        result.warnings.append(f"ledger seq {entry.seq}: receipt {sha[:16]}: {exc}; "
                               "envelope restored from the headers only")
    else:
        result.receipts += 1
    return rec


def _mark_shredded(meta: Metadata, tombstones: dict[str, datetime]) -> None:
    if not tombstones:
        return
    shas = list(tombstones)
    for i in range(0, len(shas), BATCH):  # bounded IN lists
        chunk = shas[i:i + BATCH]
        with meta.session() as s:
            for blob in s.scalars(select(Blob).where(Blob.sha256.in_(chunk))):
                blob.shredded_at = tombstones[blob.sha256]
            for msg in s.scalars(select(Message).where(Message.sha256.in_(chunk))):
                msg.expired_at = tombstones[msg.sha256]
                msg.state = "expired"


def _relink(meta: Metadata, rows: list[tuple[int, str, str | None]]) -> int:
    """Link the copies of each message again, across batch boundaries too."""
    links = resolve_links([(sha, link) for _, sha, link in rows])
    meta.link((rows[i][0], rows[j][0]) for i, j in links.items())
    return len(links)


def _flush(meta: Metadata, batch: list[MessageRecord], wanted: list[Any],
           result: RebuildResult, rows: list[tuple[int, str, str | None]]) -> None:
    if not batch:
        return
    stored = meta.add_messages(batch)
    rows.extend((row.id, rec.sha256, rec.link_sha256)
                for row, rec in zip(stored, batch, strict=True))
    for row, want in zip(stored, wanted, strict=True):
        if isinstance(want, int) and want != row.id:
            result.warnings.append(f"ledger seq {batch[0].ledger_ref}..: archive id {want} "
                                   f"was rebuilt as {row.id}")
    result.messages += len(stored)
    result.blobs += sum(1 for s in stored if s.new_blob)
    batch.clear()
    wanted.clear()


# -- catching up: the rows the database lost, the database kept ------------------------

# How far before the newest row's receive time start-up looks in the ledger: covers the
# time from a ledger append to its row's commit (one metadata batch), clocks a little
# apart in a cluster or stepped back.  Not more: a busy gateway appends ~300,000
# entries in ten minutes, about two seconds of parsing.
TAIL_MARGIN = timedelta(minutes=10)


@dataclass
class CatchUpResult:
    checked: int = 0  # message entries of the ledger looked at
    restored: int = 0  # rows added
    receipts: int = 0  # of them, restored with envelope and decision from a receipt
    shredded: int = 0  # of them, expired rows (content shredded)
    links: int = 0  # restored rows linked to another copy of their message
    audit_events: int = 0  # audit events the ledger holds and the database had lost
    holds: int = 0  # legal holds the database had lost
    hold_releases: int = 0  # releases it had lost, of holds restored or kept
    since: str | None = None  # the ledger time the check started from; None: all of it
    warnings: list[str] = field(default_factory=list)


# sha256 -> (id, receive time, source) of each row holding those bytes
_Rows = dict[str, list[tuple[int, datetime, str]]]


def tail_start(meta: Metadata) -> datetime | None:
    """Where the ledger may hold entries the database lost: the receive time of the
    newest row the gateway wrote (our clock, unlike an import's Date), less
    TAIL_MARGIN; None when there is no such row (look at the whole ledger).

    A database that lost rows lost its newest transactions (a power loss under
    SQLite's former ``synchronous=NORMAL``, a PostgreSQL without synchronous commit, a
    restored older backup); each lost row's ledger entry was appended just before its
    commit, after the newest row that survived was received.  Rows carry no ledger seq (the archive
    stage writes none), so time is the cheap bound.
    """
    with meta.session() as s:
        newest = s.scalar(select(Message.received_at).where(Message.source == "smtp")
                          .order_by(Message.id.desc()).limit(1))
    return None if newest is None else newest - TAIL_MARGIN


def catch_up(archive: Archive, meta: Metadata, *, since: datetime | None = None,
             progress: bool | None = None) -> CatchUpResult:
    """Add the rows of ledger messages the database lacks, as a rebuild restores them.

    Looks at the message entries appended since ``since`` (all: None).  A blob whose
    entries outnumber its rows lacks rows; its entries' records (restored_record)
    are matched to its rows by receipt key (blob, receive time, source), and the
    newest unmatched ones are restored, never more than the shortfall.  They are
    ``once`` records written under the exclusive receipts lock (Metadata.add_messages),
    so an archive writer recording the same receipt meanwhile gets the same row, and
    a second run restores nothing.  New ids (the database is kept); new blobs wait
    unindexed for the indexer.  Imports write no receipt and no ``once`` row: do not
    run this while ``coffer archive import`` writes.
    """
    result = CatchUpResult(since=since.isoformat() if since else None)
    led = _read_ledger(archive, None if since is None else archive.ledger.entries_since(since))
    result.checked = len(led.stored)
    by_sha: dict[str, list[LedgerEntry]] = {}
    for entry in led.stored:
        by_sha.setdefault(str(entry.fields["sha256"]), []).append(entry)
    bar = Progress("catch-up (blobs checked)", len(by_sha), enabled=progress)
    missing: list[MessageRecord] = []
    known: set[int] = set()  # the ids of rows holding the bytes of a missing one
    shas = list(by_sha)
    for i in range(0, len(shas), BATCH):  # bounded IN lists, and only these rows kept
        rows = _rows_of(meta, shas[i:i + BATCH])
        for sha in shas[i:i + BATCH]:
            entries, held = by_sha[sha], rows.get(sha, [])
            short = len(entries) - len(held)
            if short > 0:
                known.update(pk for pk, _, _ in held)
                kept = Counter((when, source) for _, when, source in held)
                for rec, one in _unmatched(archive, entries, kept, led.tombstones)[-short:]:
                    missing.append(rec)
                    result.receipts += one.receipts
                    result.shredded += one.shredded
                    result.warnings += one.warnings
        bar.update(min(i + BATCH, len(shas)))
    added: list[tuple[int, MessageRecord]] = []
    for i in range(0, len(missing), BATCH):
        batch = missing[i:i + BATCH]
        for rec in batch:
            rec.once = True
        stored = meta.add_messages(batch, exclusive=True)
        # A known id back: that receipt's row was there (in a race with a writer, the
        # writer's new row is counted as restored here: it is not duplicated either way).
        added += [(row.id, rec) for row, rec in zip(stored, batch, strict=True)
                  if row.id not in known]
    result.restored = len(added)
    result.links = (_relink(meta, [(pk, rec.sha256, rec.link_sha256) for pk, rec in added])
                    + _link_to_kept(meta, added))
    restored_shas = {rec.sha256 for _, rec in added}
    _mark_shredded(meta, {sha: t for sha, t in led.tombstones.items() if sha in restored_shas})
    audit = _lost_audit(meta, archive, led.audits)
    result.audit_events = audit.restored
    # After the rows: a lost hold's frozen messages are found among them by blob.
    holds = restore_lost_holds(meta, archive, led.holds)
    result.holds, result.hold_releases = holds.restored, holds.released
    result.warnings += audit.warnings + holds.warnings
    bar.done(len(by_sha))
    return result


def rebuild_missing(data_dir: Path, *, database: str | None = None,
                    index_engine: str | None = None, officer: str = "unknown",
                    progress: bool | None = None) -> CatchUpResult:
    """``coffer archive rebuild --missing``: catch_up over the whole ledger, keeping the
    database; the new blobs are indexed here unless a gateway's indexer holds the index
    job (then it takes them).  Audited like a rebuild."""
    archive = Archive.open(data_dir, create=False)
    meta = Metadata(metadata_url(data_dir, database))
    try:
        meta.migrate()
        result = catch_up(archive, meta, progress=progress)
        if result.restored:
            _index_pending(meta, archive, data_dir, index_engine)
        audit_catch_up(meta, archive, officer, result)
    finally:
        meta.close()
        archive.close()
    return result


def audit_catch_up(meta: Metadata, archive: Archive, officer: str,
                   result: CatchUpResult) -> None:
    """Record a catch-up as the audited action ``rebuild-missing`` (CLI and start-up)."""
    record_audit(meta, archive, officer, "rebuild-missing", result_count=result.restored,
                 detail={"checked": result.checked, "since": result.since,
                         "receipts": result.receipts, "audit_events": result.audit_events,
                         "holds": result.holds, "hold_releases": result.hold_releases,
                         "shredded": result.shredded, "links": result.links,
                         "warnings": result.warnings})


def _index_pending(meta: Metadata, archive: Archive, data_dir: Path,
                   index_engine: str | None) -> None:
    from archive.joblock import JobLock

    with JobLock("index", meta, data_dir).attempt() as mine:
        if not mine:
            return  # a running gateway's indexer has the job: it picks the blobs up
        engine = index_engine or ("pg" if meta.dialect == "postgresql" else "fts5")
        index = open_index(engine, data_dir=data_dir, meta=meta)
        try:
            Indexer(meta, index, archive.get).run()
        finally:
            index.close()


def _lost_audit(meta: Metadata, archive: Archive, entries: list[LedgerEntry]) -> LogRestore:
    """Audit events whose id the database lacks, from their ledger documents, with their
    ids (reports.rebuild_log; before the catch-up records its own event, which could
    otherwise take a lost event's id)."""
    ids = {event_id(e) for e in entries} - {None}
    if not ids:
        return LogRestore()
    with meta.session() as s:
        have = set(s.scalars(select(AuditEvent.id).where(AuditEvent.id.in_(sorted(ids)))))
    return restore_audit(meta, archive, [e for e in entries if event_id(e) not in have])


def _rows_of(meta: Metadata, shas: list[str]) -> _Rows:
    out: _Rows = {}
    with meta.session() as s:
        for pk, sha, when, source in s.execute(
                select(Message.id, Message.sha256, Message.received_at, Message.source)
                .where(Message.sha256.in_(shas))):
            out.setdefault(sha, []).append((pk, when.astimezone(UTC), source))
    return out


def _unmatched(archive: Archive, entries: list[LedgerEntry],
               kept: Counter[tuple[datetime, str]], tombstones: dict[str, datetime]
               ) -> list[tuple[MessageRecord, CatchUpResult]]:
    """The records of ``entries`` that no kept row holds (by receipt key), in order, each
    with its own counts and warnings."""
    left = Counter(kept)
    out: list[tuple[MessageRecord, CatchUpResult]] = []
    for entry in entries:
        one = CatchUpResult()
        rec = restored_record(archive, entry, tombstones, one)
        key = (rec.received_at.astimezone(UTC), rec.source)
        if left[key] > 0:
            left[key] -= 1
            continue
        out.append((rec, one))
    return out


def _link_to_kept(meta: Metadata, added: list[tuple[int, MessageRecord]]) -> int:
    """Link a restored copy whose other copy kept its row: the copies of one message
    share its receive time (gateway.archive_stage.record_for)."""
    pairs: list[tuple[int, int]] = []
    with meta.session() as s:
        for pk, rec in added:
            if not rec.link_sha256 or s.scalar(select(Message.linked_id)
                                               .where(Message.id == pk)):
                continue
            other = s.scalar(select(Message.id).where(
                Message.sha256 == rec.link_sha256, Message.received_at == rec.received_at,
                Message.id != pk).order_by(Message.id.desc()).limit(1))
            if other is not None:
                pairs.append((pk, other))
    meta.link(pairs)
    return len(pairs)
