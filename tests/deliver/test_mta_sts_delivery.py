"""MTA-STS (RFC 8461) on MX delivery, with real peers on loopback: the DNS server for the
TXT, MX and A records, an HTTPS server with a certificate from an openssl-made test CA for
the policy, and a next-hop SMTP server with (or without) STARTTLS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from nexthop import DnsZone, NextHop
from stspeers import PolicyServer, StsCa, make_ca, policy_response

from gateway import metrics
from gateway.config import Config, DeliveryConfig, DnsConfig
from gateway.deliver.deliverer import Deliverer, Outcome
from gateway.deliver.mta_sts_fetch import PolicySource
from gateway.deliver.mx import MxResolver
from gateway.envelope import Envelope
from gateway.queue.state import RcptStatus

DOMAIN = "dst.test"
RCPT = f"u@{DOMAIN}"
ENFORCE = "version: STSv1\nmode: enforce\nmx: *.dst.test\nmax_age: 86400\n"
TESTING = ENFORCE.replace("enforce", "testing")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> StsCa:
    return make_ca(tmp_path_factory.mktemp("sts-ca"))


@dataclass
class Rig:
    zone: DnsZone
    https: PolicyServer
    hop: NextHop
    ca: StsCa
    data_dir: Path
    routes: dict[str, str]
    mta_sts: bool = True
    mx_tls: Literal["required", "opportunistic", "off"] = "opportunistic"

    def deliverer(self) -> Deliverer:
        cfg = Config(
            hostname="coffer.test", data_dir=self.data_dir,
            delivery=DeliveryConfig(routes=self.routes, connect_timeout=5.0,
                                    command_timeout=5.0, mta_sts=self.mta_sts,
                                    mx_tls=self.mx_tls),
            dns=DnsConfig(nameservers=[self.zone.nameserver], timeout=2.0),
        )
        resolver = MxResolver([self.zone.nameserver], timeout=2.0, shuffle=lambda hosts: None)
        ctx = self.ca.client_context()
        sts = PolicySource(resolver, self.data_dir, context=ctx, port=self.https.port,
                           timeout=2.0)
        return Deliverer(cfg, resolver=resolver, tls_context=ctx, mx_port=self.hop.port,
                         sts=sts)

    async def send(self, deliverer: Deliverer | None = None) -> Outcome:
        d = deliverer or self.deliverer()
        try:
            (out,) = await d.deliver(Envelope(mail_from="a@src.test", rcpt_to=[RCPT]),
                                     b"Subject: x\r\n\r\nsecret\r\n", [RCPT])
        finally:
            if deliverer is None:
                await d.aclose()
        return out


@pytest.fixture
async def rig(ca: StsCa, dns_zone: DnsZone, tmp_path: Path) -> AsyncIterator[Rig]:
    # dst.test: MX mx1.dst.test, its TXT record and policy host; all on 127.0.0.1.
    dns_zone.mx(DOMAIN, 10, "mx1.dst.test")
    dns_zone.a("mx1.dst.test", "127.0.0.1")
    dns_zone.a("mta-sts.dst.test", "127.0.0.1")
    dns_zone.txt("_mta-sts.dst.test", "v=STSv1; id=1")
    https = PolicyServer(ca.server_context("mta-sts.dst.test"), policy_response(ENFORCE))
    await https.start()
    hop = NextHop(tls_context=ca.server_context("mx1.dst.test"))
    await hop.start()
    yield Rig(dns_zone, https, hop, ca, tmp_path, {"*": "mx"})
    await hop.stop()
    await https.stop()


def _fetches(result: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "coffer_mta_sts_fetches_total", {"result": result}) or 0.0


def _refused(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "coffer_mta_sts_refused_total", {"reason": reason}) or 0.0


async def test_enforce_with_a_valid_certificate_delivers_over_tls(rig: Rig, events: Any) -> None:
    before = _fetches("ok")
    out = await rig.send()
    assert _fetches("ok") == before + 1
    assert out.status is RcptStatus.DELIVERED
    assert [m.tls for m in rig.hop.received] == [True]
    (fetched,) = events("mta_sts_policy")
    assert fetched["domain"] == DOMAIN and fetched["mode"] == "enforce"
    request = rig.https.requests[0]
    assert request.startswith("GET /.well-known/mta-sts.txt HTTP/1.1\r\n")
    assert "Host: mta-sts.dst.test\r\n" in request


async def test_messages_delivered_at_once_share_one_policy_fetch(rig: Rig) -> None:
    d = rig.deliverer()
    try:
        outs = await asyncio.gather(*(rig.send(d) for _ in range(3)))
    finally:
        await d.aclose()
    assert [o.status for o in outs] == [RcptStatus.DELIVERED] * 3
    assert len(rig.https.requests) == 1
    # Written once, atomically: no temporary file is left behind.
    assert sorted(p.name for p in rig.data_dir.iterdir() if p.name.startswith("mta-sts")) == [
        "mta-sts.json", "mta-sts.lock"]


async def test_enforce_without_starttls_defers_and_sends_nothing_in_clear(rig: Rig) -> None:
    rig.hop.tls_context = None  # an attacker stripped STARTTLS
    before = _refused("tls")
    out = await rig.send()
    assert out.status is RcptStatus.DEFERRED
    assert out.reply.startswith("451 4.7.5 MTA-STS policy of dst.test: ")
    assert rig.hop.received == [] and rig.hop.mail_commands == 0
    assert _refused("tls") == before + 1


async def test_enforce_with_a_certificate_for_another_name_defers(rig: Rig, ca: StsCa) -> None:
    # The policy allows *.dst.test, but the host's certificate names another host.
    rig.hop.tls_context = ca.server_context("other.test")
    out = await rig.send()
    assert out.status is RcptStatus.DEFERRED and out.reply.startswith("451 4.7.5 ")
    assert rig.hop.received == [] and rig.hop.mail_commands == 0


async def test_enforce_with_an_mx_outside_the_policy_defers_without_connecting(
    rig: Rig,
) -> None:
    rig.https.response = policy_response(ENFORCE.replace("*.dst.test", "mail.example.org"))
    before = _refused("mx_mismatch")
    out = await rig.send()
    assert out.status is RcptStatus.DEFERRED
    assert out.reply == ("451 4.7.5 MTA-STS policy of dst.test: MX host mx1.dst.test "
                         "matches no mx pattern (mail.example.org)")
    assert rig.hop.connections == 0
    assert _refused("mx_mismatch") == before + 1


async def test_enforce_skips_a_non_matching_mx_for_a_matching_one(rig: Rig) -> None:
    rig.zone.mx(DOMAIN, 5, "evil.attacker.test")  # preferred, but not in the policy
    rig.zone.a("evil.attacker.test", "127.0.0.1")
    out = await rig.send()
    assert out.status is RcptStatus.DELIVERED
    assert out.remote.startswith("mx1.dst.test[")


async def test_testing_mode_delivers_and_logs_the_failure(rig: Rig, events: Any) -> None:
    rig.https.response = policy_response(TESTING)
    rig.hop.tls_context = None
    out = await rig.send()
    assert out.status is RcptStatus.DELIVERED
    assert [m.tls for m in rig.hop.received] == [False]
    (failure,) = events("mta_sts_testing_failure")
    assert failure["domain"] == DOMAIN and "STARTTLS" in failure["reason"]


async def test_testing_mode_keeps_mx_tls_required_without_a_second_attempt(rig: Rig) -> None:
    rig.https.response = policy_response(TESTING)
    rig.mx_tls = "required"
    rig.hop.tls_context = None
    out = await rig.send()
    assert out.status is RcptStatus.DEFERRED and out.reply.startswith("451 4.7.10 ")
    assert rig.hop.connections == 1 and rig.hop.mail_commands == 0


async def test_mode_none_and_no_policy_deliver_as_before(rig: Rig) -> None:
    rig.hop.tls_context = None
    rig.https.response = policy_response("version: STSv1\nmode: none\nmax_age: 60\n")
    assert (await rig.send()).status is RcptStatus.DELIVERED
    rig.zone.txt("_mta-sts.dst.test")  # no record, nothing cached for mode none
    (rig.data_dir / "mta-sts.json").unlink()
    assert (await rig.send()).status is RcptStatus.DELIVERED
    assert len(rig.https.requests) == 1


async def test_cached_policy_is_enforced_after_a_restart_when_the_policy_host_is_down(
    rig: Rig, events: Any,
) -> None:
    assert (await rig.send()).status is RcptStatus.DELIVERED
    cache = json.loads((rig.data_dir / "mta-sts.json").read_text())
    assert cache["policies"][DOMAIN]["mode"] == "enforce"
    # The attacker takes the policy host down, announces a new id and strips STARTTLS;
    # Coffer restarts in between (a new deliverer reads the cache file).
    await rig.https.stop()
    rig.zone.txt("_mta-sts.dst.test", "v=STSv1; id=2")
    rig.hop.tls_context = None
    out = await rig.send()
    assert out.status is RcptStatus.DEFERRED and out.reply.startswith("451 4.7.5 ")
    assert rig.hop.mail_commands == 1  # the first delivery's only
    (failed,) = events("mta_sts_fetch_failed")
    assert failed["domain"] == DOMAIN and failed["cached_mode"] == "enforce"


async def test_cached_policy_is_enforced_when_the_txt_record_disappears(rig: Rig) -> None:
    assert (await rig.send()).status is RcptStatus.DELIVERED
    rig.zone.txt("_mta-sts.dst.test")
    rig.hop.tls_context = None
    assert (await rig.send()).status is RcptStatus.DEFERRED
    assert len(rig.https.requests) == 1


async def test_policy_is_fetched_again_only_when_the_txt_id_changes(rig: Rig) -> None:
    rig.https.response = policy_response(TESTING)
    d = rig.deliverer()
    try:
        assert (await rig.send(d)).status is RcptStatus.DELIVERED
        assert (await rig.send(d)).status is RcptStatus.DELIVERED
        assert len(rig.https.requests) == 1  # same id: the cached policy
        # The domain moves its mail elsewhere and says so with a new id.
        rig.https.response = policy_response(ENFORCE.replace("*.dst.test", "mx.new.test"))
        rig.zone.txt("_mta-sts.dst.test", "v=STSv1; id=2")
        out = await rig.send(d)
    finally:
        await d.aclose()
    assert len(rig.https.requests) == 2
    assert out.status is RcptStatus.DEFERRED and "matches no mx pattern (mx.new.test)" in out.reply


@pytest.mark.parametrize(("response", "error"), [
    (policy_response("", status="301 Moved Permanently",
                     extra="Location: https://mta-sts.elsewhere.test/\r\n"), "HTTP status 301"),
    (policy_response(ENFORCE, content_type="text/html"), "not text/plain"),
    (policy_response(ENFORCE.replace("mode: enforce\n", "")), "mode must be"),
    (policy_response(ENFORCE.replace("mx: *.dst.test", "mx *.dst.test")), "line 3"),
])
async def test_unusable_policy_is_refused_and_logged_and_mail_goes_as_before(
    rig: Rig, events: Any, response: bytes, error: str,
) -> None:
    rig.https.response = response
    rig.hop.tls_context = None
    out = await rig.send()
    # §3.3: nothing fetched and nothing cached: deliver as if the domain had no policy.
    assert out.status is RcptStatus.DELIVERED
    assert len(rig.https.requests) == 1  # the redirect was not followed
    (failed,) = events("mta_sts_fetch_failed")
    assert error in failed["error"] and failed["cached_mode"] is None


async def test_policy_host_certificate_must_match_its_name(rig: Rig, ca: StsCa,
                                                           events: Any) -> None:
    await rig.https.stop()
    rig.https.context = ca.server_context("mta-sts.other.test")
    await rig.https.start()
    rig.hop.tls_context = None
    assert (await rig.send()).status is RcptStatus.DELIVERED  # no policy: as before
    (failed,) = events("mta_sts_fetch_failed")
    assert "certificate" in failed["error"].lower()


async def test_switched_off_mta_sts_is_not_consulted(rig: Rig) -> None:
    rig.mta_sts = False
    rig.hop.tls_context = None
    assert (await rig.send()).status is RcptStatus.DELIVERED
    assert rig.https.requests == []


async def test_smarthost_route_keeps_its_own_tls_setting(rig: Rig) -> None:
    rig.routes = {"*": f"smtp://127.0.0.1:{rig.hop.port}?tls=opportunistic"}
    rig.hop.tls_context = None
    assert (await rig.send()).status is RcptStatus.DELIVERED
    assert rig.https.requests == []


async def test_cached_policy_lapses_at_its_max_age(rig: Rig) -> None:
    now = [1000.0]
    resolver = MxResolver([rig.zone.nameserver], timeout=2.0)
    source = PolicySource(resolver, rig.data_dir, context=rig.ca.client_context(),
                          port=rig.https.port, timeout=2.0, clock=lambda: now[0])
    policy = await source.policy_for("DST.test.")
    assert policy is not None and policy.mode == "enforce"
    rig.zone.txt("_mta-sts.dst.test")  # the record is withdrawn
    now[0] += 86400 - 1
    assert await source.policy_for(DOMAIN) == policy
    now[0] += 1
    assert await source.policy_for(DOMAIN) is None
    assert len(rig.https.requests) == 1


async def test_policy_of_an_internationalised_domain_is_found_by_its_a_labels(
    rig: Rig, ca: StsCa,
) -> None:
    ace = "xn--bcher-kva.test"  # bücher.test
    rig.zone.mx(ace, 10, f"mx1.{ace}")
    rig.zone.a(f"mx1.{ace}", "127.0.0.1")
    rig.zone.a(f"mta-sts.{ace}", "127.0.0.1")
    rig.zone.txt(f"_mta-sts.{ace}", "v=STSv1; id=7")
    await rig.https.stop()
    rig.https.context = ca.server_context(f"mta-sts.{ace}")
    rig.https.response = policy_response(ENFORCE.replace("dst.test", ace))
    await rig.https.start()
    rig.hop.tls_context = None
    d = rig.deliverer()
    try:
        (out,) = await d.deliver(
            Envelope(mail_from="a@src.test", rcpt_to=["u@bücher.test"]),
            b"Subject: x\r\n\r\nhi\r\n", ["u@bücher.test"])
    finally:
        await d.aclose()
    assert out.status is RcptStatus.DEFERRED
    assert out.reply.startswith("451 4.7.5 MTA-STS policy of bücher.test: ")
    assert f"Host: mta-sts.{ace}\r\n" in rig.https.requests[0]
