"""Database fixtures shared by the archive metadata, index and search tests.

Every test runs on SQLite (a file under tmp_path) and on the real PostgreSQL on
this machine ($COFFER_TEST_PG, default postgresql://postgres@127.0.0.1:5432/test).
Each PostgreSQL test gets its own schema, named after this session, dropped at
the end, so parallel runs never see each other's rows.  PostgreSQL tests skip,
saying why, only when the server cannot be reached.

Import the fixtures into a test module with ``from archive_db import *``.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest
import sqlalchemy as sa

from archive.extract import extract
from archive.index import Index, Indexer, open_index
from archive.metadata import MessageRecord, Metadata

__all__ = [
    "M1", "M2", "M3", "PG_URL", "Corpus", "PgAdmin", "backend", "corpus_dir", "make_record",
    "meta", "pg_admin", "pg_metadata", "search_env",
]

PG_URL = os.environ.get("COFFER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_SESSION = uuid.uuid4().hex[:8]


@dataclass
class PgAdmin:
    engine: sa.Engine | None
    reason: str = ""

    def drop(self, schema: str) -> None:
        assert self.engine is not None
        with self.engine.begin() as c:  # one schema per transaction: bounded locks
            c.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))

    def close(self, meta: Metadata) -> None:
        """Close a Metadata; drop its schema when it is one of ours."""
        meta.close()
        if meta.schema is not None:
            self.drop(meta.schema)


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[PgAdmin]:
    """An engine on the test database, or the reason it cannot be reached."""
    engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as c:
            c.execute(sa.text("SELECT 1"))
    except Exception as exc:
        engine.dispose()
        yield PgAdmin(None, f"PostgreSQL at {PG_URL} is not reachable: {exc}")
        return
    admin = PgAdmin(engine)
    yield admin
    # Tests drop their own schemas; this sweeps up after any that could not.
    with engine.connect() as c:
        names = list(c.execute(sa.text("SELECT nspname FROM pg_namespace WHERE nspname "
                                       "LIKE :p"), {"p": f"coffer_t{_SESSION}_%"}).scalars())
    for name in names:
        admin.drop(name)
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def meta(backend: str, tmp_path: Path, pg_admin: PgAdmin) -> Iterator[Metadata]:
    m = Metadata.for_data_dir(tmp_path) if backend == "sqlite" else pg_metadata(pg_admin)
    m.migrate()
    yield m
    pg_admin.close(m)


def pg_metadata(pg_admin: PgAdmin) -> Metadata:
    """A Metadata in a fresh schema of its own (dropped at the end of the session)."""
    if pg_admin.engine is None:
        pytest.skip(pg_admin.reason)
    schema = f"coffer_t{_SESSION}_{uuid.uuid4().hex[:8]}"
    with pg_admin.engine.begin() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    return Metadata(PG_URL, schema=schema)


def make_record(raw: bytes, *, received_at: datetime | None = None, **kw: object
                ) -> MessageRecord:
    return MessageRecord(hashlib.sha256(raw).hexdigest(), extract(raw),
                         received_at or datetime(2024, 7, 1, tzinfo=UTC), **kw)  # type: ignore[arg-type]


class Corpus:
    """An in-memory blob store: what the search code sees through fetch(sha256)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def get(self, sha256: str) -> bytes:
        return self.blobs[sha256]

    def add(self, meta: Metadata, raw: bytes, **kw: object) -> int:
        rec = make_record(raw, **kw)
        self.blobs[rec.sha256] = raw
        return meta.add_message(rec).id


@pytest.fixture
def search_env(meta: Metadata, tmp_path: Path
               ) -> Iterator[Callable[[str], tuple[Metadata, Index, Corpus, Indexer]]]:
    """open(engine) -> (meta, index, corpus, indexer) for an engine usable with ``meta``."""
    opened: list[Index] = []

    def open_(engine: str) -> tuple[Metadata, Index, Corpus, Indexer]:
        if engine == "pg" and meta.dialect != "postgresql":
            pytest.skip("the pg engine lives in the PostgreSQL metadata database")
        index = open_index(engine, data_dir=tmp_path, meta=meta)
        opened.append(index)
        corpus = Corpus()
        return meta, index, corpus, Indexer(meta, index, corpus.get)

    yield open_
    for index in opened:
        index.close()


def corpus_dir() -> Path:
    """The shared MIME corpus ($COFFER_CORPUS or ../shared/corpus), or skip."""
    root = os.environ.get("COFFER_CORPUS")
    base = Path(root) if root else Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
    mime = base / "mime"
    if not mime.is_dir():
        pytest.skip(f"MIME corpus not found at {mime} (set COFFER_CORPUS)")
    return mime


# Three messages the search and CLI tests share.

def mail(frm: str, to: str, subject: str, body: str, date: str, cc: str = "",
         attachment: tuple[str, bytes] | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = frm
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = date
    msg["Message-ID"] = f"<{abs(hash((subject, date)))}@test.example>"
    msg.set_content(body)
    if attachment:
        msg.add_attachment(attachment[1], maintype="text", subtype="plain",
                           filename=attachment[0])
    return msg.as_bytes(policy=SMTP)


M1 = mail("Alice Example <alice@example.com>", "bob@example.org", "Quarterly report",
          "The merger with Falcon Corp is on track. Wire transfer pending.",
          "Mon, 15 Jan 2024 10:00:00 +0000", attachment=("forecast.txt", b"revenue forecast"))
M2 = mail("Bob <bob@example.org>", "alice@example.com", "Lunch", "Cafe at noon?",
          "Sun, 10 Mar 2024 12:00:00 +0000", cc="Carol Jones <carol@example.net>")
M3 = mail("carol@example.net", "dave@sub.example.com", "Re: merger",
          "Filler for size. " * 9000 + "the merger closes", "Mon, 01 Jul 2024 09:00:00 +0000")
