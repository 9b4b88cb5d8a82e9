"""The archive stage's records and receipts are byte for byte what the old code made.

Fast paths: record_for takes the copy and its link (no dataclasses.replace of every
record) and receipt_document encodes with one prebuilt JSON encoder, the decision and
verdicts from a memo of their encodings keyed by their marshal bytes (the confusable
values below: equal under ==, different in JSON).  The reference
below is the old code; both run on the same extraction (archive.extract's own fast
paths have their differential test in tests/archive/test_extract_fastpaths.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive.extract import extract
from archive.metadata import MessageRecord
from archive.receipts import KIND
from bench.relay import make_messages, message_sizes
from gateway.archive_stage import (
    ArchiveStage,
    archive_state,
    copies_of,
    linked,
    retention_end,
)
from gateway.envelope import Envelope, TlsInfo
from gateway.pipeline import MessageContext

NOW = datetime(2026, 11, 28, 1, 30, tzinfo=UTC)


# -- the reference: the code before the fast paths ------------------------------------

def _old_iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def old_receipt_document(rec: MessageRecord, envelope: Mapping[str, Any], qid: str) -> bytes:
    doc = {
        "kind": KIND, "message_sha256": rec.sha256, "qid": qid, "envelope": dict(envelope),
        "received_at": _old_iso(rec.received_at), "direction": rec.direction,
        "state": rec.state, "source": rec.source, "tls": rec.tls,
        "verdicts": rec.verdicts, "decision": rec.decision, "rules": list(rec.rules),
        "retention_until": _old_iso(rec.retention_until),
        "copy": rec.copy, "linked_sha256": rec.link_sha256,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode()


def old_record_for(ctx: MessageContext, sha256: str, now: datetime,
                   data: bytes | None = None) -> MessageRecord:
    env = ctx.envelope
    decide: dict[str, Any] = ctx.facts.get("decide") or {}
    runner = ctx.facts.get("runner")
    if isinstance(runner, dict) and runner.get("action") == "reject":
        decide = {**decide, "rejected": {k: runner.get(k) for k in ("stage", "reply", "reason")}}
    received = datetime.fromtimestamp(env.received_at, UTC) if env.received_at else now
    verdicts = dict(ctx.facts.get("check") or {})
    if "spam" in ctx.facts:
        verdicts["spam"] = ctx.facts["spam"]
    return MessageRecord(
        sha256=sha256,
        extracted=extract(ctx.data if data is None else data),
        received_at=received,
        direction=str(decide.get("direction") or env.role),
        source="smtp",
        state=archive_state(ctx),
        mail_from=env.mail_from,
        rcpt_to=list(env.rcpt_to),
        client_ip=env.client_ip,
        helo=env.helo,
        tls=f"{env.tls.version} {env.tls.cipher}" if env.tls else "",
        auth_user=env.auth_user or "",
        retention_until=retention_end(received, decide.get("retention")),
        verdicts=verdicts,
        decision=decide or None,
        rules=[r["name"] for r in decide.get("rules", []) if r.get("matched")],
        once=env.received_at > 0,
    )


def old_prepare(ctx: MessageContext, now: datetime) -> tuple[list[MessageRecord], list[bytes]]:
    copies = copies_of(ctx)
    shas = [hashlib.sha256(c.data).hexdigest() for c in copies]
    envelope = ctx.envelope.to_dict()
    recs = [replace(old_record_for(ctx, sha, now, c.data), copy=c.kind, link_sha256=link)
            for c, sha, link in zip(copies, shas, linked(copies, shas), strict=True)]
    return recs, [old_receipt_document(r, envelope, ctx.qid) for r in recs]


@dataclass
class _Clock:
    now: datetime

    def clock(self) -> datetime:
        return self.now


def new_prepare(ctx: MessageContext, now: datetime) -> tuple[list[MessageRecord], list[bytes]]:
    return ArchiveStage._prepare(_Clock(now), ctx, copies_of(ctx))  # type: ignore[arg-type]


def _outcome(prepare: Any, ctx: MessageContext) -> object:
    try:
        recs, receipts = prepare(ctx, NOW)
    except Exception as exc:  # e.g. a lone surrogate in a fact: the same error both ways
        return f"{type(exc).__name__}: {exc}"
    return recs, repr(recs), receipts  # repr: datetimes with their zones


def assert_same(ctx: MessageContext) -> None:
    assert _outcome(new_prepare, ctx) == _outcome(old_prepare, ctx)


# -- contexts -------------------------------------------------------------------------

def _ctx(data: bytes, facts: dict[str, Any], *, received: bytes | None = None,
         tls: bool = True, auth_user: str | None = None, received_at: float = 1.8e9,
         rcpt: str = "rcpt@dst.example") -> MessageContext:
    env = Envelope("bench@src.example", [rcpt, "b\u00fcro@dst.example"], client_ip="127.0.0.1",
                   client_port=40001, helo="localhost",
                   tls=TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384") if tls else None,
                   auth_user=auth_user, received_at=received_at, mail_options=["BODY=8BITMIME"])
    return MessageContext(env, data, facts, qid="Q7", received=received)


BENCH_FACTS: dict[str, Any] = {
    "check": {"spf": {"result": "none"}, "dkim": {"result": "none"}},
    "spam": {"score": 0.1, "verdict": "ham"},
    "decide": {"decision": "accept", "direction": "inbound", "retention": "7y",
               "rules": [{"name": "default", "matched": True}, {"name": "x", "matched": False}]},
    "trace": [{"stage": "check", "action": "accept"}],
}


def test_bench_messages_record_and_receipt_as_before() -> None:
    for data in make_messages(message_sizes(40, 1), 1):
        assert_same(_ctx(data, BENCH_FACTS))


def test_two_copies_record_and_receipt_as_before() -> None:
    sent, received = make_messages(message_sizes(2, 3), 3)
    ctx = _ctx(sent, BENCH_FACTS, received=received)
    recs, receipts = new_prepare(ctx, NOW)
    assert [r.copy for r in recs] == ["received", "sent"] and len(receipts) == 2
    assert_same(ctx)


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12),
                     st.floats(allow_nan=False), st.text(max_size=8),
                     st.sampled_from(["caf\u00e9", "\u65e5\u672c", "\x00", "\ud800"]),
                     st.builds(lambda: NOW), st.just(b"raw"), st.just(frozenset({1})))
_JSONISH = st.recursive(
    _SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                      st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)


@st.composite
def _facts(draw: st.DrawFn) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    decide: dict[str, Any] = draw(st.dictionaries(st.sampled_from(["x", "why", "note"]), _JSONISH,
                                                  max_size=2))
    decide["decision"] = draw(st.sampled_from(["accept", "quarantine", "discard", "odd", None]))
    if draw(st.booleans()):
        decide["direction"] = draw(st.sampled_from(["inbound", "outbound", "", None]))
    if draw(st.booleans()):
        decide["retention"] = draw(st.sampled_from(["forever", "1y", "6mo", "2w", "30d", None]))
    if draw(st.booleans()):
        decide["rules"] = draw(st.lists(st.fixed_dictionaries(
            {"name": st.text(max_size=6), "matched": st.booleans()}), max_size=3))
    if draw(st.booleans()):
        facts["decide"] = decide
    if draw(st.booleans()):
        facts["check"] = draw(st.dictionaries(st.text(max_size=5), _JSONISH, max_size=3))
    if draw(st.booleans()):
        facts["spam"] = draw(_JSONISH)
    if draw(st.booleans()):
        facts["runner"] = {"action": draw(st.sampled_from(["reject", "accept"])),
                           "stage": "spam", "reply": "550 5.7.1 no", "reason": draw(_JSONISH)}
    if draw(st.booleans()):
        facts["trace"] = [{"action": draw(st.sampled_from(["accept", "quarantine", "discard"]))}]
    return facts


_DATA = [
    *make_messages(message_sizes(4, 5), 5),
    b"From: =?utf-8?q?J=C3=B6rg?= <j@b.example>\r\nSubject: caf\xc3\xa9\r\n\r\nbody\r\n",
    b"Date: yesterday\r\nTo: Team: a@b.example;\r\n\r\n\xff\xfe\r\n",
    b"",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(facts=_facts(), data=st.sampled_from(range(len(_DATA))),
       second=st.sampled_from([None, *range(len(_DATA))]), tls=st.booleans(),
       auth_user=st.sampled_from([None, "", "alice", "\u00e9mile"]),
       received_at=st.sampled_from([0.0, 1.8e9, 1_800_000_000.123456]))
def test_generated_contexts_record_and_receipt_as_before(
        facts: dict[str, Any], data: int, second: int | None, tls: bool,
        auth_user: str | None, received_at: float) -> None:
    assert_same(_ctx(_DATA[data], facts, received=None if second is None else _DATA[second],
                     tls=tls, auth_user=auth_user, received_at=received_at))


# -- receipts from memoized fragments (archive.receipts._FRAGMENTS) -----------------------

class _Text(str):
    """A str subclass: marshal refuses it, so its dict is encoded without the memo."""


# Values that compare equal (or marshal alike) but encode differently, and the types
# default=str turns into text: each one encoded after the others, memo warm.
_CONFUSABLE: list[Any] = [
    True, 1, 1.0, False, 0, 0.0, -0.0, None, "1", "true", b"x", bytearray(b"x"),
    memoryview(b"x"), (1, 2), [1, 2], frozenset({1}), {"b": 1, "a": 2}, {"a": 2, "b": 1},
    {1: "x"}, {True: "x"}, {1.0: "x"}, _Text("x"), "x", float("nan"), float("inf"), NOW,
    "\ud800", 10**30,
]


def _confusable_facts(value: Any) -> dict[str, Any]:
    return {"check": {"spf": {"result": value}}, "spam": value,
            "decide": {**BENCH_FACTS["decide"], "why": value, "nested": [{"v": value}]}}


def test_receipts_of_confusable_values_as_before() -> None:
    from archive import receipts
    receipts._FRAGMENTS.clear()
    data = make_messages(message_sizes(1, 9), 9)[0]
    for _ in range(2):  # cold memo, then warm: every value after every other
        for value in _CONFUSABLE:
            assert_same(_ctx(data, _confusable_facts(value)))
    assert receipts._FRAGMENTS  # the memo was used, not only the general encoding


def test_receipt_fragments_are_reused_across_messages() -> None:
    from archive import receipts
    receipts._FRAGMENTS.clear()
    for data in make_messages(message_sizes(5, 2), 2):
        assert_same(_ctx(data, BENCH_FACTS))
    # The decision and the verdicts, once each for all five messages.
    assert len(receipts._FRAGMENTS) == 2


# -- retention_end: labels remembered, the calendar asked only after day 28 -----------

def old_retention_end(start: datetime, label: Any) -> datetime | None:
    import calendar
    import re
    from datetime import timedelta
    if not label or label == "forever":
        return None
    m = re.match(r"^(\d+)(y|mo|w|d)$", label.strip().lower())
    if not m:
        raise ValueError(f"unknown retention period {label!r}")
    n, unit = int(m.group(1)), m.group(2)
    if unit in ("y", "mo"):
        months = start.month - 1 + (n * 12 if unit == "y" else n)
        year, month = start.year + months // 12, months % 12 + 1
        day = min(start.day, calendar.monthrange(year, month)[1])
        return start.replace(year=year, month=month, day=day)
    return start + timedelta(days=n * (7 if unit == "w" else 1))


def _retention_outcome(fn: Any, start: datetime, label: Any) -> object:
    try:
        return repr(fn(start, label))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


_LABELS: list[Any] = ["1y", "7Y", " 6mo ", "2w", "30d", "forever", "", None, "0y", "1mo", "13mo",
                      "12mo", "x", "1 y", "7y\n", "8000y", "10000y", 5, ["1y"], "1d", "0d"]


@given(start=st.datetimes(timezones=st.sampled_from([UTC, None])),
       label=st.sampled_from(_LABELS))
@settings(max_examples=500, deadline=None)
def test_retention_end_as_before(start: datetime, label: Any) -> None:
    for _ in range(2):  # the label cold, then remembered
        assert (_retention_outcome(retention_end, start, label)
                == _retention_outcome(old_retention_end, start, label))


@pytest.mark.parametrize("day", [28, 29, 30, 31])
def test_retention_end_at_month_ends_as_before(day: int) -> None:
    for year in (2023, 2024, 2100, 9998, 9999):
        for month in (1, 2, 3, 12):
            try:
                start = datetime(year, month, day, 12, tzinfo=UTC)
            except ValueError:
                continue
            for label in _LABELS:
                assert (_retention_outcome(retention_end, start, label)
                        == _retention_outcome(old_retention_end, start, label))
