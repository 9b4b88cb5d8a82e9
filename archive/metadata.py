"""The archive's metadata database (SQLAlchemy 2): what is stored, for whom, and why.

Single instance, many envelopes: the bytes of a message are stored once per
SHA-256 (:class:`Blob`); every receipt of those bytes (one SMTP transaction, one
import) is a :class:`Message` row carrying its own envelope, verdicts, policy
decision and retention.  A message sent to 50 recipients in one transaction is
one blob, one message row and 50 ``envelope_to`` participant rows; the same
bytes received twice are one blob and two message rows.

    blobs ──< attachments                 content: what the bytes contain
      └──< messages ──< participants      envelope + header addresses, by role
                 ├──< verdicts            SPF / DKIM / DMARC / ARC / spam (JSON detail)
                 ├──── decisions          policy action + rule trace (JSON)
                 ├──< rule_hits           rule names, for rule:NAME queries
                 └──< hold_items >── holds
    audit_events                          who searched / viewed / exported what

The database is an index of the archive, not its proof: the store and the ledger
are (``coffer archive verify`` does not trust this database).  SQLite (WAL) is the
embedded default, PostgreSQL the shared one; the schema is created and upgraded
by Alembic (:meth:`Metadata.migrate`).
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    Connection,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    Select,
    String,
    Text,
    TypeDecorator,
    and_,
    any_,
    bindparam,
    create_engine,
    event,
    false,
    func,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.sqlite import DATETIME as SQLITE_DATETIME
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from archive.errors import ArchiveError
from archive.extract import Extracted
from archive.rows import Rows, rows_for

__all__ = [
    "Attachment",
    "AuditEvent",
    "Blob",
    "Decision",
    "Hold",
    "HoldItem",
    "Message",
    "MessageRecord",
    "MessageSummary",
    "Metadata",
    "MetadataError",
    "Participant",
    "RuleHit",
    "Verdict",
    "current_officer",
]


class MetadataError(ArchiveError):
    """The metadata database cannot be opened, migrated or written."""


# SQLite's INTEGER PRIMARY KEY is the rowid (auto-increment); PostgreSQL gets BIGINT.
Id = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """Timestamps stored as naive UTC and returned aware, identically on both backends."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the archive metadata")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)

    def bind_processor(self, dialect: Dialect) -> Callable[[datetime | None], Any] | None:
        """On SQLite, ``process_bind_param`` and the dialect's text format in one step.

        The generic path (``process_bind_param``, then SQLite DATETIME's ``%`` format
        with a dict of seven fields) cost ~5 us per timestamp, and every archived
        message binds five.  The text is the same (tests hold them equal); any other
        dialect, or a DATETIME with another storage format, takes the generic path.
        """
        impl = self.impl_instance
        if (isinstance(impl, SQLITE_DATETIME)
                and getattr(impl, "_storage_format", None) == _SQLITE_DATETIME_FORMAT):
            return _sqlite_utc_text
        return super().bind_processor(dialect)


# SQLite DATETIME's default text format (what _sqlite_utc_text writes).
_SQLITE_DATETIME_FORMAT = getattr(SQLITE_DATETIME, "_storage_format", None)


def _sqlite_utc_text(value: datetime | None) -> str | None:
    """UtcDateTime's bound value as SQLite DATETIME stores it: naive UTC,
    "YYYY-MM-DD HH:MM:SS.ffffff"."""
    if value is None:
        return None
    tz = value.tzinfo
    if tz is None:
        raise ValueError("naive datetime given to the archive metadata")
    if tz is not UTC:  # the gateway's clocks give UTC already
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


class Base(DeclarativeBase):
    pass


class Blob(Base):
    __tablename__ = "blobs"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    stored_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # NULL until the full-text indexer has taken it (index lag = now - stored_at).
    indexed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    shredded_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    scan_flags: Mapped[list[str]] = mapped_column(Json, default=list)

    attachments: Mapped[list[Attachment]] = relationship(back_populates="blob")


