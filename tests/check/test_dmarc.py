"""DMARC (RFC 7489): the matrix of alignment, policy discovery and disposition.

Records are served by the loopback DNS server; SPF and DKIM verdicts are given
directly (their own checks are tested in test_spf.py and test_dkim.py).
"""

from __future__ import annotations

import random

import pytest
from authdns import Zone

from gateway.check import dmarc
from gateway.check.dns import Resolver
from gateway.check.verdicts import DkimVerdict, SpfVerdict


def msg(*froms: str) -> bytes:
    head = "".join(f"From: {f}\r\n" for f in froms)
    return (head + "To: bob@example.org\r\nSubject: s\r\n\r\nbody\r\n").encode()


ALICE = msg("Alice <alice@example.com>")
NO_SPF = SpfVerdict("none", "", "")


def spf_pass(domain: str, identity: str = "mailfrom") -> SpfVerdict:
    return SpfVerdict("pass", domain, "", identity)  # type: ignore[arg-type]


def dkim_pass(domain: str) -> DkimVerdict:
    return DkimVerdict("pass", domain, "s1")


def evaluate(resolver: Resolver, data: bytes = ALICE, spf: SpfVerdict = NO_SPF,
             dkim: tuple[DkimVerdict, ...] = (), **kw: object) -> dmarc.DmarcVerdict:
    return dmarc.evaluate_sync(resolver, data, spf, dkim, **kw)  # type: ignore[arg-type]


# --- alignment -------------------------------------------------------------------


@pytest.mark.parametrize(("record", "spf_domain", "result"), [
    ("v=DMARC1; p=reject", "example.com", "pass"),
    ("v=DMARC1; p=reject", "bounces.example.com", "pass"),  # relaxed: same org domain
    ("v=DMARC1; p=reject; aspf=s", "bounces.example.com", "fail"),  # strict: same name
    ("v=DMARC1; p=reject; aspf=s", "example.com", "pass"),
    ("v=DMARC1; p=reject", "example.net", "fail"),  # unaligned
])
def test_spf_alignment(zone: Zone, resolver: Resolver, record: str, spf_domain: str,
                       result: str) -> None:
    zone.txt("_dmarc.example.com", record)
    assert evaluate(resolver, spf=spf_pass(spf_domain)).result == result


@pytest.mark.parametrize(("record", "d", "result"), [
    ("v=DMARC1; p=reject", "example.com", "pass"),
    ("v=DMARC1; p=reject", "mail.example.com", "pass"),
    ("v=DMARC1; p=reject; adkim=s", "mail.example.com", "fail"),
    ("v=DMARC1; p=reject; adkim=s", "EXAMPLE.com", "pass"),
    ("v=DMARC1; p=reject", "example.com.evil.net", "fail"),
])
def test_dkim_alignment(zone: Zone, resolver: Resolver, record: str, d: str,
                        result: str) -> None:
    zone.txt("_dmarc.example.com", record)
    assert evaluate(resolver, dkim=(dkim_pass(d),)).result == result


