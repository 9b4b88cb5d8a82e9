"""Run the real ``coffer`` CLI in-process with archive.cli_verify registered.

Until gateway.cli.COMMAND_MODULES lists archive.cli_verify (the lead wires it),
the tests add it for the duration of one call.
"""

from __future__ import annotations

import gateway.cli as cli

MODULE = "archive.cli_verify"


def run_coffer(argv: list[str]) -> int:
    saved = cli.COMMAND_MODULES
    if MODULE not in saved:
        cli.COMMAND_MODULES = (*saved, MODULE)
    try:
        return cli.main(argv)
    finally:
        cli.COMMAND_MODULES = saved
