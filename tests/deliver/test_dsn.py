"""Bounces are valid RFC 3464 delivery status notifications (parsed with the email package)."""

from __future__ import annotations

from email.message import Message
from typing import Any

import pytest
from reportparse import Report, parse_report

from gateway.deliver.dsn import (
    FailedRecipient,
    NoticeAction,
    ReportedRecipient,
    build_dsn,
    header_section,
    status_code,
)

ORIGINAL = (b"From: Alice <alice@src.test>\r\nTo: bob@dst.test\r\nSubject: Quarterly numbers\r\n"
            b"Message-ID: <q1@src.test>\r\n\r\nThe secret body\r\n")


def test_dsn_is_a_multipart_report_with_the_three_rfc3464_parts() -> None:
    raw = build_dsn(
        sender="alice@src.test", original=ORIGINAL,
        recipients=[FailedRecipient("bob@dst.test", "550 5.1.1 <bob@dst.test>: No such user",
                                "mx.dst.test[192.0.2.7]:25"),
                FailedRecipient("carol@dst.test", "451 4.4.1 Connection refused",
                                expired=True)],
        reporting_mta="coffer.test", arrival=1_700_000_000.0, now=1_700_000_600.0, qid="Q1",
    )
    report = parse_report(raw)
    msg = report.top
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@coffer.test>"
    assert msg["To"] == "<alice@src.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert [p.get_content_type() for p in report.parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert "bob@dst.test" in report.human and "carol@dst.test" in report.human

    per_msg = report.per_message
    bob, carol = report.recipients  # one block per failed recipient
    assert per_msg["Reporting-MTA"] == "dns; coffer.test"
    assert per_msg["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert bob["Final-Recipient"] == "rfc822; bob@dst.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.dst.test[192.0.2.7]:25"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@dst.test>: No such user"
    assert carol["Status"] == "4.4.7"  # RFC 3463: delivery time expired
    assert carol["Diagnostic-Code"] == "smtp; 451 4.4.1 Connection refused"

    assert "Subject: Quarterly numbers" in report.headers
    assert "The secret body" not in report.headers  # headers only, never the content


def test_status_code_comes_from_the_enhanced_code_or_the_reply_class() -> None:
    assert status_code("550 5.7.1 Relay denied") == "5.7.1"
    assert status_code("550-5.1.1 first line") == "5.1.1"
    assert status_code("554 Transaction failed") == "5.0.0"
    assert status_code("452 4.2.2 Over quota", expired=True) == "4.4.7"


def test_multi_line_replies_stay_on_one_diagnostic_line() -> None:
    raw = build_dsn(sender="a@src.test", original=ORIGINAL,
                    recipients=[FailedRecipient("b@dst.test", "550 5.7.1 first\nsecond line")],
                    reporting_mta="coffer.test", arrival=0.0, now=0.0)
    (status,) = parse_report(raw).recipients
    assert status["Diagnostic-Code"] == "smtp; 550 5.7.1 first second line"


def test_never_builds_a_dsn_to_the_null_sender() -> None:
    with pytest.raises(ValueError, match="null"):
        build_dsn(sender="", original=ORIGINAL, recipients=[FailedRecipient("b@x.test", "550")],
                  reporting_mta="coffer.test", arrival=0.0, now=0.0)


def test_header_section_stops_at_the_empty_line_and_uses_crlf() -> None:
    assert header_section(b"A: 1\nB: 2\n\nbody\n") == b"A: 1\r\nB: 2\r\n"
    assert header_section(ORIGINAL).endswith(b"Message-ID: <q1@src.test>\r\n")


def _one(raw: bytes) -> tuple[Report, Message]:
    report = parse_report(raw)
    (block,) = report.recipients
    return report, block


def _failure(**kw: Any) -> tuple[Report, Message]:
    return _one(build_dsn(sender="alice@src.test", original=ORIGINAL,
                     recipients=[ReportedRecipient("bob@dst.test", "550 5.1.1 No such user",
                                                   original_recipient=kw.pop("orcpt", ""))],
                     reporting_mta="coffer.test", arrival=0.0, now=0.0, **kw))


def test_ret_full_returns_the_whole_message_as_message_rfc822() -> None:
    report, _ = _failure(ret="FULL")
    assert report.parts[2].get_content_type() == "message/rfc822"
    assert report.returned is not None
    assert report.returned["Subject"] == "Quarterly numbers"
    assert report.returned.get_payload() == "The secret body\r\n"


def test_ret_hdrs_and_no_ret_return_the_header_section_only() -> None:
    for ret in ("HDRS", None):
        report, _ = _failure(ret=ret)
        assert report.parts[2].get_content_type() == "text/rfc822-headers"
        assert "Subject: Quarterly numbers" in report.headers
        assert "The secret body" not in report.headers


def test_ret_full_above_the_size_limit_returns_headers_only() -> None:
    report, _ = _failure(ret="FULL", full_limit=len(ORIGINAL) - 1)
    assert report.parts[2].get_content_type() == "text/rfc822-headers"
    assert "The secret body" not in report.headers
    report, _ = _failure(ret="FULL", full_limit=len(ORIGINAL))
    assert report.parts[2].get_content_type() == "message/rfc822"


def test_envid_and_orcpt_become_original_envelope_id_and_original_recipient() -> None:
    report, block = _failure(envid="QQ314159", orcpt="rfc822; Bob@dst.test")
    assert report.per_message["Original-Envelope-Id"] == "QQ314159"
    assert block["Original-Recipient"] == "rfc822; Bob@dst.test"
    assert block["Final-Recipient"] == "rfc822; bob@dst.test"
    # RFC 3464 §2.2 / §2.3: these come first in their blocks.
    assert report.per_message.keys()[0] == "Original-Envelope-Id"
    assert block.keys()[0] == "Original-Recipient"
    report, block = _failure()
    assert "Original-Envelope-Id" not in report.per_message
    assert "Original-Recipient" not in block


@pytest.mark.parametrize(("action", "reply", "status", "subject"), [
    ("delivered", "250 2.0.0 Delivered to maildir as 1.M2", "2.0.0",
     "Successful Mail Delivery Report"),
    ("relayed", "250 2.6.0 Ok: queued as X", "2.6.0", "Successful Mail Delivery Report"),
    ("relayed", "250 Ok", "2.0.0", "Successful Mail Delivery Report"),
    ("delayed", "451 4.4.1 Connection refused", "4.4.1", "Delayed Mail (still being retried)"),
    ("delayed", "", "4.0.0", "Delayed Mail (still being retried)"),
])
def test_each_action_has_its_status_class_and_subject(
    action: NoticeAction, reply: str, status: str, subject: str
) -> None:
    raw = build_dsn(sender="alice@src.test", original=ORIGINAL,
                    recipients=[ReportedRecipient("bob@dst.test", reply, action=action)],
                    reporting_mta="coffer.test", arrival=0.0, now=0.0, ret="FULL")
    report, block = _one(raw)
    assert block["Action"] == action and block["Status"] == status
    assert report.top["Subject"] == subject
    assert "bob@dst.test" in report.human
    # RFC 3461 §4.3: RET=FULL is about failure notices; the others carry headers.
    assert report.parts[2].get_content_type() == "text/rfc822-headers"


def test_delayed_notice_says_until_when_it_is_retried() -> None:
    raw = build_dsn(sender="alice@src.test", original=ORIGINAL,
                    recipients=[ReportedRecipient("bob@dst.test", "451 4.4.1 refused",
                                                  action="delayed",
                                                  will_retry_until=1_700_000_000.0)],
                    reporting_mta="coffer.test", arrival=0.0, now=0.0)
    _, block = _one(raw)
    assert block["Will-Retry-Until"] == "Tue, 14 Nov 2023 22:13:20 +0000"
