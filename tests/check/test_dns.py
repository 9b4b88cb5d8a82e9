"""The check stage's resolver: outcomes, the TTL cache, and the library adapters."""

from __future__ import annotations

import dkim
import pytest
from authdns import DnsTestServer, Zone

from gateway.check.dns import (
    DkimDnsFunc,
    DnsTempError,
    Resolver,
    TtlCache,
    parse_nameserver,
)


class Clock:
    """A settable clock (the cache takes the clock as a parameter)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    ("[::1]:5353", ("::1", 5353)),
    ("::1", ("::1", 53)),
])
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


def test_parse_nameserver_refuses_a_bad_port() -> None:
    with pytest.raises(ValueError, match="port"):
        parse_nameserver("127.0.0.1:dns")


def test_records_none_and_temperror(zone: Zone, resolver: Resolver) -> None:
    zone.txt("a.example", "hello").add("a.example", "A", "192.0.2.1")
    zone.timeout("slow.example").fail("broken.example")
    assert resolver.txt("a.example") == [b"hello"]
    assert resolver.txt("nxdomain.example") == []  # NXDOMAIN
    assert resolver.query("a.example", "AAAA") == ()  # NODATA
    with pytest.raises(DnsTempError, match="timeout"):
        resolver.query("slow.example", "TXT")
    with pytest.raises(DnsTempError):
        resolver.query("broken.example", "TXT")


def test_multi_string_txt_is_concatenated(zone: Zone, resolver: Resolver) -> None:
    zone.txt("k.example", ["v=DKIM1; p=abc", "def"])
    assert resolver.txt("k.example") == [b"v=DKIM1; p=abcdef"]


def test_malformed_name_has_no_records(resolver: Resolver) -> None:
    assert resolver.query("a" * 64 + ".example", "TXT") == ()
    assert resolver.query("a..example", "TXT") == ()


def test_cache_answers_without_asking_again(dns_server: DnsTestServer) -> None:
    dns_server.zone.txt("c.example", "cached")
    cache = TtlCache()
    r = Resolver([dns_server.hostport], timeout=0.5, cache=cache)
    assert r.txt("c.example") == [b"cached"]
    assert r.txt("C.Example.") == [b"cached"]
    assert dns_server.zone.queries.count(("c.example", "TXT")) == 1
    assert (cache.hits, cache.misses) == (1, 1)


def test_negative_answers_are_cached_but_errors_are_not(dns_server: DnsTestServer) -> None:
    dns_server.zone.fail("broken.example")
    r = Resolver([dns_server.hostport], timeout=0.5, cache=TtlCache())
    assert r.txt("missing.example") == []
    assert r.txt("missing.example") == []
    for _ in range(2):
        with pytest.raises(DnsTempError):
            r.txt("broken.example")
    assert dns_server.zone.queries.count(("missing.example", "TXT")) == 1
    assert dns_server.zone.queries.count(("broken.example", "TXT")) == 2


def test_cache_entries_expire_with_their_ttl() -> None:
    clock = Clock()
    cache = TtlCache(clock=clock)
    cache.put(("a", "TXT"), (b"x",), ttl=300)
    clock.now += 299
    assert cache.get(("a", "TXT")) == (b"x",)
    clock.now += 2
    assert cache.get(("a", "TXT")) is None
    assert len(cache) == 0


def test_cache_is_bounded_least_recently_used_first() -> None:
    cache = TtlCache(max_entries=2, clock=Clock())
    cache.put(("a", "A"), 1, 60)
    cache.put(("b", "A"), 2, 60)
    cache.get(("a", "A"))
    cache.put(("c", "A"), 3, 60)
    assert cache.get(("b", "A")) is None
    assert cache.get(("a", "A")) == 1 and cache.get(("c", "A")) == 3


def test_dkim_adapter_tells_timeout_from_missing_key(zone: Zone, resolver: Resolver) -> None:
    zone.timeout("slow._domainkey.example.com").txt("k._domainkey.example.com", "v=DKIM1; p=x")
    f = DkimDnsFunc(resolver)
    assert f(b"k._domainkey.example.com.") == b"v=DKIM1; p=x"
    assert f(b"none._domainkey.example.com.") is None
    assert f.missing == ["none._domainkey.example.com"]
    with pytest.raises(dkim.DnsTimeoutError):
        f(b"slow._domainkey.example.com.")
    assert f.temperror is not None
