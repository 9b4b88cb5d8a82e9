"""Resolver.remember/recall: SPF verdicts and DMARC records kept across messages.

A remembered result is taken only while every DNS answer it was computed from is
still cached, unchanged: the same evaluation input.  These tests hold the
remembered path to the evaluation it skips (spf._evaluate, dmarc._discover), on
the RFC 7208 suite and on the bench generator's and the corpus's messages through
the whole CheckStage.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from authcorpus import corpus_dir
from authdns import DnsTestServer, Zone
from test_spf import KNOWN_DIFFERENCES, _suite_cases

from bench.relay import make_messages, message_sizes
from gateway.check import authresults, dmarc, spf
from gateway.check.config import CheckConfig
from gateway.check.dns import Resolver, TtlCache
from gateway.check.stage import HEADER_MEMO, CheckStage
from gateway.check.verdicts import SpfVerdict, Verdicts
from gateway.envelope import Envelope
from gateway.pipeline import MessageContext


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _forgetful(r: Resolver) -> Resolver:
    """The same resolver (same cache) with nothing ever recalled: the old path."""
    r.recall = lambda key: None  # type: ignore[method-assign]
    return r


def _cases() -> list[Any]:
    # the suite's cases, with their ids, without test_spf's xfail marks: here the
    # known differences must agree with the evaluation too
    return [pytest.param(*p.values, p.id, id=p.id,
                         marks=[m for m in p.marks if m.name == "skip"])
            for p in _suite_cases()]


@pytest.mark.parametrize(("zonedata", "case", "scenario", "case_id"), _cases())
def test_rfc7208_suite_remembered_equals_evaluated(
        dns_server: DnsTestServer, zonedata: dict[str, Any], case: dict[str, Any],
        scenario: int, case_id: str | None) -> None:
    dns_server.zone.load_spf_suite(zonedata)
    r = Resolver([dns_server.hostport], timeout=0.3, cache=TtlCache())
    args = (r, case["host"], case["mailfrom"], case["helo"])
    first = spf.check_sync(*args, default_explanation="DEFAULT")
    again = spf.check_sync(*args, default_explanation="DEFAULT")
    # the evaluation the memo skips, on the same cached answers
    reference = spf._evaluate(*args, "DEFAULT")
    assert again == reference
    if first.result != "temperror":  # a DNS error is not cached: the retry may differ
        assert first == reference
    if case_id in KNOWN_DIFFERENCES:
        return
    expected = case["result"]
    allowed = expected if isinstance(expected, list) else [expected]
    assert again.result in allowed, f"{case.get('spec')}: got {again.result} ({again.reason})"
    if "explanation" in case:
        assert again.reason == case["explanation"]


def test_a_remembered_verdict_builds_no_pyspf_query(
        zone: Zone, resolver: Resolver, monkeypatch: pytest.MonkeyPatch) -> None:
    zone.txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
    first = spf.check_sync(resolver, "192.0.2.7", "alice@example.com", "mx.example.com")

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("pyspf.query built for a remembered verdict")

    monkeypatch.setattr(spf.pyspf, "query", refuse)
    assert spf.check_sync(resolver, "192.0.2.7", "alice@example.com", "mx.example.com") is first
    # any other input is another evaluation
    with pytest.raises(AssertionError):
        spf.check_sync(resolver, "192.0.2.8", "alice@example.com", "mx.example.com")
    with pytest.raises(AssertionError):
        spf.check_sync(resolver, "192.0.2.7", "bob@example.com", "mx.example.com")
    with pytest.raises(AssertionError):
        spf.check_sync(resolver, "192.0.2.7", "alice@example.com", "mx2.example.com")


def test_a_changed_answer_is_a_new_evaluation(dns_server: DnsTestServer) -> None:
    clock = Clock()
    r = Resolver([dns_server.hostport], timeout=0.5, cache=TtlCache(clock=clock))
    dns_server.zone.txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
    assert spf.check_sync(r, "192.0.2.7", "a@example.com", "h").result == "pass"
    dns_server.zone.clear()
    dns_server.zone.txt("example.com", "v=spf1 -all")
    # still cached: the same answer, the same verdict
    assert spf.check_sync(r, "192.0.2.7", "a@example.com", "h").result == "pass"
    clock.now += 10_000  # past every TTL: the new record is read
    assert spf.check_sync(r, "192.0.2.7", "a@example.com", "h").result == "fail"


def test_an_evicted_answer_is_a_new_evaluation(dns_server: DnsTestServer) -> None:
    r = Resolver([dns_server.hostport], timeout=0.5, cache=TtlCache())
    dns_server.zone.txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
    assert spf.check_sync(r, "192.0.2.7", "a@example.com", "h").result == "pass"
    dns_server.zone.clear()
    dns_server.zone.txt("example.com", "v=spf1 -all")
    assert r.cache is not None
    r.cache.clear()
    assert spf.check_sync(r, "192.0.2.7", "a@example.com", "h").result == "fail"


def test_the_time_macro_is_never_remembered(zone: Zone, resolver: Resolver,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # RFC 7208 §7.3: %{t} is the current time, so the explanation changes with it
    zone.txt("example.com", "v=spf1 -all exp=why.example.com")
    zone.txt("why.example.com", "refused at %{t}")
    first = spf.check_sync(resolver, "198.51.100.1", "a@example.com", "h")
    assert first.result == "fail" and first.reason.startswith("refused at ")
    monkeypatch.setattr(spf.pyspf.time, "time", lambda: 4_000_000_000.0)
    assert spf.check_sync(resolver, "198.51.100.1", "a@example.com", "h").reason == (
        "refused at 4000000000")


def test_a_dns_error_is_never_remembered(zone: Zone, resolver: Resolver) -> None:
    zone.timeout("slow.example.com")
    assert spf.check_sync(resolver, "192.0.2.1", "a@slow.example.com", "h").result == (
        "temperror")
    zone.clear()
    zone.txt("slow.example.com", "v=spf1 +all")
    assert spf.check_sync(resolver, "192.0.2.1", "a@slow.example.com", "h").result == "pass"


def test_dmarc_record_remembered_until_its_answer_changes(dns_server: DnsTestServer) -> None:
    clock = Clock()
    r = Resolver([dns_server.hostport], timeout=0.5, cache=TtlCache(clock=clock))
    dns_server.zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    first = dmarc.discover(r, "mail.example.com")
    assert first == (dmarc.DmarcRecord("reject"), "example.com", "")
    assert dmarc.discover(r, "mail.example.com") is first
    assert dmarc.discover(r, "mail.example.com") == dmarc._discover(r, "mail.example.com")
    dns_server.zone.clear()
    dns_server.zone.txt("_dmarc.mail.example.com", "v=DMARC1; p=none")
    clock.now += 10_000
    assert dmarc.discover(r, "mail.example.com") == (
        dmarc.DmarcRecord("none"), "mail.example.com", "")


def test_a_result_remembered_inside_another_counts_for_both(dns_server: DnsTestServer) -> None:
    r = Resolver([dns_server.hostport], timeout=0.5, cache=TtlCache())
    dns_server.zone.txt("example.com", "v=spf1 -all")
    inner = lambda: r.remember("inner", lambda: r.txt("example.com"))  # noqa: E731
    r.remember("outer", inner)
    r.remember("outer2", lambda: r.recall("inner"))
    assert r.cache is not None
    r.cache.clear()
    assert r.recall("inner") is None and r.recall("outer") is None
    assert r.recall("outer2") is None


# --- the whole stage, remembered and not ------------------------------------------


def _corpus_messages() -> list[bytes]:
    base = corpus_dir()
    if base is None:
        return []
    files = sorted(p for p in (base / "dkim-arc").rglob("*") if p.is_file()
                   and p.stat().st_size < 200_000)
    out = []
    for p in files[:150]:
        data = p.read_bytes()
        if b"\n\n" in data.replace(b"\r\n", b"\n")[:100_000]:
            out.append(data)
    return out


async def test_stage_remembered_equals_evaluated(dns_server: DnsTestServer) -> None:
    zone = dns_server.zone
    zone.txt("src.example", "v=spf1 ip4:127.0.0.0/8 -all")
    zone.txt("_dmarc.src.example", "v=DMARC1; p=quarantine; pct=100")
    zone.txt("example.com", "v=spf1 ip4:192.0.2.0/24 ~all")
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    messages = make_messages(message_sizes(60, 3), 3) + _corpus_messages()
    senders = ["bench@src.example", "x@example.com", "", "y@sub.src.example"]
    ips = ["127.0.0.1", "192.0.2.9", "198.51.100.4"]
    fast = CheckStage(Resolver([dns_server.hostport], 0.5, TtlCache()), authserv_id="mx.test")
    slow = CheckStage(_forgetful(Resolver([dns_server.hostport], 0.5, TtlCache())),
                      authserv_id="mx.test")
    # and every Authentication-Results value built anew, as before CheckStage.header's memo
    slow.header = lambda v, checked=True: authresults.build(  # type: ignore[method-assign]
        slow.authserv_id, v, checks=slow.checks if checked else frozenset())
    compared = 0
    for rnd in range(2):  # the second round recalls what the first remembered
        for i, data in enumerate(messages):
            results = []
            for stage in (fast, slow):
                env = Envelope(senders[i % len(senders)], ["r@dst.example"],
                               client_ip=ips[(i + rnd) % len(ips)], helo="mx.src.example")
                res = await stage.run(MessageContext(env, data))
                results.append((res.headers, res.facts, res.reason, res.data, res.action))
            assert results[0] == results[1], i
            compared += 1
    assert compared >= 120
    assert fast.resolver._memo  # remembered something, or this compared nothing new
    assert fast._headers


def test_the_header_memo_is_bounded_and_keyed_on_every_input(resolver: Resolver) -> None:
    stage = CheckStage(resolver, authserv_id="mx.test")
    verdicts = [Verdicts(SpfVerdict(r, d)) for r in ("pass", "fail", "none")
                for d in ("a.example", "b.example")]
    for _ in range(2):
        for v in verdicts:
            for checked in (True, False):
                assert stage.header(v, checked=checked) == authresults.build(
                    "mx.test", v, checks=stage.checks if checked else frozenset())
    stage.config = CheckConfig(checks=["spf"])
    assert stage.header(verdicts[0]) == authresults.build(
        "mx.test", verdicts[0], checks=frozenset({"spf"}))
    stage.authserv_id = "other.test"
    assert stage.header(verdicts[0]).startswith("other.test;")
    for i in range(HEADER_MEMO + 5):
        stage.header(Verdicts(SpfVerdict("none", f"d{i}.example")))
    assert len(stage._headers) <= HEADER_MEMO


def test_bench_sender_is_recalled(dns_server: DnsTestServer) -> None:
    r = Resolver([dns_server.hostport], 0.5, TtlCache())
    stage = CheckStage(r, authserv_id="mx.test")
    env = Envelope("bench@src.example", ["r@dst.example"], client_ip="127.0.0.1",
                   helo="bench.src.example")
    data = make_messages(message_sizes(1, 1), 1)[0]
    asyncio.run(stage.run(MessageContext(env, data)))
    queries = len(dns_server.zone.queries)
    assert r.recall(spf.memo_key("127.0.0.1", "bench@src.example", "bench.src.example"))
    assert r.recall(("dmarc", "src.example"))
    asyncio.run(stage.run(MessageContext(env, data)))
    assert len(dns_server.zone.queries) == queries


def test_a_recalled_answer_stays_in_use_for_the_lru(dns_server: DnsTestServer) -> None:
    # recall() moves the answers it relies on to the end, as the lookups it skips did
    r = Resolver([dns_server.hostport], 0.5, TtlCache(max_entries=2))
    dns_server.zone.txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
    assert spf.check_sync(r, "192.0.2.7", "a@example.com", "h").result == "pass"
    r.query("one.example", "A")
    assert spf.check_sync(r, "192.0.2.7", "a@example.com", "h").result == "pass"
    r.query("two.example", "A")  # evicts one.example, not example.com
    assert r.recall(spf.memo_key("192.0.2.7", "a@example.com", "h")) is not None
