"""The spool header's JSON, built from memoised fragments, is the text the whole header
encodes to (gateway.queue.spool.header_text against _EVENT_JSON.encode)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.queue.spool import _EVENT_JSON, header_text

_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
            | st.text(max_size=12))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_FACTS = st.dictionaries(st.sampled_from(["check", "spam", "decide", "trace", "runner",
                                          "split", "dsn", "notify", "é"]), _VALUES, max_size=6)


def _whole(qid: str, env: dict[str, Any], facts: dict[str, Any], size: int) -> str:
    return _EVENT_JSON.encode({"qid": qid, "envelope": env, "facts": facts, "size": size})


@settings(max_examples=400)
@given(qid=st.text(max_size=20), facts=_FACTS, size=st.integers(min_value=0))
def test_header_text_is_the_whole_header_encoded(qid: str, facts: dict[str, Any],
                                                 size: int) -> None:
    env = {"mail_from": "a@src.test", "rcpt_to": ["b@dst.test"], "received_at": 1.5}
    want = _whole(qid, env, facts, size)
    assert header_text(qid, env, facts, size) == want
    assert header_text(qid, env, facts, size) == want  # from the memo this time
    assert json.loads(want)["facts"] == facts


def test_values_that_differ_only_in_type_are_not_confused() -> None:
    env: dict[str, Any] = {}
    for decide in ({"x": True}, {"x": 1}, {"x": 1.0}, {"x": 0.0}, {"x": -0.0}, {"x": "1"}):
        facts = {"decide": decide}
        assert header_text("q", env, facts, 1) == _whole("q", env, facts, 1)


def test_a_key_json_would_turn_into_text_takes_the_whole_encoding() -> None:
    facts: dict[Any, Any] = {"decide": {"a": 1}, 7: {"b": 2}}
    assert header_text("q", {}, facts, 3) == _whole("q", {}, facts, 3)


def test_a_mutated_value_is_encoded_anew() -> None:
    decide: dict[str, Any] = {"rules": [{"name": "r1", "matched": False}]}
    first = header_text("q", {}, {"decide": decide}, 1)
    decide["rules"][0]["matched"] = True
    second = header_text("q", {}, {"decide": decide}, 1)
    assert second != first and second == _whole("q", {}, {"decide": decide}, 1)


def test_the_decide_facts_of_the_next_message_come_from_the_memo() -> None:
    from gateway.queue import spool

    def decided() -> dict[str, Any]:  # built afresh for each message, as decide does
        return {"decision": "accept", "rules": [{"name": "r", "matched": False, "why": "no"}]}

    spool._FACTS.clear()
    first = header_text("q1", {}, {"decide": decided()}, 1)
    second = header_text("q2", {}, {"decide": decided()}, 2)  # equal, another object
    assert len(spool._FACTS) == 1
    assert second == _whole("q2", {}, {"decide": decided()}, 2) and first != second
