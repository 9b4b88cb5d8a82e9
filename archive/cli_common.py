"""Shared plumbing for the ``coffer archive ...`` command group.

Several modules add commands under ``coffer archive`` (verify and keys in
archive.cli_verify; reindex, import and friends elsewhere).  argparse allows one
``add_subparsers`` per parser, so the first caller creates the ``archive``
sub-command and its subparsers object and caches both on the top-level
subparsers action; later callers get the same object back.  Module order in
gateway.cli.COMMAND_MODULES therefore does not matter.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_CACHE_ATTR = "_coffer_archive_subparsers"

# argparse does not export the type of the object add_subparsers() returns.
SubParsers = Any


def archive_subparsers(sub: SubParsers) -> SubParsers:
    """Create, or return the already created, subparsers of ``coffer archive``.

    ``sub`` is the top-level subparsers object that ``register(subparsers)``
    receives.  Use the result as ``archive_subparsers(sub).add_parser("verify")``.
    """
    cached = getattr(sub, _CACHE_ATTR, None)
    if cached is not None:
        return cached
    parser: argparse.ArgumentParser = sub.add_parser(
        "archive", help="the immutable archive: verify, keys, import, reindex, expire",
        description="Commands that operate on the immutable, encrypted archive.",
    )
    archive_sub = parser.add_subparsers(dest="archive_command", metavar="ARCHIVE_COMMAND")
    archive_sub.required = True
    setattr(sub, _CACHE_ATTR, archive_sub)
    return archive_sub


def add_location_arguments(parser: argparse.ArgumentParser) -> None:
    """The common ``--data-dir DIR | --config FILE`` pair that locates the archive."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--data-dir", metavar="DIR", help="the gateway data directory")
    where.add_argument("--config", metavar="FILE", help="gateway configuration (YAML)")


def data_dir_from_args(args: argparse.Namespace) -> Path:
    """--data-dir, else the data_dir of --config (or $COFFER_CONFIG, else ./coffer.yaml).

    A configuration mistake raises gateway.errors.ConfigError (exit 2 in gateway.cli).
    """
    from gateway import config
    from gateway.errors import ConfigError

    if getattr(args, "data_dir", None):
        return Path(args.data_dir)
    path = config.find_config(getattr(args, "config", None))
    if not path.exists():
        raise ConfigError(
            "no such configuration file (give --data-dir DIR or --config FILE)", file=str(path)
        )
    return config.load(path).data_dir
