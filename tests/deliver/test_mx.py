"""MX lookup (RFC 5321 §5.1, RFC 7505) against a real DNS server on loopback."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from nexthop import DnsZone, NextHop

from gateway.config import Config
from gateway.deliver.deliverer import Deliverer
from gateway.deliver.mx import MxHost, MxResolver
from gateway.envelope import Envelope
from gateway.errors import DeliveryError
from gateway.queue.state import RcptStatus


def _resolver(zone: DnsZone) -> MxResolver:
    return MxResolver([zone.nameserver], timeout=2.0, shuffle=lambda hosts: None)


async def test_mx_hosts_come_in_preference_order_with_addresses(dns_zone: DnsZone) -> None:
    dns_zone.mx("example.test", 20, "backup.example.test")
    dns_zone.mx("example.test", 10, "primary.example.test")
    dns_zone.a("primary.example.test", "127.0.0.1")
    dns_zone.aaaa("primary.example.test", "::1")
    dns_zone.a("backup.example.test", "127.0.0.1")
    hosts = await _resolver(dns_zone).lookup("Example.Test")
    assert hosts == [
        MxHost("primary.example.test", 10, ("127.0.0.1", "::1")),
        MxHost("backup.example.test", 20, ("127.0.0.1",)),
    ]


async def test_domain_without_mx_falls_back_to_its_address(dns_zone: DnsZone) -> None:
    dns_zone.a("plain.test", "127.0.0.1")
    assert await _resolver(dns_zone).lookup("plain.test") == [
        MxHost("plain.test", 0, ("127.0.0.1",))]


async def test_null_mx_is_a_permanent_failure_5_1_10(dns_zone: DnsZone) -> None:
    dns_zone.mx("nomail.test", 0, ".")
    with pytest.raises(DeliveryError) as err:
        await _resolver(dns_zone).lookup("nomail.test")
    assert not err.value.transient
    assert err.value.reply is not None and "5.1.10" in err.value.reply


async def test_nonexistent_domain_is_permanent(dns_zone: DnsZone) -> None:
    with pytest.raises(DeliveryError) as err:
        await _resolver(dns_zone).lookup("nowhere.test")
    assert not err.value.transient and err.value.reply is not None
    assert err.value.reply.startswith("550 5.1.2")


async def test_servfail_is_temporary(dns_zone: DnsZone) -> None:
    dns_zone.resolver.servfail.add("broken.test")
    with pytest.raises(DeliveryError) as err:
        await _resolver(dns_zone).lookup("broken.test")
    assert err.value.transient


async def test_address_literal_needs_no_lookup() -> None:
    hosts = await MxResolver(["127.0.0.1:1"], timeout=0.5).lookup("[127.0.0.1]")
    assert hosts == [MxHost("[127.0.0.1]", 0, ("127.0.0.1",))]


async def test_mx_delivery_falls_through_to_the_next_exchanger(
    dns_zone: DnsZone, nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    # The preferred exchanger has only an address nobody listens on.
    dns_zone.mx("dst.test", 5, "down.dst.test")
    dns_zone.aaaa("down.dst.test", "::1")
    dns_zone.mx("dst.test", 10, "up.dst.test")
    dns_zone.a("up.dst.test", "127.0.0.1")
    cfg = make_cfg({"*": "mx"}, nameservers=[dns_zone.nameserver])
    d = Deliverer(cfg, resolver=_resolver(dns_zone), mx_port=nexthop.port)
    try:
        out = await d.deliver(Envelope(mail_from="a@src.test", rcpt_to=["u@dst.test"]),
                              b"Subject: x\r\n\r\nhi\r\n", ["u@dst.test"])
    finally:
        await d.aclose()
    assert out[0].status is RcptStatus.DELIVERED
    assert out[0].route == "mx:dst.test"
    assert out[0].remote == f"up.dst.test[127.0.0.1]:{nexthop.port}"
    assert nexthop.delivered_to("u@dst.test") == 1


async def test_mx_null_mx_bounces_recipients(
    dns_zone: DnsZone, make_cfg: Callable[..., Config]
) -> None:
    dns_zone.mx("nomail.test", 0, ".")
    d = Deliverer(make_cfg({"*": "mx"}, nameservers=[dns_zone.nameserver]))
    try:
        out = await d.deliver(Envelope(mail_from="a@src.test", rcpt_to=["u@nomail.test"]),
                              b"Subject: x\r\n\r\nhi\r\n", ["u@nomail.test"])
    finally:
        await d.aclose()
    assert out[0].status is RcptStatus.BOUNCED and "5.1.10" in out[0].reply


async def test_domain_name_dns_cannot_carry_is_a_permanent_failure(dns_zone: DnsZone) -> None:
    with pytest.raises(DeliveryError) as err:
        await _resolver(dns_zone).lookup("a" * 70 + ".test")  # label over 63 octets
    assert not err.value.transient


async def test_mx_host_is_secure_only_when_mx_and_its_addresses_were_validated(
    dns_zone: DnsZone,
) -> None:
    # RFC 7672 §2.2.1, §2.2.2: the AD bit of the (validating) resolver on each RRset.
    dns_zone.mx("signed.test", 10, "a.signed.test")
    dns_zone.mx("signed.test", 20, "b.signed.test")
    dns_zone.a("a.signed.test", "127.0.0.1")
    dns_zone.a("b.signed.test", "127.0.0.1")
    dns_zone.secure("signed.test", "a.signed.test")  # b's address is not signed
    resolver = MxResolver([dns_zone.nameserver], timeout=2.0, shuffle=lambda hosts: None,
                          dnssec=True)
    hosts = await resolver.lookup("signed.test")
    assert [(h.name, h.secure) for h in hosts] == [("a.signed.test", True),
                                                   ("b.signed.test", False)]
    dns_zone.resolver.secure.discard("signed.test")  # an unsigned MX RRset taints all
    assert [h.secure for h in await resolver.lookup("signed.test")] == [False, False]


async def test_implicit_mx_is_secure_when_the_domain_address_is(dns_zone: DnsZone) -> None:
    dns_zone.a("plain.test", "127.0.0.1")
    dns_zone.secure("plain.test")
    resolver = MxResolver([dns_zone.nameserver], timeout=2.0, dnssec=True)
    assert await resolver.lookup("plain.test") == [
        MxHost("plain.test", 0, ("127.0.0.1",), secure=True)]


async def test_tlsa_lookup_tells_records_security_and_failure(dns_zone: DnsZone) -> None:
    dns_zone.a("mx.signed.test", "127.0.0.1")
    dns_zone.tlsa("_25._tcp.mx.signed.test", 3, 1, 1, b"\1" * 32)
    dns_zone.secure("_25._tcp.mx.signed.test")
    dns_zone.resolver.servfail.add("_26._tcp.mx.signed.test")
    resolver = MxResolver([dns_zone.nameserver], timeout=2.0, dnssec=True)
    answer = await resolver.tlsa("mx.signed.test", 25)
    assert answer is not None and answer.secure
    assert [str(r) for r in answer.records] == ["3 1 1 " + "01" * 32]
    none = await resolver.tlsa("other.signed.test", 25)  # NXDOMAIN
    assert none is not None and none.records == ()
    assert await resolver.tlsa("mx.signed.test", 26) is None
