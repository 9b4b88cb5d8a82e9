"""The metadata database of a test archive, on SQLite or on the real PostgreSQL.

``db`` (parametrised sqlite / postgresql) gives a data directory and the
``--database`` URL the CLI needs for it: SQLite is the embedded
DATA_DIR/archive/meta.db; PostgreSQL is a schema of its own on the test database
(archive_db.PG_URL), named after this session and dropped at the end, so
parallel runs never see each other's rows.  ``lose()`` is the disaster the
rebuild tests recover from: the database (and a file index) gone, an empty one
in its place.

Import with ``from metadata_db import *`` (it brings the archive_db fixtures it uses).
"""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "archive"))
from archive_db import _SESSION, PG_URL, PgAdmin, backend, pg_admin

from archive.index import Index, open_index
from archive.metadata import Metadata

__all__ = ["Db", "backend", "db", "pg_admin", "pg_database"]


@dataclass
class Db:
    data: Path
    schema: str | None = None  # PostgreSQL: the schema of this test; None: SQLite
    admin: PgAdmin | None = None
    database: str | None = None  # PostgreSQL: a whole database of this test (its URL)

    @property
    def url(self) -> str | None:
        """The ``--database`` URL, or None for the embedded SQLite default."""
        if self.database is not None:
            return self.database
        if self.schema is None:
            return None
        return f"{PG_URL}?options={quote(f'-csearch_path={self.schema}')}"

    @property
    def engine(self) -> str:
        return "fts5" if self.url is None else "pg"

    def cli(self) -> list[str]:
        return ["--data-dir", str(self.data), *(["--database", self.url] if self.url else [])]

    def open(self) -> Metadata:
        return Metadata.for_data_dir(self.data) if self.url is None else Metadata(self.url)

    def index(self, meta: Metadata) -> Index:
        return open_index(self.engine, data_dir=self.data, meta=meta)

    def lose(self) -> None:
        """Lose the database and the file index: an empty database is all that is left."""
        for p in (self.data / "archive").glob("meta.db*"):
            p.unlink()
        shutil.rmtree(self.data / "archive" / "index", ignore_errors=True)
        if self.schema is not None:
            assert self.admin is not None and self.admin.engine is not None
            self.admin.drop(self.schema)
            with self.admin.engine.begin() as c:
                c.execute(sa.text(f'CREATE SCHEMA "{self.schema}"'))


@pytest.fixture
def db(backend: str, tmp_path: Path, pg_admin: PgAdmin) -> Iterator[Db]:
    if backend == "sqlite":
        yield Db(tmp_path / "data")
        return
    if pg_admin.engine is None:
        pytest.skip(pg_admin.reason)
    schema = f"coffer_t{_SESSION}_{uuid.uuid4().hex[:8]}"
    with pg_admin.engine.begin() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield Db(tmp_path / "data", schema, pg_admin)
    finally:
        pg_admin.drop(schema)


@pytest.fixture
def pg_database(pg_admin: PgAdmin) -> Iterator[Callable[[], str]]:
    """new() -> the URL of a new, empty database of this test (dropped at the end): for
    what works on whole databases, such as pg_dump / pg_restore."""
    if pg_admin.engine is None:
        pytest.skip(pg_admin.reason)
    made: list[str] = []
    auto = pg_admin.engine.execution_options(isolation_level="AUTOCOMMIT")

    def new() -> str:
        name = f"coffer_t{_SESSION}_{uuid.uuid4().hex[:8]}"
        with auto.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)

    yield new
    with auto.connect() as c:
        for name in made:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