class Message(Base):
    """One receipt of a blob: an SMTP transaction or an imported copy."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Id, primary_key=True)  # the archive id officers see
    blob_id: Mapped[int] = mapped_column(ForeignKey("blobs.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    message_id: Mapped[str] = mapped_column(String(998), index=True)  # RFC 5322 §2.1.1
    date: Mapped[datetime] = mapped_column(UtcDateTime)  # Date:, else receipt
    subject: Mapped[str] = mapped_column(Text)
    from_addr: Mapped[str] = mapped_column(String(320))
    size: Mapped[int] = mapped_column(BigInteger, index=True)
    # IMAP's RFC822.SIZE: the size with bare LF as CRLF (archive.extract.crlf_size),
    # recorded with the row so a SELECT need not read the blob; NULL on rows archived
    # before migration 0003 (archive.imap.archive_backend measures those lazily).
    crlf_size: Mapped[int | None] = mapped_column(BigInteger)
    attachment_count: Mapped[int] = mapped_column(Integer, default=0)
    direction: Mapped[str] = mapped_column(String(16), index=True)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    retention_until: Mapped[datetime | None] = mapped_column(UtcDateTime, index=True)
    source: Mapped[str] = mapped_column(String(255))  # "smtp:LISTENER", "import:PATH"
    state: Mapped[str] = mapped_column(String(16), default="accepted")
    flags: Mapped[list[str]] = mapped_column(Json, default=list)
    # The envelope (RFC 5321 §2.3.1); recipients are participant rows (envelope_to).
    mail_from: Mapped[str] = mapped_column(String(320), default="")
    client_ip: Mapped[str] = mapped_column(String(64), default="")
    helo: Mapped[str] = mapped_column(String(255), default="")
    tls: Mapped[str] = mapped_column(String(128), default="")
    auth_user: Mapped[str] = mapped_column(String(255), default="")
    # Verdict summaries for spf:/dkim:/dmarc: queries; "" when not checked.
    spf: Mapped[str] = mapped_column(String(16), default="", index=True)
    dkim: Mapped[str] = mapped_column(String(16), default="", index=True)
    dmarc: Mapped[str] = mapped_column(String(16), default="", index=True)
    # Which copy of the message this row is (COPIES; "" the only one), and the other
    # copy it links to: as sent <-> as received, ciphertext <-> decrypted (issue 3 item 1).
    copy: Mapped[str] = mapped_column(String(16), default="", server_default="")
    linked_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    ledger_ref: Mapped[str | None] = mapped_column(String(128))
    expired_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    blob: Mapped[Blob] = relationship()
    participants: Mapped[list[Participant]] = relationship(
        back_populates="message", order_by="Participant.id")
    verdicts: Mapped[list[Verdict]] = relationship(back_populates="message")
    decision: Mapped[Decision | None] = relationship(back_populates="message")

    __table_args__ = (Index("ix_messages_date_id", "date", "id"),)


class Participant(Base):
    """An address with its role: from to cc bcc sender reply_to envelope_from envelope_to.

    ``bcc`` rows are envelope recipients that appear in no To/Cc header (RFC 5321
    §3.3: the envelope, not the header, says who received the message).
    """

    __tablename__ = "participants"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(320))  # lower-cased
    name: Mapped[str] = mapped_column(String(255), default="")

    message: Mapped[Message] = relationship(back_populates="participants")

    __table_args__ = (Index("ix_participants_address_role", "address", "role"),)


class Attachment(Base):
    __tablename__ = "attachments"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    blob_id: Mapped[int] = mapped_column(ForeignKey("blobs.id"), index=True)
    name: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    depth: Mapped[int] = mapped_column(Integer, default=0)
    scanned: Mapped[bool] = mapped_column(Boolean, default=True)
    flags: Mapped[list[str]] = mapped_column(Json, default=list)

    blob: Mapped[Blob] = relationship(back_populates="attachments")


class Verdict(Base):
    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # spf dkim dmarc arc spam
    result: Mapped[str] = mapped_column(String(32))
    detail: Mapped[Any] = mapped_column(Json)

    message: Mapped[Message] = relationship(back_populates="verdicts")


class Decision(Base):
    """The policy decision for a message, with the trace of every rule hit and miss."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id"), unique=True)
    action: Mapped[str] = mapped_column(String(32))
    trace: Mapped[Any] = mapped_column(Json)
    decided_at: Mapped[datetime] = mapped_column(UtcDateTime)

    message: Mapped[Message] = relationship(back_populates="decision")


class RuleHit(Base):
    __tablename__ = "rule_hits"

    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id"), primary_key=True)
    rule: Mapped[str] = mapped_column(String(255), primary_key=True, index=True)


class Hold(Base):
    """A legal hold: the query that created it is kept as evidence."""

    __tablename__ = "holds"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    case: Mapped[str] = mapped_column(String(255), unique=True)
    query: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    created_by: Mapped[str] = mapped_column(String(255))
    released_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    released_by: Mapped[str | None] = mapped_column(String(255))


class HoldItem(Base):
    __tablename__ = "hold_items"

    hold_id: Mapped[int] = mapped_column(ForeignKey("holds.id"), primary_key=True)
    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id"), primary_key=True,
                                            index=True)


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    who: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(32), index=True)  # search show export hold ...
    query: Mapped[str | None] = mapped_column(Text)
    result_count: Mapped[int | None] = mapped_column(Integer)
    target: Mapped[str | None] = mapped_column(String(255))  # e.g. the message id shown
    detail: Mapped[Any] = mapped_column(Json)


