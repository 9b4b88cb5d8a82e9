"""``coffer users``: IMAP accounts of the archive (users, officers, admins).

    coffer users add NAME --role user|officer|admin [--address ADDR]... --password-stdin
    coffer users passwd NAME --password-stdin
    coffer users role NAME ROLE
    coffer users disable NAME | enable NAME
    coffer users address NAME ADDR...
    coffer users list [--json]

Accounts live in ``DATA_DIR/archive/imap.db`` (or ``--database URL``), with argon2id
password hashes; see archive.imap.accounts.  Passwords are read from stdin (one line)
so they never appear in a process listing or shell history; on a terminal without
``--password-stdin`` the password is asked for twice.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from archive.cli_common import add_location_arguments
from archive.imap.accounts import ROLES, Accounts
from archive.location import config_from_args
from gateway.errors import ConfigError

EXIT_OK = 0


def register(sub: Any) -> None:
    users = sub.add_parser("users", help="IMAP accounts: users, officers, admins",
                           description="Manage who can open the archive over IMAP.")
    users_sub = users.add_subparsers(dest="users_command", metavar="COMMAND")
    users_sub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        add_location_arguments(p)
        p.add_argument("--database", metavar="URL",
                       help="account database URL (default: DATA_DIR/archive/imap.db)")

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
    common(p)
    p.set_defaults(func=run_list)


def open_accounts(args: argparse.Namespace) -> Accounts:
    if getattr(args, "database", None):
        return Accounts(args.database)
    cfg = config_from_args(args)
    if cfg is not None and cfg.imap.accounts_database:
        return Accounts(cfg.imap.accounts_database)  # the one every node shares
    return Accounts.for_data_dir(cfg.data_dir if cfg is not None else Path(args.data_dir))


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


def run_add(args: argparse.Namespace) -> int:
    password = read_password(args)
    accounts = open_accounts(args)
    try:
        accounts.add(args.name, args.role, password, args.address)
    finally:
        accounts.close()
    print(f"added {args.role} {args.name}", file=sys.stderr)
    return EXIT_OK


def run_passwd(args: argparse.Namespace) -> int:
    password = read_password(args)
    accounts = open_accounts(args)
    try:
        accounts.passwd(args.name, password)
    finally:
        accounts.close()
    return EXIT_OK


def run_role(args: argparse.Namespace) -> int:
    accounts = open_accounts(args)
    try:
        accounts.set_role(args.name, args.role)
    finally:
        accounts.close()
    return EXIT_OK


def run_disable(args: argparse.Namespace) -> int:
    accounts = open_accounts(args)
    try:
        accounts.set_disabled(args.name, args.disabled)
    finally:
        accounts.close()
    return EXIT_OK


def run_address(args: argparse.Namespace) -> int:
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
