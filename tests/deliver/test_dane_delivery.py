"""DANE (RFC 7672) on MX delivery, with real peers on loopback: the DNS server plays a
validating resolver (AD bit on chosen names) and serves TLSA records, the next hop speaks
STARTTLS with certificates made by the real openssl (self-signed for DANE-EE, from a
private CA for DANE-TA)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from danepeers import Served, cert_sha256, from_ca, self_signed, spki_sha256
from nexthop import DnsZone, NextHop
from stspeers import PolicyServer, StsCa, make_ca, policy_response

from gateway import metrics
from gateway.config import Config, DeliveryConfig, DnsConfig
from gateway.deliver.dane import tlsa_name
from gateway.deliver.deliverer import Deliverer, Outcome
from gateway.deliver.mta_sts_fetch import PolicySource
from gateway.deliver.mx import MxResolver
from gateway.envelope import Envelope
from gateway.queue.state import RcptStatus

DOMAIN = "dst.test"
MX1, MX2 = "mx1.dst.test", "mx2.dst.test"
RCPT = f"u@{DOMAIN}"


@dataclass(frozen=True)
class Pki:
    ca: StsCa
    selfsigned: Served  # self-signed, named for no MX host at all
    good: Served  # from the private CA, for MX1, sent with the CA
    wrong_name: Served  # from the private CA, for another host


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("dane-delivery")
    ca = make_ca(tmp / "ca")
    return Pki(ca, self_signed(tmp / "ss", "not-the-mx.test"), from_ca(ca, MX1),
               from_ca(ca, "elsewhere.test"))


@dataclass
class Rig:
    zone: DnsZone
    pki: Pki
    data_dir: Path
    hops: list[NextHop]
    dane: bool = True
    mta_sts: bool = False
    sts_port: int = 0
    mx_tls: Literal["required", "opportunistic", "off"] = "opportunistic"

    async def hop(self, served: Served | None) -> NextHop:
        """A next hop with STARTTLS presenting ``served`` (None: no STARTTLS)."""
        hop = NextHop(tls_context=served.context() if served is not None else None)
        await hop.start()
        self.hops.append(hop)
        return hop

    async def mx1(self, served: Served | None, *tlsa: int | bytes) -> NextHop:
        """A next hop as the signed DOMAIN's one MX host MX1, with a TLSA record
        (usage, selector, matching type, data) when given."""
        hop = await self.hop(served)
        self.secure_mx(MX1, port=hop.port)
        if tlsa:
            usage, selector, mtype, data = tlsa
            assert isinstance(data, bytes)
            self.zone.tlsa(tlsa_name(MX1, hop.port), int(usage), int(selector), int(mtype),
                           data)
        return hop

    def secure_mx(self, *hosts: str, port: int) -> None:
        """MX records for DOMAIN to ``hosts`` in that order, all on 127.0.0.1, signed."""
        for pref, host in enumerate(hosts, 1):
            self.zone.mx(DOMAIN, pref * 10, host)
            self.zone.a(host, "127.0.0.1")
            self.zone.secure(host, tlsa_name(host, port))
        self.zone.secure(DOMAIN)

    async def send(self, port: int) -> Outcome:
        cfg = Config(
            hostname="coffer.test", data_dir=self.data_dir,
            delivery=DeliveryConfig(routes={"*": "mx"}, connect_timeout=5.0,
                                    command_timeout=5.0, dane=self.dane,
                                    mta_sts=self.mta_sts, mx_tls=self.mx_tls),
            dns=DnsConfig(nameservers=[self.zone.nameserver], timeout=2.0),
        )
        resolver = MxResolver([self.zone.nameserver], timeout=2.0,
                              shuffle=lambda hosts: None, dnssec=self.dane)
        ctx = self.pki.ca.client_context()  # PKIX, for MTA-STS
        sts = PolicySource(resolver, self.data_dir, context=ctx, port=self.sts_port,
                           timeout=2.0)
        d = Deliverer(cfg, resolver=resolver, tls_context=ctx, mx_port=port, sts=sts)
        try:
            (out,) = await d.deliver(Envelope(mail_from="a@src.test", rcpt_to=[RCPT]),
                                     b"Subject: x\r\n\r\nsecret\r\n", [RCPT])
        finally:
            await d.aclose()
        return out


@pytest.fixture
async def rig(pki: Pki, dns_zone: DnsZone, tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(dns_zone, pki, tmp_path, [])
    yield r
    for hop in r.hops:
        await hop.stop()


def _count(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def _refused(reason: str) -> float:
    return _count("coffer_dane_refused_total", reason=reason)


def _deferred_by_dane(out: Outcome, host: str = MX1) -> bool:
    return (out.status is RcptStatus.DEFERRED
            and out.reply.startswith(f"451 4.7.5 DANE: {host}: "))


@pytest.mark.parametrize(("usage", "mode"), [
    (3, "dane"),  # DANE-EE: the self-signed, wrongly named certificate is authenticated
    (1, "encrypt"),  # PKIX-EE only: unusable for SMTP (RFC 7672 §3.1.3), TLS unauthenticated
], ids=["dane-ee-match", "only-unusable"])
async def test_delivers_over_tls_to_a_self_signed_wrongly_named_cert(
    rig: Rig, usage: int, mode: str,
) -> None:
    # For usage 1 the record's key is not even the server's: it is not looked at.
    served = rig.pki.selfsigned if usage == 3 else rig.pki.good
    hop = await rig.mx1(rig.pki.selfsigned, usage, 1, 1, spki_sha256(served.leaf))
    before = _count("coffer_dane_sessions_total", mode=mode)
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply
    assert [m.tls for m in hop.received] == [True]
    assert _count("coffer_dane_sessions_total", mode=mode) == before + 1


async def test_dane_ee_mismatch_defers_475_before_mail_from(rig: Rig, events: Any) -> None:
    hop = await rig.mx1(rig.pki.selfsigned, 3, 1, 1, spki_sha256(rig.pki.good.leaf))
    before = _refused("tls")
    out = await rig.send(hop.port)
    assert _deferred_by_dane(out), out.reply
    assert "DANE-EE" in out.reply
    assert hop.connections == 1 and hop.mail_commands == 0 and hop.received == []
    assert _refused("tls") == before + 1
    assert events("dane_refused") == [{"domain": DOMAIN, "mx": MX1, "reason": (
        "certificate matches no DANE-EE TLSA record")}]


async def test_dane_host_without_starttls_defers_and_sends_nothing_in_clear(rig: Rig) -> None:
    hop = await rig.mx1(None, 3, 1, 1, spki_sha256(rig.pki.selfsigned.leaf))
    out = await rig.send(hop.port)
    assert _deferred_by_dane(out), out.reply
    assert "STARTTLS" in out.reply
    assert hop.connections == 1 and hop.mail_commands == 0 and hop.received == []


async def test_dane_ta_on_the_private_ca_with_the_mx_name_delivers(rig: Rig) -> None:
    hop = await rig.mx1(rig.pki.good, 2, 0, 1, cert_sha256(rig.pki.ca.ca_pem))
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply
    assert [m.tls for m in hop.received] == [True]


async def test_dane_ta_with_a_certificate_for_another_name_defers(rig: Rig) -> None:
    hop = await rig.mx1(rig.pki.wrong_name, 2, 0, 1, cert_sha256(rig.pki.ca.ca_pem))
    out = await rig.send(hop.port)
    assert _deferred_by_dane(out), out.reply
    # RFC 7672 §3.2.2: the MX host name and the next-hop domain, nothing else.
    assert f"not valid for {MX1}, {DOMAIN}" in out.reply
    assert hop.mail_commands == 0


async def test_dane_ta_accepts_a_certificate_for_the_next_hop_domain_alone(rig: Rig) -> None:
    # RFC 7672 §3.2.2: the recipient domain, whose secure MX records named MX1, is a
    # reference identifier as well as MX1 (a provider's certificate for its domain).
    hop = await rig.mx1(from_ca(rig.pki.ca, DOMAIN), 2, 0, 1, cert_sha256(rig.pki.ca.ca_pem))
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply
    assert [m.tls for m in hop.received] == [True]


@pytest.mark.parametrize("name", [f"mx1.{DOMAIN}.example", f"sub.{DOMAIN}", "test"],
                         ids=["suffixed", "subdomain", "parent"])
async def test_dane_ta_refuses_names_that_only_resemble_the_next_hop_domain(
    rig: Rig, name: str,
) -> None:
    hop = await rig.mx1(from_ca(rig.pki.ca, name), 2, 0, 1, cert_sha256(rig.pki.ca.ca_pem))
    out = await rig.send(hop.port)
    assert _deferred_by_dane(out), out.reply
    assert hop.mail_commands == 0


async def test_only_unusable_records_still_require_starttls(rig: Rig) -> None:
    hop = await rig.mx1(None, 1, 1, 1, spki_sha256(rig.pki.good.leaf))
    out = await rig.send(hop.port)
    assert _deferred_by_dane(out), out.reply
    assert hop.received == []


@pytest.mark.parametrize("insecure", [DOMAIN, MX1], ids=["mx-rrset", "address"])
async def test_insecure_mx_or_address_ignores_tlsa_and_delivers_as_before(
    rig: Rig, insecure: str,
) -> None:
    hop = await rig.hop(None)  # not even STARTTLS: opportunistic goes in clear
    rig.secure_mx(MX1, port=hop.port)
    rig.zone.resolver.secure.discard(insecure)
    rig.zone.tlsa(tlsa_name(MX1, hop.port), 3, 1, 1, spki_sha256(rig.pki.good.leaf))
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply
    assert [m.tls for m in hop.received] == [False]


async def test_insecure_tlsa_answer_is_ignored(rig: Rig) -> None:
    hop = await rig.hop(rig.pki.selfsigned)
    rig.secure_mx(MX1, port=hop.port)
    rig.zone.resolver.secure.discard(tlsa_name(MX1, hop.port))
    rig.zone.tlsa(tlsa_name(MX1, hop.port), 3, 1, 1, spki_sha256(rig.pki.good.leaf))
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply


async def test_failed_tlsa_lookup_of_a_secure_host_defers_without_connecting(rig: Rig) -> None:
    hop = await rig.hop(rig.pki.selfsigned)
    rig.secure_mx(MX1, port=hop.port)
    rig.zone.resolver.servfail.add(tlsa_name(MX1, hop.port))
    before = _refused("tlsa_lookup")
    out = await rig.send(hop.port)
    assert out.reply == f"451 4.7.5 DANE: {MX1}: TLSA lookup failed"
    assert out.status is RcptStatus.DEFERRED
    assert hop.connections == 0
    assert _refused("tlsa_lookup") == before + 1


async def test_a_host_failing_dane_is_passed_over_for_the_next_mx(rig: Rig) -> None:
    hop = await rig.hop(rig.pki.selfsigned)
    rig.secure_mx(MX1, MX2, port=hop.port)
    rig.zone.tlsa(tlsa_name(MX1, hop.port), 3, 1, 1, spki_sha256(rig.pki.good.leaf))
    rig.zone.tlsa(tlsa_name(MX2, hop.port), 3, 1, 1, spki_sha256(rig.pki.selfsigned.leaf))
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply
    assert out.remote.startswith(MX2)
    assert hop.connections == 2 and len(hop.received) == 1


async def test_dane_overrides_mx_tls_off(rig: Rig) -> None:
    hop = await rig.mx1(rig.pki.selfsigned, 3, 1, 1, spki_sha256(rig.pki.selfsigned.leaf))
    rig.mx_tls = "off"
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply
    assert [m.tls for m in hop.received] == [True]


async def test_switched_off_dane_ignores_tlsa_records(rig: Rig) -> None:
    hop = await rig.mx1(rig.pki.selfsigned, 3, 1, 1, spki_sha256(rig.pki.good.leaf))
    rig.dane = False
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply


@pytest.fixture
async def sts_refusing(rig: Rig) -> AsyncIterator[Callable[[], None]]:
    """An enforced MTA-STS policy for DOMAIN that names no MX host of it (and whose
    PKIX check the self-signed certificate would fail anyway)."""
    https = PolicyServer(rig.pki.ca.server_context(f"mta-sts.{DOMAIN}"), policy_response(
        "version: STSv1\nmode: enforce\nmx: *.other.test\nmax_age: 86400\n"))
    await https.start()

    def enable() -> None:
        rig.zone.a(f"mta-sts.{DOMAIN}", "127.0.0.1")
        rig.zone.txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=1")
        rig.mta_sts, rig.sts_port = True, https.port

    yield enable
    await https.stop()


async def test_dane_takes_precedence_over_an_mta_sts_policy_that_would_refuse(
    rig: Rig, sts_refusing: Callable[[], None],
) -> None:
    hop = await rig.hop(rig.pki.selfsigned)
    rig.secure_mx(MX1, port=hop.port)
    sts_refusing()
    rig.dane = False  # first without DANE: MTA-STS refuses the host
    out = await rig.send(hop.port)
    assert out.reply.startswith("451 4.7.5 MTA-STS policy of dst.test"), out.reply
    rig.dane = True
    rig.zone.tlsa(tlsa_name(MX1, hop.port), 3, 1, 1, spki_sha256(rig.pki.selfsigned.leaf))
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply
    assert [m.tls for m in hop.received] == [True]


async def test_unusable_records_leave_an_enforced_mta_sts_policy_in_charge(
    rig: Rig, sts_refusing: Callable[[], None],
) -> None:
    hop = await rig.hop(rig.pki.selfsigned)
    rig.secure_mx(MX1, port=hop.port)
    sts_refusing()
    rig.zone.tlsa(tlsa_name(MX1, hop.port), 1, 1, 1, spki_sha256(rig.pki.selfsigned.leaf))
    out = await rig.send(hop.port)
    assert out.reply.startswith("451 4.7.5 MTA-STS policy of dst.test"), out.reply
    assert hop.connections == 0


TARGET = "smtp.hosting.test"  # what MX1 is an alias of, in the CNAME tests


async def _aliased_mx1(rig: Rig, served: Served, *, secure_alias: bool = True) -> NextHop:
    """A next hop presenting ``served`` as DOMAIN's one MX host MX1, a CNAME of TARGET
    (127.0.0.1); all signed, the CNAME record too unless ``secure_alias`` is False."""
    hop = await rig.hop(served)
    rig.zone.mx(DOMAIN, 10, MX1)
    rig.zone.cname(MX1, TARGET)
    rig.zone.a(TARGET, "127.0.0.1")
    rig.zone.secure(DOMAIN, TARGET, tlsa_name(MX1, hop.port), tlsa_name(TARGET, hop.port))
    if secure_alias:
        rig.zone.secure(MX1)
    return hop


async def test_behind_a_cname_the_tlsa_records_of_the_expanded_name_are_used(
    rig: Rig,
) -> None:
    hop = await _aliased_mx1(rig, rig.pki.selfsigned)
    # RFC 7672 §2.2.2: the expanded name first; the original's (wrong) record unused.
    rig.zone.tlsa(tlsa_name(TARGET, hop.port), 3, 1, 1, spki_sha256(rig.pki.selfsigned.leaf))
    rig.zone.tlsa(tlsa_name(MX1, hop.port), 3, 1, 1, spki_sha256(rig.pki.good.leaf))
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply
    assert [m.tls for m in hop.received] == [True]


async def test_behind_a_cname_without_records_at_the_expanded_name_the_original_s_apply(
    rig: Rig,
) -> None:
    hop = await _aliased_mx1(rig, rig.pki.selfsigned)
    rig.zone.tlsa(tlsa_name(MX1, hop.port), 3, 1, 1, spki_sha256(rig.pki.good.leaf))
    out = await rig.send(hop.port)
    assert _deferred_by_dane(out), out.reply  # the original name's record, not matched
    assert "DANE-EE" in out.reply
    assert hop.mail_commands == 0


async def test_an_insecure_cname_step_makes_dane_not_apply(rig: Rig) -> None:
    hop = await _aliased_mx1(rig, rig.pki.selfsigned, secure_alias=False)
    rig.zone.tlsa(tlsa_name(TARGET, hop.port), 3, 1, 1, spki_sha256(rig.pki.good.leaf))
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply  # opportunistic TLS, as without


@pytest.mark.parametrize("name", [TARGET, MX1], ids=["expanded", "original"])
async def test_behind_a_cname_dane_ta_accepts_the_expanded_or_the_original_name(
    rig: Rig, name: str,
) -> None:
    hop = await _aliased_mx1(rig, from_ca(rig.pki.ca, name))
    rig.zone.tlsa(tlsa_name(TARGET, hop.port), 2, 0, 1, cert_sha256(rig.pki.ca.ca_pem))
    out = await rig.send(hop.port)
    assert out.status is RcptStatus.DELIVERED, out.reply


async def test_behind_a_cname_dane_ta_refuses_a_third_name(rig: Rig) -> None:
    hop = await _aliased_mx1(rig, rig.pki.wrong_name)
    rig.zone.tlsa(tlsa_name(TARGET, hop.port), 2, 0, 1, cert_sha256(rig.pki.ca.ca_pem))
    out = await rig.send(hop.port)
    assert _deferred_by_dane(out), out.reply
    assert f"not valid for {MX1}, {TARGET}, {DOMAIN}" in out.reply