# -- input and output records -------------------------------------------------------


@dataclass(slots=True)
class MessageRecord:
    """Everything the archive stage knows about one receipt of a message."""

    sha256: str
    extracted: Extracted
    received_at: datetime
    direction: str = "inbound"
    source: str = "smtp"
    state: str = "accepted"
    mail_from: str = ""
    rcpt_to: list[str] = field(default_factory=list)
    client_ip: str = ""
    helo: str = ""
    tls: str = ""
    auth_user: str = ""
    retention_until: datetime | None = None
    verdicts: dict[str, Any] = field(default_factory=dict)  # facts["check"] (+ "spam")
    decision: dict[str, Any] | None = None  # facts["decide"]: action, trace ...
    rules: list[str] = field(default_factory=list)  # names of the rules that matched
    linked_id: int | None = None
    ledger_ref: str | None = None
    copy: str = ""  # which copy of the message (COPIES); "" the only one
    # The SHA-256 of the copy this one links to; add_messages resolves it to linked_id
    # (the nearest row with those bytes in the same batch: resolve_links).
    link_sha256: str | None = None
    # The receive time identifies this receipt (an SMTP transaction, to the microsecond):
    # recorded again (the archive stage re-run after a crash), it returns the first row.
    once: bool = False
    # Said about this receipt beyond what the bytes show (Message.flags), e.g. that it
    # came as a journal copy (gateway.journal_archive).
    flags: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    blob_id: int
    new_blob: bool


@dataclass(frozen=True, slots=True)
class MessageSummary:
    """What a search result row shows."""

    id: int
    sha256: str
    message_id: str
    date: datetime
    from_addr: str
    to: tuple[str, ...]
    subject: str
    size: int
    direction: str
    blob_id: int
    copy: str = ""
    linked_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "message_id": self.message_id, "date": self.date.isoformat(),
            "from": self.from_addr, "to": list(self.to), "subject": self.subject,
            "size": self.size, "direction": self.direction, "sha256": self.sha256,
            "copy": self.copy, "linked_id": self.linked_id,
        }


# The copies of one message (Message.copy).  An outbound message the gateway signed or
# encrypted is kept as RECEIVED (the plaintext the sender submitted) and SENT (the exact
# bytes delivered); an inbound encrypted message it could decrypt as ENCRYPTED (the
# bytes received and delivered) and DECRYPTED (what the recipient reads).  Search lists
# the readable copy (RECEIVED, DECRYPTED, or the only one ""); the SECONDARY copies are
# reached through ``linked_id`` (coffer show), and holds and exports take them too.
RECEIVED, SENT, DECRYPTED, ENCRYPTED = "received", "sent", "decrypted", "encrypted"
# A journal report (gateway.journal_archive): the original message it carries, with the
# report's envelope, is JOURNALED; the report as it arrived is JOURNAL_REPORT.
JOURNALED, JOURNAL_REPORT = "journaled", "journal_report"
COPIES = frozenset({"", RECEIVED, SENT, DECRYPTED, ENCRYPTED, JOURNALED, JOURNAL_REPORT})
SECONDARY_COPIES = frozenset({SENT, ENCRYPTED, JOURNAL_REPORT})


def resolve_links(rows: Sequence[tuple[str, str | None]]) -> dict[int, int]:
    """Position -> position of the row it links to, for (sha256, link_sha256) rows
    in archive order (pure).

    A row links to the nearest other row holding the bytes it names: the copies of
    one message are written next to each other (one ledger append), and the same
    bytes may recur elsewhere (single instance: the same plaintext sent twice).
    """
    where: dict[str, list[int]] = {}
    for i, (sha, _) in enumerate(rows):
        where.setdefault(sha, []).append(i)
    out: dict[int, int] = {}
    for i, (_, link) in enumerate(rows):
        if not link:
            continue
        candidates = [j for j in where.get(link, ()) if j != i]
        if candidates:
            out[i] = min(candidates, key=lambda j: (abs(j - i), j))
    return out


def current_officer(explicit: str | None = None) -> str:
    """Who is acting: --officer, else $USER, else the login name."""
    if explicit:
        return explicit
    user = os.environ.get("USER")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _verdict_summary(kind: str, value: Any) -> str:
    """One result word per mechanism; DKIM: pass if any signature passed (RFC 6376 §6.1)."""
    if isinstance(value, list):
        results = [_verdict_summary(kind, v) for v in value]
        results = [r for r in results if r]
        if "pass" in results:
            return "pass"
        return results[0] if results else ""
    if isinstance(value, dict):
        result = value.get("result", "")
        return str(result).lower()[:16] if result else ""
    if isinstance(value, str):
        return value.lower()[:16]
    return ""


