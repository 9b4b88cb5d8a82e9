"""Legal holds: the query is kept as evidence, matches are recorded, release keeps history;
every create and release is audited in the database and the ledger (no personal data)."""

from __future__ import annotations

import pytest
from admin_env import *  # noqa: F403 - fixtures: env
from admin_env import T0, Env, ledger_kinds
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import M1, M2, M3

from archive.holds import HoldError, create_hold, get_hold, list_holds, release_hold
from archive.metadata import Hold
from archive.query import QueryError


def test_create_records_matches_and_the_query_as_evidence(env: Env) -> None:
    m1 = env.add(M1)
    m3 = env.add(M3)
    env.add(M2)
    env.indexer().run()
    info = create_hold(env.meta, env.archive, env.searcher(), "C-1", "body:merger",
                       "hugo", reason="SEC inquiry", clock=lambda: T0)
    assert info.active and info.items == 2 and info.query == "body:merger"
    shown = get_hold(env.meta, "C-1", with_ids=True)
    assert shown is not None and set(shown.message_ids) == {m1, m3}
    assert shown.created_by == "hugo" and shown.created_at == T0
    assert shown.reason == "SEC inquiry"
    # The hold:CASE query finds what the hold recorded.
    assert set(env.searcher().message_ids("hold:C-1")) == {m1, m3}


def test_create_and_release_are_audited_in_database_and_ledger_without_personal_data(
        env: Env) -> None:
    env.add(M1)
    env.indexer().run()
    create_hold(env.meta, env.archive, env.searcher(), "C-2", "from:alice@example.com",
                "hugo", clock=lambda: T0)
    release_hold(env.meta, env.archive, "C-2", "ines", clock=lambda: T0)
    events = env.meta.audit_events()
    assert [(e.who, e.action, e.target, e.result_count) for e in events] == [
        ("hugo", "hold", "C-2", 1), ("ines", "release", "C-2", 1)]
    assert events[0].query == "from:alice@example.com"
    kinds = ledger_kinds(env.archive)
    assert kinds.count("hold_placed") == 1 and kinds.count("hold_released") == 1
    assert kinds.count("audit") == 2
    ledger_text = b"".join(p.read_bytes() for p in env.archive.paths.ledger.glob("*.jsonl"))
    assert b"alice@example.com" not in ledger_text
    assert b"hugo" not in ledger_text and b"ines" not in ledger_text


def test_release_keeps_the_hold_as_history_and_cannot_repeat(env: Env) -> None:
    env.indexer().run()
    create_hold(env.meta, env.archive, env.searcher(), "C-3", "subject:lunch", "hugo")
    released = release_hold(env.meta, env.archive, "C-3", "ines")
    assert not released.active and released.released_by == "ines"
    assert [h.case for h in list_holds(env.meta)] == ["C-3"]
    assert list_holds(env.meta, include_released=False) == []
    with pytest.raises(HoldError, match="already released"):
        release_hold(env.meta, env.archive, "C-3", "ines")
    with pytest.raises(HoldError, match="already exists"):
        create_hold(env.meta, env.archive, env.searcher(), "C-3", "subject:lunch", "hugo")
    with pytest.raises(HoldError, match="no hold"):
        release_hold(env.meta, env.archive, "nope", "ines")


def test_malformed_query_creates_no_hold(env: Env) -> None:
    head = env.archive.ledger.head()
    with pytest.raises(QueryError):
        create_hold(env.meta, env.archive, env.searcher(), "C-4", "from:(", "hugo")
    with env.meta.session() as s:
        assert s.query(Hold).count() == 0
    assert env.archive.ledger.head() == head
