"""Authentication-Results (RFC 8601): what Coffer writes, and forged ones removed.

Regression guards: a forged A-R claiming our authserv-id must never survive
(RFC 8601 §5, CVE-2020-12272), and a signature whose ``l=`` leaves appended
content unsigned must be reported as such.
"""

from __future__ import annotations

import authres
import dkim
import pytest
from authdns import Zone

from gateway.check.authresults import authserv_id_of, build, strip_forged
from gateway.check.dns import Resolver
from gateway.check.stage import CheckStage
from gateway.check.verdicts import (
    ArcVerdict,
    DkimVerdict,
    DmarcVerdict,
    SpfVerdict,
    Verdicts,
)
from gateway.envelope import Envelope
from gateway.pipeline import MessageContext, apply
from gateway.transform.dkim_sign import dkimpy_key, generate_key, public_record

ID = "mx.coffer.test"
BODY = b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nhello\r\n"

VERDICTS = Verdicts(
    spf=SpfVerdict("softfail", "example.com", 'domain "example.com" says maybe', "mailfrom",
                   "alice@example.com"),
    dkim=(DkimVerdict("pass", "example.com", "s1", "signature verified", 0, "AbCd+/12",
                      "rsa-sha256"),
          DkimVerdict("fail", "lists.example", "k", "body hash mismatch")),
    dmarc=DmarcVerdict("pass", "example.com", "reject", "none"),
    arc=ArcVerdict("none"),
)


def test_header_lists_every_method_with_its_properties() -> None:
    value = build(ID, VERDICTS)
    lines = value.split(";\r\n\t")
    assert lines[0] == ID
    assert lines[1] == ('spf=softfail reason="domain \\"example.com\\" says maybe" '
                        "smtp.mailfrom=alice@example.com")
    assert lines[2] == ('dkim=pass header.d=example.com header.s=s1 header.b="AbCd+/12" '
                        "header.a=rsa-sha256")
    assert lines[3] == 'dkim=fail reason="body hash mismatch" header.d=lists.example header.s=k'
    assert lines[4] == "dmarc=pass policy.dmarc=reject header.from=example.com"
    assert lines[5] == "arc=none"


def test_header_parses_with_an_independent_rfc8601_parser() -> None:
    parsed = authres.AuthenticationResultsHeader.parse(
        "Authentication-Results: " + build(ID, VERDICTS).replace("\r\n", ""))
    assert parsed.authserv_id == ID
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "softfail"), ("dkim", "pass"), ("dkim", "fail"), ("dmarc", "pass"),
        ("arc", "none")]


def test_helo_identity_is_reported_as_smtp_helo() -> None:
    v = Verdicts(spf=SpfVerdict("pass", "mx.example.com", "", "helo", "postmaster@mx.example.com"))
    assert "spf=pass smtp.helo=mx.example.com" in build(ID, v)


def test_no_checks_is_none() -> None:
    assert build(ID, Verdicts(), checks=frozenset()) == f"{ID};\r\n\tnone"


def test_header_stays_ascii_with_an_idn_from_domain() -> None:
    v = Verdicts(dmarc=DmarcVerdict("none", "bücher.example", "", "none"),
                 spf=SpfVerdict("fail", "bücher.example", "nicht erlaubt: ä", "mailfrom",
                                "jörg@bücher.example"))
    value = build(ID, v)
    assert value.isascii()
    assert "header.from=xn--bcher-kva.example" in value
    assert r'smtp.mailfrom="j\\xf6rg@xn--bcher-kva.example"' in value


def test_reason_cannot_inject_a_line_break() -> None:
    v = Verdicts(spf=SpfVerdict("fail", "e.com", "evil\r\nX-Injected: yes", "mailfrom", "a@e.com"))
    assert "\r\nX-Injected" not in build(ID, v)


