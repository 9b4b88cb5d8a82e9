"""The mailbox backend: the one port between the IMAP protocol and what it serves.

The server (archive.imap.server) speaks IMAP and knows nothing of the archive; a
backend knows who may log in, which folders a principal sees, which messages
are in them and their bytes, and keeps per-user flags.  Two adapters:

* :class:`MemoryBackend` here: a complete in-memory implementation (accounts,
  folders, UIDs, private flags, notifications), used by the protocol tests and
  the Dovecot differential test;
* ``archive.imap.archive_backend.ArchiveBackend``: the archive's metadata,
  blob store and audit log.

Backends are synchronous; the server calls methods of a ``blocking`` backend in a
worker thread.  UIDs are stable and strictly ascending within a folder for a given
UIDVALIDITY (RFC 3501 §2.3.1.1).
"""

from __future__ import annotations

import hmac
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from archive.imap.errors import MailboxError
from archive.imap.render import parse_message, to_crlf

__all__ = [
    "PERMANENT_FLAGS",
    "Backend",
    "MailboxInfo",
    "MemoryBackend",
    "MessageInfo",
    "Principal",
]

# The archive is immutable: only these two flags are kept, per user (RFC 3501 §2.3.2).
PERMANENT_FLAGS = frozenset({"\\Seen", "\\Flagged"})


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated account."""

    name: str
    role: str = "user"  # user | officer | admin
    addresses: frozenset[str] = frozenset()

    @property
    def is_officer(self) -> bool:
        return self.role in ("officer", "admin")


@dataclass(frozen=True, slots=True)
class MailboxInfo:
    name: str  # hierarchy separator "/"
    attributes: tuple[str, ...]  # e.g. ("\\Sent",) RFC 6154; ("\\Noselect",)
    uidvalidity: int


@dataclass(frozen=True, slots=True)
class MessageInfo:
    uid: int
    internaldate: datetime
    size: int  # RFC822.SIZE: the CRLF length of BODY[]
    flags: frozenset[str] = frozenset()


Unsubscribe = Callable[[], None]


@runtime_checkable
class Backend(Protocol):
    """What the IMAP server needs from a mail store."""

    blocking: bool  # True: call from a worker thread (database / disk I/O)

    def authenticate(self, user: str, password: str) -> Principal | None: ...

    def mailboxes(self, principal: Principal) -> list[MailboxInfo]: ...

    def messages(self, principal: Principal, mailbox: str) -> list[MessageInfo]:
        """Ascending by UID.  Raises MailboxError when the principal has no such folder."""
        ...

    def fetch_raw(self, principal: Principal, mailbox: str, uid: int) -> bytes:
        """The exact original bytes.  Raises MailboxError if not in that folder."""
        ...

    def text_search(self, principal: Principal, mailbox: str, query: str,
                    body_only: bool) -> set[int] | None:
        """UIDs matching SEARCH TEXT/BODY from a full-text index, or None: scan yourself."""
        ...

    def set_flags(self, principal: Principal, mailbox: str, uid: int,
                  flags: frozenset[str]) -> None:
        """Per-user private flags (only PERMANENT_FLAGS are kept)."""
        ...

    def audit(self, principal: Principal, action: str, detail: dict[str, object]) -> None: ...

    def watch(self, principal: Principal, mailbox: str,
              callback: Callable[[], None]) -> Unsubscribe:
        """Call *callback* (from any thread) when the folder may have changed."""
        ...


def stable_uidvalidity(name: str, epoch: int = 1) -> int:
    """A UIDVALIDITY that stays the same for a folder name (RFC 3501 §2.3.1.1: non-zero)."""
    return (zlib.crc32(f"{epoch}:{name}".encode()) & 0x7FFFFFFF) or 1


# -- in memory --------------------------------------------------------------------------


@dataclass
class _Folder:
    name: str
    attributes: tuple[str, ...]
    uidvalidity: int
    owners: set[str]  # principals who see it ("*" = officers)
    messages: list[tuple[MessageInfo, bytes]] = field(default_factory=list)
    next_uid: int = 1


class MemoryBackend:
    """A real, in-memory implementation of :class:`Backend`.

    Accounts have plain passwords (tests only); each folder lists who may see it;
    flags are kept per (user, folder, uid).  ``add_message`` appends with the next
    UID and wakes IDLE sessions.
    """

    blocking = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, tuple[str, Principal]] = {}
        self._folders: dict[tuple[str, str], _Folder] = {}  # (owner, name)
        self._flags: dict[tuple[str, str, int], frozenset[str]] = {}
        self._watchers: dict[tuple[str, str], list[Callable[[], None]]] = {}
        self.audit_log: list[tuple[str, str, dict[str, object]]] = []
        self.fulltext = False  # when True, text_search answers (a naive index)

    # -- administration --

    def add_account(self, name: str, password: str, role: str = "user",
                    addresses: tuple[str, ...] = ()) -> Principal:
        p = Principal(name, role, frozenset(a.lower() for a in addresses))
        with self._lock:
            self._accounts[name] = (password, p)
        for folder, attrs in (("INBOX", ()), ("Sent", ("\\Sent",))):
            self.add_folder(name, folder, attrs)
        return p

    def add_folder(self, owner: str, name: str, attributes: tuple[str, ...] = (),
                   uidvalidity: int | None = None) -> None:
        with self._lock:
            self._folders.setdefault((owner, name), _Folder(
                name, attributes, uidvalidity or stable_uidvalidity(f"{owner}/{name}"),
                {owner}))

    def add_message(self, owner: str, folder: str, raw: bytes,
                    internaldate: datetime | None = None,
                    flags: frozenset[str] = frozenset()) -> int:
        with self._lock:
            f = self._folders[(owner, folder)]
            uid = f.next_uid
            f.next_uid += 1
            when = internaldate or datetime.now(UTC).replace(microsecond=0)
            f.messages.append((MessageInfo(uid, when, len(to_crlf(raw))), raw))
            if flags:
                self._flags[(owner, folder, uid)] = flags & PERMANENT_FLAGS
            callbacks = list(self._watchers.get((owner, folder), ()))
        for cb in callbacks:
            cb()
        return uid

    # -- Backend --

    def authenticate(self, user: str, password: str) -> Principal | None:
        with self._lock:
            entry = self._accounts.get(user)
        if entry is None or not hmac.compare_digest(entry[0].encode(), password.encode()):
            return None
        return entry[1]

    def _folder(self, principal: Principal, mailbox: str) -> _Folder:
        f = self._folders.get((principal.name, mailbox))
        if f is None:
            raise MailboxError(mailbox)
        return f

    def mailboxes(self, principal: Principal) -> list[MailboxInfo]:
        with self._lock:
            return [MailboxInfo(f.name, f.attributes, f.uidvalidity)
                    for (owner, _), f in self._folders.items() if owner == principal.name]

    def messages(self, principal: Principal, mailbox: str) -> list[MessageInfo]:
        with self._lock:
            f = self._folder(principal, mailbox)
            out = []
            for info, _ in f.messages:
                flags = self._flags.get((principal.name, mailbox, info.uid), frozenset())
                out.append(MessageInfo(info.uid, info.internaldate, info.size, flags))
            return out

    def fetch_raw(self, principal: Principal, mailbox: str, uid: int) -> bytes:
        with self._lock:
            f = self._folder(principal, mailbox)
            for info, raw in f.messages:
                if info.uid == uid:
                    return raw
        raise MailboxError(f"{mailbox}: no UID {uid}")

    def text_search(self, principal: Principal, mailbox: str, query: str,
                    body_only: bool) -> set[int] | None:
        if not self.fulltext:
            return None
        needle = query.lower().encode()
        with self._lock:
            f = self._folder(principal, mailbox)
            msgs = list(f.messages)
        out = set()
        for info, raw in msgs:
            m = parse_message(raw)
            hay = m.data[m.root.bstart:] if body_only else m.data
            if needle in hay.lower():
                out.add(info.uid)
        return out

    def set_flags(self, principal: Principal, mailbox: str, uid: int,
                  flags: frozenset[str]) -> None:
        with self._lock:
            self._folder(principal, mailbox)
            self._flags[(principal.name, mailbox, uid)] = flags & PERMANENT_FLAGS

    def audit(self, principal: Principal, action: str, detail: dict[str, object]) -> None:
        with self._lock:
            self.audit_log.append((principal.name, action, detail))

    def watch(self, principal: Principal, mailbox: str,
              callback: Callable[[], None]) -> Unsubscribe:
        key = (principal.name, mailbox)
        with self._lock:
            self._watchers.setdefault(key, []).append(callback)

        def unsubscribe() -> None:
            with self._lock:
                cbs = self._watchers.get(key, [])
                if callback in cbs:
                    cbs.remove(callback)

        return unsubscribe
