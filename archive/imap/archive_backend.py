"""The archive as an IMAP mailbox backend: metadata + blob store + full-text index + audit.

Folders (RFC 6154 special-use attributes in brackets):

    users, officers and admins with addresses
      INBOX                 mail whose recipients (To, Cc, envelope) include an address of theirs
      Sent       [\\Sent]    mail whose sender (From, Sender, MAIL FROM) is one of theirs
      INBOX/<year>          with ``by_year`` (imap.folders_by_year): the same mail split by
      Sent/<year>           the year it was archived (INTERNALDATE, UTC), one folder per
                            year that has mail; INBOX and Sent still hold all of it
    officers and admins
      All Mail   [\\All]     every message in the archive; UID = the archive id
      Domains/<domain>      mail to or from a domain (the configured local domains)
      Holds/<case>          the messages of an active legal hold
      Searches/<name>       a saved search (archive query language), re-run on each SELECT

A user never sees a message no address of theirs took part in (envelope or header):
their folders are built from participant rows, and a UID is only served when it is in
the folder as last listed for that user.  Expired (crypto-shredded) messages leave
every folder.  UIDs: All Mail uses the archive id (ascending in arrival order);
every other folder numbers its messages in the order they entered it (a table in
the account database, see archive.imap.accounts), so a message that becomes visible
later gets a higher UID and sync clients see it.  Officers' SELECT, body FETCH and
SEARCH are audited (archive.search.audit: the database, then the ledger hooks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, select

from archive.audit import append_audit
from archive.facade import Archive
from archive.imap.accounts import Accounts
from archive.imap.backend import (
    PERMANENT_FLAGS,
    MailboxInfo,
    MessageInfo,
    Principal,
    Unsubscribe,
    stable_uidvalidity,
)
from archive.imap.errors import MailboxError
from archive.imap.render import to_crlf
from archive.index import Index
from archive.metadata import (
    SECONDARY_COPIES,
    AuditEvent,
    Hold,
    HoldItem,
    Message,
    Metadata,
    Participant,
)
from archive.query import Term
from archive.search import AuditHook, BlobReader, Searcher, audit

__all__ = ["ArchiveBackend", "ledger_audit_hook"]

_RECIPIENT_ROLES = ("to", "cc", "bcc", "envelope_to")
_SENDER_ROLES = ("from", "sender", "envelope_from")


@dataclass(frozen=True, slots=True)
class _FolderDef:
    name: str
    attributes: tuple[str, ...]
    key: str  # where its UIDs and flags are kept
    kind: str  # inbox sent all domain hold search
    arg: str = ""


@dataclass(frozen=True, slots=True)
class _Entry:
    pk: int
    sha256: str
    blob_id: int


def ledger_audit_hook(archive: Archive) -> AuditHook:
    """A hook writing each audit event to ``archive``'s ledger as every other audit event
    is (archive.audit.append_audit): ids and hashes in the entry, the officer and the
    query only in its encrypted document (the ledger itself is not encrypted)."""

    def hook(ev: AuditEvent) -> None:
        append_audit(archive, ev)

    return hook


class ArchiveBackend:
    """:class:`archive.imap.backend.Backend` over the archive."""

    blocking = True

    def __init__(self, meta: Metadata, blobs: BlobReader, accounts: Accounts,
                 index: Index | None = None, domains: Sequence[str] = (),
                 audit_hooks: Collection[AuditHook] | None = None,
                 poll_interval: float = 2.0, by_year: bool = False) -> None:
        self.meta = meta
        self.by_year = by_year
        self.blobs = blobs
        self.accounts = accounts
        self.index = index
        self.domains = tuple(d.lower() for d in domains)
        self.audit_hooks = audit_hooks
        self._lock = threading.Lock()
        # (user, folder) -> uid -> entry, as last listed: what that user may fetch.
        self._views: dict[tuple[str, str], dict[int, _Entry]] = {}
        self._watchers: list[Callable[[], None]] = []
        self.poll_interval = poll_interval
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()

    # -- accounts --

    def authenticate(self, user: str, password: str) -> Principal | None:
        return self.accounts.authenticate(user, password)

    # -- folders --

    def _folders(self, p: Principal) -> dict[str, _FolderDef]:
        out: dict[str, _FolderDef] = {}
        if p.addresses or not p.is_officer:
            out["INBOX"] = _FolderDef("INBOX", (), f"u/{p.name}/INBOX", "inbox")
            out["Sent"] = _FolderDef("Sent", ("\\Sent",), f"u/{p.name}/Sent", "sent")
            if self.by_year:
                for kind, year in self._years(p):
                    name = f"{'INBOX' if kind == 'inbox' else 'Sent'}/{year}"
                    out[name] = _FolderDef(name, (), f"u/{p.name}/{name}", kind, str(year))
        if p.is_officer:
            out["All Mail"] = _FolderDef("All Mail", ("\\All",), "o/All Mail", "all")
            for d in self.domains:
                name = f"Domains/{d}"
                out[name] = _FolderDef(name, (), f"o/{name}", "domain", d)
            with self.meta.session() as s:
                cases = list(s.scalars(select(Hold.case).where(Hold.released_at.is_(None))
                                       .order_by(Hold.case)))
            for case in cases:
                name = f"Holds/{case}"
                out[name] = _FolderDef(name, (), f"o/{name}", "hold", case)
            if self.index is not None:
                for sname, query in self.accounts.saved_searches():
                    name = f"Searches/{sname}"
                    out[name] = _FolderDef(name, (), f"o/{name}", "search", query)
        return out

    def _folder(self, p: Principal, mailbox: str) -> _FolderDef:
        f = self._folders(p).get(mailbox)
        if f is None:
            raise MailboxError(mailbox)
        return f

    def mailboxes(self, principal: Principal) -> list[MailboxInfo]:
        return [MailboxInfo(f.name, f.attributes, self._uidvalidity(f))
                for f in self._folders(principal).values()]

    @staticmethod
    def _uidvalidity(f: _FolderDef) -> int:
        return stable_uidvalidity(f.key)

    def _years(self, p: Principal) -> list[tuple[str, int]]:
        """(inbox|sent, year) of every year in which this principal has live mail."""
        if not p.addresses:
            return []
        year = func.extract("year", Message.received_at)
        out: set[tuple[str, int]] = set()
        with self.meta.session() as s:
            for kind, roles in (("inbox", _RECIPIENT_ROLES), ("sent", _SENDER_ROLES)):
                q = (select(year).distinct()
                     .join(Participant, Message.id == Participant.message_pk)
                     .where(Participant.address.in_(sorted(p.addresses)),
                            Participant.role.in_(roles), Message.expired_at.is_(None)))
                out.update((kind, int(y)) for y in s.scalars(q) if y is not None)
        return sorted(out)

    def _member_pks(self, p: Principal, f: _FolderDef) -> list[int]:
        """The archive ids in a folder for this principal, ascending (arrival order).

        A message the gateway changed is archived twice (as received and as sent, or
        as received encrypted and decrypted; archive.metadata): a folder lists it once,
        as its readable copy, like ``coffer search``; the other copy stays reachable
        through ``coffer show`` and exports.
        """
        live = and_(Message.expired_at.is_(None),
                    Message.copy.not_in(sorted(SECONDARY_COPIES)))
        with self.meta.session() as s:
            if f.kind in ("inbox", "sent"):
                if not p.addresses:
                    return []
                roles = _RECIPIENT_ROLES if f.kind == "inbox" else _SENDER_ROLES
                q = (select(Participant.message_pk).distinct()
                     .join(Message, Message.id == Participant.message_pk)
                     .where(Participant.address.in_(sorted(p.addresses)),
                            Participant.role.in_(roles), live))
                if f.arg:  # INBOX/<year>, Sent/<year>: archived in that year (UTC)
                    y = int(f.arg)
                    q = q.where(Message.received_at >= datetime(y, 1, 1, tzinfo=UTC),
                                Message.received_at < datetime(y + 1, 1, 1, tzinfo=UTC))
            elif f.kind == "all":
                q = select(Message.id).where(live)
            elif f.kind == "domain":
                q = (select(Participant.message_pk).distinct()
                     .join(Message, Message.id == Participant.message_pk)
                     .where(Participant.address.like(f"%@{f.arg}"), live))
            elif f.kind == "hold":
                q = (select(HoldItem.message_pk).join(Hold, Hold.id == HoldItem.hold_id)
                     .join(Message, Message.id == HoldItem.message_pk)
                     .where(Hold.case == f.arg, Hold.released_at.is_(None), live))
            else:
                assert self.index is not None
                ids = Searcher(self.meta, self.index).message_ids(f.arg)
                q = select(Message.id).where(self.meta.ids_condition(Message.id, ids), live)
            return sorted(set(s.scalars(q)))

    def _listing(self, p: Principal, f: _FolderDef) -> list[tuple[int, int]]:
        pks = self._member_pks(p, f)
        if f.kind == "all":
            return [(pk, pk) for pk in pks]
        return self.accounts.assign_uids(f.key, self._uidvalidity(f), pks)

    def messages(self, principal: Principal, mailbox: str) -> list[MessageInfo]:
        f = self._folder(principal, mailbox)
        listing = self._listing(principal, f)
        rows: dict[int, tuple[Any, str, int]] = {}
        sizes: dict[str, int] = {}
        pks = [pk for _, pk in listing]
        with self.meta.session() as s:
            for i in range(0, len(pks), 5000):
                chunk = pks[i:i + 5000]
                for pk, received, sha, blob_id, size in s.execute(
                        select(Message.id, Message.received_at, Message.sha256, Message.blob_id,
                               Message.crlf_size)
                        .where(self.meta.ids_condition(Message.id, chunk))):
                    rows[pk] = (received, sha, blob_id)
                    if size is not None:
                        sizes[sha] = size
        sizes.update(self._unrecorded_sizes({r[1] for r in rows.values()} - sizes.keys()))
        flags = self.accounts.flags(principal.name, f.key)
        view: dict[int, _Entry] = {}
        out = []
        for uid, pk in listing:
            row = rows.get(pk)
            if row is None:
                continue
            received, sha, blob_id = row
            view[uid] = _Entry(pk, sha, blob_id)
            out.append(MessageInfo(uid, received, sizes[sha], flags.get(uid, frozenset())))
        with self._lock:
            self._views[(principal.name, mailbox)] = view
        return out

    def _unrecorded_sizes(self, shas: set[str]) -> dict[str, int]:
        """RFC822.SIZE of blobs whose rows have none (archived before migration 0003):
        from the account database's cache, else measured from the blob and cached.

        The cache, not the metadata row, takes the measured size: the IMAP server only
        reads the metadata database, whose writers (the archive stage, the importer,
        the rebuild) stay the gateway's; and the cache is already there for such rows.
        """
        if not shas:
            return {}
        sizes = self.accounts.crlf_sizes(shas)
        missing = shas - sizes.keys()
        if missing:
            computed = {sha: len(to_crlf(self.blobs.get(sha))) for sha in missing}
            self.accounts.set_crlf_sizes(computed)
            sizes.update(computed)
        return sizes

    def _entry(self, p: Principal, mailbox: str, uid: int) -> _Entry:
        with self._lock:
            e = self._views.get((p.name, mailbox), {}).get(uid)
        if e is None:
            raise MailboxError(f"{mailbox}: no UID {uid}")
        return e

    def fetch_raw(self, principal: Principal, mailbox: str, uid: int) -> bytes:
        return self.blobs.get(self._entry(principal, mailbox, uid).sha256)

    def text_search(self, principal: Principal, mailbox: str, query: str,
                    body_only: bool) -> set[int] | None:
        if self.index is None:
            return None
        words = query.split()
        if not words:
            return None
        term = Term("body" if body_only else "text", " ".join(words), phrase=len(words) > 1)
        blob_ids = set(self.index.search(term))
        with self._lock:
            view = dict(self._views.get((principal.name, mailbox), {}))
        return {uid for uid, e in view.items() if e.blob_id in blob_ids}

    def set_flags(self, principal: Principal, mailbox: str, uid: int,
                  flags: frozenset[str]) -> None:
        f = self._folder(principal, mailbox)
        self._entry(principal, mailbox, uid)
        self.accounts.set_flags(principal.name, f.key, uid, flags & PERMANENT_FLAGS)

    def audit(self, principal: Principal, action: str, detail: dict[str, object]) -> None:
        query = detail.get("query")
        count = detail.get("count", detail.get("messages"))
        audit(self.meta, principal.name, action,
              query=str(query) if query is not None else None,
              result_count=int(count) if isinstance(count, int) else None,
              target=str(detail.get("mailbox", ""))[:255] or None,
              detail={k: v for k, v in detail.items() if k != "query"},
              hooks=self.audit_hooks)

    def watch(self, principal: Principal, mailbox: str,
              callback: Callable[[], None]) -> Unsubscribe:
        """Wake IDLE sessions when the archive grows: a shared poller thread reads the
        highest archive id every ``poll_interval`` seconds (cheap: the primary key), and
        :meth:`notify` (an in-process archive stage) wakes them at once.  Removals
        (expiry) are found by the server's periodic re-listing."""
        with self._lock:
            self._watchers.append(callback)
            if self._poller is None and self.poll_interval > 0:
                self._stop.clear()
                self._poller = threading.Thread(target=self._poll, name="imap-archive-poll",
                                                daemon=True)
                self._poller.start()

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._watchers:
                    self._watchers.remove(callback)

        return unsubscribe

    def _max_id(self) -> int:
        with self.meta.session() as s:
            return int(s.scalar(select(func.max(Message.id))) or 0)

    def _poll(self) -> None:
        last = self._max_id()
        while not self._stop.wait(self.poll_interval):
            try:
                current = self._max_id()
            except Exception:  # a database hiccup: try again next time
                continue
            if current != last:
                last = current
                self.notify()

    def notify(self) -> None:
        with self._lock:
            callbacks = list(self._watchers)
        for cb in callbacks:
            cb()

    def close(self) -> None:
        """Stop the poller thread (the databases and store belong to the caller)."""
        self._stop.set()
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.join(5)
