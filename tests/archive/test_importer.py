"""``archive.importer``: mbox (mboxrd unquoting), Maildir and .eml directories, idempotent,
robust to malformed input, and a round trip of the shared MIME corpus."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from admin_env import *  # noqa: F403 - fixtures: env
from admin_env import Env, ledger_kinds
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import M1, M2, M3, corpus_dir

from archive.extract import extract
from archive.importer import import_path, split_mbox
from archive.metadata import Message

A = b"From: a@example.com\nSubject: first\n\nHello\n>From the start\n>>From quoted twice\n"
B = b"From: b@example.com\nSubject: second\n\nBye\n"


def test_split_mbox_unquotes_from_lines_and_drops_the_separator() -> None:
    data = (b"From x Mon Jan  1 00:00:00 2024\nSubject: s\n\n>From here\n>>From there\n\n"
            b"From y Mon Jan  1 00:00:00 2024\nSubject: t\n\nbody\n")
    assert list(split_mbox(data)) == [
        (1, b"Subject: s\n\nFrom here\n>From there\n"), (7, b"Subject: t\n\nbody\n")]


def test_import_mbox_stores_each_message_and_records_the_source(env: Env, tmp_path: Path
                                                                ) -> None:
    box = tmp_path / "inbox.mbox"
    box.write_bytes(b"From x Mon Jan  1 00:00:00 2024\n" + A.replace(b">From", b">>From")
                    + b"\nFrom y Mon Jan  1 00:00:01 2024\n" + B + b"\n")
    report = import_path(env.meta, env.archive, env.index, box)
    assert (report.found, report.stored, report.failures) == (2, 2, [])
    assert env.archive.get(hashlib.sha256(A).hexdigest()) == A
    assert env.archive.get(hashlib.sha256(B).hexdigest()) == B
    with env.meta.session() as s:
        rows = list(s.query(Message).order_by(Message.id))
    assert {r.source for r in rows} == {f"import:{box.resolve()}"}
    assert {r.direction for r in rows} == {"imported"}
    assert report.indexed == 2
    assert len(env.searcher().message_ids("subject:second")) == 1


def test_import_maildir_reads_cur_and_new_not_tmp(env: Env, tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (md / sub).mkdir(parents=True)
    (md / "cur" / "1.host:2,S").write_bytes(M1)
    (md / "new" / "2.host").write_bytes(M2)
    (md / "tmp" / "3.host").write_bytes(M3)  # still being delivered: not a message yet
    report = import_path(env.meta, env.archive, env.index, md)
    assert report.stored == 2 and not report.failures
    assert env.meta.count() == 2


def test_import_is_idempotent(env: Env, tmp_path: Path) -> None:
    d = tmp_path / "emls"
    d.mkdir()
    (d / "a.eml").write_bytes(M1)
    (d / "b.eml").write_bytes(M2)
    (d / "copy-of-a.eml").write_bytes(M1)  # the same bytes twice in one source: one row
    first = import_path(env.meta, env.archive, env.index, d)
    assert (first.stored, first.duplicates) == (2, 1)
    head = env.archive.ledger.head()
    second = import_path(env.meta, env.archive, env.index, d)
    assert (second.found, second.stored, second.duplicates) == (3, 0, 3)
    assert env.archive.ledger.head() == head  # not even a ledger entry
    assert env.meta.count() == 2


def test_malformed_files_are_reported_and_the_rest_imported(env: Env, tmp_path: Path) -> None:
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "good.eml").write_bytes(M1)
    (d / "empty.eml").write_bytes(b"")
    (d / "binary.eml").write_bytes(b"\x00\x01\x02 not a message at all")
    (d / "notes.txt").write_bytes(b"skipped: not .eml")
    (d / "broken.mbox").write_bytes(b"this is no mbox\n")
    report = import_path(env.meta, env.archive, env.index, d)
    assert report.stored == 1 and report.skipped_files == 1
    assert sorted(Path(f.where).name for f in report.failures) == [
        "binary.eml", "broken.mbox", "empty.eml"]
    assert all(f.error for f in report.failures)


def test_corpus_round_trip_import_search_fetch_and_reimport(env: Env) -> None:
    corpus = corpus_dir()
    report = import_path(env.meta, env.archive, env.index, corpus)
    assert report.stored > 100
    # Every .eml file that was stored comes back byte-identical.
    emls = sorted(corpus.rglob("*.eml"))
    checked = 0
    for f in emls:
        raw = f.read_bytes()
        sha = hashlib.sha256(raw).hexdigest()
        if env.archive.exists(sha):
            assert env.archive.get(sha) == raw, f
            checked += 1
    assert checked >= len(emls) - len(report.failures)
    searcher = env.searcher()
    with env.meta.session() as s:
        rows = list(s.query(Message).order_by(Message.id))
    # Search by each field: a message is found by its own From, Message-ID, subject
    # word, body word and date.
    tried = 0
    for row in rows[::7]:
        raw = env.archive.get(row.sha256)
        text = extract(raw)
        words = [w for w in re.findall(r"[A-Za-z]{4,}", text.subject)][:1]
        # A whole word, as the index tokenizes it ("Filter2" is one token, not "Filter").
        body = [w for w in re.findall(r"\b[A-Za-z]{5,}\b", text.body)][:1]
        queries = [f"date:{row.date:%Y-%m-%d}"]
        if "@" in row.from_addr and " " not in row.from_addr and '"' not in row.from_addr:
            queries.append(f"from:{row.from_addr}")
        if row.message_id and re.fullmatch(r"[!-~]+", row.message_id) \
                and '"' not in row.message_id:
            queries.append(f'message-id:"{row.message_id}"')
        queries += [f"subject:{w}" for w in words] + [f"body:{w}" for w in body]
        for q in queries:
            assert row.id in searcher.message_ids(q), (q, row.id)
            tried += 1
    assert tried > 50
    assert 0 < len(searcher.message_ids("has:attachment")) < len(rows)
    head = env.archive.ledger.head()
    again = import_path(env.meta, env.archive, env.index, corpus)
    assert again.stored == 0 and again.duplicates == report.found
    assert env.archive.ledger.head() == head
    assert "message_stored" in ledger_kinds(env.archive)
