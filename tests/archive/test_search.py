"""archive.search: the query language end to end, on SQLite and PostgreSQL, every engine."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin, search_env
from archive_db import M1, M2, M3, Corpus, PgAdmin, corpus_dir, pg_metadata
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive.index import Index, Indexer, open_index
from archive.metadata import AuditEvent, Metadata
from archive.query import QueryError, parse
from archive.search import (
    Searcher,
    audit,
    make_snippet,
    register_audit_hook,
    unregister_audit_hook,
)

Env = tuple[Metadata, Index, Corpus, Indexer]


# (metadata backend, full-text engine): every engine with each backend it runs with.
COMBOS = [("sqlite", "fts5"), ("sqlite", "whoosh"), ("postgresql", "fts5"),
          ("postgresql", "pg")]


def load(meta: Metadata, engine: str, data_dir: Path) -> tuple[Searcher, dict[str, int]]:
    index = open_index(engine, data_dir=data_dir, meta=meta)
    corpus = Corpus()
    ids = {
        "m1": corpus.add(meta, M1, rcpt_to=["bob@example.org", "boss@corp.example"],
                         mail_from="alice@example.com", direction="inbound",
                         verdicts={"spf": {"result": "fail"}, "dmarc": {"result": "fail"}},
                         rules=["finance-retain-7y"]),
        "m2": corpus.add(meta, M2, rcpt_to=["alice@example.com", "carol@example.net"],
                         direction="outbound", verdicts={"spf": {"result": "pass"}}),
        "m3": corpus.add(meta, M3, rcpt_to=["dave@sub.example.com"], direction="internal"),
        # The same bytes as m1 received again: one blob, a second envelope.
        "m4": corpus.add(meta, M1, rcpt_to=["erin@example.org"], direction="inbound",
                         received_at=datetime(2024, 8, 1, tzinfo=UTC)),
    }
    assert Indexer(meta, index, corpus.get).run() == 3
    meta.place_hold("C-17", "subject:lunch", "officer", [ids["m2"]],
                    datetime(2024, 9, 1, tzinfo=UTC))
    return Searcher(meta, index, corpus.get), ids


@pytest.fixture(scope="module", params=COMBOS, ids=["-".join(c) for c in COMBOS])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           pg_admin: PgAdmin) -> Iterator[tuple[Searcher, dict[str, int]]]:
    """Four messages, loaded once per combination: the tests below only read."""
    backend, engine = request.param
    data_dir = tmp_path_factory.mktemp(engine)
    meta = Metadata.for_data_dir(data_dir) if backend == "sqlite" else pg_metadata(pg_admin)
    meta.migrate()
    searcher, ids = load(meta, engine, data_dir)
    yield searcher, ids
    searcher.index.close()
    pg_admin.close(meta)


@pytest.mark.parametrize(("query", "expected"), [
    ("from:alice@example.com", {"m1", "m4"}),
    ("from:ALICE", {"m1", "m4"}),
    ("from:@example.org", {"m2"}),
    ("to:alice@example.com", {"m2"}),
    ("to:@example.com", {"m2"}),  # @domain: that domain exactly, not sub.example.com ...
    ("to:example.com", {"m2", "m3"}),  # ... a bare word: a substring
    ("cc:carol", {"m2"}),
    ("cc:jones", {"m2"}),  # display name
    ("bcc:boss@corp.example", {"m1"}),  # envelope only: not in m4's envelope
    ("participant:erin@example.org", {"m4"}),
    ("participant:carol@example.net", {"m2", "m3"}),
    ("subject:merger", {"m3"}),
    ("body:merger", {"m1", "m3", "m4"}),
    ("merger", {"m1", "m3", "m4"}),
    ('body:"wire transfer"', {"m1", "m4"}),
    ('"transfer wire"', set()),
    ("attachment:revenue", {"m1", "m4"}),
    ("filename:forecast", {"m1", "m4"}),
    ("has:attachment", {"m1", "m4"}),
    ("NOT has:attachment", {"m2", "m3"}),
    ("date:2024-01", {"m1", "m4"}),
    ("date:2024-02..2024-06", {"m2"}),
    ("date:2024-03-10", {"m2"}),
    ("before:2024-03", {"m1", "m4"}),
    ("after:2024-03", {"m3"}),
    ("size:>100K", {"m3"}),
    ("size:<100k", {"m1", "m2", "m4"}),
    ("direction:outbound", {"m2"}),
    ("direction:inbound", {"m1", "m4"}),
    ("spf:fail", {"m1"}),
    ("dmarc:fail", {"m1"}),
    ("NOT spf:fail", {"m2", "m3", "m4"}),  # no verdict counts as "not fail"
    ("rule:finance-retain-7y", {"m1"}),
    ("hold:C-17", {"m2"}),
    ("hold:C-99", set()),
    ("merger OR lunch", {"m1", "m2", "m3", "m4"}),
    ("merger -subject:merger", {"m1", "m4"}),
    ("merger -(subject:merger OR wire)", set()),
    ("merger -from:carol", {"m1", "m4"}),
    ("participant:example.com -participant:@example.com", {"m3"}),
    ("(subject:lunch OR spf:fail) direction:inbound", {"m1"}),
    ("merger (from:carol OR bcc:boss@corp.example)", {"m1", "m3"}),
    ("NOT (merger OR lunch)", set()),
    ("cafe from:bob", {"m2"}),
    ("merg* date:2024-07", {"m3"}),
])
def test_each_field_and_combination_finds_exactly_its_messages(
        loaded: tuple[Searcher, dict[str, int]], query: str, expected: set[str]) -> None:
    searcher, ids = loaded
    result = searcher.search(query, limit=100, snippets=False)
    names = {k for k, v in ids.items() if v in {h.message.id for h in result.hits}}
    assert names == expected
    assert result.total == len(expected)
    assert sorted(searcher.message_ids(query)) == sorted(ids[n] for n in expected)


def test_message_id_query_finds_both_envelopes_of_one_blob(
        loaded: tuple[Searcher, dict[str, int]]) -> None:
    searcher, ids = loaded
    mid = searcher.meta.get(ids["m1"]).message_id  # type: ignore[union-attr]
    result = searcher.search(f"message-id:<{mid}>")
    assert {h.message.id for h in result.hits} == {ids["m1"], ids["m4"]}


def test_results_are_newest_first_with_limit_offset_and_total(
        loaded: tuple[Searcher, dict[str, int]]) -> None:
    searcher, ids = loaded
    everything = "merger OR lunch"
    page1 = searcher.search(everything, limit=2, snippets=False)
    page2 = searcher.search(everything, limit=2, offset=2, snippets=False)
    assert page1.total == page2.total == 4
    order = [h.message.id for h in page1.hits + page2.hits]
    # m3 (July) is newest by Date:, then m2 (March); m1 and m4 share a Date: -> id desc.
    assert order == [ids["m3"], ids["m2"], ids["m4"], ids["m1"]]


def test_relevance_order_puts_the_subject_hit_first(
        loaded: tuple[Searcher, dict[str, int]]) -> None:
    searcher, ids = loaded
    result = searcher.search("merger", order="relevance", snippets=False)
    assert result.hits[0].message.id == ids["m3"]
    assert result.hits[0].score > 0


def test_rows_carry_what_the_cli_prints(loaded: tuple[Searcher, dict[str, int]]) -> None:
    searcher, ids = loaded
    hit = searcher.search("subject:lunch").hits[0]
    row = hit.to_json()
    assert row["id"] == ids["m2"]
    assert row["from"] == "bob@example.org" and row["to"] == ["alice@example.com"]
    assert row["subject"] == "Lunch" and row["date"] == "2024-03-10T12:00:00+00:00"
    assert row["message_id"].endswith("@test.example")
    json.dumps(row)


def test_snippets_are_cut_from_the_fetched_message_with_terms_marked(
        loaded: tuple[Searcher, dict[str, int]]) -> None:
    searcher, _ = loaded
    hit = searcher.search('body:"wire transfer"').hits[0]
    assert "[Wire] [transfer] pending" in hit.snippet
    far = searcher.search("subject:merger closes").hits[0]
    assert far.snippet.startswith("…") and "[closes]" in far.snippet


def test_without_fetch_there_are_no_snippets(
        loaded: tuple[Searcher, dict[str, int]]) -> None:
    searcher, _ = loaded
    blind = Searcher(searcher.meta, searcher.index, None)
    assert [h.snippet for h in blind.search("merger").hits] == ["", "", ""]


def test_a_query_error_reaches_the_caller_with_its_column(
        loaded: tuple[Searcher, dict[str, int]]) -> None:
    searcher, _ = loaded
    with pytest.raises(QueryError) as info:
        searcher.search("merger AND (from:alice")
    assert info.value.column == 12


def test_audit_writes_the_database_then_calls_the_hooks(meta: Metadata) -> None:
    seen: list[AuditEvent] = []
    register_audit_hook(seen.append)
    try:
        event = audit(meta, "officer7", "search", query="from:x", result_count=2,
                      clock=lambda: datetime(2024, 1, 1, tzinfo=UTC))
    finally:
        unregister_audit_hook(seen.append)
    assert seen == [event]
    stored = meta.audit_events()
    assert [(e.who, e.action, e.query, e.result_count) for e in stored] == [
        ("officer7", "search", "from:x", 2)]
    assert stored[0].at == datetime(2024, 1, 1, tzinfo=UTC)


def test_make_snippet_marks_prefix_matches_and_strips_control_characters() -> None:
    terms = [t for t in [parse("merg*")] if hasattr(t, "text")]
    snippet = make_snippet("A\x00B\tthe Merging\x07 of things", terms)  # type: ignore[arg-type]
    assert snippet == "A B the [Merging] of things"


@pytest.fixture
def corpus_env(search_env: Callable[[str], Env], backend: str
               ) -> tuple[Env, dict[int, bytes]]:
    env = search_env("pg" if backend == "postgresql" else "fts5")
    meta, _, corpus, indexer = env
    root = corpus_dir()
    files = [p for p in sorted(root.rglob("*"))
             if p.is_file() and not p.name.startswith(("LICENSE", "COPYING"))]
    by_id: dict[int, bytes] = {}
    for path in files[::2]:  # half the corpus: the round trip, in seconds
        raw = path.read_bytes()
        by_id[corpus.add(meta, raw, source=f"import:{path.name}")] = raw
    indexer.run()
    return env, by_id


def test_mime_corpus_round_trip_search_by_each_field(
        corpus_env: tuple[Env, dict[int, bytes]]) -> None:
    (meta, index, corpus, _), by_id = corpus_env
    searcher = Searcher(meta, index, corpus.get)
    checked = 0
    for pk in sorted(by_id)[::2]:
        msg = meta.get(pk)
        assert msg is not None
        assert corpus.get(msg.sha256) == by_id[pk]  # byte-identical
        queries = []
        if msg.message_id and '"' not in msg.message_id:
            queries.append(f'message-id:"{msg.message_id}"')
        if msg.from_addr and "@" in msg.from_addr and '"' not in msg.from_addr:
            queries.append(f'from:"{msg.from_addr}"')
        words = [w for w in msg.subject.replace('"', " ").split() if any(c.isalnum() for c in w)]
        if words:
            queries.append('subject:"' + " ".join(words[:4]) + '"')
        queries.append(f"date:{msg.date:%Y-%m-%d}")
        for q in queries:
            assert pk in searcher.message_ids(q), q
            checked += 1
    assert checked > 250


@pytest.mark.parametrize(("backend", "engine"), COMBOS, ids=["-".join(c) for c in COMBOS])
def test_rebuild_recreates_the_index_from_the_store_alone(
        search_env: Callable[[str], Env], engine: str) -> None:
    meta, index, corpus, indexer = search_env(engine)
    pk = corpus.add(meta, M1)
    corpus.add(meta, M2)
    assert indexer.run() == 2 and indexer.run() == 0  # nothing waits any more
    searcher = Searcher(meta, index, corpus.get)
    index.clear()
    assert searcher.message_ids("merger") == []
    progress: list[int] = []
    assert indexer.rebuild(batch=1, progress=progress.append) == 2
    assert progress == [1, 2]
    assert searcher.message_ids("merger") == [pk]


# Leaves whose answers are known from the table above; random trees of them must
# get exactly the answer set algebra gives (AND: intersection, OR: union, NOT: complement).
LEAVES: dict[str, set[str]] = {
    "merger": {"m1", "m3", "m4"}, "subject:lunch": {"m2"}, 'body:"wire transfer"': {"m1", "m4"},
    "filename:forecast": {"m1", "m4"}, "from:carol": {"m3"}, "bcc:boss@corp.example": {"m1"},
    "has:attachment": {"m1", "m4"}, "direction:outbound": {"m2"}, "spf:fail": {"m1"},
    "size:>100K": {"m3"}, "date:2024-03": {"m2"}, "hold:C-17": {"m2"},
    "participant:erin@example.org": {"m4"}, "cafe": {"m2"},
}
ALL = {"m1", "m2", "m3", "m4"}


def _trees() -> st.SearchStrategy[tuple[str, frozenset[str]]]:
    leaf = st.sampled_from(sorted(LEAVES)).map(lambda q: (q, frozenset(LEAVES[q])))

    def extend(children: st.SearchStrategy[tuple[str, frozenset[str]]]
               ) -> st.SearchStrategy[tuple[str, frozenset[str]]]:
        both = st.tuples(children, children)
        return st.one_of(
            both.map(lambda p: (f"({p[0][0]}) ({p[1][0]})", p[0][1] & p[1][1])),
            both.map(lambda p: (f"({p[0][0]}) OR ({p[1][0]})", p[0][1] | p[1][1])),
            children.map(lambda c: (f"NOT ({c[0]})", frozenset(ALL - c[1]))),
        )
    return st.recursive(leaf, extend, max_leaves=6)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_trees())
def test_random_boolean_trees_agree_with_set_algebra(
        loaded: tuple[Searcher, dict[str, int]], tree: tuple[str, frozenset[str]]) -> None:
    searcher, ids = loaded
    query, expected = tree
    found = set(searcher.message_ids(query))
    assert found == {ids[n] for n in expected}, query
