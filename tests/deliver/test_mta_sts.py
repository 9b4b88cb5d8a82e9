"""MTA-STS (RFC 8461) pure logic: TXT record, policy file, mx patterns, cache decisions."""

from __future__ import annotations

import pytest

from gateway.deliver.mta_sts import (
    MAX_AGE_LIMIT,
    CachedPolicy,
    Policy,
    PolicyError,
    choose,
    dump_cache,
    load_cache,
    mx_matches,
    parse_policy,
    parse_txt,
)
from gateway.deliver.mta_sts_fetch import FetchError, parse_http_response

GOOD = "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmx: *.example.net\nmax_age: 86400\n"


@pytest.mark.parametrize(("records", "expected"), [
    (["v=STSv1; id=20190429T010101;"], "20190429T010101"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=STSv1 ;\tid=abc ;"], "abc"),  # §3.1: whitespace around the delimiter
    (["v=STSv1; id=abc; ext=1"], "abc"),  # §3.1: other fields are ignored
    (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),  # records of other kinds are discarded
    (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # not exactly one: no policy
    ([], None),
    (["v=STSv1; mode=enforce"], None),  # no id
    (["v=STSv1; id=not-alnum"], None),  # §3.1: sts-id is 1*32(ALPHA / DIGIT)
    (["v=STSv1; id=" + "a" * 33], None),
    (["V=STSV1; id=abc"], None),  # the version tag is case-sensitive
    (["v=STSv1; id"], None),
])
def test_txt_record_gives_the_policy_id_or_none(records: list[str], expected: str | None) -> None:
    assert parse_txt(records) == expected


@pytest.mark.parametrize("text", [
    GOOD,
    GOOD.replace("\n", "\r\n"),  # §3.2: CRLF or LF line ends
    GOOD.rstrip("\n"),  # no final line end
    "mx: mx1.example.com\r\nmax_age:86400\nversion:  STSv1\nmode: enforce\nmx: *.example.net",
    GOOD + "future_key: whatever value\n",  # unknown keys are ignored
    GOOD.replace("mx1.example.com", "MX1.Example.COM."),  # case and a final dot
])
def test_well_formed_policies_read_the_same(text: str) -> None:
    assert parse_policy(text) == Policy("enforce", ("mx1.example.com", "*.example.net"), 86400)


@pytest.mark.parametrize(("text", "why"), [
    (GOOD.replace("mode: enforce\n", ""), "mode"),
    (GOOD.replace("enforce", "strict"), "mode"),
    (GOOD.replace("version: STSv1\n", ""), "version"),
    (GOOD.replace("STSv1", "STSv2"), "version"),
    (GOOD.replace("max_age: 86400\n", ""), "max_age"),
    (GOOD.replace("86400", "-1"), "max_age"),
    (GOOD.replace("86400", "1d"), "max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 86400\n", "without any mx"),
    (GOOD.replace("mx1.example.com", "mx1.*.example.com"), "not an mx pattern"),
    (GOOD.replace("mx1.example.com", "https://mx1"), "not an mx pattern"),
    (GOOD + "this line has no colon\n", "line 6"),
    ("<html><body>Not found</body></html>", "line 1"),
])
def test_malformed_policies_are_rejected_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_policy(text)


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 60\n") == Policy("none", (), 60)


def test_max_age_over_a_year_is_read_as_a_year() -> None:
    assert parse_policy(GOOD.replace("86400", "999999999")).max_age == MAX_AGE_LIMIT


def test_first_of_a_repeated_key_counts() -> None:
    assert parse_policy(GOOD + "mode: none\n").mode == "enforce"


@pytest.mark.parametrize(("pattern", "host", "expected"), [
    ("mx1.example.com", "mx1.example.com", True),
    ("mx1.example.com", "MX1.EXAMPLE.COM.", True),
    ("mx1.example.com", "mx2.example.com", False),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "example.com", False),  # §4.1: the wildcard is one whole label
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "mx1.example.com.evil", False),
    ("*.example.com", "mx1example.com", False),
])
def test_mx_pattern_matching(pattern: str, host: str, expected: bool) -> None:
    assert mx_matches(pattern, host) is expected


_POLICY = Policy("enforce", ("mx.example.com",), 100)


@pytest.mark.parametrize(("txt_id", "cached", "now", "expected"), [
    ("1", None, 0.0, "fetch"),
    ("1", CachedPolicy("1", _POLICY, 0.0), 50.0, "cached"),
    ("2", CachedPolicy("1", _POLICY, 0.0), 50.0, "fetch"),  # §5.1: new id, new policy
    ("1", CachedPolicy("1", _POLICY, 0.0), 100.0, "fetch"),  # expired
    (None, CachedPolicy("1", _POLICY, 0.0), 50.0, "cached"),  # TXT gone: still applies
    (None, CachedPolicy("1", _POLICY, 0.0), 150.0, "none"),
    (None, None, 0.0, "none"),
])
def test_cache_decision(txt_id: str | None, cached: CachedPolicy | None, now: float,
                        expected: str) -> None:
    assert choose(txt_id, cached, now) == expected


def test_cache_round_trips_and_skips_a_damaged_entry() -> None:
    entries = {"example.com": CachedPolicy("1", _POLICY, 12.5),
               "none.test": CachedPolicy("a", Policy("none", (), 5), 1.0)}
    data = dump_cache(entries)
    assert load_cache(data) == entries
    data["policies"]["bad.test"] = {"id": "x", "mode": "enforce", "mx": [], "max_age": 1}
    assert load_cache(data) == entries
    assert load_cache({"version": 99, "policies": {}}) == {}


def _http(status: str, headers: str, body: bytes) -> bytes:
    return f"HTTP/1.1 {status}\r\n{headers}\r\n".encode() + body


@pytest.mark.parametrize(("raw", "text"), [
    (_http("200 OK", "Content-Type: text/plain\r\nContent-Length: 2\r\n", b"ab"), "ab"),
    (_http("200 OK", "content-type: Text/Plain; charset=utf-8\r\n", b"ab"), "ab"),
    (_http("200 OK", "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n",
           b"2\r\nab\r\n1;x=y\r\nc\r\n0\r\n\r\n"), "abc"),
])
def test_http_response_gives_the_policy_text(raw: bytes, text: str) -> None:
    assert parse_http_response(raw) == text


@pytest.mark.parametrize(("raw", "why"), [
    (_http("301 Moved Permanently",
           "Location: https://elsewhere.test/\r\nContent-Type: text/plain\r\n", b""), "301"),
    (_http("404 Not Found", "Content-Type: text/plain\r\n", b""), "404"),
    (_http("200 OK", "Content-Type: text/html\r\n", b"x"), "text/html"),
    (_http("200 OK", "", b"x"), "missing"),
    (_http("200 OK", "Content-Type: text/plain\r\n", b"x" * 70000), "larger"),
    (_http("200 OK", "Content-Type: text/plain\r\nContent-Length: 9\r\n", b"ab"), "shorter"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP response"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n", "incomplete"),
])
def test_http_response_refused(raw: bytes, why: str) -> None:
    with pytest.raises(FetchError, match=why):
        parse_http_response(raw)
