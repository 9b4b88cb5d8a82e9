"""Where one archive lives: data directory, metadata database, full-text engine, blob store.

``coffer serve`` and every command that reads the archive resolve the same
:class:`ArchiveLocation`, so a node configured for PostgreSQL and S3 never has a
command quietly open an empty SQLite file beside it::

    loc = location_from_config(cfg)                  # serve: the archive: and s3: sections
    loc = location_from_args(args)                   # a CLI: flags over environment over config
    meta = loc.open_metadata(); index = loc.open_index(meta); archive = loc.open_archive()

Precedence for a command (what an operator expects from Postfix's ``-c``/``-o``):
``--database``/``--index`` on the command line, then ``$COFFER_ARCHIVE_DB``, then
the configuration file's ``archive.database``/``archive.index``, then the
embedded defaults (SQLite ``DATA_DIR/archive/meta.db``; pg with PostgreSQL, else
fts5).  ``--data-dir DIR`` names a bare data directory: no configuration file is
read, so only the embedded defaults and the flags apply.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from archive.metadata import Metadata, MetadataError

if TYPE_CHECKING:
    from archive.facade import Archive
    from archive.index import Index
    from archive.s3config import S3Config
    from gateway.config import Config

ENV_DATABASE = "COFFER_ARCHIVE_DB"


@dataclass(frozen=True)
class ArchiveLocation:
    data_dir: Path
    database: str | None = None  # None: SQLite under data_dir
    index: str | None = None  # None: pg with PostgreSQL, else fts5
    s3: S3Config | None = None  # None: blobs under data_dir/archive/store
    node: str = "local"
    ledger_seal: float = 60.0  # seconds between a node's ledger seals (archive.cluster)

    @property
    def sqlite_file(self) -> Path:
        return self.data_dir / "archive" / "meta.db"

    @property
    def shared(self) -> bool:
        """True when the metadata database is a server other nodes may share."""
        return self.database is not None and not self.database.startswith("sqlite")

    def open_metadata(self, *, must_exist: bool = False, migrate: bool = True) -> Metadata:
        """The metadata database, migrated; ``must_exist``: refuse to create a SQLite file."""
        if self.database is None:
            if must_exist and not self.sqlite_file.exists():
                raise MetadataError(f"{self.sqlite_file}: no archive metadata here "
                                    "(after losing it, run `coffer archive rebuild`)")
            meta = Metadata.for_data_dir(self.data_dir)
        else:
            meta = Metadata(self.database)
        if migrate:
            try:
                meta.migrate()
            except BaseException:
                meta.close()
                raise
        return meta

    def index_engine(self, meta: Metadata) -> str:
        return self.index or ("pg" if meta.dialect == "postgresql" else "fts5")

    def open_index(self, meta: Metadata, engine: str | None = None) -> Index:
        from archive.index import open_index

        return open_index(engine or self.index_engine(meta), data_dir=self.data_dir, meta=meta)

    def open_archive(self, *, create: bool = False) -> Archive:
        from archive.facade import Archive

        return Archive.open(self.data_dir, create=create, s3=self.s3)


def location_from_config(cfg: Config) -> ArchiveLocation:
    """The archive a configuration describes (``archive:`` and ``s3:`` sections)."""
    return ArchiveLocation(cfg.data_dir, cfg.archive.database, cfg.archive.index, cfg.s3,
                           cfg.node_name, cfg.archive.ledger_seal)


def config_from_args(args: argparse.Namespace, *, required: bool = True) -> Config | None:
    """The configuration a command names: None with ``--data-dir``.

    ``--config``, else $COFFER_CONFIG, else ./coffer.yaml; a missing file is a
    ConfigError when ``required`` or when it was named explicitly, else None.
    A configuration mistake raises gateway.errors.ConfigError (exit 2 in gateway.cli).
    """
    from gateway import config
    from gateway.errors import ConfigError

    if getattr(args, "data_dir", None):
        return None
    path = config.find_config(getattr(args, "config", None))
    if not path.exists():
        if required or getattr(args, "config", None):
            raise ConfigError(
                "no such configuration file (give --data-dir DIR or --config FILE)",
                file=str(path))
        return None
    return config.load(path)


def location_from_args(args: argparse.Namespace, *, required: bool = True) -> ArchiveLocation:
    """The archive a command works on: see the module docstring for the precedence.

    Without ``required`` and with no configuration file at all, the current
    directory is the data directory (what ``coffer search`` always did).
    """
    cfg = config_from_args(args, required=required)
    if cfg is not None:
        loc = location_from_config(cfg)
    else:
        loc = ArchiveLocation(Path(getattr(args, "data_dir", None) or "."))
    database = (getattr(args, "database", None) or os.environ.get(ENV_DATABASE)
                or loc.database)
    index = getattr(args, "index", None) or loc.index
    return ArchiveLocation(loc.data_dir, database, index, loc.s3, loc.node, loc.ledger_seal)
