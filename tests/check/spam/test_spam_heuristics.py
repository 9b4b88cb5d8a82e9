"""Each heuristic fires on the oddity it names, and stays quiet on a clean message."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import pytest
from spamkit import NOW, message, multipart

from gateway.check.spam import heuristics
from gateway.check.spam.message import parse, strip_mbox_from
from gateway.check.spam.symbols import SYMBOLS, Scan, Thresholds


def symbols(data: bytes, check: Mapping[str, Any] | None = None) -> dict[str, float]:
    scan = Scan()
    heuristics.evaluate(parse(data), scan, check=check, now=NOW)
    return scan.symbols


def test_a_clean_message_fires_nothing() -> None:
    assert symbols(message()) == {}


@pytest.mark.parametrize(("field", "symbol"), [
    ("Date", "MISSING_DATE"), ("Message-ID", "MISSING_MID"), ("From", "MISSING_FROM"),
    ("Subject", "MISSING_SUBJECT"), ("To", "MISSING_TO"),
])
def test_a_missing_header_is_named(field: str, symbol: str) -> None:
    assert symbol in symbols(message(drop=(field,)))


def test_date_is_judged_against_the_newest_received_field_not_the_clock() -> None:
    old = message(headers={"Date": "Tue, 20 Aug 2002 10:00:00 +0000"},
                  extra="Received: from a by b; Wed, 21 Aug 2002 10:00:00 +0000\r\n")
    assert "DATE_IN_PAST" not in symbols(old)
    assert "DATE_IN_PAST" in symbols(message(headers={"Date": "Tue, 20 Aug 2002 10:00:00 +0000"}))


def test_future_and_unparseable_dates() -> None:
    assert "DATE_IN_FUTURE" in symbols(message(headers={"Date": "Fri, 28 May 2027 10:00:00 +0000"}))
    assert "INVALID_DATE" in symbols(message(headers={"Date": "yesterday-ish"}))


def test_malformed_message_id() -> None:
    assert "INVALID_MSGID" in symbols(message(headers={"Message-ID": "no-angle-brackets"}))


def test_reply_to_in_another_organizational_domain() -> None:
    assert "REPLYTO_DIFF_DOMAIN" in symbols(message(headers={"Reply-To": "x@winner.example.net"}))
    # the same organizational domain (RFC 7489 §3.2) is not a mismatch
    same_org = message(headers={"Reply-To": "a@lists.example.com"})
    assert "REPLYTO_DIFF_DOMAIN" not in symbols(same_org)


def test_display_name_showing_another_address() -> None:
    s = symbols(message(headers={"From": '"service@paypal.com" <evil@phish.example.net>'}))
    assert "FROM_DISPLAY_ADDR_MISMATCH" in s


def test_subject_in_capitals_with_punctuation() -> None:
    s = symbols(message(headers={"Subject": "MAKE MONEY FAST NOW!!!"}))
    assert {"SUBJ_ALL_CAPS", "SUBJ_EXCESS_PUNCT"} <= s.keys()


def test_html_only_with_an_image_and_little_text() -> None:
    html = '<html><body><img src="http://img.example.net/a.gif">Buy now</body></html>'
    s = symbols(message(html, content_type="text/html; charset=us-ascii"))
    assert {"HTML_ONLY", "HTML_SHORT_WITH_IMAGE"} <= s.keys()


def test_link_text_showing_another_domain() -> None:
    html = ('<p>Log in at <a href="http://login.phish.example.net/x">'
            'https://www.mybank.com/login</a></p>')
    s = symbols(message(html, content_type="text/html"))
    assert "URL_TEXT_MISMATCH" in s
    same = '<a href="https://www.mybank.com/login">www.mybank.com</a>'
    assert "URL_TEXT_MISMATCH" not in symbols(message(same, content_type="text/html"))


@pytest.mark.parametrize(("url", "symbol"), [
    ("http://192.0.2.7/offer", "URL_IP_LITERAL"),
    ("http://0x7f.1/offer", "URL_IP_LITERAL"),
    ("https://bit.ly/3abc", "URL_SHORTENER"),
    ("http://www.mybank.com@phish.example.net/", "URL_USERINFO"),
    ("http://shop.example.net:8081/buy", "URL_NONSTANDARD_PORT"),
])
def test_url_tricks(url: str, symbol: str) -> None:
    assert symbol in symbols(message(f"Click {url} today\n"))


def test_double_extension_and_executable_attachments() -> None:
    att = 'Content-Disposition: attachment; filename="invoice.pdf.exe"\r\n'
    s = symbols(multipart([("text/plain", "", "see attached"),
                           ("application/octet-stream", att, "TVqQAAMAAAAEAAAA")]))
    assert {"ATT_DOUBLE_EXT", "ATT_EXECUTABLE"} <= s.keys()
    pdf = 'Content-Disposition: attachment; filename="invoice.pdf"\r\n'
    s = symbols(multipart([("text/plain", "", "see attached"), ("application/pdf", pdf, "x")]))
    assert not {"ATT_DOUBLE_EXT", "ATT_EXECUTABLE"} & s.keys()


def test_executable_recognized_by_content_whatever_its_name() -> None:
    mz = base64.b64encode(b"MZ\x90\x00" + b"\x00" * 60).decode()
    att = ('Content-Transfer-Encoding: base64\r\n'
           'Content-Disposition: attachment; filename="photo.jpg"\r\n')
    assert "ATT_EXECUTABLE" in symbols(multipart([("text/plain", "", "hi"),
                                                  ("image/jpeg", att, mz)]))


def test_plain_text_needlessly_in_base64() -> None:
    body = base64.b64encode(b"Cheap pills, best prices, order today.\n").decode()
    data = message(body, headers={"Content-Transfer-Encoding": "base64"})
    assert "BODY_ALL_BASE64_TEXT" in symbols(data)


def test_declared_charset_that_does_not_decode_the_text() -> None:
    utf8 = message("caf\xe9 ol\xe9\n", content_type="text/plain; charset=utf-8")
    assert "CHARSET_MISMATCH" not in symbols(utf8)
    latin1 = utf8.replace("\xe9".encode(), b"\xe9")  # latin-1 bytes declared UTF-8
    assert "CHARSET_MISMATCH" in symbols(latin1)


def test_multipart_without_closing_boundary() -> None:
    assert "MIME_BAD_BOUNDARY" in symbols(multipart([("text/plain", "", "hi")], close=False))


def test_gtube_makes_a_message_certain_spam() -> None:
    s = symbols(message(f"test\n{heuristics.GTUBE}\n"))
    assert s["GTUBE"] >= Thresholds().reject


def test_authentication_verdicts_become_symbols() -> None:
    check = {"spf": {"result": "fail", "domain": "example.com"},
             "dkim": [{"result": "fail", "domain": "example.com", "unsigned_bytes": 0}],
             "dmarc": {"result": "fail", "domain": "example.com", "policy": "reject",
                       "disposition": "reject"},
             "arc": {"result": "none"}}
    s = symbols(message(), check)
    assert {"SPF_FAIL", "DKIM_REJECT", "DMARC_POLICY_REJECT"} <= s.keys()
    good = {"spf": {"result": "pass"}, "dkim": [{"result": "pass", "unsigned_bytes": 0}],
            "dmarc": {"result": "pass", "disposition": "none"}, "arc": {"result": "pass"}}
    s = symbols(message(), good)
    assert s.keys() == {"SPF_PASS", "DKIM_ALLOW", "DMARC_POLICY_ALLOW", "ARC_ALLOW"}
    assert sum(s.values()) < 0


def test_a_dkim_signature_with_unsigned_body_bytes_is_not_trusted() -> None:
    check = {"dkim": [{"result": "pass", "unsigned_bytes": 200}]}
    assert "DKIM_ALLOW" not in symbols(message(), check)


def test_configured_weights_override_the_defaults() -> None:
    scan = Scan(weights={"MISSING_DATE": 0.25})
    heuristics.evaluate(parse(message(drop=("Date",))), scan, now=NOW)
    assert scan.symbols["MISSING_DATE"] == 0.25
    assert SYMBOLS["MISSING_DATE"].weight != 0.25


def test_mbox_from_line_is_not_a_header() -> None:
    data = b"From alice@example.com  Thu Aug 22 13:17:22 2002\n" + message()
    assert strip_mbox_from(data) == message()
    assert symbols(data) == {}


def test_thresholds_map_scores_to_actions() -> None:
    t = Thresholds(quarantine=6, reject=15)
    assert [t.action(s) for s in (-1, 5.9, 6, 14.9, 15)] == [
        "no action", "no action", "quarantine", "quarantine", "reject"]
