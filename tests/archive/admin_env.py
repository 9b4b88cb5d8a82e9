"""A real archive (store, ledger, keys) with its metadata database and full-text index,
for the retention, hold, audit, import and admin CLI tests (SQLite and PostgreSQL).

Import with ``from admin_env import *`` together with ``from archive_db import *``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from archive_db import PG_URL, make_record

from archive.facade import Archive
from archive.index import Index, Indexer, open_index
from archive.metadata import Metadata
from archive.search import Searcher

__all__ = ["T0", "Env", "env", "ledger_kinds"]

T0 = datetime(2024, 7, 1, tzinfo=UTC)


@dataclass
class Env:
    data_dir: Path
    meta: Metadata
    archive: Archive
    index: Index

    def add(self, raw: bytes, *, retention_until: datetime | None = None,
            **kw: Any) -> int:
        """Store and record one receipt of ``raw`` (as the archive stage does)."""
        ref = self.archive.put(raw, {"test": True})
        rec = make_record(raw, retention_until=retention_until, **kw)
        assert rec.sha256 == ref.sha256
        return self.meta.add_message(rec).id

    def indexer(self) -> Indexer:
        return Indexer(self.meta, self.index, self.archive.get)

    def searcher(self) -> Searcher:
        return Searcher(self.meta, self.index, self.archive.get)

    def cli_args(self) -> list[str]:
        args = ["--data-dir", str(self.data_dir)]
        if self.meta.dialect == "postgresql":
            args += ["--database", f"{PG_URL}?options={quote(f'-csearch_path={self.meta.schema}')}"]
        return args


@pytest.fixture
def env(meta: Metadata, tmp_path: Path) -> Iterator[Env]:
    archive = Archive.open(tmp_path)
    engine = "pg" if meta.dialect == "postgresql" else "fts5"
    index = open_index(engine, data_dir=tmp_path, meta=meta)
    try:
        yield Env(tmp_path, meta, archive, index)
    finally:
        index.close()
        archive.close()


def ledger_kinds(archive: Archive) -> list[str]:
    return [e.kind for e in archive.ledger.entries()]