@pytest.mark.parametrize(("value", "expected"), [
    ("mx.coffer.test; spf=pass", "mx.coffer.test"),
    ("MX.Coffer.Test 1; none", "mx.coffer.test"),
    ("(a comment) mx.coffer.test; dkim=pass", "mx.coffer.test"),
    ("(nested (comment)) mx.coffer.test;", "mx.coffer.test"),
    ('"mx.coffer.test"; none', "mx.coffer.test"),
    ("other.example; spf=pass", "other.example"),
    ("mx.coffer.test.evil; spf=pass", "mx.coffer.test.evil"),
])
def test_authserv_id_is_read_past_comments_and_version(value: str, expected: str) -> None:
    assert authserv_id_of(value) == expected


def test_forged_header_claiming_our_id_is_removed() -> None:
    forged = (b"Received: from x\r\n"
              b"Authentication-Results: mx.coffer.test;\r\n\tspf=pass smtp.mailfrom=ceo@bank\r\n"
              b"authentication-results: (sneaky) MX.COFFER.TEST; dkim=pass\r\n"
              b"Authentication-Results: other.example; spf=fail\r\n")
    stripped, removed = strip_forged(forged + BODY, ID)
    assert removed == 2
    assert stripped == (b"Received: from x\r\n"
                        b"Authentication-Results: other.example; spf=fail\r\n") + BODY


def test_message_without_forgery_is_untouched() -> None:
    data = b"Authentication-Results: mx.coffer.test.evil; spf=pass\r\n" + BODY
    assert strip_forged(data, ID) == (data, 0)


def test_a_body_line_that_looks_like_a_header_is_not_touched() -> None:
    data = BODY + b"Authentication-Results: mx.coffer.test; spf=pass\r\n"
    assert strip_forged(data, ID) == (data, 0)


async def test_stage_removes_forged_header_and_adds_its_own(zone: Zone,
                                                            resolver: Resolver) -> None:
    zone.txt("example.com", "v=spf1 -all")
    stage = CheckStage(resolver, authserv_id=ID)
    forged = b"Authentication-Results: mx.coffer.test; spf=pass; dkim=pass; dmarc=pass\r\n"
    ctx = MessageContext(Envelope("alice@example.com", ["bob@example.org"],
                                  client_ip="192.0.2.66", helo="evil.example"), forged + BODY)
    result = await stage.run(ctx)
    assert result.data == BODY
    ((name, value),) = result.headers
    assert name == "Authentication-Results"
    assert "spf=fail" in value
    assert result.action == "continue"
    assert result.facts["spf"]["result"] == "fail"


async def test_runner_merge_keeps_our_header_and_drops_the_forged_one(
        zone: Zone, resolver: Resolver) -> None:
    zone.txt("example.com", "v=spf1 -all")
    stage = CheckStage(resolver, authserv_id=ID)
    forged = b"Authentication-Results: mx.coffer.test; spf=pass; dkim=pass; dmarc=pass\r\n"
    ctx = MessageContext(Envelope("alice@example.com", ["bob@example.org"],
                                  client_ip="192.0.2.66", helo="evil.example"), forged + BODY)
    result = await stage.run(ctx)
    apply(ctx, "check", result)
    assert ctx.data.startswith(b"Authentication-Results: mx.coffer.test;\r\n\tspf=fail")
    assert ctx.data.count(b"mx.coffer.test") == 1
    assert ctx.facts["check"]["spf"]["result"] == "fail"


async def test_l_appended_content_is_reported(zone: Zone, resolver: Resolver) -> None:
    key = generate_key("rsa-sha256")
    zone.txt("s1._domainkey.example.com", public_record(key))
    _, pk = dkimpy_key(key)
    signed = dkim.sign(BODY, b"s1", b"example.com", pk, length=True) + BODY
    appended = signed + b"Unsubscribe? Pay here: http://evil.example/\r\n"
    stage = CheckStage(resolver, authserv_id=ID)
    result = await stage.run(MessageContext(
        Envelope("alice@example.com", ["bob@example.org"], client_ip="192.0.2.1", helo="h"),
        appended))
    (d,) = result.facts["dkim"]
    assert d["result"] == "pass"
    assert d["unsigned_bytes"] == len(b"Unsubscribe? Pay here: http://evil.example/\r\n")
    assert 'reason="l= leaves 45 body bytes unsigned"' in result.headers[0][1]
