"""The CLI imports only the modules of the command it runs, and the table stays true."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

from gateway.cli import COMMAND_MODULES, COMMANDS, _modules_for, build_parser


def _registered_by(module: str) -> set[str]:
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).register(sub)
    return set(sub.choices)


def test_command_table_names_exactly_the_modules_that_register_each_command() -> None:
    registered: dict[str, set[str]] = {}
    for module in COMMAND_MODULES:
        for command in _registered_by(module):
            registered.setdefault(command, set()).add(module)
    assert {c: set(m) for c, m in COMMANDS.items()} == registered


def test_a_named_command_imports_only_its_modules_and_help_imports_all() -> None:
    assert _modules_for(["queue", "list", "--json"]) == ("gateway.cli.queue",)
    assert len(_modules_for(["archive", "verify"])) == 4
    assert _modules_for(["--help"]) == COMMAND_MODULES
    assert _modules_for(["--version", "queue"]) == COMMAND_MODULES
    assert _modules_for(["no-such-command"]) == COMMAND_MODULES
    assert _modules_for([]) == COMMAND_MODULES


def test_queue_command_does_not_import_the_archive_database_or_reports() -> None:
    # (gateway.config itself imports the S3 and IMAP settings models: cheap, pure pydantic.)
    code = ("import sys; from gateway.cli import build_parser; build_parser(['queue', 'list']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'reports') "
            "or m in ('archive.metadata', 'archive.facade', 'archive.index')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_full_parser_still_lists_every_command() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(COMMANDS)
