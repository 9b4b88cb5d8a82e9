"""SMTP TLS Reporting (RFC 8460) and the MTA-STS refresh (RFC 8461 §5.1) with real parts
on loopback: the DNS server (MX, A, TXT, TLSA with the AD bit), an HTTPS policy host and
an HTTPS report receiver with openssl-made certificates, next hops with and without
STARTTLS, the spool, and two reporters sharing one data directory."""

from __future__ import annotations

import asyncio
import email
import gzip
import json
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from danepeers import (
    Served,
    cert_sha256,
    expired_from_ca,
    from_ca,
    issued_by,
    self_signed,
    spki_sha256,
)
from nexthop import DnsZone, NextHop
from stspeers import PolicyServer, ReportReceiver, StsCa, make_ca, policy_response
from tlsrptschema import problems

from gateway import metrics
from gateway.config import Config, DeliveryConfig, DnsConfig, RelayConfig, TlsRptConfig
from gateway.deliver import tlsrpt
from gateway.deliver.dane import tlsa_name
from gateway.deliver.deliverer import Deliverer
from gateway.deliver.mta_sts_fetch import PolicySource, refresh_policies
from gateway.deliver.mx import MxResolver
from gateway.deliver.tlsrpt import SessionKey
from gateway.deliver.tlsrpt_send import CLAIM_LEASE, RETRY_FIRST, TlsReporter, retry_delay
from gateway.deliver.tlsrpt_store import TlsReportStore, open_store
from gateway.envelope import Envelope
from gateway.queue.spool import Spool
from gateway.queue.state import RcptStatus

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "dst.test"
MX1 = "mx1.dst.test"
RCPT = f"u@{DOMAIN}"
ENFORCE = "version: STSv1\nmode: enforce\nmx: *.dst.test\nmax_age: 172800\n"
DAY = date(2026, 11, 28)
IN_DAY = datetime(2026, 11, 28, 15, 0, tzinfo=UTC).timestamp()
NEXT_MORNING = datetime(2026, 11, 29, 0, 20, tzinfo=UTC).timestamp()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> StsCa:
    return make_ca(tmp_path_factory.mktemp("tlsrpt-ca"))


