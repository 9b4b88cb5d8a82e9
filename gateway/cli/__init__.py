"""The ``coffer`` command: one argparse parser, one module per command group.

Each module in COMMAND_MODULES exposes ``register(subparsers)``, adding its
sub-commands with ``set_defaults(func=handler)``; a handler takes the parsed
arguments and returns the exit code: 0 success, 1 the operation found a problem
(e.g. verify found tampering), 2 a usage or configuration error.  Errors are
translated here into one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.errors import CofferError, ConfigError

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2

COMMAND_MODULES: tuple[str, ...] = (
    "gateway.cli.init",
    "gateway.cli.serve",
    "gateway.cli.check_config",
    "gateway.cli.auth",
    "gateway.cli.queue",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coffer", description="Coffer: compliance-focused, encrypted, archiving mail gateway"
    )
    parser.add_argument("--version", action="version", version=f"coffer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
