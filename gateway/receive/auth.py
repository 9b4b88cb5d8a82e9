"""SMTP AUTH credentials: ``user:$argon2id$...`` lines in ``auth.passwd_file``.

The file is read at start-up (a mistake there is a ConfigError naming file and
line) and re-read when it changes (modification time, size or inode), so ``coffer
smtp-users add|passwd|remove`` takes effect without a restart; a broken re-read keeps the
previous users and is logged.

Verifying an argon2 hash costs tens of milliseconds of CPU on purpose: callers
run :meth:`PasswordFile.verify` in an executor, never on the event loop.  An
unknown user is verified against a dummy hash so that its reply takes as long
as a wrong password (no user enumeration by timing).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError

from gateway import log
from gateway.errors import ConfigError

_HASHER = PasswordHasher()


def hash_password(password: str, hasher: PasswordHasher | None = None) -> str:
    """An argon2id hash of ``password`` for a ``user:hash`` line of the passwd file.

    The default costs are argon2-cffi's (RFC 9106 "low memory" profile); tests
    pass a cheap ``hasher``.  Verification reads the costs from the hash itself.
    """
    return (hasher or _HASHER).hash(password)


def parse_passwd(text: str, file: str) -> dict[str, str]:
    """``user:hash`` lines (``#`` comments, blank lines) -> {user: hash}."""
    users: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.rpartition(":")
        if not sep or not user:
            raise ConfigError("expected 'user:argon2-hash'", file=file, line=lineno)
        if not hashed.startswith("$argon2"):
            raise ConfigError(
                f"user {user!r}: not an argon2 hash (make one with `coffer smtp-users passwd`)",
                file=file, line=lineno,
            )
        if user in users:
            raise ConfigError(f"user {user!r} is listed twice", file=file, line=lineno)
        users[user] = hashed
    return users


class PasswordFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime = self._stat()
        self._users = self._read()
        self._dummy: str | None = None

    def _stat(self) -> tuple[int, int, int]:
        # Size and inode too: two writes within one clock tick share an mtime.
        try:
            st = os.stat(self.path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", file=str(self.path)) from None

    def _read(self) -> dict[str, str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read: {exc}", file=str(self.path)) from None
        return parse_passwd(text, str(self.path))

    def _maybe_reload(self) -> None:
        with self._lock:
            try:
                mtime = self._stat()
                if mtime != self._mtime:
                    self._users, self._mtime = self._read(), mtime
                    log.event("passwd_reloaded", file=str(self.path), users=len(self._users))
            except ConfigError as exc:
                log.event("passwd_reload_failed", error=str(exc))

    @property
    def users(self) -> frozenset[str]:
        return frozenset(self._users)

    def _make_dummy(self) -> str:
        # Same costs as the real hashes, so an unknown user takes as long as a known one.
        hasher = _HASHER
        for hashed in self._users.values():
            try:
                hasher = PasswordHasher.from_parameters(extract_parameters(hashed))
                break
            except (InvalidHashError, ValueError):
                continue
        return hasher.hash("not a password: equalises timing")

    def verify(self, user: str, password: str) -> bool:
        """Whether ``password`` is ``user``'s.  Blocking (argon2): run it in an executor."""
        self._maybe_reload()
        hashed = self._users.get(user)
        if hashed is None:
            if self._dummy is None:
                self._dummy = self._make_dummy()
            hashed, ok_if_match = self._dummy, False
        else:
            ok_if_match = True
        try:
            return _HASHER.verify(hashed, password) and ok_if_match
        except (VerificationError, InvalidHashError):
            return False