# -- the database ---------------------------------------------------------------------

# Alembic keeps its migration context in module globals: one migration per process
# at a time (other processes are kept out by the file or advisory lock).
_MIGRATE_LOCK = threading.Lock()

_SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",  # readers never block the archive writer
    # FULL: a commit is on disk when it returns (WAL fsynced at every commit), so a power
    # loss cannot take rows the spool has already been told are archived; the store and
    # ledger remain the proof, this keeps the searchable copy in step with them.  One
    # fsync per archive batch: within noise in bench/relay.py (docs/benchmarks.md).
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
)


_TABLES = Base.metadata.tables
_BLOBS = _TABLES["blobs"]
_MESSAGES = _TABLES["messages"]
# Statements add_messages runs for every batch, built once (the bound values vary).
_RECORDED = select(_MESSAGES.c.sha256, _MESSAGES.c.received_at, _MESSAGES.c.source,
                   _MESSAGES.c.id, _MESSAGES.c.blob_id).where(
    _MESSAGES.c.sha256.in_(bindparam("shas", expanding=True)))
_UNINDEXED = (select(_BLOBS.c.id, _BLOBS.c.sha256)
              .where(_BLOBS.c.indexed_at.is_(None), _BLOBS.c.shredded_at.is_(None))
              .order_by(_BLOBS.c.id).limit(bindparam("limit", type_=Integer)))
# The receipts lock on PostgreSQL (Metadata.add_messages), per schema as archive.joblock:
# released at commit.  Shared locks do not wait for each other, so the nodes' archive
# writers never queue behind one another, only behind a catch-up.
_PG_RECEIPTS_KEY = "hashtextextended(current_schema() || ':' || :k, 0)"
_PG_RECEIPTS_LOCK = {
    False: text(f"SELECT pg_advisory_xact_lock_shared({_PG_RECEIPTS_KEY})"),
    True: text(f"SELECT pg_advisory_xact_lock({_PG_RECEIPTS_KEY})"),
}
_LINK = (_MESSAGES.update().where(_MESSAGES.c.id == bindparam("pk"))
         .values(linked_id=bindparam("link")))


def _receipt_key(rec: MessageRecord) -> tuple[str, datetime, str]:
    return rec.sha256, rec.received_at.astimezone(UTC), rec.source


def _recorded_before(conn: Connection, recs: Sequence[MessageRecord], existing: set[str]
                     ) -> dict[tuple[str, datetime, str], StoredMessage]:
    """The rows already holding some of these receipts (only blobs that exist can)."""
    shas = [r.sha256 for r in recs if r.once and r.sha256 in existing]
    if not shas:
        return {}
    rows = conn.execute(_RECORDED, {"shas": sorted(set(shas))})
    return {(sha, when.astimezone(UTC), source): StoredMessage(pk, blob_id, False)
            for sha, when, source, pk, blob_id in rows}


