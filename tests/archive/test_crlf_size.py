"""archive.extract.crlf_size: the size IMAP serves (RFC822.SIZE) without building the copy.

The archive records it with each message row (migration 0003) and the IMAP server
answers RFC822.SIZE from the row, so it must equal ``len(to_crlf(raw))`` exactly:
on every corpus message, on random bytes, and on the line-end edge cases.  The
importer records it; rows archived before migration 0003 keep NULL.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from admin_env import *  # noqa: F403 - fixtures: env
from admin_env import Env
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import make_record
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from archive import metadata
from archive.extract import crlf_size, extract
from archive.imap.render import to_crlf
from archive.importer import import_path
from archive.metadata import Message, Metadata

REPO = Path(__file__).resolve().parents[2]


def _corpus_files() -> list[Path]:
    """Every file under the corpus's MIME folders and the SpamAssassin regression mails
    (PROVENANCE.md: messages, mboxes, and a few non-RFC 5322 files: all bytes count)."""
    root = Path(os.environ.get("COFFER_CORPUS") or REPO.parent / "shared" / "corpus")
    dirs = [root / "mime", root / "spam-ham" / "spamassassin-regression"]
    if not all(d.is_dir() for d in dirs):
        pytest.skip(f"MIME corpus not found under {root} (set COFFER_CORPUS): the "
                    "corpus cases cannot run; the random and edge cases still do")
    return sorted(p for d in dirs for p in d.rglob("*") if p.is_file())


def test_crlf_size_equals_the_served_length_on_every_corpus_message() -> None:
    files = _corpus_files()
    assert len(files) > 300
    mixed = 0
    for path in files:
        raw = path.read_bytes()
        assert crlf_size(raw) == len(to_crlf(raw)), path
        mixed += b"\r\n" in raw and b"\n" in raw.replace(b"\r\n", b"")
    assert mixed > 0  # the corpus holds files with both CRLF and bare LF


@pytest.mark.parametrize("raw", [
    b"", b"\n", b"\r", b"\r\n", b"\n\r", b"\r\r\n", b"\n\n", b"\r\n\n", b"\n\r\n",
    b"a", b"a\r", b"a\n", b"a\r\n", b"a\nb", b"a\rb", b"a\r\nb\nc\r",
    b"line without newline", b"x\x00y\n", b"\x00\r\x00\n",
    b"Subject: s\n\nbody\rmore\r\n\r\n.\n\r",
])
def test_crlf_size_edge_cases(raw: bytes) -> None:
    assert crlf_size(raw) == len(to_crlf(raw))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_crlf_size_equals_the_served_length_on_random_bytes(raw: bytes) -> None:
    assert crlf_size(raw) == len(to_crlf(raw))


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"\x00", b" "]), max_size=60))
def test_crlf_size_equals_the_served_length_on_line_end_soup(pieces: list[bytes]) -> None:
    raw = b"".join(pieces)
    assert crlf_size(raw) == len(to_crlf(raw))


def test_extract_records_the_crlf_size_of_the_bytes_it_was_given() -> None:
    raw = b"From: a@example.com\nSubject: lf\n\nbody\r\nmore\n"
    ex = extract(raw)
    assert ex.size == len(raw) and ex.crlf_size == len(to_crlf(raw)) == len(raw) + 4  # four bare LF


LF_ONLY = b"From: a@example.com\nTo: b@example.com\nSubject: lf\n\nline one\nline two"
MIXED = b"From: a@example.com\r\nSubject: mixed\r\n\r\nbare\rcr\nand lf\r\n"


def test_import_records_each_message_s_imap_size(env: Env, tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "cur" / "1.host:2,S").write_bytes(LF_ONLY)
    (md / "new" / "2.host").write_bytes(MIXED)
    assert import_path(env.meta, env.archive, env.index, md).stored == 2
    with env.meta.session() as s:
        rows = list(s.execute(select(Message.sha256, Message.crlf_size)))
    assert len(rows) == 2
    for sha, size in rows:
        assert size == len(to_crlf(env.archive.get(sha)))
    assert sorted(size for _, size in rows) == sorted([len(LF_ONLY) + 5, len(MIXED) + 1])


def _alembic(meta: Metadata, action: str, revision: str) -> None:
    """``alembic ACTION REVISION`` on this database (Metadata.migrate only upgrades)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(REPO / "archive" / "migrations"))
    with meta.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)


def test_migration_0003_leaves_rows_archived_before_it_null(
        meta: Metadata, monkeypatch: pytest.MonkeyPatch) -> None:
    _alembic(meta, "downgrade", "0002")  # an archive as it was before the revision
    with meta.engine.connect() as conn:
        assert "crlf_size" not in {c["name"] for c in sa.inspect(conn).get_columns("messages")}
    with monkeypatch.context() as m:  # and a row written by the code of then
        m.setattr(metadata, "_message_row", _without_crlf_size(metadata._message_row))
        old = meta.add_message(make_record(MIXED)).id
    _alembic(meta, "upgrade", "head")
    new = meta.add_message(make_record(LF_ONLY)).id
    with meta.session() as s:
        got = dict(s.execute(select(Message.id, Message.crlf_size)).all())
    assert got == {old: None, new: len(LF_ONLY) + LF_ONLY.count(b"\n")}


def _without_crlf_size(row: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def before_0003(*args: Any, **kw: Any) -> dict[str, Any]:
        out = row(*args, **kw)
        del out["crlf_size"]
        return out

    return before_0003
