"""The queue's shape (qshape): rows, age buckets, states, top N and the JSON form."""

from __future__ import annotations

import json

import pytest

from gateway.queue.select import Entry
from gateway.queue.shape import BUCKETS, bucket_of, reason_of, render, summarize, to_json


def _entry(qid: str, *pending: str, age_min: float = 1.0, state: str = "deferred",
           sender: str = "alice@src.test", error: str = "") -> Entry:
    return Entry(qid=qid, age_s=age_min * 60, sender=sender, pending=pending, state=state,
                 last_error=error)


@pytest.mark.parametrize(("minutes", "bucket"), [
    (0, "<5m"), (4.99, "<5m"), (5, "5-10m"), (19, "10-20m"), (39, "20-40m"),
    (79, "40-80m"), (159, "80-160m"), (160, "160m+"), (10_000, "160m+"),
])
def test_age_buckets_double_like_qshape(minutes: float, bucket: str) -> None:
    assert BUCKETS[bucket_of(minutes * 60)] == bucket


def test_rows_count_messages_per_pending_domain_by_age_and_state() -> None:
    entries = [
        _entry("1", "a@store.test", "b@store.test", age_min=2),  # counted once for store
        _entry("2", "a@store.test", age_min=7),
        _entry("3", "c@Partner.test", "a@store.test", age_min=200, state="held"),
        _entry("4", "d@partner.test", age_min=1, state="active"),
        _entry("5", "e@quiet.test", age_min=30, state="quarantined"),
    ]
    shape = summarize(entries)
    assert [(r.key, r.total) for r in shape.rows] == [
        ("store.test", 3), ("partner.test", 2), ("quiet.test", 1)]
    store = shape.rows[0]
    assert dict(zip(BUCKETS, store.ages, strict=True))["<5m"] == 1
    assert dict(zip(BUCKETS, store.ages, strict=True))["5-10m"] == 1
    assert dict(zip(BUCKETS, store.ages, strict=True))["160m+"] == 1
    assert (store.states["deferred"], store.states["held"]) == (2, 1)
    # TOTAL counts messages: message 3 is in two rows but one message.
    assert shape.total.total == 5
    assert shape.total.states == {"active": 1, "deferred": 2, "held": 1, "quarantined": 1}


def test_top_keeps_the_largest_rows_and_says_how_many_were_left_out() -> None:
    entries = [_entry(str(i), f"x@d{i % 3}.test") for i in range(7)]  # d0: 3, d1: 2, d2: 2
    shape = summarize(entries, top=2)
    assert [(r.key, r.total) for r in shape.rows] == [("d0.test", 3), ("d1.test", 2)]
    assert shape.more_rows == 1
    assert shape.total.total == 7
    assert render(shape)[-1] == "(1 more row(s); see --top)"


def test_by_sender_groups_by_sender_domain_with_the_null_sender_apart() -> None:
    shape = summarize([_entry("1", "a@x.test", sender="Spam@Bulk.test"),
                       _entry("2", "a@x.test", sender="other@bulk.test"),
                       _entry("3", "a@x.test", sender="")], by="sender")
    assert [(r.key, r.total) for r in shape.rows] == [("bulk.test", 2), ("<>", 1)]


def test_by_reason_uses_the_enhanced_code_and_the_start_of_the_text() -> None:
    assert reason_of(_entry("1", error="451 4.3.0 Mail store unavailable")) == \
        "4.3.0 Mail store unavailable"
    assert reason_of(_entry("1", error="421 Service not available")) == \
        "421 Service not available"
    assert reason_of(_entry("1", error="connection refused by 127.0.0.1:25")) == \
        "connection refused by 127.0.0.1:25"
    assert len(reason_of(_entry("1", error="451 4.3.0 " + "x" * 200))) == 40
    assert reason_of(_entry("1")) == "(no attempt yet)"
    held = Entry(qid="h", age_s=0, sender="", pending=(), state="held", held_stage="archive")
    assert reason_of(held) == "held at archive"
    shape = summarize([_entry("1", "a@x.test", error="451 4.3.0 down"),
                       _entry("2", "b@y.test", error="451 4.3.0 down")], by="reason")
    assert [(r.key, r.total) for r in shape.rows] == [("4.3.0 down", 2)]


def test_json_has_stable_field_names_and_round_trips() -> None:
    obj = json.loads(json.dumps(to_json(summarize([_entry("1", "a@x.test", age_min=12)]))))
    assert obj["by"] == "domain"
    assert obj["buckets"] == list(BUCKETS)
    assert obj["rows"] == [{"key": "x.test", "total": 1,
                            "ages": {b: int(b == "10-20m") for b in BUCKETS},
                            "states": {"active": 0, "deferred": 1, "held": 0,
                                       "quarantined": 0}}]
    assert obj["total"]["key"] == "TOTAL" and obj["total"]["total"] == 1
    assert obj["more_rows"] == 0


def test_text_puts_total_first_then_rows_in_order() -> None:
    lines = render(summarize([_entry("1", "a@x.test"), _entry("2", "a@y.test", "b@x.test")]))
    assert lines[0].split()[:3] == ["RECIPIENT", "DOMAIN", "total"]
    assert [line.split()[:2] for line in lines[1:]] == [["TOTAL", "2"], ["x.test", "2"],
                                                         ["y.test", "1"]]


def test_an_unknown_grouping_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown grouping"):
        summarize([], by="color")
