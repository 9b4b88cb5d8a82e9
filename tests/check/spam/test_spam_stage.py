"""SpamStage: facts for the policy, the X-Spam-Status header, and DNS blocklists
asked through the configured resolver (a real DNS server on loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from authdns import Zone
from spamkit import NOW, message

import policies
from gateway.check.dns import Resolver
from gateway.check.spam import dnsbl
from gateway.check.spam.bayes import TokenStore
from gateway.check.spam.config import DnsblConfig, SpamConfig
from gateway.check.spam.heuristics import GTUBE
from gateway.check.spam.scorer import Scorer
from gateway.check.spam.stage import SpamStage, strip_spam_fields
from gateway.envelope import Envelope
from gateway.pipeline import Action, MessageContext, apply
from policies.engine import evaluate
from policies.loader import load_policy


def ctx(data: bytes, *, ip: str = "192.0.2.10", role: str = "inbound",
        facts: dict[str, object] | None = None) -> MessageContext:
    env = Envelope("alice@example.com", ["bob@example.org"], client_ip=ip, role=role)
    return MessageContext(envelope=env, data=data, facts=dict(facts or {}), qid="Q1")


def make_stage(cfg: SpamConfig | None = None, resolver: Resolver | None = None,
               store: TokenStore | None = None) -> SpamStage:
    return SpamStage(Scorer(cfg or SpamConfig(), store), resolver, clock=lambda: NOW,
                     allow_private_dnsbl=True)


async def test_facts_and_header_of_a_spam_verdict() -> None:
    stage = make_stage()
    try:
        result = await stage.run(ctx(message(f"hi\n{GTUBE}\n")))
    finally:
        stage.close()
    assert result.action is Action.CONTINUE  # the policy decides, not the stage
    assert result.facts["verdict"] == "spam" and result.facts["action"] == "reject"
    assert result.facts["score"] >= 1000 and "GTUBE" in result.facts["symbols"]
    ((name, value),) = result.headers
    assert name == "X-Spam-Status" and value.startswith("Yes, score=")
    assert "GTUBE" in value


async def test_a_clean_message_is_ham_and_keeps_its_bytes() -> None:
    stage = make_stage()
    try:
        c = ctx(message())
        result = await stage.run(c)
    finally:
        stage.close()
    assert result.facts == {"score": 0.0, "verdict": "ham", "action": "no action",
                            "symbols": {}}
    assert result.data is None
    assert result.headers == [("X-Spam-Status", "No, score=0.0 required=6.0 tests=none")]


async def test_a_forged_x_spam_status_is_removed_before_ours_is_added() -> None:
    forged = message(headers={"X-Spam-Status": "No, score=-100"},
                     extra="X-Spam-Flag: NO\r\n")
    stage = make_stage()
    try:
        c = ctx(forged)
        result = await stage.run(c)
    finally:
        stage.close()
    apply(c, "spam", result)
    assert c.data.count(b"X-Spam-Status:") == 1 and b"score=-100" not in c.data
    assert b"X-Spam-Flag" not in c.data
    assert strip_spam_fields(message()) == (message(), 0)


async def test_the_shipped_baseline_policy_acts_on_the_facts_the_stage_stored() -> None:
    policy = load_policy(Path(policies.__file__).parent / "baseline.yaml")
    stage = make_stage()
    decisions = {}
    try:
        for label, data in (("gtube", message(f"{GTUBE}\n")), ("clean", message())):
            c = ctx(data)
            apply(c, "spam", await stage.run(c))
            decisions[label] = evaluate(policy, c.envelope, c.data, c.facts,
                                        local_domains=["example.org"])
    finally:
        stage.close()
    assert decisions["gtube"].decision == "reject"
    assert decisions["gtube"].decided_by == "reject-certain-spam"
    assert decisions["clean"].decision == "accept"


async def test_mail_of_other_roles_is_not_scored() -> None:
    stage = make_stage()
    try:
        result = await stage.run(ctx(message(f"{GTUBE}\n"), role="submission"))
    finally:
        stage.close()
    assert result.facts == {} and result.headers == []
    assert "submission" in result.reason


async def test_authentication_facts_of_the_check_stage_are_scored() -> None:
    check = {"spf": {"result": "fail"}, "dkim": [],
             "dmarc": {"result": "fail", "disposition": "reject"}, "arc": {"result": "none"}}
    stage = make_stage()
    try:
        result = await stage.run(ctx(message(), facts={"check": check}))
    finally:
        stage.close()
    assert {"SPF_FAIL", "DMARC_POLICY_REJECT"} <= result.facts["symbols"].keys()


async def test_the_classifier_contributes_once_trained(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "b.sqlite")
    cfg = SpamConfig(bayes={"min_learned": 3})
    scorer = Scorer(cfg, store)
    spam = [message(f"Cheap replica watches {i}, casino bonus, viagra pills\n",
                    headers={"Subject": f"casino bonus {i}"}) for i in range(4)]
    ham = [message(f"Minutes of the architecture meeting {i}: the spool and the ledger\n",
                   headers={"Subject": f"meeting minutes {i}"}) for i in range(4)]
    scorer.learn([(m, True) for m in spam] + [(m, False) for m in ham])
    stage = SpamStage(scorer, clock=lambda: NOW)
    try:
        s = await stage.run(ctx(message("casino bonus and replica watches, viagra\n",
                                        headers={"Subject": "casino"})))
        h = await stage.run(ctx(message("the ledger and the spool, meeting minutes\n",
                                        headers={"Subject": "minutes"})))
    finally:
        stage.close()
    assert s.facts["symbols"].get("BAYES_SPAM", 0) > 0 and s.facts["bayes"] > 0.8
    assert h.facts["symbols"].get("BAYES_HAM", 0) < 0 and h.facts["bayes"] < 0.2


# -- DNS blocklists --------------------------------------------------------------

BL = DnsblConfig(
    enabled=True,
    ip_zones=[{"zone": "bl.test", "symbol": "RBL_TEST", "weight": 4.0,
               "codes": {"127.0.0.4": 6.0}}],
    uri_zones=[{"zone": "uribl.test", "symbol": "URIBL_TEST", "weight": 3.0}],
)


def test_rfc5782_query_names() -> None:
    assert dnsbl.reverse_name("192.0.2.99") == "99.2.0.192"
    assert dnsbl.reverse_name("::ffff:192.0.2.99") == "99.2.0.192"
    v6 = dnsbl.reverse_name("2001:db8:1:2::3")
    assert v6 is not None and v6.startswith("3.0.0.0.0.0.0.0") and v6.endswith("8.b.d.0.1.0.0.2")
    assert len(v6.split(".")) == 32
    assert dnsbl.reverse_name("not an ip") is None


async def test_listed_client_and_link_domain_add_their_symbols(
    zone: Zone, resolver: Resolver
) -> None:
    zone.add("2.0.0.127.bl.test", "A", "127.0.0.2")
    zone.add("example.net.uribl.test", "A", "127.0.0.2")  # the link's registered domain
    body = "Buy at http://shop.example.net/now and http://www.example.org/ok\n"
    stage = make_stage(SpamConfig(dnsbl=BL), resolver)
    try:
        result = await stage.run(ctx(message(body), ip="127.0.0.2"))
    finally:
        stage.close()
    assert result.facts["symbols"]["RBL_TEST"] == 4.0
    assert result.facts["symbols"]["URIBL_TEST"] == 3.0
    asked = {name for name, _ in zone.queries}
    assert "example.org.uribl.test" in asked  # every link domain was asked, once
    assert "shop.example.net.uribl.test" not in asked


async def test_return_codes_map_to_weights_and_refusals_are_not_listings(
    zone: Zone, resolver: Resolver
) -> None:
    zone.add("4.0.0.127.bl.test", "A", "127.0.0.4")
    zone.add("5.0.0.127.bl.test", "A", "127.255.255.254")  # "open resolver": not a listing
    stage = make_stage(SpamConfig(dnsbl=BL), resolver)
    try:
        listed = await stage.run(ctx(message(), ip="127.0.0.4"))
        refused = await stage.run(ctx(message(), ip="127.0.0.5"))
    finally:
        stage.close()
    assert listed.facts["symbols"]["RBL_TEST"] == 6.0
    assert "RBL_TEST" not in refused.facts["symbols"]


async def test_a_blocklist_that_does_not_answer_is_reported_not_scored(
    zone: Zone, resolver: Resolver
) -> None:
    zone.timeout("6.0.0.127.bl.test")
    stage = make_stage(SpamConfig(dnsbl=BL), resolver)
    try:
        result = await stage.run(ctx(message(), ip="127.0.0.6"))
    finally:
        stage.close()
    assert result.action is Action.CONTINUE
    assert result.facts["symbols"] == {"DNSBL_TEMPFAIL": 0.0}


async def test_blocklists_are_off_by_default(zone: Zone, resolver: Resolver) -> None:
    zone.add("2.0.0.127.bl.test", "A", "127.0.0.2")
    off = SpamConfig(dnsbl={**BL.model_dump(), "enabled": False})
    stage = make_stage(off, resolver)
    try:
        await stage.run(ctx(message(), ip="127.0.0.2"))
    finally:
        stage.close()
    assert zone.queries == []
    assert SpamConfig().dnsbl.enabled is False


async def test_private_client_addresses_are_not_looked_up_in_production(
    zone: Zone, resolver: Resolver
) -> None:
    stage = SpamStage(Scorer(SpamConfig(dnsbl=BL)), resolver, clock=lambda: NOW)
    try:
        await stage.run(ctx(message(), ip="10.1.2.3"))
    finally:
        stage.close()
    assert not any(name.endswith("bl.test") and name.count(".") == 5
                   for name, _ in zone.queries)


@pytest.mark.parametrize("bad", [{"zone": "", "symbol": "X"},
                                 {"zone": "bl.test", "symbol": "lower-case"}])
def test_bad_zone_configuration_is_refused(bad: dict[str, str]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        DnsblConfig(ip_zones=[bad])
