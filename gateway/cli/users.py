"""``coffer users``: IMAP accounts of the archive (users, officers, admins).

    coffer users add NAME --role user|officer|admin [--address ADDR]... --password-stdin
    coffer users passwd NAME --password-stdin
    coffer users role NAME ROLE
    coffer users disable NAME | enable NAME
    coffer users address NAME ADDR...
    coffer users list [--json]

Every change (add, passwd, role, disable, enable, address) is audited as an officer
action on the archive (archive.audit.record: a row in the archive's metadata database
and an ``audit`` entry in its ledger, refusals included): who may read the archive is
part of what an auditor must be able to reconstruct.  The actor is ``--officer NAME``
(default $USER); the password is never recorded.  The archive is that of --data-dir or
--config (created if the data directory has none yet), so a change needs one of them
even when ``--database`` names the account database.  ``list`` shows no message content
and changes nothing: not audited.

Accounts live in ``--database URL``, else the configuration's ``imap.accounts_database``
(with ``--config FILE`` or $COFFER_CONFIG), else ``DATA_DIR/archive/imap.db``, with argon2id
password hashes; see archive.imap.accounts.  Passwords are read from stdin (one line)
so they never appear in a process listing or shell history; on a terminal without
``--password-stdin`` the password is asked for twice.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from archive.cli_common import add_location_arguments
from archive.imap.accounts import ROLES, Accounts
from gateway.errors import ConfigError

EXIT_OK = 0


def register(sub: Any) -> None:
    users = sub.add_parser("users", help="IMAP accounts: users, officers, admins",
                           description="Manage who can open the archive over IMAP.")
    users_sub = users.add_subparsers(dest="users_command", metavar="COMMAND")
    users_sub.required = True

    def common(p: argparse.ArgumentParser, *, officer: bool = True) -> None:
        add_location_arguments(p)
        p.add_argument("--database", metavar="URL",
                       help="account database URL (default: imap.accounts_database of the "
                       "configuration, else DATA_DIR/archive/imap.db)")
        if officer:
            p.add_argument("--officer", metavar="NAME",
                           help="who is making the change, for the audit log (default $USER)")

    p = users_sub.add_parser("add", help="create an account")
    p.add_argument("name")
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--address", action="append", default=[], metavar="ADDR",
                   help="an address whose mail is this user's (repeatable)")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin")
    common(p)
    p.set_defaults(func=run_add)

    p = users_sub.add_parser("passwd", help="set a new password")
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true")
    common(p)
    p.set_defaults(func=run_passwd)

    p = users_sub.add_parser("role", help="change an account's role")
    p.add_argument("name")
    p.add_argument("role", choices=ROLES)
    common(p)
    p.set_defaults(func=run_role)

    for verb, disabled in (("disable", True), ("enable", False)):
        p = users_sub.add_parser(verb, help=f"{verb} logins of an account")
        p.add_argument("name")
        common(p)
        p.set_defaults(func=run_disable, disabled=disabled)

    p = users_sub.add_parser("address", help="add addresses to an account")
    p.add_argument("name")
    p.add_argument("addresses", nargs="+", metavar="ADDR")
    common(p)
    p.set_defaults(func=run_address)

    p = users_sub.add_parser("list", help="list accounts")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    common(p, officer=False)
    p.set_defaults(func=run_list)


def open_accounts(args: argparse.Namespace) -> Accounts:
    from archive.imap.cli import open_accounts as open_from_args

    accounts: Accounts = open_from_args(args, getattr(args, "database", None))
    return accounts


def read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        return password[:-1] if password.endswith("\r") else password
    if not sys.stdin.isatty():
        raise ConfigError("give --password-stdin to read the password from a pipe")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        raise ConfigError("the passwords do not match")
    return first


@contextmanager
def audited(args: argparse.Namespace, action: str, **detail: Any) -> Iterator[None]:
    """Audit the account change the block makes, or its refusal (then re-raised).

    The archive and its metadata database are opened before the change, so a change
    whose audit could not be written is never made.  ``--database`` here names the
    account database, so the metadata database comes from $COFFER_ARCHIVE_DB or the
    configuration (archive.location).
    """
    from archive.audit import record
    from archive.imap.errors import AccountError
    from archive.location import location_from_args
    from archive.metadata import current_officer

    who = current_officer(args.officer)
    loc = location_from_args(argparse.Namespace(**{**vars(args), "database": None}))
    archive = loc.open_archive(create=True)
    try:
        meta = loc.open_metadata()
        try:
            try:
                yield
            except AccountError as exc:
                record(meta, archive, who, action, target=args.name,
                       detail={**detail, "error": str(exc)})
                raise
            record(meta, archive, who, action, target=args.name, detail=detail or None)
        finally:
            meta.close()
    finally:
        archive.close()


def run_add(args: argparse.Namespace) -> int:
    password = read_password(args)
    with audited(args, "user-add", role=args.role, addresses=list(args.address)):
        accounts = open_accounts(args)
        try:
            accounts.add(args.name, args.role, password, args.address)
        finally:
            accounts.close()
    print(f"added {args.role} {args.name}", file=sys.stderr)
    return EXIT_OK


def run_passwd(args: argparse.Namespace) -> int:
    password = read_password(args)
    with audited(args, "user-passwd"):
        accounts = open_accounts(args)
        try:
            accounts.passwd(args.name, password)
        finally:
            accounts.close()
    return EXIT_OK


def run_role(args: argparse.Namespace) -> int:
    with audited(args, "user-role", role=args.role):
        accounts = open_accounts(args)
        try:
            accounts.set_role(args.name, args.role)
        finally:
            accounts.close()
    return EXIT_OK


def run_disable(args: argparse.Namespace) -> int:
    with audited(args, "user-disable" if args.disabled else "user-enable"):
        accounts = open_accounts(args)
        try:
            accounts.set_disabled(args.name, args.disabled)
        finally:
            accounts.close()
    return EXIT_OK


def run_address(args: argparse.Namespace) -> int:
    with audited(args, "user-address", addresses=list(args.addresses)):
        accounts = open_accounts(args)
        try:
            accounts.add_addresses(args.name, args.addresses)
        finally:
            accounts.close()
    return EXIT_OK


def run_list(args: argparse.Namespace) -> int:
    accounts = open_accounts(args)
    try:
        rows = accounts.all()
    finally:
        accounts.close()
    for r in rows:
        if args.json:
            print(json.dumps(r.to_json()))
        else:
            state = " (disabled)" if r.disabled else ""
            print(f"{r.name:20} {r.role:8} {' '.join(r.addresses)}{state}")
    return EXIT_OK
