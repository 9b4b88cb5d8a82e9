"""The three full-text engines answer the same queries the same way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from archive_db import *  # noqa: F403 - fixtures: pg_admin
from archive_db import PgAdmin, pg_metadata

from archive.index import Index, IndexDoc, open_index, tokenize
from archive.index.fts5 import Fts5Index, match_expression
from archive.index.pg import tsquery_literal, tsvector_literal
from archive.metadata import Metadata
from archive.query import Term, parse

DOCS = [
    IndexDoc(1, subject="Quarterly report", body="The merger with Falcon Corp is on track.",
             attachment="Revenue forecast 2024", filename="forecast.xlsx",
             participants="Alice Example alice@example.com", sha256="a" * 64),
    IndexDoc(2, subject="Lunch", body="Café au lait at noon? Wire transfer done.",
             filename="menu.pdf\nmap.png", participants="Bob bob@example.org",
             sha256="b" * 64),
    IndexDoc(3, subject="Re: merger", body="Please wire the transfer today.",
             attachment="Signed contract for the merger", filename="contract.docx",
             participants="Carol carol@example.net", sha256="c" * 64),
]
# Blob 3's id handed out again to another message (its metadata row was lost).
REUSED = IndexDoc(3, subject="Holiday rota", body="Dana covers the helpdesk in August.",
                  participants="Dana dana@example.com", sha256="d" * 64)


@pytest.fixture(params=["fts5", "whoosh", "pg"])
def index(request: pytest.FixtureRequest, tmp_path: Path, pg_admin: PgAdmin
          ) -> Iterator[Index]:
    meta: Metadata | None = None
    if request.param == "pg":
        meta = pg_metadata(pg_admin)
        meta.migrate()
    ix = open_index(request.param, data_dir=tmp_path, meta=meta)
    assert ix.add(DOCS) == 3
    yield ix
    ix.close()
    if meta is not None:
        pg_admin.close(meta)


@pytest.mark.parametrize(("query", "ids"), [
    ("merger", {1, 3}),
    ("subject:merger", {3}),
    ("body:merger", {1}),
    ("attachment:merger", {3}),
    ("attachment:contract", {3}),  # attachment: covers names too
    ("filename:contract", {3}),
    ("filename:forecast", {1}),
    ("attachment:forecast", {1}),
    ('body:"wire transfer"', {2}),
    ('"transfer today"', {3}),
    ("body:wire body:transfer", {2, 3}),
    ("cafe", {2}),  # accents folded: café
    ("CAFÉ", {2}),
    ("merg*", {1, 3}),
    ("subject:quart*", {1}),
    ("lunch OR contract", {2, 3}),
    ("(lunch OR report) merger", {1}),
    ("alice", {1}),  # header participants are in bare-word search
    ("alice@example.com", {1}),
    ("body:alice", set()),
    ("merger -contract", {1}),  # the index subtracts: "a NOT b"
    ("merger NOT (subject:merger OR lunch)", {1}),
    ("merger -merger", set()),
    ("nonexistent", set()),
])
def test_engines_agree_on_matches(index: Index, query: str, ids: set[int]) -> None:
    assert set(index.search(parse(query))) == ids


def test_more_specific_fields_score_higher(index: Index) -> None:
    scores = index.search(parse("merger"))
    assert scores[3] > 0 or scores[1] > 0
    assert all(isinstance(v, float) for v in scores.values())


def test_adding_an_indexed_document_again_is_a_no_op(index: Index) -> None:
    assert index.add([DOCS[0]]) == 0
    assert index.count() == 3
    assert set(index.search(parse("quarterly"))) == {1}


def test_an_id_given_to_another_blob_answers_for_the_new_document_only(index: Index) -> None:
    assert index.add([REUSED]) == 0  # not a new id
    assert set(index.search(parse("merger"))) == {1}
    assert set(index.search(parse("helpdesk"))) == {3}
    assert set(index.search(parse("subject:holiday dana"))) == {3}
    assert index.count() == 3
    assert index.add([REUSED]) == 0  # the same blob again: nothing changes
    assert set(index.search(parse("helpdesk OR contract"))) == {3}
    index.add([DOCS[2]])  # and back (the id reused once more)
    assert set(index.search(parse("helpdesk"))) == set()
    assert set(index.search(parse("merger"))) == {1, 3}
    assert index.count() == 3


def test_a_deleted_id_added_again_matches_again(index: Index) -> None:
    index.delete([3])
    index.add([REUSED])
    assert set(index.search(parse("helpdesk"))) == {3}
    assert set(index.search(parse("merger"))) == {1}
    assert index.count() == 3
    index.delete([3])
    assert set(index.search(parse("helpdesk"))) == set()
    assert index.count() == 2


def test_deleted_documents_never_match_again(index: Index) -> None:
    index.delete([3])
    assert set(index.search(parse("merger"))) == {1}
    assert index.count() == 2
    index.optimize()
    assert set(index.search(parse("merger"))) == {1}


def test_clear_empties_the_index_for_a_rebuild(index: Index) -> None:
    index.clear()
    assert index.count() == 0
    assert index.search(parse("merger")) == {}
    index.add(DOCS[:1])
    assert set(index.search(parse("merger"))) == {1}


def test_fts5_file_holds_terms_not_the_text(tmp_path: Path) -> None:
    ix = Fts5Index(tmp_path / "fts5.db")
    sentence = "zebras juggle turquoise lollipops beneath quantum waterfalls"
    ix.add([IndexDoc(7, body=sentence)])
    ix.close()
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert sentence.encode() not in data
    assert b"juggle turquoise" not in data


def test_fts5_match_expression_quotes_user_text() -> None:
    assert match_expression(Term("body", 'a "b" OR c')) == 'body : "a ""b"" OR c"'
    assert match_expression(parse("subject:x* OR y")) == '(subject : "x" * OR "y")'
    assert match_expression(parse("a b -c -d")) == '((("a" AND "b") NOT "c") NOT "d")'


def test_pg_literals_escape_quotes_and_carry_field_weights() -> None:
    assert tsvector_literal([("A", "it's it"), ("B", "x")]) == "'it':1A,3A 's':2A 'x':14B"
    assert tsquery_literal(Term("attachment", "o'neil deal", prefix=True)) == \
        "'o':CD <-> 'neil':CD <-> 'deal':*CD"
    assert tsquery_literal(Term("text", "x")) == "'x'"


def test_tokenizer_folds_case_and_accents_and_splits_on_underscore() -> None:
    assert tokenize("Crème_Brûlée AT 10:30, ÉTÉ") == ["creme", "brulee", "at", "10", "30", "ete"]


def test_fts5_batch_add_equals_adding_one_document_at_a_time(tmp_path: Path) -> None:
    """A batch is added with one lookup and one executemany per table; the index (the
    matches and their bm25 scores) is the one adding each document alone builds.  A
    repeated id of the same blob keeps its first document; an id already present with
    the same blob is skipped."""
    extra = [IndexDoc(4, subject="Merger memo", body="merger merger wire", sha256="e" * 64),
             IndexDoc(4, subject="ignored", body="this copy of 4 is never indexed",
                      sha256="e" * 64),
             DOCS[1],  # already present after the first batch
             IndexDoc(5, body="cafe transfer report", participants="Dana dana@example.com")]
    one = Fts5Index(tmp_path / "one.db")
    batch = Fts5Index(tmp_path / "batch.db")
    try:
        added_one = [one.add([d]) for d in DOCS] + [one.add([d]) for d in extra]
        assert sum(added_one) == 5
        assert batch.add(DOCS) == 3 and batch.add(extra) == 2
        assert one.count() == batch.count() == 5
        for query in ("merger", "wire", "ignored", "cafe", "report OR lunch", "dana",
                      "subject:merger", "transfer -merger"):
            assert batch.search(parse(query)) == one.search(parse(query)), query
        assert batch.search(parse("ignored")) == {}
    finally:
        one.close()
        batch.close()


def test_fts5_index_opened_by_racing_processes_is_created_once(tmp_path: Path) -> None:
    # Every worker process opens the index at start-up; a fresh data directory used to
    # make the losers fail with "table docs already exists" (logged as index_failed).
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for attempt in range(6):
        path = tmp_path / f"race{attempt}" / "index.sqlite"
        path.parent.mkdir()
        start, errors = ctx.Barrier(4), ctx.SimpleQueue()
        procs = [ctx.Process(target=_open_after_barrier, args=(str(path), start, errors))
                 for _ in range(4)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(30)
        assert [proc.exitcode for proc in procs] == [0] * 4
        assert [errors.get() for _ in procs] == [""] * 4
        ix = Fts5Index(path)
        assert ix.add(DOCS) == 3
        ix.close()


def _open_after_barrier(path: str, start: Any, errors: Any) -> None:
    start.wait()
    try:
        Fts5Index(path).close()
    except Exception as exc:  # reported to the parent, which names it
        errors.put(f"{type(exc).__name__}: {exc}")
    else:
        errors.put("")


def test_fts5_index_commits_are_durable_at_once(tmp_path: Path) -> None:
    # The metadata marks a batch indexed after the index commits it: a commit that a
    # power loss could undo would leave those messages unsearchable for good.
    index = Fts5Index(tmp_path / "index.db")
    try:
        assert index.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert index.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        index.close()


@pytest.mark.parametrize("contentless_delete", [False, True])
def test_fts5_replaces_a_document_with_and_without_contentless_delete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, contentless_delete: bool) -> None:
    """Older SQLite (Debian 12's 3.40) cannot delete from a contentless table: the new
    document goes under a fresh rowid that searches map back to its id."""
    import sqlite3

    import archive.index.fts5 as fts5

    if contentless_delete and sqlite3.sqlite_version_info < (3, 43, 0):
        pytest.skip(f"SQLite {sqlite3.sqlite_version} has no contentless_delete")
    monkeypatch.setattr(fts5, "_has_contentless_delete", lambda: contentless_delete)
    ix = Fts5Index(tmp_path / "index.db")
    try:
        assert ix.contentless_delete is contentless_delete
        assert ix.add(DOCS) == 3
        for _ in range(3):  # replaced several times: only the last one matches
            ix.add([REUSED])
            ix.add([DOCS[2]])
        ix.add([REUSED])
        assert ix.search(parse("helpdesk")).keys() == {3}
        assert ix.search(parse("merger")).keys() == {1}
        assert ix.search(parse("merger"), scored=False) == {1: 0.0}
        assert ix.count() == 3
    finally:
        ix.close()


def test_fts5_index_from_before_blob_hashes_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "index.db"
    ix = Fts5Index(path)
    ix.add(DOCS)
    ix.close()
    db = sqlite3.connect(path)  # the file as an earlier version left it
    db.executescript("DROP TABLE moved; CREATE TABLE p2 (id INTEGER PRIMARY KEY); "
                     "INSERT INTO p2 SELECT id FROM present; DROP TABLE present; "
                     "ALTER TABLE p2 RENAME TO present;")
    db.close()
    ix = Fts5Index(path)
    try:
        assert ix.count() == 3
        ix.add([REUSED])  # its old document has no blob hash: replaced
        assert set(ix.search(parse("helpdesk"))) == {3}
        assert set(ix.search(parse("merger"))) == {1}
        assert ix.add([DOCS[0]]) == 0  # no hash recorded for 1 either: replaced, same text
        assert set(ix.search(parse("quarterly"))) == {1} and ix.count() == 3
    finally:
        ix.close()
