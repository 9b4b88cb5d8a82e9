"""IMAP accounts (users, officers, admins with argon2id hashes) and IMAP-only state.

Where it lives: a database of its own, by default ``DATA_DIR/archive/imap.db``
(SQLite), or any SQLAlchemy URL (the shared PostgreSQL database in a multi-node
setup; the tables are all prefixed ``imap_``).  The archive metadata schema is owned
by its Alembic migrations and compared against them in tests, so this module does
not add tables to it; nothing here is evidence (the archive's store and ledger are),
only access control and per-user view state:

    imap_users ──< imap_addresses       who logs in, role, the addresses that are theirs
    imap_folder_uids                    stable per-folder UIDs (folder, uid) -> message id
    imap_folders                        UIDVALIDITY and the next UID of each folder
    imap_flags                          private \\Seen / \\Flagged per user, folder, uid
    imap_saved_searches                 officers' virtual folders (archive query language)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from archive.imap.backend import Principal
from archive.imap.errors import AccountError
from archive.imap.upstream import Upstream
from archive.metadata import safe_url

__all__ = ["ROLES", "AccountInfo", "Accounts", "Provisioning"]

ROLES = ("user", "officer", "admin")
_NAME_RE = re.compile(r"[A-Za-z0-9._@+-]{1,255}")
_ADDR_RE = re.compile(r"[^@\s]+@[^@\s]+")


class _Base(DeclarativeBase):
    pass


class User(_Base):
    __tablename__ = "imap_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Address(_Base):
    __tablename__ = "imap_addresses"

    user_id: Mapped[int] = mapped_column(ForeignKey("imap_users.id", ondelete="CASCADE"),
                                         primary_key=True)
    address: Mapped[str] = mapped_column(String(320), primary_key=True)  # lower-cased


class FolderUid(_Base):
    __tablename__ = "imap_folder_uids"

    folder: Mapped[str] = mapped_column(String(400), primary_key=True)
    uid: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    message_pk: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (UniqueConstraint("folder", "message_pk"),)


class Folder(_Base):
    __tablename__ = "imap_folders"

    folder: Mapped[str] = mapped_column(String(400), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    next_uid: Mapped[int] = mapped_column(BigInteger, default=1)
    last_message_pk: Mapped[int] = mapped_column(BigInteger, default=0)


class Flag(_Base):
    __tablename__ = "imap_flags"

    user: Mapped[str] = mapped_column(String(255), primary_key=True)
    folder: Mapped[str] = mapped_column(String(400), primary_key=True)
    uid: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    flags: Mapped[str] = mapped_column(String(64))  # space separated


class CrlfSize(_Base):
    """RFC822.SIZE of a blob: its length with bare LF served as CRLF (computed once)."""

    __tablename__ = "imap_sizes"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)


class SavedSearch(_Base):
    __tablename__ = "imap_saved_searches"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    query: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime)


def _insert_ignore(dialect: str, model: type[_Base]) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING (two sessions may cache the same value)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(model).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(model).on_conflict_do_nothing()


# The password hash of an account created for an upstream-authenticated name: not an
# argon2 hash, so it never verifies locally (argon2 raises InvalidHashError).
UPSTREAM_ONLY = "!upstream"


@dataclass(frozen=True, slots=True)
class Provisioning:
    """Create a ``user`` account for an upstream-authenticated name with no local one.

    ``address``: the address template of the new account, ``{user}`` being the name
    (``{user}@corp.example``); a name that already is an address may use ``{user}``."""

    address: str


@dataclass(frozen=True, slots=True)
class AccountInfo:
    name: str
    role: str
    addresses: tuple[str, ...]
    disabled: bool

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "role": self.role, "addresses": list(self.addresses),
                "disabled": self.disabled}


class Accounts:
    """Accounts and IMAP view state in their own database (see the module docstring)."""

    def __init__(self, url: str, hasher: PasswordHasher | None = None,
                 schema: str | None = None, upstream: Upstream | None = None,
                 provisioning: Provisioning | None = None) -> None:
        self.url = url
        self.hasher = hasher or PasswordHasher()
        self.upstream = upstream
        self.provisioning = provisioning
        connect_args: dict[str, Any] = {}
        if url.startswith("postgresql") and schema:
            connect_args["options"] = f"-csearch_path={schema}"  # as archive.metadata
        try:
            self.engine = create_engine(url, connect_args=connect_args)
            with self.engine.begin() as conn:
                if self.engine.dialect.name == "postgresql":
                    # Several nodes start at once: CREATE TABLE's existence check is not
                    # atomic against a concurrent create; one node creates, the rest wait.
                    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"),
                                 {"k": "coffer-imap-accounts"})
                _Base.metadata.create_all(conn)
        except Exception as exc:
            raise AccountError(f"cannot open the IMAP account database {safe_url(url)!r}: "
                               f"{str(exc).splitlines()[0]}") from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Verifying an unknown user costs as much as a known one (no user enumeration).
        self._dummy = self.hasher.hash("coffer-dummy-password")

    @classmethod
    def for_data_dir(cls, data_dir: Path | str, hasher: PasswordHasher | None = None,
                     upstream: Upstream | None = None,
                     provisioning: Provisioning | None = None) -> Accounts:
        path = Path(data_dir) / "archive" / "imap.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{path}", hasher, upstream=upstream, provisioning=provisioning)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    # -- accounts --

    @staticmethod
    def _check(name: str, role: str | None, addresses: Iterable[str]) -> list[str]:
        if not _NAME_RE.fullmatch(name):
            raise AccountError(f"invalid user name {name!r} (letters, digits, . _ @ + -)")
        if role is not None and role not in ROLES:
            raise AccountError(f"invalid role {role!r} (one of {', '.join(ROLES)})")
        out = []
        for a in addresses:
            if not _ADDR_RE.fullmatch(a):
                raise AccountError(f"invalid address {a!r}")
            out.append(a.lower())
        return out

    def _get(self, s: Session, name: str) -> User:
        user = s.scalar(select(User).where(User.name == name))
        if user is None:
            raise AccountError(f"no such user {name!r}")
        return user

    def add(self, name: str, role: str, password: str, addresses: Iterable[str] = ()) -> None:
        addrs = self._check(name, role, addresses)
        if not password:
            raise AccountError("empty password")
        with self.session() as s:
            if s.scalar(select(User.id).where(User.name == name)) is not None:
                raise AccountError(f"user {name!r} already exists")
            user = User(name=name, role=role, password_hash=self.hasher.hash(password),
                        disabled=False, created_at=datetime.now(UTC).replace(tzinfo=None))
            s.add(user)
            s.flush()
            s.add_all(Address(user_id=user.id, address=a) for a in dict.fromkeys(addrs))

    def passwd(self, name: str, password: str) -> None:
        if not password:
            raise AccountError("empty password")
        with self.session() as s:
            self._get(s, name).password_hash = self.hasher.hash(password)

    def set_role(self, name: str, role: str) -> None:
        self._check(name, role, ())
        with self.session() as s:
            self._get(s, name).role = role

    def set_disabled(self, name: str, disabled: bool = True) -> None:
        with self.session() as s:
            self._get(s, name).disabled = disabled

    def add_addresses(self, name: str, addresses: Iterable[str]) -> None:
        addrs = self._check(name, None, addresses)
        with self.session() as s:
            user = self._get(s, name)
            have = set(s.scalars(select(Address.address).where(Address.user_id == user.id)))
            s.add_all(Address(user_id=user.id, address=a) for a in dict.fromkeys(addrs)
                      if a not in have)

    def all(self) -> list[AccountInfo]:
        with self.session() as s:
            users = list(s.scalars(select(User).order_by(User.name)))
            addrs: dict[int, list[str]] = {}
            for uid, a in s.execute(select(Address.user_id, Address.address)
                                    .order_by(Address.address)):
                addrs.setdefault(uid, []).append(a)
        return [AccountInfo(u.name, u.role, tuple(addrs.get(u.id, ())), u.disabled)
                for u in users]

    def _lookup(self, name: str) -> tuple[User | None, tuple[str, ...]]:
        with self.session() as s:
            user = s.scalar(select(User).where(User.name == name))
            addrs = () if user is None else tuple(s.scalars(
                select(Address.address).where(Address.user_id == user.id)))
        return user, addrs

    def _verify(self, hashed: str, password: str) -> bool:
        try:
            return bool(self.hasher.verify(hashed, password))
        except (VerificationError, InvalidHashError):
            return False

    def authenticate(self, name: str, password: str) -> Principal | None:
        """The principal, or None (unknown, disabled, or wrong password).  Blocking.

        With an upstream server, an account's local password (one set with ``coffer
        users add/passwd``) is tried first, like a first passdb; otherwise the upstream
        decides, and raises UpstreamUnavailable when it cannot be asked.  Who the
        principal is (role, addresses) always comes from this database: an
        upstream-authenticated name without a local account is refused, or created as
        a ``user`` when provisioning is configured.
        """
        user, addrs = self._lookup(name)
        hashed = user.password_hash if user is not None else self._dummy
        if self.upstream is None or hashed != UPSTREAM_ONLY:
            ok = self._verify(hashed, password)
            if user is not None and ok:
                return None if user.disabled else Principal(user.name, user.role,
                                                            frozenset(addrs))
            if self.upstream is None:
                return None
        assert self.upstream is not None
        if user is not None and user.disabled:
            return None
        if not self.upstream.check(name, password):
            return None
        if user is None and self.provisioning is not None:
            user, addrs = self._provision(name)
        if user is None:
            return None
        return Principal(user.name, user.role, frozenset(addrs))

    def _provision(self, name: str) -> tuple[User | None, tuple[str, ...]]:
        """Create ``name`` as a user with its templated address (a concurrent login may
        have created it first: both inserts ignore a conflict)."""
        assert self.provisioning is not None
        try:
            addrs = self._check(name, "user", [self.provisioning.address.replace("{user}",
                                                                                name)])
        except AccountError:
            return None, ()  # a name that cannot be an account here is not let in
        dialect = self.engine.dialect.name
        with self.session() as s:
            s.execute(_insert_ignore(dialect, User).values(
                name=name, role="user", password_hash=UPSTREAM_ONLY, disabled=False,
                created_at=datetime.now(UTC).replace(tzinfo=None)))
            uid = s.scalar(select(User.id).where(User.name == name))
            s.execute(_insert_ignore(dialect, Address).values(user_id=uid, address=addrs[0]))
        return self._lookup(name)

    # -- saved searches --

    def save_search(self, name: str, query: str, who: str) -> None:
        with self.session() as s:
            s.merge(SavedSearch(name=name, query=query, created_by=who,
                                created_at=datetime.now(UTC).replace(tzinfo=None)))

    def saved_searches(self) -> list[tuple[str, str]]:
        with self.session() as s:
            return [(r.name, r.query) for r in s.scalars(select(SavedSearch)
                                                        .order_by(SavedSearch.name))]

    def delete_search(self, name: str) -> None:
        with self.session() as s:
            s.execute(delete(SavedSearch).where(SavedSearch.name == name))

    # -- folder UIDs and flags --

    def folder_state(self, folder: str, uidvalidity: int) -> tuple[int, int, int]:
        """(uidvalidity, next_uid, last_message_pk) of a folder, creating it."""
        with self.session() as s:
            f = s.get(Folder, folder)
            if f is None:
                f = Folder(folder=folder, uidvalidity=uidvalidity, next_uid=1,
                           last_message_pk=0)
                s.add(f)
            return f.uidvalidity, f.next_uid, f.last_message_pk

    def assign_uids(self, folder: str, uidvalidity: int,
                    message_pks: Iterable[int]) -> list[tuple[int, int]]:
        """Give every message of the folder a UID (new ones after all existing ones, in
        the order given: arrival order), and return (uid, message_pk) ascending by UID.

        RFC 3501 §2.3.1.1: UIDs are strictly ascending in the order messages arrive in
        the folder, so a message that becomes visible later (an address added to a
        user, a hold placed on old mail) gets a new, higher UID, never an old gap.
        """
        wanted = list(dict.fromkeys(message_pks))
        with self.session() as s:
            f = s.get(Folder, folder, with_for_update=True)
            if f is None:
                f = Folder(folder=folder, uidvalidity=uidvalidity, next_uid=1,
                           last_message_pk=0)
                s.add(f)
                s.flush()
            have = {pk: uid for uid, pk in s.execute(
                select(FolderUid.uid, FolderUid.message_pk).where(FolderUid.folder == folder))}
            fresh = [pk for pk in wanted if pk not in have]
            if fresh:
                rows = []
                for pk in fresh:
                    have[pk] = f.next_uid
                    rows.append({"folder": folder, "uid": f.next_uid, "message_pk": pk})
                    f.next_uid += 1
                s.execute(insert(FolderUid), rows)
                f.last_message_pk = max(f.last_message_pk, *fresh)
            keep = set(wanted)
            return sorted((uid, pk) for pk, uid in have.items() if pk in keep)

    def flags(self, user: str, folder: str) -> dict[int, frozenset[str]]:
        with self.session() as s:
            return {uid: frozenset(fl.split()) for uid, fl in s.execute(
                select(Flag.uid, Flag.flags).where(Flag.user == user, Flag.folder == folder))}

    def set_flags(self, user: str, folder: str, uid: int, flags: frozenset[str]) -> None:
        with self.session() as s:
            if flags:
                s.merge(Flag(user=user, folder=folder, uid=uid, flags=" ".join(sorted(flags))))
            else:
                s.execute(delete(Flag).where(Flag.user == user, Flag.folder == folder,
                                             Flag.uid == uid))

    def crlf_sizes(self, shas: Iterable[str]) -> dict[str, int]:
        wanted = list(dict.fromkeys(shas))
        out: dict[str, int] = {}
        with self.session() as s:
            for i in range(0, len(wanted), 500):
                for sha, size in s.execute(select(CrlfSize.sha256, CrlfSize.size)
                                           .where(CrlfSize.sha256.in_(wanted[i:i + 500]))):
                    out[sha] = size
        return out

    def set_crlf_sizes(self, sizes: dict[str, int]) -> None:
        if not sizes:
            return
        with self.session() as s:
            s.execute(_insert_ignore(self.engine.dialect.name, CrlfSize),
                      [{"sha256": k, "size": v} for k, v in sizes.items()])

    def count_users(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(User)) or 0)