def test_only_a_passing_dkim_signature_counts(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    sigs = (DkimVerdict("fail", "example.com", "s1"), dkim_pass("mailinglist.example"))
    v = evaluate(resolver, dkim=sigs)
    assert (v.result, v.disposition) == ("fail", "reject")


def test_spf_pass_on_helo_never_aligns_cve_2019_20790(zone: Zone, resolver: Resolver) -> None:
    # a null MAIL FROM checks SPF on HELO; DMARC must not use that identity
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    v = evaluate(resolver, spf=spf_pass("example.com", identity="helo"))
    assert (v.result, v.disposition) == ("fail", "reject")


def test_unaligned_failure_carries_the_requested_disposition(zone: Zone,
                                                             resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=quarantine")
    v = evaluate(resolver, spf=spf_pass("example.net"), dkim=(dkim_pass("example.net"),))
    assert (v.result, v.domain, v.policy, v.disposition) == (
        "fail", "example.com", "quarantine", "quarantine")


def test_pass_has_no_disposition(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    v = evaluate(resolver, dkim=(dkim_pass("example.com"),))
    assert (v.result, v.policy, v.disposition) == ("pass", "reject", "none")


# --- policy discovery ------------------------------------------------------------


def test_subdomain_uses_sp_from_the_organizational_domain(zone: Zone,
                                                          resolver: Resolver) -> None:
    # RFC 7489 §6.6.3: no record at the From domain -> the org domain's, with sp=
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject; sp=quarantine")
    v = evaluate(resolver, msg("noreply@news.example.com"))
    assert (v.result, v.domain, v.record_domain, v.policy, v.disposition) == (
        "fail", "news.example.com", "example.com", "quarantine", "quarantine")


def test_subdomain_without_sp_inherits_p(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    assert evaluate(resolver, msg("x@a.b.example.com")).policy == "reject"


def test_record_at_the_subdomain_itself_uses_its_p(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject; sp=none")
    zone.txt("_dmarc.news.example.com", "v=DMARC1; p=quarantine")
    v = evaluate(resolver, msg("x@news.example.com"))
    assert (v.policy, v.record_domain) == ("quarantine", "news.example.com")


def test_org_domain_comes_from_the_public_suffix_list(zone: Zone, resolver: Resolver) -> None:
    assert dmarc.org_domain("mail.example.co.uk") == "example.co.uk"
    assert dmarc.org_domain("a.b.example.com") == "example.com"
    assert dmarc.org_domain("co.uk") == "co.uk"
    zone.txt("_dmarc.example.co.uk", "v=DMARC1; p=reject")
    v = evaluate(resolver, msg("x@mail.example.co.uk"))
    assert (v.record_domain, v.policy) == ("example.co.uk", "reject")
    assert ("_dmarc.co.uk", "TXT") not in zone.queries  # never above the org domain


def test_no_record_is_none(zone: Zone, resolver: Resolver) -> None:
    zone.txt("example.com", "v=spf1 -all")
    v = evaluate(resolver)
    assert (v.result, v.disposition) == ("none", "none")


def test_records_without_v_dmarc1_are_ignored(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "some verification token")
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    assert evaluate(resolver).policy == "reject"


def test_several_records_mean_no_dmarc(zone: Zone, resolver: Resolver) -> None:
    # RFC 7489 §6.6.3 step 4
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    zone.txt("_dmarc.example.com", "v=DMARC1; p=none")
    assert evaluate(resolver).result == "none"


def test_invalid_p_without_rua_is_no_policy(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=bogus")
    assert evaluate(resolver).result == "none"


def test_invalid_p_with_rua_acts_as_p_none(zone: Zone, resolver: Resolver) -> None:
    # RFC 7489 §6.6.3 step 6
    zone.txt("_dmarc.example.com", "v=DMARC1; p=bogus; rua=mailto:d@example.com")
    v = evaluate(resolver)
    assert (v.result, v.policy, v.disposition) == ("fail", "none", "none")


# --- pct ---------------------------------------------------------------------------


def test_pct_zero_downgrades_reject_to_quarantine(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject; pct=0")
    v = evaluate(resolver, rng=random.Random(1))
    assert (v.policy, v.disposition) == ("reject", "quarantine")


def test_pct_zero_downgrades_quarantine_to_none(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=quarantine; pct=0")
    assert evaluate(resolver, rng=random.Random(1)).disposition == "none"


@pytest.mark.parametrize(("seed", "disposition"), [(1, "reject"), (2, "quarantine")])
def test_pct_samples_messages(zone: Zone, resolver: Resolver, seed: int,
                              disposition: str) -> None:
    # Random(1).random() = 0.13 (< 50%: sampled); Random(2).random() = 0.96 (not)
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject; pct=50")
    assert evaluate(resolver, rng=random.Random(seed)).disposition == disposition


def test_pct_100_always_applies(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject; pct=100")
    for seed in range(20):
        assert evaluate(resolver, rng=random.Random(seed)).disposition == "reject"


# --- From ------------------------------------------------------------------------


def test_several_from_fields_fail(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=none")
    v = evaluate(resolver, msg("a@example.com", "b@example.com"),
                 dkim=(dkim_pass("example.com"),))
    assert (v.result, v.disposition) == ("fail", "none")
    assert "2 From" in v.reason


def test_several_from_fields_rejected_when_configured(resolver: Resolver) -> None:
    v = evaluate(resolver, msg("a@example.com", "b@evil.example"), multiple_from="reject")
    assert (v.result, v.disposition) == ("fail", "reject")


def test_from_with_addresses_in_two_domains_fails(resolver: Resolver) -> None:
    v = evaluate(resolver, msg("a@example.com, b@evil.example"))
    assert v.result == "fail"


def test_from_with_two_addresses_in_one_domain_is_evaluated(zone: Zone,
                                                            resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    v = evaluate(resolver, msg("a@example.com, b@Example.com"), dkim=(dkim_pass("example.com"),))
    assert v.result == "pass"


def test_no_from_fails(resolver: Resolver) -> None:
    v = evaluate(resolver, b"To: bob@example.org\r\nSubject: s\r\n\r\nbody\r\n")
    assert (v.result, v.reason) == ("fail", "no From header field")


def test_folded_from_field_is_read(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    data = b"From: \"A very long display name\"\r\n <alice@example.com>\r\nTo: b@x\r\n\r\nb\r\n"
    assert evaluate(resolver, data, dkim=(dkim_pass("example.com"),)).result == "pass"


# --- DNS failures ----------------------------------------------------------------


def test_record_lookup_timeout_is_temperror(zone: Zone, resolver: Resolver) -> None:
    zone.timeout("_dmarc.example.com")
    v = evaluate(resolver)
    assert (v.result, v.disposition) == ("temperror", "none")


def test_record_lookup_servfail_is_temperror(zone: Zone, resolver: Resolver) -> None:
    zone.fail("_dmarc.example.com")
    assert evaluate(resolver).result == "temperror"


def test_aligned_dkim_temperror_is_dmarc_temperror(zone: Zone, resolver: Resolver) -> None:
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    v = evaluate(resolver, dkim=(DkimVerdict("temperror", "example.com", "s1"),))
    assert (v.result, v.disposition) == ("temperror", "none")


def test_unaligned_temperror_cannot_dodge_the_policy(zone: Zone, resolver: Resolver) -> None:
    # a sender adding a signature of its own with a broken DNS must not escape p=reject
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    v = evaluate(resolver, dkim=(DkimVerdict("temperror", "attacker.example", "s1"),),
                 spf=SpfVerdict("temperror", "attacker.example", "", "mailfrom"))
    assert (v.result, v.disposition) == ("fail", "reject")


# --- the record parser -------------------------------------------------------------


def test_parse_record_defaults_and_case() -> None:
    r = dmarc.parse_record("v=DMARC1;P=Quarantine; pct=200; adkim=x; fo=1")
    assert r == dmarc.DmarcRecord("quarantine", None, 100, "r", "r")


def test_parse_record_refuses_a_malformed_tag() -> None:
    with pytest.raises(dmarc.RecordError):
        dmarc.parse_record("v=DMARC1; p")
