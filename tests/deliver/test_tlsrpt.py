"""RFC 8460 pure logic: result types, the _smtp._tls record, the JSON report and the
multipart/report message carrying it."""

from __future__ import annotations

import email
import gzip
import json
from datetime import UTC, date, datetime
from email.message import Message

import pytest
from tlsrptschema import problems

from gateway.deliver import tlsrpt
from gateway.deliver.tlsrpt import SessionKey

DAY = date(2026, 11, 28)
STS = tlsrpt.sts_policy_string("enforce", ("*.dst.test",), 86400)


@pytest.mark.parametrize(("reason", "dane", "expected"), [
    ("TLS required for this route but the next hop does not offer STARTTLS", False,
     "starttls-not-supported"),
    ("next hop does not offer STARTTLS", True, "starttls-not-supported"),
    ("STARTTLS refused by next hop: 454 4.7.0 not now", False, "starttls-not-supported"),
    ("TLS handshake with mx1[127.0.0.1]:25 failed: [SSL: CERTIFICATE_VERIFY_FAILED] "
     "certificate verify failed: Hostname mismatch, certificate is not valid for "
     "'mx1.dst.test'. (_ssl.c:1006)", False, "certificate-host-mismatch"),
    ("TLS handshake with x failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
     "failed: certificate has expired (_ssl.c:1006)", False, "certificate-expired"),
    ("TLS handshake with x failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
     "failed: unable to get local issuer certificate (_ssl.c:1006)", False,
     "certificate-not-trusted"),
    ("certificate matches no DANE-EE TLSA record", True, "validation-failure"),
    ("certificate is not valid for mx1.dst.test, dst.test", True,
     "certificate-host-mismatch"),
    ("certificate at depth 0 expired on 2026-11-28 16:25:39 UTC", True,
     "certificate-expired"),
    ("certificate at depth 0 is not yet valid (from 2027-01-01 00:00:00 UTC)", True,
     "certificate-not-trusted"),
    ("chain broken below the trust anchor at depth 0: bad signature", True,
     "certificate-not-trusted"),
    ("certificate at depth 1 is not a CA but issued the one below it", True,
     "certificate-not-trusted"),
    ("TLSA lookup failed", True, "dnssec-invalid"),
    ("MX host mx9.evil.test matches no mx pattern (*.dst.test)", False,
     "validation-failure"),
])
def test_failure_reasons_map_to_rfc8460_result_types(reason: str, dane: bool,
                                                     expected: str) -> None:
    assert tlsrpt.result_type(reason, dane=dane) == expected


@pytest.mark.parametrize(("records", "expected"), [
    (["v=TLSRPTv1; rua=mailto:tls@dst.test"], ("mailto:tls@dst.test",)),
    (["v=TLSRPTv1;rua=mailto:a@dst.test,https://r.dst.test/in"],
     ("mailto:a@dst.test", "https://r.dst.test/in")),
    (["v=spf1 -all", "v=TLSRPTv1; rua=https://r.dst.test/in"], ("https://r.dst.test/in",)),
    ([], None),
    (["v=spf1 -all"], None),
    (["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"], None),
    (["v=TLSRPTv1; rua=ftp://x.test/"], None),
    (["v=TLSRPTv2; rua=mailto:a@x.test"], None),
])
def test_txt_record_gives_the_rua_uris_or_none(records: list[str],
                                               expected: tuple[str, ...] | None) -> None:
    assert tlsrpt.parse_txt(records) == expected


def _counts() -> list[tuple[SessionKey, int]]:
    return [
        (SessionKey("dst.test", "sts", STS, ("*.dst.test",), "success"), 7),
        (SessionKey("dst.test", "sts", STS, ("*.dst.test",), "starttls-not-supported",
                    "mx1.dst.test", "127.0.0.1"), 2),
        (SessionKey("dst.test", "sts", STS, ("*.dst.test",), "certificate-expired",
                    "mx2.dst.test", "127.0.0.2"), 1),
        (SessionKey("dane.test", "tlsa", ("3 1 1 ab",), ("mx.dane.test",), "success"), 4),
    ]


def test_report_follows_the_rfc_field_list_and_sums_per_policy() -> None:
    report = tlsrpt.build_report(DAY, "dst.test", _counts(), organization="Coffer Test",
                                 contact="postmaster@src.test", submitter="coffer.test")
    assert problems(report) == []
    assert report["date-range"] == {"start-datetime": "2026-11-28T00:00:00Z",
                                    "end-datetime": "2026-11-28T23:59:59Z"}
    (entry,) = report["policies"]  # the other domain's counts are not in it
    assert entry["policy"] == {"policy-type": "sts", "policy-string": list(STS),
                               "policy-domain": "dst.test", "mx-host": ["*.dst.test"]}
    assert entry["summary"] == {"total-successful-session-count": 7,
                                "total-failure-session-count": 3}
    assert {(d["result-type"], d["receiving-mx-hostname"], d["receiving-ip"],
             d["failed-session-count"]) for d in entry["failure-details"]} == {
        ("starttls-not-supported", "mx1.dst.test", "127.0.0.1", 2),
        ("certificate-expired", "mx2.dst.test", "127.0.0.2", 1)}


def _parts(raw: bytes) -> tuple[Message, list[Message]]:
    msg = email.message_from_bytes(raw)
    parts = msg.get_payload()
    assert isinstance(parts, list)
    return msg, parts


def test_mail_report_is_a_multipart_report_with_the_gzipped_json_named_per_rfc() -> None:
    report = tlsrpt.build_report(DAY, "dst.test", _counts(), organization="Coffer Test",
                                 contact="postmaster@src.test", submitter="coffer.test")
    gz = tlsrpt.compress(report)
    raw = tlsrpt.build_message(report, gz, domain="dst.test", day=DAY,
                               submitter="coffer.test", sender="tlsrpt@coffer.test",
                               to=["tls@dst.test"],
                               now=datetime(2026, 11, 29, 0, 10, tzinfo=UTC))
    msg, (text, attachment) = _parts(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "dst.test"
    assert msg["TLS-Report-Submitter"] == "coffer.test"
    subject = " ".join(msg["Subject"].split())  # unfolded (RFC 5322 §2.2.3)
    assert subject == ("Report Domain: dst.test Submitter: coffer.test "
                       "Report-ID: <2026-11-28_dst.test@coffer.test>")
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    assert attachment.get_filename() == "coffer.test!dst.test!1795824000!1795910400.json.gz"
    body = attachment.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert json.loads(gzip.decompress(body)) == report
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))  # RFC 5322 §2.1.1


def test_same_report_compresses_to_the_same_bytes() -> None:
    report = tlsrpt.build_report(DAY, "dst.test", _counts(), organization="o", contact="c",
                                 submitter="s")
    assert tlsrpt.compress(report) == tlsrpt.compress(report)


def test_mailto_uri_gives_its_address() -> None:
    assert tlsrpt.mailto_address("mailto:tls%2Brpt@dst.test?subject=x") == "tls+rpt@dst.test"