@pytest.fixture(scope="module")
def selfsigned(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return self_signed(tmp_path_factory.mktemp("tlsrpt-dane"), "not-the-mx.test")


def _cfg(data_dir: Path, zone: DnsZone, routes: dict[str, str] | None = None) -> Config:
    return Config(
        hostname="coffer.test", data_dir=data_dir,
        relay=RelayConfig(local_domains=["src.test"]),
        delivery=DeliveryConfig(routes=routes or {"*": "mx"}, connect_timeout=5.0,
                                command_timeout=5.0,
                                tls_rpt=TlsRptConfig(enabled=True, organization="Coffer Test")),
        dns=DnsConfig(nameservers=[zone.nameserver], timeout=2.0),
    )


def _resolver(zone: DnsZone, *, dnssec: bool = False) -> MxResolver:
    return MxResolver([zone.nameserver], timeout=2.0, shuffle=lambda hosts: None,
                      dnssec=dnssec)


async def _send(d: Deliverer) -> RcptStatus:
    try:
        (out,) = await d.deliver(Envelope(mail_from="a@src.test", rcpt_to=[RCPT]),
                                 b"Subject: x\r\n\r\nsecret\r\n", [RCPT])
    finally:
        await d.aclose()
    return out.status


def _results(store: TlsReportStore) -> dict[tuple[str, str, str], int]:
    """(policy type, result, receiving MX) -> sessions, for the day at IN_DAY."""
    store.flush()
    return {(k.policy_type, k.result, k.receiving_mx): n for k, n in store.sessions(DAY)}


@pytest.fixture
async def sts_rig(ca: StsCa, dns_zone: DnsZone) -> AsyncIterator[PolicyServer]:
    dns_zone.mx(DOMAIN, 10, MX1)
    dns_zone.a(MX1, "127.0.0.1")
    dns_zone.a(f"mta-sts.{DOMAIN}", "127.0.0.1")
    dns_zone.txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=1")
    https = PolicyServer(ca.server_context(f"mta-sts.{DOMAIN}"), policy_response(ENFORCE))
    await https.start()
    yield https
    await https.stop()


def _sts_deliverer(cfg: Config, zone: DnsZone, ca: StsCa, https: PolicyServer, port: int,
                   store: TlsReportStore) -> Deliverer:
    resolver = _resolver(zone)
    sts = PolicySource(resolver, cfg.data_dir, context=ca.client_context(),
                       port=https.port, timeout=2.0)
    return Deliverer(cfg, resolver=resolver, tls_context=ca.client_context(), mx_port=port,
                     sts=sts, tls_reports=store, clock=lambda: IN_DAY)


async def test_sts_failure_then_success_are_counted_with_their_result_types(
    ca: StsCa, dns_zone: DnsZone, sts_rig: PolicyServer, tmp_path: Path,
) -> None:
    cfg = _cfg(tmp_path, dns_zone)
    store = open_store(tmp_path)
    plain = NextHop()  # no STARTTLS: an enforced policy refuses it
    good = NextHop(tls_context=ca.server_context(MX1))
    await plain.start()
    await good.start()
    try:
        assert await _send(_sts_deliverer(cfg, dns_zone, ca, sts_rig, plain.port, store)) \
            is RcptStatus.DEFERRED
        assert await _send(_sts_deliverer(cfg, dns_zone, ca, sts_rig, good.port, store)) \
            is RcptStatus.DELIVERED
    finally:
        await plain.stop()
        await good.stop()
    assert _results(store) == {("sts", "starttls-not-supported", MX1): 1,
                               ("sts", "success", ""): 1}
    (failure,) = [k for k, _ in store.sessions(DAY) if k.result != "success"]
    assert (failure.receiving_ip, failure.sending_ip) == ("127.0.0.1", "127.0.0.1")
    assert failure.policy_string == tlsrpt.sts_policy_string("enforce", ("*.dst.test",),
                                                             172800)


async def test_messages_over_one_pooled_connection_count_as_one_session(
    ca: StsCa, dns_zone: DnsZone, sts_rig: PolicyServer, tmp_path: Path,
) -> None:
    store = open_store(tmp_path)
    hop = NextHop(tls_context=ca.server_context(MX1))
    await hop.start()
    d = _sts_deliverer(_cfg(tmp_path, dns_zone), dns_zone, ca, sts_rig, hop.port, store)
    try:
        for _ in range(3):
            (out,) = await d.deliver(Envelope(mail_from="a@src.test", rcpt_to=[RCPT]),
                                     b"Subject: x\r\n\r\nsecret\r\n", [RCPT])
            assert out.status is RcptStatus.DELIVERED
    finally:
        await d.aclose()
        await hop.stop()
    assert (len(hop.received), hop.connections) == (3, 1)
    assert _results(store) == {("sts", "success", ""): 1}  # RFC 8460 §4.4: sessions


@pytest.mark.parametrize(("mode", "status"), [("testing", RcptStatus.DELIVERED),
                                             ("enforce", RcptStatus.DEFERRED)])
async def test_an_mx_host_outside_the_policy_counts_one_validation_failure(
    ca: StsCa, dns_zone: DnsZone, sts_rig: PolicyServer, tmp_path: Path, mode: str,
    status: RcptStatus,
) -> None:
    # The policy names mx9 only; the domain's MX is mx1 (with a good certificate).
    sts_rig.response = policy_response(
        f"version: STSv1\nmode: {mode}\nmx: mx9.dst.test\nmax_age: 172800\n")
    store = open_store(tmp_path)
    hop = NextHop(tls_context=ca.server_context(MX1))
    await hop.start()
    try:
        assert await _send(_sts_deliverer(_cfg(tmp_path, dns_zone), dns_zone, ca, sts_rig,
                                          hop.port, store)) is status
    finally:
        await hop.stop()
    # testing: tried, and its one session failed; enforce: not tried, one failure.
    assert _results(store) == {("sts", "validation-failure", MX1): 1}
    assert len(hop.received) == (1 if mode == "testing" else 0)


async def _counts_without_policy(ca: StsCa, zone: DnsZone, https: PolicyServer,
                                 tmp_path: Path) -> dict[tuple[str, str, str], int]:
    """Deliver one message when the policy cannot be had: it goes as without MTA-STS
    (to a next hop without STARTTLS); what it counted."""
    store = open_store(tmp_path)
    hop = NextHop()
    await hop.start()
    try:
        assert await _send(_sts_deliverer(_cfg(tmp_path, zone), zone, ca, https, hop.port,
                                          store)) is RcptStatus.DELIVERED
    finally:
        await hop.stop()
    return _results(store)


async def test_a_policy_that_cannot_be_fetched_counts_as_sts_policy_fetch_error(
    ca: StsCa, dns_zone: DnsZone, sts_rig: PolicyServer, tmp_path: Path,
) -> None:
    sts_rig.response = policy_response("gone", status="404 Not Found")
    assert await _counts_without_policy(ca, dns_zone, sts_rig, tmp_path) == {
        ("sts", "sts-policy-fetch-error", ""): 1}


async def test_a_policy_host_with_a_certificate_for_another_name_counts_as_webpki_invalid(
    ca: StsCa, dns_zone: DnsZone, sts_rig: PolicyServer, tmp_path: Path,
) -> None:
    await sts_rig.stop()
    sts_rig.context = ca.server_context("elsewhere.test")
    await sts_rig.start()  # same port, a certificate not valid for mta-sts.dst.test
    assert await _counts_without_policy(ca, dns_zone, sts_rig, tmp_path) == {
        ("sts", "sts-webpki-invalid", ""): 1}


async def test_a_fetched_file_that_is_no_policy_counts_as_sts_policy_invalid(
    ca: StsCa, dns_zone: DnsZone, sts_rig: PolicyServer, tmp_path: Path,
) -> None:
    sts_rig.response = policy_response("version: STSv1\nmode: sometimes\n")
    assert await _counts_without_policy(ca, dns_zone, sts_rig, tmp_path) == {
        ("sts", "sts-policy-invalid", ""): 1}


async def test_dane_mismatch_then_match_are_counted_as_tlsa_sessions(
    dns_zone: DnsZone, selfsigned: Served, ca: StsCa, tmp_path: Path,
) -> None:
    store = open_store(tmp_path)
    cfg = _cfg(tmp_path, dns_zone)
    wrong = NextHop(tls_context=selfsigned.context())
    right = NextHop(tls_context=selfsigned.context())
    await wrong.start()
    await right.start()
    dns_zone.mx(DOMAIN, 10, MX1)
    dns_zone.a(MX1, "127.0.0.1")
    dns_zone.secure(DOMAIN, MX1, tlsa_name(MX1, wrong.port), tlsa_name(MX1, right.port))
    # DANE-EE SPKI records: one of another key, one of the served key.
    other = spki_sha256(ca.leaf("elsewhere.test")[0])
    dns_zone.tlsa(tlsa_name(MX1, wrong.port), 3, 1, 1, other)
    dns_zone.tlsa(tlsa_name(MX1, right.port), 3, 1, 1, spki_sha256(selfsigned.leaf))
    try:
        for hop, expected in ((wrong, RcptStatus.DEFERRED), (right, RcptStatus.DELIVERED)):
            resolver = _resolver(dns_zone, dnssec=True)
            d = Deliverer(cfg, resolver=resolver, mx_port=hop.port, tls_reports=store,
                          clock=lambda: IN_DAY)
            assert await _send(d) is expected
    finally:
        await wrong.stop()
        await right.stop()
    assert _results(store) == {("tlsa", "validation-failure", MX1): 1,
                               ("tlsa", "success", ""): 1}
    (failure,) = [k for k, _ in store.sessions(DAY) if k.result != "success"]
    assert failure.sending_ip == "127.0.0.1"  # our end of the failed session


async def _dane_session(zone: DnsZone, data_dir: Path, served: Served,
                        *tlsa: int | bytes) -> tuple[RcptStatus, TlsReportStore]:
    """One message to DOMAIN, whose one MX host MX1 (all signed) publishes the TLSA
    record ``tlsa`` (usage, selector, matching type, data) and presents ``served``:
    how it went, and the store that counted the session."""
    usage, selector, mtype, data = tlsa
    assert isinstance(data, bytes)
    store = open_store(data_dir)
    hop = NextHop(tls_context=served.context())
    await hop.start()
    zone.mx(DOMAIN, 10, MX1)
    zone.a(MX1, "127.0.0.1")
    zone.secure(DOMAIN, MX1, tlsa_name(MX1, hop.port))
    zone.tlsa(tlsa_name(MX1, hop.port), int(usage), int(selector), int(mtype), data)
    try:
        d = Deliverer(_cfg(data_dir, zone), resolver=_resolver(zone, dnssec=True),
                      mx_port=hop.port, tls_reports=store, clock=lambda: IN_DAY)
        status = await _send(d)
    finally:
        await hop.stop()
    return status, store


@pytest.fixture(scope="module")
def dane_ta_chains(ca: StsCa, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Served]:
    """Chains under ``ca`` that a DANE-TA record on it anchors, each failing one check."""
    tmp = tmp_path_factory.mktemp("tlsrpt-dane-ta")
    elsewhere = from_ca(ca, "elsewhere.test")
    return {"another-name": elsewhere,
            "expired": expired_from_ca(ca, tmp / "expired", MX1),
            # A leaf for MX1 signed by another leaf's key: a chain error below the anchor.
            "issued-by-a-leaf": issued_by(elsewhere, tmp / "forged", MX1)}


@pytest.mark.parametrize(("chain", "result"), [
    ("another-name", "certificate-host-mismatch"),
    ("expired", "certificate-expired"),
    ("issued-by-a-leaf", "certificate-not-trusted"),
])
async def test_a_dane_ta_chain_failing_a_check_counts_as_its_rfc8460_result_type(
    dns_zone: DnsZone, ca: StsCa, dane_ta_chains: dict[str, Served], tmp_path: Path,
    chain: str, result: str,
) -> None:
    status, store = await _dane_session(dns_zone, tmp_path, dane_ta_chains[chain],
                                        2, 0, 1, cert_sha256(ca.ca_pem))
    try:
        assert status is RcptStatus.DEFERRED
        assert _results(store) == {("tlsa", result, MX1): 1}
    finally:
        store.close()


async def test_only_unusable_tlsa_records_count_as_tlsa_invalid_though_mail_goes(
    dns_zone: DnsZone, selfsigned: Served, tmp_path: Path,
) -> None:
    # A PKIX-EE record, unusable for SMTP (RFC 7672 §3.1.3): TLS without authentication.
    record = spki_sha256(selfsigned.leaf)
    status, store = await _dane_session(dns_zone, tmp_path, selfsigned, 1, 1, 1, record)
    try:
        assert status is RcptStatus.DELIVERED
        assert _results(store) == {("tlsa", "tlsa-invalid", MX1): 1}
        ((key, _),) = store.sessions(DAY)
    finally:
        store.close()
    # The report names the records the domain published, and where the session went.
    assert key.policy_string == (f"1 1 1 {record.hex()}",)
    assert (key.receiving_ip, key.sending_ip) == ("127.0.0.1", "127.0.0.1")


def _counted(data_dir: Path) -> None:
    """A day of counts as the deliverer leaves them: one domain asking for reports, one
    publishing no _smtp._tls record."""
    store = open_store(data_dir)
    sts = tlsrpt.sts_policy_string("enforce", ("*.dst.test",), 172800)
    for key, n in (
        (SessionKey(DOMAIN, "sts", sts, ("*.dst.test",), "success"), 3),
        (SessionKey(DOMAIN, "sts", sts, ("*.dst.test",), "certificate-expired", MX1,
                    "127.0.0.1"), 2),
        (SessionKey("quiet.test", "sts", sts, ("*.quiet.test",), "success"), 1),
    ):
        for _ in range(n):
            store.count(IN_DAY, key)
    store.flush()
    store.close()


async def test_daily_job_reports_once_per_domain_across_two_workers(
    ca: StsCa, dns_zone: DnsZone, tmp_path: Path, events: Any,
) -> None:
    receiver = ReportReceiver(ca.server_context("rua.dst.test"))
    await receiver.start()
    dns_zone.a("rua.dst.test", "127.0.0.1")
    dns_zone.txt(f"_smtp._tls.{DOMAIN}", "v=TLSRPTv1; rua=mailto:tls-reports@dst.test,"
                 f"https://rua.dst.test:{receiver.port}/v1/tlsrpt")
    _counted(tmp_path)
    cfg = _cfg(tmp_path, dns_zone)
    spool = Spool(tmp_path / "spool", fsync=False)
    queued: list[str] = []
    workers = [TlsReporter(cfg, open_store(tmp_path), _resolver(dns_zone), spool,
                           context=ca.client_context(), notify=queued.append,
                           clock=lambda: NEXT_MORNING, who=f"w{i}") for i in range(2)]
    before = metrics.REGISTRY.get_sample_value(
        "coffer_tlsrpt_reports_total", {"channel": "https", "result": "sent"}) or 0.0
    try:
        first = await asyncio.gather(*(w.tick() for w in workers))
        again = await asyncio.gather(*(w.tick() for w in workers))
    finally:
        await receiver.stop()
        for w in workers:
            w.store.close()
    # Each domain claimed by exactly one worker, once.
    assert sorted(d for done in first for d in done) == [DOMAIN, "quiet.test"]
    assert again == [[], []]
    # https: one POST of the gzipped report.
    ((head, body),) = receiver.posts
    assert head.startswith("POST /v1/tlsrpt HTTP/1.1\r\n")
    assert "Content-Type: application/tlsrpt+gzip\r\n" in head
    report = json.loads(gzip.decompress(body))
    assert problems(report) == []
    assert report["organization-name"] == "Coffer Test"
    assert report["contact-info"] == "postmaster@src.test"
    assert [p["policy"]["policy-domain"] for p in report["policies"]] == [DOMAIN]
    assert metrics.REGISTRY.get_sample_value(
        "coffer_tlsrpt_reports_total", {"channel": "https", "result": "sent"}) == before + 1
    # mailto: one message in the queue, to the rua address, nothing for quiet.test.
    assert queued == spool.queue_ids()
    (qid,) = queued
    msg = spool.load(qid)
    assert msg.envelope.rcpt_to == ["tls-reports@dst.test"]
    assert msg.envelope.mail_from == "noreply-tlsrpt@coffer.test"
    assert {e["domain"] for e in events("tlsrpt_sent")} == {DOMAIN}
    (skipped,) = events("tlsrpt_not_requested")
    assert skipped["domain"] == "quiet.test"
    # The spooled report goes out through a next hop as a valid multipart/report.
    hop = NextHop()
    await hop.start()
    try:
        d = Deliverer(_cfg(tmp_path, dns_zone, {DOMAIN: f"smtp://127.0.0.1:{hop.port}"}))
        try:
            (out,) = await d.deliver(msg.envelope, msg.data, msg.envelope.rcpt_to)
        finally:
            await d.aclose()
    finally:
        await hop.stop()
    assert out.status is RcptStatus.DELIVERED
    (received,) = hop.received
    mail = email.message_from_bytes(received.data)
    assert mail.get_content_type() == "multipart/report"
    assert mail.get_param("report-type") == "tlsrpt"
    assert mail["TLS-Report-Domain"] == DOMAIN
    attachment = mail.get_payload()[1]  # type: ignore[index]
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert json.loads(gzip.decompress(attachment.get_payload(decode=True))) == report


async def test_policy_is_refetched_when_it_expires_within_a_day(
    ca: StsCa, dns_zone: DnsZone, sts_rig: PolicyServer, tmp_path: Path, events: Any,
) -> None:
    now = [IN_DAY]
    sts = PolicySource(_resolver(dns_zone), tmp_path, context=ca.client_context(),
                       port=sts_rig.port, timeout=2.0, clock=lambda: now[0])
    assert await sts.policy_for(DOMAIN) is not None
    assert len(sts_rig.requests) == 1
    now[0] += 3600  # max_age is two days: not due yet
    assert await refresh_policies(sts) == []
    now[0] = IN_DAY + 172800 - 3600  # an hour before it lapses
    assert await refresh_policies(sts) == [DOMAIN]
    assert len(sts_rig.requests) == 2
    assert events("mta_sts_policy")[-1]["change"] == "refreshed"
    assert await refresh_policies(sts) == []  # the fresh copy has a new max_age
    cached = json.loads((tmp_path / "mta-sts.json").read_text())["policies"][DOMAIN]
    assert cached["fetched"] == now[0]


async def test_refresh_keeps_the_cached_policy_when_the_txt_record_is_gone(
    ca: StsCa, dns_zone: DnsZone, sts_rig: PolicyServer, tmp_path: Path,
) -> None:
    now = [IN_DAY]
    sts = PolicySource(_resolver(dns_zone), tmp_path, context=ca.client_context(),
                       port=sts_rig.port, timeout=2.0, clock=lambda: now[0])
    assert await sts.policy_for(DOMAIN) is not None
    dns_zone.txt(f"_mta-sts.{DOMAIN}")  # no record any more
    now[0] = IN_DAY + 172800 - 3600
    await refresh_policies(sts)
    assert len(sts_rig.requests) == 1
    policy = await sts.policy_for(DOMAIN)
    assert policy is not None and policy.mode == "enforce"  # RFC 8461 §5.1


async def test_a_report_the_receiver_refuses_is_logged_failed_and_not_retried_at_once(
    ca: StsCa, dns_zone: DnsZone, tmp_path: Path, events: Any,
) -> None:
    receiver = PolicyServer(ca.server_context("rua.dst.test"),
                            policy_response("no", status="500 Internal Server Error"))
    await receiver.start()
    dns_zone.a("rua.dst.test", "127.0.0.1")
    dns_zone.txt(f"_smtp._tls.{DOMAIN}", f"v=TLSRPTv1; rua=https://rua.dst.test:{receiver.port}/")
    _counted(tmp_path)
    before = metrics.REGISTRY.get_sample_value(
        "coffer_tlsrpt_reports_total", {"channel": "https", "result": "failed"}) or 0.0
    store = open_store(tmp_path)
    reporter = TlsReporter(_cfg(tmp_path, dns_zone), store, _resolver(dns_zone),
                           Spool(tmp_path / "spool", fsync=False),
                           context=ca.client_context(), clock=lambda: NEXT_MORNING)
    try:
        assert DOMAIN in await reporter.report_day(DAY)
        assert await reporter.report_day(DAY) == []  # its retry is not due yet
    finally:
        await receiver.stop()
        store.close()
    assert len(receiver.requests) == 1
    (failed,) = events("tlsrpt_failed")
    assert failed["domain"] == DOMAIN and "500" in failed["error"]
    assert metrics.REGISTRY.get_sample_value(
        "coffer_tlsrpt_reports_total", {"channel": "https", "result": "failed"}) == before + 1


async def test_another_worker_takes_the_refreshed_policy_from_the_cache_file(
    ca: StsCa, dns_zone: DnsZone, sts_rig: PolicyServer, tmp_path: Path,
) -> None:
    now = [IN_DAY]

    def source() -> PolicySource:
        return PolicySource(_resolver(dns_zone), tmp_path, context=ca.client_context(),
                            port=sts_rig.port, timeout=2.0, clock=lambda: now[0])

    worker0 = source()
    assert await worker0.policy_for(DOMAIN) is not None
    worker1 = source()  # read the same policy from the file at its start
    now[0] = IN_DAY + 172800 - 3600
    assert await refresh_policies(worker0) == [DOMAIN]
    # Past the first copy's max_age the policy host is down: worker 1 still has the
    # policy (the refreshed copy), it does not deliver as if there were none.
    sts_rig.response = policy_response("down", status="503 Service Unavailable")
    now[0] = IN_DAY + 172800 + 60
    policy = await worker1.policy_for(DOMAIN)
    assert policy is not None and policy.mode == "enforce"
    assert len(sts_rig.requests) == 2  # worker 1 did not fetch at all


def _https_rua(zone: DnsZone, *receivers: ReportReceiver, mailto: bool = False) -> None:
    ruas = [f"https://rua{i}.dst.test:{r.port}/" for i, r in enumerate(receivers)]
    for i in range(len(receivers)):
        zone.a(f"rua{i}.dst.test", "127.0.0.1")
    if mailto:
        ruas.insert(0, "mailto:tls-reports@dst.test")
    zone.txt(f"_smtp._tls.{DOMAIN}", "v=TLSRPTv1; rua=" + ",".join(ruas))


async def _receivers(ca: StsCa, *refuse: int) -> list[ReportReceiver]:
    out = [ReportReceiver(ca.server_context(f"rua{i}.dst.test"), refuse=n)
           for i, n in enumerate(refuse)]
    for r in out:
        await r.start()
    return out


async def _one_rua(ca: StsCa, zone: DnsZone, data_dir: Path, refuse: int) -> ReportReceiver:
    """A day counted (``_counted``) whose domain asks for reports at one https receiver
    that refuses the first ``refuse`` POSTs."""
    (receiver,) = await _receivers(ca, refuse)
    _https_rua(zone, receiver)
    _counted(data_dir)
    return receiver


def _reporter(data_dir: Path, zone: DnsZone, ca: StsCa, now: list[float],
              who: str = "0") -> TlsReporter:
    return TlsReporter(_cfg(data_dir, zone), open_store(data_dir), _resolver(zone),
                       Spool(data_dir / "spool", fsync=False), context=ca.client_context(),
                       clock=lambda: now[0], who=who)


async def test_a_claim_left_by_a_dead_reporter_is_taken_over_after_its_lease(
    ca: StsCa, dns_zone: DnsZone, tmp_path: Path,
) -> None:
    receiver = await _one_rua(ca, dns_zone, tmp_path, 0)
    dead = open_store(tmp_path)  # claimed, then its worker died before sending
    assert dead.claim(DAY, DOMAIN, "dead", NEXT_MORNING, CLAIM_LEASE) == 0
    dead.close()
    now = [NEXT_MORNING + 60]
    reporter = _reporter(tmp_path, dns_zone, ca, now)
    try:
        assert await reporter.tick() == ["quiet.test"]  # DOMAIN: the lease still runs
        assert receiver.requests == []
        now[0] = NEXT_MORNING + CLAIM_LEASE + 1
        assert await reporter.tick() == [DOMAIN]
        now[0] += 3 * CLAIM_LEASE
        assert await reporter.tick() == []
    finally:
        await receiver.stop()
        reporter.store.close()
    assert len(receiver.posts) == 1


async def test_a_receiver_failing_twice_then_accepting_gets_exactly_one_report(
    ca: StsCa, dns_zone: DnsZone, tmp_path: Path, events: Any,
) -> None:
    receiver = await _one_rua(ca, dns_zone, tmp_path, 2)
    now = [NEXT_MORNING]
    # Two workers: a retry is taken by whichever ticks first, once.
    workers = [_reporter(tmp_path, dns_zone, ca, now, who=f"w{i}") for i in range(2)]
    try:
        rounds = []
        for step in (0.0, 60.0, RETRY_FIRST, retry_delay(2), retry_delay(3) * 4):
            now[0] += step
            done = await asyncio.gather(*(w.tick() for w in workers))
            rounds.append(sorted(d for ds in done for d in ds if d == DOMAIN))
    finally:
        await receiver.stop()
        for w in workers:
            w.store.close()
    assert rounds == [[DOMAIN], [], [DOMAIN], [DOMAIN], []]
    assert (len(receiver.requests), len(receiver.posts)) == (3, 1)
    report = json.loads(gzip.decompress(receiver.posts[0][1]))
    assert report["report-id"] == tlsrpt.report_id(DAY, DOMAIN, "coffer.test")
    assert len(events("tlsrpt_failed")) == 2


async def test_a_retry_goes_only_to_the_rua_that_did_not_get_the_report(
    ca: StsCa, dns_zone: DnsZone, tmp_path: Path,
) -> None:
    failing, fine = await _receivers(ca, 1, 0)
    _https_rua(dns_zone, failing, fine, mailto=True)
    _counted(tmp_path)
    now = [NEXT_MORNING]
    reporter = _reporter(tmp_path, dns_zone, ca, now)
    try:
        assert DOMAIN in await reporter.tick()
        now[0] += RETRY_FIRST
        assert await reporter.tick() == [DOMAIN]
    finally:
        await failing.stop()
        await fine.stop()
        reporter.store.close()
    assert (len(failing.requests), len(failing.posts)) == (2, 1)
    assert (len(fine.requests), len(fine.posts)) == (1, 1)
    assert len(reporter.spool.queue_ids()) == 1  # the mailto: report, spooled once


async def test_a_report_refused_all_the_next_day_is_given_up_with_one_log_line(
    ca: StsCa, dns_zone: DnsZone, tmp_path: Path, events: Any,
) -> None:
    receiver = await _one_rua(ca, dns_zone, tmp_path, 1000)
    now = [NEXT_MORNING]
    reporter = _reporter(tmp_path, dns_zone, ca, now)
    tries = 0
    try:
        while DOMAIN in await reporter.tick():
            tries += 1
            now[0] += retry_delay(tries)
        now[0] += 3 * 86400  # the day after the next: nothing more for that day
        await reporter.tick()
    finally:
        await receiver.stop()
        reporter.store.close()
    assert 3 <= len(receiver.requests) == tries
    assert receiver.posts == []
    (given_up,) = events("tlsrpt_given_up")
    assert given_up["domain"] == DOMAIN and given_up["tries"] == tries


def test_a_report_claimed_before_leases_existed_stays_settled(tmp_path: Path) -> None:
    _counted(tmp_path)
    with sqlite3.connect(tmp_path / "tlsrpt.db") as db:  # as an older Coffer left it
        db.execute("INSERT INTO reports (day, policy_domain, claimed_by, outcome) "
                   "VALUES (?, ?, 'old', 'https sent')", (DAY.isoformat(), DOMAIN))
    store = open_store(tmp_path)
    try:
        assert store.open_domains(DAY, NEXT_MORNING) == ["quiet.test"]
        assert store.claim(DAY, DOMAIN, "new", NEXT_MORNING, CLAIM_LEASE) == -1
    finally:
        store.close()


def _doomed_reporter(data_dir: Path, zone: DnsZone, ca: StsCa) -> subprocess.Popen[str]:
    """A worker process reporting the day after DAY, as a real Coffer worker would, to be
    killed -9 while it sends."""
    script = textwrap.dedent(f"""
        import asyncio, ssl
        from pathlib import Path
        from gateway.config import (Config, DeliveryConfig, DnsConfig, RelayConfig,
                                    TlsRptConfig)
        from gateway.deliver.mx import MxResolver
        from gateway.deliver.tlsrpt_send import TlsReporter
        from gateway.deliver.tlsrpt_store import open_store
        from gateway.queue.spool import Spool
        data = Path({str(data_dir)!r})
        cfg = Config(hostname="coffer.test", data_dir=data,
                     relay=RelayConfig(local_domains=["src.test"]),
                     delivery=DeliveryConfig(routes={{"*": "mx"}},
                                             tls_rpt=TlsRptConfig(enabled=True)),
                     dns=DnsConfig(nameservers=[{zone.nameserver!r}], timeout=2.0))
        reporter = TlsReporter(cfg, open_store(data),
                               MxResolver([{zone.nameserver!r}], timeout=2.0),
                               Spool(data / "spool", fsync=False),
                               context=ssl.create_default_context(cafile={str(ca.ca_pem)!r}),
                               clock=lambda: {NEXT_MORNING!r}, who="doomed")
        asyncio.run(reporter.tick())
    """)
    return subprocess.Popen([sys.executable, "-c", script], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def test_a_report_whose_send_a_crash_cut_short_is_not_sent_to_that_rua_again(
    ca: StsCa, dns_zone: DnsZone, tmp_path: Path, events: Any,
) -> None:
    # The receiver reads the whole POST and never answers; the worker is killed -9
    # meanwhile: whether the report counts as received is the receiver's secret.
    (receiver,) = await _receivers(ca, 0)
    receiver.hold = True
    _https_rua(dns_zone, receiver)
    uri = f"https://rua0.dst.test:{receiver.port}/"
    _counted(tmp_path)
    child = _doomed_reporter(tmp_path, dns_zone, ca)
    try:
        async with asyncio.timeout(30):
            while not receiver.held.is_set():
                assert child.poll() is None, child.communicate()[1]
                await asyncio.sleep(0.02)
    finally:
        child.kill()
        child.communicate()
    marks = open_store(tmp_path)
    try:
        assert marks.interrupted(DAY, DOMAIN) == {uri}  # written before the POST
        assert marks.served(DAY, DOMAIN) == set()
    finally:
        marks.close()
    receiver.hold = False
    now = [NEXT_MORNING + CLAIM_LEASE + 1]  # the dead worker's lease has run out
    reporter = _reporter(tmp_path, dns_zone, ca, now)
    try:
        assert await reporter.tick() == [DOMAIN, "quiet.test"]
        now[0] += 3 * RETRY_FIRST
        assert await reporter.tick() == []  # settled: no retry either
    finally:
        await receiver.stop()
        reporter.store.close()
    assert (len(receiver.requests), receiver.posts) == (1, [])  # the first POST only
    (cut,) = events("tlsrpt_interrupted")
    assert (cut["domain"], cut["to"]) == (DOMAIN, uri)
    assert cut["report_id"] == tlsrpt.report_id(DAY, DOMAIN, "coffer.test")
    assert events("tlsrpt_sent") == [] and events("tlsrpt_failed") == []


async def test_a_crash_before_the_send_leaves_no_mark_and_the_report_goes_out_once(
    ca: StsCa, dns_zone: DnsZone, tmp_path: Path,
) -> None:
    # The guard of the test above: a claim without a mark (the worker died before it
    # began to send) is an ordinary takeover, the report is sent.
    receiver = await _one_rua(ca, dns_zone, tmp_path, 0)
    dead = open_store(tmp_path)
    assert dead.claim(DAY, DOMAIN, "dead", NEXT_MORNING, CLAIM_LEASE) == 0
    assert dead.interrupted(DAY, DOMAIN) == set()
    dead.close()
    now = [NEXT_MORNING + CLAIM_LEASE + 1]
    reporter = _reporter(tmp_path, dns_zone, ca, now)
    try:
        assert DOMAIN in await reporter.tick()
        assert reporter.store.interrupted(DAY, DOMAIN) == set()  # the mark is gone
        assert reporter.store.served(DAY, DOMAIN) == {f"https://rua0.dst.test:{receiver.port}/"}
    finally:
        await receiver.stop()
        reporter.store.close()
    assert len(receiver.posts) == 1
