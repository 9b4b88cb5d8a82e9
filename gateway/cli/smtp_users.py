"""``coffer smtp-users``: the SMTP AUTH users of ``auth.passwd_file``.

    coffer smtp-users add NAME [--password-stdin] [--config FILE | --file PATH]
    coffer smtp-users passwd NAME [--password-stdin] [...]
    coffer smtp-users remove NAME [...]
    coffer smtp-users list [--json] [...]

The file holds ``user:$argon2id$...`` lines (gateway.receive.auth); this command
is how they are made.  Every change rewrites the file atomically: the new text is
written to a temporary file in the same directory, fsynced, renamed over the old
one and the directory fsynced, so a crash leaves the old file or the new one,
never half of either, and a running ``coffer serve`` (which re-reads the file
when it changes) never sees a partial file.  Concurrent edits are serialised by
an ``flock`` on ``FILE.lock``.  Comments and the order of the other lines are
kept.  A new file is created with mode 0600 (it holds password hashes).

IMAP accounts of the archive are a different thing: ``coffer users``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway import config
from gateway.cli.users import read_password
from gateway.errors import CofferError, ConfigError
from gateway.receive.auth import hash_password, parse_passwd

EXIT_OK = 0

# parse_passwd splits at the last ':', and '#' starts a comment line.
_NAME = re.compile(r"^[^\s:#][^\s:]{0,254}$")


def register(sub: Any) -> None:
    top = sub.add_parser("smtp-users", help="SMTP AUTH users (auth.passwd_file)",
                         description="Add, change, remove and list the users who may "
                         "authenticate to the SMTP submission listeners.")
    cmds = top.add_subparsers(dest="smtp_users_command", metavar="COMMAND")
    cmds.required = True

    def common(p: argparse.ArgumentParser) -> None:
        where = p.add_mutually_exclusive_group()
        where.add_argument("--config", metavar="FILE",
                           help="configuration whose auth.passwd_file to edit (default: "
                           "$COFFER_CONFIG, else ./coffer.yaml)")
        where.add_argument("--file", metavar="PATH", help="edit this password file instead")

    for verb, helptext in (("add", "add a user"), ("passwd", "set a user's password")):
        p = cmds.add_parser(verb, help=helptext)
        p.add_argument("name")
        p.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of stdin")
        common(p)
        p.set_defaults(func=run_add if verb == "add" else run_passwd)

    p = cmds.add_parser("remove", help="remove a user")
    p.add_argument("name")
    common(p)
    p.set_defaults(func=run_remove)

    p = cmds.add_parser("list", help="list the users (never their hashes)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    common(p)
    p.set_defaults(func=run_list)


def passwd_path(args: argparse.Namespace) -> Path:
    """--file, else the configuration's ``auth.passwd_file`` (relative to data_dir)."""
    if getattr(args, "file", None):
        return Path(args.file)
    cfg_path = config.find_config(getattr(args, "config", None))
    if not cfg_path.exists():
        raise ConfigError("no such configuration file (give --config FILE or --file PATH)",
                          file=str(cfg_path))
    cfg = config.load(cfg_path)
    if cfg.auth.passwd_file is None:
        raise ConfigError("auth.passwd_file is not set: set it (e.g. passwd_file: passwd), "
                          "then run this again", file=str(cfg_path), key="auth.passwd_file")
    return cfg.path(cfg.auth.passwd_file)


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"{name!r} is not a user name (no spaces or ':', not starting "
                          "with '#', at most 255 characters)")
    return name


def _read(path: Path) -> tuple[list[str], dict[str, str]]:
    """The file's lines and its users (validated: a broken file is not edited)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=str(path)) from None
    return text.splitlines(), parse_passwd(text, str(path))


def _user_of(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    return stripped.rpartition(":")[0]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_atomically(path: Path, lines: list[str]) -> None:
    """Replace ``path`` by ``lines``: temp file, fsync, rename, fsync the directory."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # the rename itself survives a crash
    finally:
        os.close(dfd)


def _set(args: argparse.Namespace, *, new: bool) -> int:
    name = _check_name(args.name)
    password = read_password(args)
    if not password:
        raise ConfigError("the password is empty")
    path = passwd_path(args)
    hashed = hash_password(password)  # tens of ms of argon2: outside the lock
    with _locked(path):
        lines, users = _read(path)
        if new and name in users:
            raise CofferError(f"{path}: user {name!r} exists (use `coffer smtp-users passwd`)")
        if not new and name not in users:
            raise CofferError(f"{path}: no user {name!r}")
        if new:
            lines.append(f"{name}:{hashed}")
        else:
            lines = [f"{name}:{hashed}" if _user_of(ln) == name else ln for ln in lines]
        write_atomically(path, lines)
    print(f"{'added' if new else 'changed the password of'} {name} in {path}", file=sys.stderr)
    return EXIT_OK


def run_add(args: argparse.Namespace) -> int:
    return _set(args, new=True)


def run_passwd(args: argparse.Namespace) -> int:
    return _set(args, new=False)


def run_remove(args: argparse.Namespace) -> int:
    path = passwd_path(args)
    with _locked(path):
        lines, users = _read(path)
        if args.name not in users:
            raise CofferError(f"{path}: no user {args.name!r}")
        write_atomically(path, [ln for ln in lines if _user_of(ln) != args.name])
    print(f"removed {args.name} from {path}", file=sys.stderr)
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    path = passwd_path(args)
    _, users = _read(path)
    for name in users:
        print(json.dumps({"user": name}) if args.json else name)
    return EXIT_OK