class Metadata:
    """The metadata database: open, migrate, record messages, query, audit."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        # psycopg (v3) is the PostgreSQL driver; a plain postgresql:// URL means it too.
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                url = "postgresql+psycopg://" + url.removeprefix(plain)
        self.url = url
        self.schema = schema
        connect_args: dict[str, Any] = {}
        if url.startswith("postgresql") and schema:
            # Every connection works inside the schema (tests use one per test).
            connect_args["options"] = f"-csearch_path={schema}"
        try:
            self.engine: Engine = create_engine(url, connect_args=connect_args)
        except Exception as exc:
            raise MetadataError(f"cannot open metadata database {safe_url(url)}: {exc}"
                                ) from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_on_connect)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def for_data_dir(cls, data_dir: Path | str) -> Metadata:
        """The embedded default: ``DATA_DIR/archive/meta.db``."""
        path = Path(data_dir) / "archive" / "meta.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{path}")

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Metadata:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    def migrate(self, revision: str = "head") -> None:
        """Create or upgrade the schema with Alembic (``alembic upgrade head``)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        try:
            with _MIGRATE_LOCK, self._file_lock(), self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    # Several gateway nodes may start at once: one migrates, the others
                    # wait for its commit and then find nothing to do.
                    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
                                 {"k": "coffer-archive-migrate"})
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
        except Exception as exc:
            raise MetadataError(f"cannot migrate metadata database {safe_url(self.url)}: "
                                f"{str(exc).splitlines()[0]}") from exc

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """SQLite: an exclusive lock file beside the database while migrating, so two
        processes opening a new archive at once do not both create the tables."""
        database = self.engine.url.database
        if self.dialect != "sqlite" or not database or database == ":memory:":
            yield
            return
        with open(f"{database}.migrate-lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- writing ------------------------------------------------------------------

    def add_message(self, rec: MessageRecord) -> StoredMessage:
        """Record one receipt; the blob row (and its attachments) only if new."""
        return self.add_messages([rec])[0]

    def add_messages(self, recs: Sequence[MessageRecord], *,
                     exclusive: bool = False) -> list[StoredMessage]:
        """Record a batch of receipts in one transaction (group commit).

        Bulk inserts on a Core connection (one statement per table, ids back in
        parameter order), through archive.rows: on SQLite straight on the DBAPI cursor.
        The ORM (a Session, its bulk insert) cost about as much CPU again per message.

        Idempotent per receipt for records marked ``once``: one whose blob, receive
        time and source are already recorded returns that row instead of a second
        one.  The gateway records a message, then notes in its spool that it did; a
        crash between the two runs the archive stage again after the restart, and
        the message must still be archived once.

        That check and the insert run under the receipts lock (:meth:`_receipts_lock`)
        when a record is ``once``: shared by the archive writers, ``exclusive`` for
        the catch-up (reports.rebuild.catch_up), which restores rows for ledger entries
        a writer may be about to record; whichever comes second finds the other's row.
        """
        if not recs:
            return []
        locked = exclusive or any(r.once for r in recs)
        with (self._receipts_lock(exclusive) if locked else nullcontext(),
              self.engine.begin() as conn):
            if locked and self.dialect == "postgresql":
                conn.execute(_PG_RECEIPTS_LOCK[exclusive], {"k": "coffer-receipts"})
            w = rows_for(conn)
            blob_ids: dict[str, int] = w.ids_by(
                _BLOBS, "sha256", list(dict.fromkeys(r.sha256 for r in recs)))
            existing = set(blob_ids)
            again = _recorded_before(conn, recs, existing)
            if again:
                done = {i: again[_receipt_key(r)] for i, r in enumerate(recs)
                        if r.once and _receipt_key(r) in again}
                rest = [r for i, r in enumerate(recs) if i not in done]
                if not rest:
                    return [done[i] for i in range(len(recs))]
                fresh_out = iter(self._insert(conn, w, rest, blob_ids, existing))
                return [done[i] if i in done else next(fresh_out) for i in range(len(recs))]
            return self._insert(conn, w, recs, blob_ids, existing)

    @contextmanager
    def _receipts_lock(self, exclusive: bool) -> Iterator[None]:
        """SQLite: a ``flock`` of ``meta.db.receipts-lock`` (PostgreSQL: an advisory lock
        in the transaction, see add_messages), shared or exclusive.

        The pysqlite driver reads before it begins the write transaction, so SQLite's
        own writer lock does not cover the ``once`` check.  A new open file per use:
        flock locks belong to the open file, and threads of one process (the
        gateway's writer and its start-up catch-up) must exclude each other too.
        """
        database = self.engine.url.database
        if self.dialect != "sqlite" or not database or database == ":memory:":
            yield
            return
        fd = os.open(f"{database}.receipts-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _insert(self, conn: Connection, w: Rows, recs: Sequence[MessageRecord],
                blob_ids: dict[str, int], existing: set[str]) -> list[StoredMessage]:
        """Insert the blob rows that are new and one message row per record."""
        fresh = {r.sha256: r for r in recs if r.sha256 not in existing}
        if fresh:
            ids = w.insert_ids(_BLOBS, [
                {"sha256": sha, "size": r.extracted.size, "stored_at": r.received_at,
                 "scan_flags": list(r.extracted.flags), "indexed_at": None,
                 "shredded_at": None} for sha, r in fresh.items()])
            blob_ids.update(zip(fresh, ids, strict=True))
            attachments = [_attachment_row(blob_ids[sha], a)
                           for sha, r in fresh.items() for a in r.extracted.attachments]
            if attachments:
                w.insert(_TABLES["attachments"], attachments)
        # Each verdict's summary once: the message row and the verdict rows both take it.
        summaries = [{kind: _verdict_summary(kind, value) for kind, value in r.verdicts.items()}
                     for r in recs]
        pks = w.insert_ids(_MESSAGES, [_message_row(blob_ids[r.sha256], r, summary)
                                       for r, summary in zip(recs, summaries, strict=True)])
        people: list[dict[str, Any]] = []
        verdicts: list[dict[str, Any]] = []
        decisions: list[dict[str, Any]] = []
        hits: list[dict[str, Any]] = []
        for pk, rec, summary in zip(pks, recs, summaries, strict=True):
            people.extend(_participant_rows(pk, rec))
            verdicts.extend({"message_pk": pk, "kind": kind[:16],
                             "result": summary[kind][:32], "detail": value}
                            for kind, value in rec.verdicts.items())
            if rec.decision is not None:
                decisions.append({"message_pk": pk, "decided_at": rec.received_at,
                                  "action": str(rec.decision.get("action", ""))[:32],
                                  "trace": rec.decision})
            hits.extend({"message_pk": pk, "rule": rule[:255]}
                        for rule in dict.fromkeys(rec.rules))
        for name, batch in (("participants", people), ("verdicts", verdicts),
                            ("decisions", decisions), ("rule_hits", hits)):
            if batch:
                w.insert(_TABLES[name], batch)
        links = resolve_links([(r.sha256, r.link_sha256) for r in recs])
        if links:
            conn.execute(_LINK, [{"pk": pks[i], "link": pks[j]} for i, j in links.items()])
        seen: set[str] = set()
        out = []
        for pk, rec in zip(pks, recs, strict=True):
            out.append(StoredMessage(pk, blob_ids[rec.sha256],
                                     rec.sha256 not in existing and rec.sha256 not in seen))
            seen.add(rec.sha256)
        return out

    def link(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Set ``linked_id`` of each (message id, linked message id) (a rebuild's links)."""
        rows = [{"id": a, "linked_id": b} for a, b in pairs]
        if rows:
            with self.session() as s:
                s.execute(update(Message), rows)

    def with_linked(self, ids: Sequence[int]) -> list[int]:
        """``ids`` and, after them, every copy linked to one of them (holds, exports:
        the copy as sent is evidence as much as the copy as received)."""
        if not ids:
            return []
        with self.session() as s:
            extra = set(s.scalars(select(Message.linked_id).where(
                self.ids_condition(Message.id, ids), Message.linked_id.is_not(None))))
            extra.update(s.scalars(select(Message.id).where(
                self.ids_condition(Message.linked_id, ids))))
        known = set(ids)
        return list(ids) + sorted(i for i in extra if i is not None and i not in known)

    def mark_indexed(self, blob_ids: Collection[int], when: datetime) -> None:
        # Core, not a Session: the indexer runs this for every batch (an ORM bulk
        # update also synchronises a session that holds no objects).
        if not blob_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(update(_BLOBS).where(self.ids_condition(_BLOBS.c.id, blob_ids))
                         .values(indexed_at=when))

    def unindexed(self, limit: int = 500) -> list[tuple[int, str]]:
        """(blob id, sha256) of blobs waiting for the full-text indexer, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(_UNINDEXED, {"limit": limit})
            return [(r[0], r[1]) for r in rows]

    def all_blobs(self) -> Iterator[tuple[int, str]]:
        """Every live blob, for a rebuild of the full-text index."""
        last = 0
        while True:
            with self.session() as s:
                rows = list(s.execute(select(Blob.id, Blob.sha256)
                                      .where(Blob.id > last, Blob.shredded_at.is_(None))
                                      .order_by(Blob.id).limit(1000)))
            if not rows:
                return
            for r in rows:
                yield r[0], r[1]
            last = rows[-1][0]

    def place_hold(self, case: str, query: str, who: str, message_ids: Iterable[int],
                   when: datetime, reason: str = "") -> int:
        with self.session() as s:
            hold = Hold(case=case, query=query, reason=reason, created_at=when, created_by=who)
            s.add(hold)
            s.flush()
            s.add_all(HoldItem(hold_id=hold.id, message_pk=m) for m in dict.fromkeys(message_ids))
            return hold.id

    def record_audit(self, who: str, action: str, *, when: datetime, query: str | None = None,
                     result_count: int | None = None, target: str | None = None,
                     detail: dict[str, Any] | None = None) -> AuditEvent:
        with self.session() as s:
            ev = AuditEvent(at=when, who=who[:255], action=action[:32], query=query,
                            result_count=result_count, target=target, detail=detail or {})
            s.add(ev)
        return ev

    def audit_events(self, since: datetime | None = None) -> list[AuditEvent]:
        with self.session() as s:
            q = select(AuditEvent).order_by(AuditEvent.id)
            if since is not None:
                q = q.where(AuditEvent.at >= since)
            return list(s.scalars(q))

    # -- reading ------------------------------------------------------------------

    def ids_condition(self, column: Any, ids: Collection[int], *, dense: bool = False
                      ) -> ColumnElement[bool]:
        """``column IN ids`` with a single bound parameter, whatever len(ids) is.

        A plain IN list needs one parameter per id and fails past SQLite's and
        PostgreSQL's parameter limits; a JSON array (SQLite) or an array (PostgreSQL)
        does not.  ``dense``: the ids are a large part of the table; SQLite, which
        cannot estimate a JSON array's size, is then kept off the column's index
        (``+0``) so that it walks the date index and stops at the page it needs.
        """
        if not ids:
            return false()
        values = sorted(set(ids))
        if self.dialect == "postgresql":
            return column == any_(bindparam(None, values, type_=ARRAY(BigInteger)))  # type: ignore[no-any-return]
        table = func.json_each(bindparam(None, json.dumps(values), type_=String)).table_valued(
            "value")
        target = column + 0 if dense else column
        return target.in_(select(table.c.value))  # type: ignore[no-any-return]

    def participant_ids(self, roles: Collection[str], value: str) -> list[int]:
        """Ids of messages with a matching participant (see participant_query)."""
        with self.session() as s:
            return list(s.scalars(participant_query(roles, value, self.dialect)))

    def index_lag(self, now: datetime) -> float:
        """Seconds the oldest blob has waited for the full-text indexer (0: none waits)."""
        with self.session() as s:
            oldest = s.scalar(select(func.min(Blob.stored_at)).where(
                Blob.indexed_at.is_(None), Blob.shredded_at.is_(None)))
        if oldest is None:
            return 0.0
        if oldest.tzinfo is None:  # min() bypasses the column type on some backends
            oldest = oldest.replace(tzinfo=UTC)
        return max(0.0, (now - oldest).total_seconds())

    def approx_blobs(self) -> int:
        """About how many blobs there are (the largest id: no table scan)."""
        with self.session() as s:
            return int(s.scalar(select(func.max(Blob.id))) or 0)

    def get(self, message_pk: int) -> Message | None:
        with self.session() as s:
            return s.get(Message, message_pk)

    def decision_trace(self, message_pk: int) -> dict[str, Any] | None:
        """The policy decision recorded with a message (its rule trace, a rejection)."""
        with self.session() as s:
            trace = s.scalar(select(Decision.trace).where(Decision.message_pk == message_pk))
        return trace if isinstance(trace, dict) else None

    def find_message_id(self, message_id: str) -> list[int]:
        mid = message_id.strip().removeprefix("<").removesuffix(">")
        with self.session() as s:
            return list(s.scalars(select(Message.id).where(Message.message_id == mid)
                                  .order_by(Message.id)))

    def participants(self, message_pk: int) -> list[Participant]:
        with self.session() as s:
            return list(s.scalars(select(Participant).where(Participant.message_pk == message_pk)
                                  .order_by(Participant.id)))

    def attachments(self, blob_id: int) -> list[Attachment]:
        with self.session() as s:
            return list(s.scalars(select(Attachment).where(Attachment.blob_id == blob_id)
                                  .order_by(Attachment.id)))

    def count(self, condition: ColumnElement[bool] | None = None) -> int:
        with self.session() as s:
            q = select(func.count()).select_from(Message)
            if condition is not None:
                q = q.where(condition)
            return int(s.scalar(q) or 0)

    def matching_ids(self, condition: ColumnElement[bool]) -> list[tuple[int, int]]:
        """(message id, blob id) of every match, newest first."""
        with self.session() as s:
            rows = s.execute(select(Message.id, Message.blob_id).where(condition)
                             .order_by(Message.date.desc(), Message.id.desc()))
            return [(r[0], r[1]) for r in rows]

    def page(self, condition: ColumnElement[bool] | None = None, *, limit: int = 50,
             offset: int = 0) -> list[int]:
        """Ids of one page of matches, newest first (a narrow query: sorting whole rows
        of every match would cost far more)."""
        with self.session() as s:
            q = select(Message.id).order_by(Message.date.desc(), Message.id.desc())
            if condition is not None:
                q = q.where(condition)
            return list(s.scalars(q.limit(limit).offset(offset)))

    def summaries(self, condition: ColumnElement[bool] | None = None, *, limit: int = 50,
                  offset: int = 0, ids: Sequence[int] | None = None) -> list[MessageSummary]:
        """Result rows, newest first (or in the order of ``ids`` when given)."""
        if ids is None:
            ids = self.page(condition, limit=limit, offset=offset)
        with self.session() as s:
            msgs = list(s.scalars(select(Message).where(self.ids_condition(Message.id, ids))))
            to: dict[int, list[str]] = {m.id: [] for m in msgs}
            if msgs:
                for pk, addr in s.execute(
                    select(Participant.message_pk, Participant.address)
                    .where(self.ids_condition(Participant.message_pk, list(to)),
                           Participant.role == "to").order_by(Participant.id)):
                    to[pk].append(addr)
        rows = {m.id: MessageSummary(m.id, m.sha256, m.message_id, m.date, m.from_addr,
                                     tuple(to[m.id]), m.subject, m.size, m.direction, m.blob_id,
                                     m.copy, m.linked_id)
                for m in msgs}
        return [rows[i] for i in ids if i in rows]


def _attachment_row(blob_id: int, a: Any) -> dict[str, Any]:
    return {"blob_id": blob_id, "name": a.name[:4000], "content_type": a.content_type[:255],
            "size": a.size, "sha256": a.sha256, "depth": a.depth, "scanned": a.scanned,
            "flags": list(a.flags)}


def _message_row(blob_id: int, rec: MessageRecord,
                 summary: dict[str, str] | None = None) -> dict[str, Any]:
    """``summary``: each verdict's _verdict_summary, if the caller has them already."""
    ex = rec.extracted
    if summary is None:
        summary = {kind: _verdict_summary(kind, value) for kind, value in rec.verdicts.items()}
    return {
        "blob_id": blob_id, "sha256": rec.sha256, "message_id": ex.message_id[:998],
        "date": ex.date or rec.received_at, "subject": ex.subject,
        "from_addr": ex.from_address[:320], "size": ex.size, "crlf_size": ex.crlf_size,
        "attachment_count": sum(1 for a in ex.attachments if a.depth == 0),
        "direction": rec.direction, "received_at": rec.received_at,
        "retention_until": rec.retention_until, "source": rec.source[:255], "state": rec.state,
        "flags": list(rec.flags) + list(ex.flags)
        + ([] if ex.date else ["no Date header: dated by receipt"]),
        "mail_from": rec.mail_from[:320], "client_ip": rec.client_ip[:64],
        "helo": rec.helo[:255], "tls": rec.tls[:128], "auth_user": rec.auth_user[:255],
        "spf": summary.get("spf", ""),  # _verdict_summary(kind, None): none given
        "dkim": summary.get("dkim", ""),
        "dmarc": summary.get("dmarc", ""),
        "linked_id": rec.linked_id, "ledger_ref": rec.ledger_ref, "expired_at": None,
        "copy": rec.copy,
    }


def _participant_rows(pk: int, rec: MessageRecord) -> list[dict[str, Any]]:
    rows = [{"message_pk": pk, "role": p.role, "address": p.address[:320], "name": p.name[:255]}
            for p in rec.extracted.participants]
    if rec.mail_from:
        rows.append({"message_pk": pk, "role": "envelope_from",
                     "address": rec.mail_from.lower()[:320], "name": ""})
    visible = {p.address for p in rec.extracted.participants if p.role in ("to", "cc")}
    for rcpt in dict.fromkeys(r.lower() for r in rec.rcpt_to):
        rows.append({"message_pk": pk, "role": "envelope_to", "address": rcpt[:320], "name": ""})
        if rcpt not in visible:
            # RFC 5322 §3.6.3: a Bcc recipient is in the envelope but in no To/Cc.
            rows.append({"message_pk": pk, "role": "bcc", "address": rcpt[:320], "name": ""})
    return rows

def safe_url(url: str) -> str:
    """The URL for messages: never a password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable database URL>"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    for pragma in _SQLITE_PRAGMAS:
        cur.execute(pragma)
    cur.close()


ALL_ROLES = frozenset({"from", "sender", "reply_to", "to", "cc", "bcc", "envelope_from",
                       "envelope_to"})


def participant_query(roles: Collection[str], value: str, dialect: str) -> Select[Any]:
    """Ids of messages with a participant in ``roles`` matching ``value`` (archive.query):
    ``a@b`` exactly (indexed), ``@b`` that domain, else a substring of address or name."""
    value = value.lower()
    if "@" in value and not value.startswith("@"):
        match: ColumnElement[bool] = Participant.address == value
    elif value.startswith("@"):
        match = Participant.address.like("%" + _escape_like(value), escape="\\")
    else:
        pattern = "%" + _escape_like(value) + "%"
        # Addresses are stored lower-cased.  SQLite's LIKE already ignores (ASCII) case
        # and its lower() folds no more, so only PostgreSQL needs ILIKE for names.
        name = (Participant.name.ilike(pattern, escape="\\") if dialect == "postgresql"
                else Participant.name.like(pattern, escape="\\"))
        match = Participant.address.like(pattern, escape="\\") | name
    if set(roles) != ALL_ROLES:
        match = and_(Participant.role.in_(sorted(roles)), match)
    return select(Participant.message_pk).where(match)


def address_condition(roles: Collection[str], value: str, dialect: str = "sqlite"
                      ) -> ColumnElement[bool]:
    """Messages with a participant in ``roles`` matching ``value`` (a sub-query)."""
    return Message.id.in_(participant_query(roles, value, dialect))


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
