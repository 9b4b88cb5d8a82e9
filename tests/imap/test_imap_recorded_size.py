"""RFC822.SIZE comes from the size the archive recorded (messages.crlf_size), not the blob.

A SELECT used to read and decrypt every blob of a folder it had not sized yet (7.2 s
at 100,000 messages).  Messages archived since migration 0003 carry their size:
the server answers SELECT and FETCH RFC822.SIZE without one blob read (counted by a
wrapper around the blob reader the backend is given).  A row archived before (NULL)
is still measured from its blob, once, and cached in the account database.
"""

from __future__ import annotations

import hashlib
import imaplib
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from imap_helpers import RunningServer
from imapclient import IMAPClient  # type: ignore[import-untyped]

from archive.extract import extract
from archive.facade import Archive
from archive.imap.accounts import Accounts
from archive.imap.archive_backend import ArchiveBackend
from archive.imap.server import ImapConfig
from archive.metadata import Message, MessageRecord, Metadata

CHEAP = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
PG_URL = os.environ.get("COFFER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

# CRLF throughout; bare LF throughout; mixed, with a bare CR and no final newline; NUL.
MESSAGES = [
    b"From: carol@ext.example\r\nTo: alice@corp.example\r\nSubject: crlf\r\n\r\nbody\r\n",
    b"From: dan@ext.example\nTo: alice@corp.example\nSubject: lf only\n\nline one\nline two\n",
    b"From: eve@ext.example\r\nTo: alice@corp.example\r\nSubject: mixed\n\r\n"
    b"a bare\rcr\nthen lf\r\nand no final newline\r",
    b"From: fay@ext.example\nTo: alice@corp.example\nSubject: nul\n\nzero\x00byte\n",
]


class CountingBlobs:
    """The archive's blob reader, counting every read (what a SELECT must not do)."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.reads: list[str] = []

    def get(self, sha256: str) -> bytes:
        self.reads.append(sha256)
        return self.archive.get(sha256)


@dataclass
class Env:
    meta: Metadata
    accounts: Accounts
    blobs: CountingBlobs
    shas: list[str]


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    """MESSAGES archived for alice (SQLite files, or a PostgreSQL schema of their own,
    skipped saying why when PostgreSQL is unreachable)."""
    admin: sa.Engine | None = None
    schema = f"coffer_imapsize_{uuid.uuid4().hex[:10]}"
    if request.param == "sqlite":
        meta = Metadata.for_data_dir(tmp_path)
        accounts = Accounts.for_data_dir(tmp_path, hasher=CHEAP)
    else:
        admin = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        try:
            with admin.begin() as c:
                c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        except Exception as exc:
            admin.dispose()
            pytest.skip(f"PostgreSQL at {PG_URL} is not reachable: {exc}")
        meta = Metadata(PG_URL, schema=schema)
        accounts = Accounts(PG_URL, hasher=CHEAP, schema=schema)
    archive = Archive.open(tmp_path)
    try:
        meta.migrate()
        for day, raw in enumerate(MESSAGES, start=1):
            archive.put(raw)
            meta.add_message(MessageRecord(
                hashlib.sha256(raw).hexdigest(), extract(raw),
                datetime(2024, 7, day, 12, tzinfo=UTC), mail_from="x@ext.example",
                rcpt_to=["alice@corp.example"]))
        accounts.add("alice", "user", "alice-pw", ["alice@corp.example"])
        yield Env(meta, accounts, CountingBlobs(archive),
                  [hashlib.sha256(m).hexdigest() for m in MESSAGES])
    finally:
        archive.close()
        accounts.close()
        meta.close()
        if admin is not None:
            with admin.begin() as c:
                c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


def serve(env: Env) -> tuple[ArchiveBackend, RunningServer]:
    backend = ArchiveBackend(env.meta, env.blobs, env.accounts, poll_interval=0)
    return backend, RunningServer(backend, ImapConfig(port=0, allow_plaintext_loopback=True))


def sizes_and_bodies(port: int, env: Env) -> tuple[dict[int, int], dict[int, bytes], int]:
    """RFC822.SIZE of INBOX by UID (imaplib: SELECT + UID FETCH 1:*), with the number of
    blob reads they took; then BODY[] of each message (IMAPClient)."""
    c = imaplib.IMAP4("127.0.0.1", port)
    try:
        c.login("alice", "alice-pw")
        typ, data = c.select("INBOX", readonly=True)
        assert typ == "OK" and data == [str(len(MESSAGES)).encode()]
        typ, lines = c.uid("FETCH", "1:*", "(RFC822.SIZE)")
        assert typ == "OK"
    finally:
        c.logout()
    reads = len(env.blobs.reads)
    sizes = {}
    for line in lines:
        assert isinstance(line, bytes)
        m = re.search(rb"UID (\d+) RFC822\.SIZE (\d+)\)", line)
        assert m is not None, line
        sizes[int(m[1])] = int(m[2])
    with IMAPClient("127.0.0.1", port=port, ssl=False) as ic:
        ic.login("alice", "alice-pw")
        ic.select_folder("INBOX", readonly=True)
        got = ic.fetch(sorted(sizes), ["BODY.PEEK[]"])
    return sizes, {uid: d[b"BODY[]"] for uid, d in got.items()}, reads


def test_select_and_fetch_size_of_freshly_archived_mail_read_no_blob(env: Env) -> None:
    with env.meta.session() as s:
        assert None not in s.scalars(sa.select(Message.crlf_size)).all()
    backend, server = serve(env)
    try:
        sizes, bodies, reads = sizes_and_bodies(server.port, env)
    finally:
        server.stop()
        backend.close()
    assert reads == 0  # SELECT and FETCH RFC822.SIZE: the recorded sizes only
    assert len(env.blobs.reads) == len(MESSAGES)  # BODY[] does read each blob
    assert {uid: len(body) for uid, body in bodies.items()} == sizes
    assert sorted(sizes.values()) != sorted(map(len, MESSAGES))  # bare LF served as CRLF
    assert env.accounts.crlf_sizes(env.shas) == {}  # nothing left to cache


def test_a_row_archived_before_the_size_was_recorded_is_measured_once(env: Env) -> None:
    lf_only = env.shas[1]
    with env.meta.session() as s:  # as migration 0003 leaves a row archived before it
        s.execute(sa.update(Message).where(Message.sha256 == lf_only).values(crlf_size=None))
    backend, server = serve(env)
    try:
        sizes, bodies, reads = sizes_and_bodies(server.port, env)
        assert reads == 1 and env.blobs.reads[0] == lf_only  # that blob alone
        assert {uid: len(body) for uid, body in bodies.items()} == sizes
        served = len(MESSAGES[1]) + MESSAGES[1].count(b"\n")  # every LF bare
        assert env.accounts.crlf_sizes(env.shas) == {lf_only: served}
        # A later session takes the cached size: no blob read at all.
        env.blobs.reads.clear()
        again, _, reads = sizes_and_bodies(server.port, env)
        assert reads == 0 and again == sizes
    finally:
        server.stop()
        backend.close()
