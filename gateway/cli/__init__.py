"""The ``coffer`` command: one argparse parser, one module per command group.

Each module in COMMAND_MODULES exposes ``register(subparsers)``, adding its
sub-commands with ``set_defaults(func=handler)``.  COMMANDS maps each top-level
command to the modules that register it, so ``coffer queue list`` imports the
queue module only (not SQLAlchemy and the archive): start-up fell from about
0.9 s to 0.2 s.  ``coffer --help`` and unknown commands import every module
(a test keeps COMMANDS equal to what the modules register).  A handler takes the parsed
arguments and returns the exit code: 0 success, 1 the operation found a problem
(e.g. verify found tampering), 2 a usage or configuration error.  Errors are
translated here into one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.errors import CofferError, ConfigError

if TYPE_CHECKING:
    from gateway.config import Config

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


def operator_name() -> str:
    """Who runs this command, for the log lines of operator actions."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def ago(seconds: float) -> str:
    """``seconds`` as the largest whole unit: 3d, 5h, 12m, 40s."""
    s = int(max(seconds, 0))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def setup_log(cfg: Config) -> None:
    """Operator actions go to the gateway's log (its file, or stderr)."""
    from gateway import log  # not for `coffer --help`

    log.setup(cfg.log.level, cfg.log.format, cfg.path(cfg.log.file) if cfg.log.file else None)


def config_options(*, json: bool = True) -> argparse.ArgumentParser:
    """The options most sub-commands share (``parents=[...]``): ``--config`` and,
    unless ``json`` is False, ``--json``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="configuration file (default: $COFFER_CONFIG, else ./coffer.yaml)")
    if json:
        common.add_argument("--json", action="store_true",
                            help="one JSON object per line on stdout")
    return common

COMMAND_MODULES: tuple[str, ...] = (
    "gateway.cli.init",
    "gateway.cli.serve",
    "gateway.cli.check_config",
    "gateway.cli.auth",
    "gateway.cli.queue",
    "gateway.cli.ratelimit",
    "gateway.cli.recipients",
    "gateway.cli.tlsrpt",
    "gateway.cli.policy",
    "archive.cli_search",
    "archive.cli_verify",
    "archive.cli_admin",
    "gateway.cli.users",
    "gateway.cli.smtp_users",
    "archive.imap.cli",
    "gateway.cli.keys",
    "gateway.cli.spam",
    "reports.cli",
)


# Top-level command -> the modules that register (part of) it.
COMMANDS: dict[str, tuple[str, ...]] = {
    "init": ("gateway.cli.init",),
    "serve": ("gateway.cli.serve",),
    "check-config": ("gateway.cli.check_config",),
    "auth": ("gateway.cli.auth",),
    "dkim": ("gateway.cli.auth",),
    "queue": ("gateway.cli.queue",),
    "ratelimit": ("gateway.cli.ratelimit",),
    "recipients": ("gateway.cli.recipients",),
    "tlsrpt": ("gateway.cli.tlsrpt",),
    "policy": ("gateway.cli.policy",),
    "archive": ("archive.cli_search", "archive.cli_verify", "archive.cli_admin", "reports.cli"),
    "search": ("archive.cli_search",),
    "show": ("archive.cli_search",),
    "hold": ("archive.cli_admin",),
    "audit": ("archive.cli_admin",),
    "users": ("gateway.cli.users",),
    "smtp-users": ("gateway.cli.smtp_users",),
    "imap": ("archive.imap.cli",),
    "keys": ("gateway.cli.keys",),
    "spam": ("gateway.cli.spam",),
    "quarantine": ("gateway.cli.spam",),
    "export": ("reports.cli",),
    "recover": ("reports.cli",),
    "report": ("reports.cli",),
    "backup": ("reports.cli",),
}


def _modules_for(argv: Sequence[str] | None) -> tuple[str, ...]:
    """The command modules to import for this command line (all, unless it names one)."""
    args = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    # "coffer --help queue" prints the top-level help, which lists every command.
    if first is None or args[first] not in COMMANDS or first > 0:
        return COMMAND_MODULES
    return tuple(m for m in COMMAND_MODULES if m in COMMANDS[args[first]])


def build_parser(argv: Sequence[str] | None = (), /) -> argparse.ArgumentParser:
    """The parser; given the command line, only the modules its command needs register."""
    parser = argparse.ArgumentParser(
        prog="coffer", description="Coffer: compliance-focused, encrypted, archiving mail gateway"
    )
    parser.add_argument("--version", action="version", version=f"coffer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in (COMMAND_MODULES if argv == () else _modules_for(argv)):
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"coffer: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CofferError as exc:
        print(f"coffer: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
