"""Envelope journal reports (Exchange 2010+, Microsoft 365): the envelope and the original."""

from __future__ import annotations

import hashlib

import pytest
from journal_reports import EXCHANGE_TEXT, M365_TEXT, ORIGINAL, report

from gateway.journal_report import (
    JournalReportError,
    ReportRecipient,
    is_journal_report,
    parse_envelope,
    parse_report,
)
from gateway.mailparse import parse


@pytest.mark.parametrize(("text", "expected"), [
    (EXCHANGE_TEXT, [
        ReportRecipient("bob@corp.example", "to"),
        ReportRecipient("carol@corp.example", "cc"),
        ReportRecipient("dave@corp.example", "bcc"),
        ReportRecipient("member@corp.example", "to", expanded_from="team@corp.example"),
        ReportRecipient("eve@corp.example", "to", forwarded_from="frank@corp.example"),
    ]),
    (M365_TEXT, [
        ReportRecipient("bob@corp.example", "recipient"),
        ReportRecipient("grace@corp.example", "recipient"),
        ReportRecipient("dave@corp.example", "bcc"),
        ReportRecipient("member@corp.example", "recipient", expanded_from="team@corp.example",
                        forwarded_from="frank@corp.example"),
    ]),
    ("Sender: <Alice@Corp.Example>\nTo: \"Bob B\" <BOB@corp.example>\n",
     [ReportRecipient("bob@corp.example", "to")]),
], ids=["exchange-2010", "microsoft-365", "angle-brackets-lower-cased"])
def test_report_text_gives_every_recipient_with_its_annotation(
        text: str, expected: list[ReportRecipient]) -> None:
    env = parse_envelope(text)
    assert list(env.recipients) == expected
    assert env.sender == "alice@corp.example"


def test_microsoft_365_fields_are_read_and_unknown_ones_kept() -> None:
    env = parse_envelope(M365_TEXT)
    assert env.on_behalf_of == "boss@corp.example"
    assert env.message_id == "<q3@corp.example>"
    assert env.subject == "Quarterly figures"
    assert ("TLS", "Version=1.2, Cipher=TLS_AES_256") in env.other


@pytest.mark.parametrize(("text", "why"), [
    ("To: bob@corp.example\n", "no Sender"),
    ("Sender: alice@corp.example\nSubject: x\n", "no recipient"),
    ("just some prose\n", "no Sender"),
])
def test_report_text_without_sender_or_recipient_is_refused(text: str, why: str) -> None:
    with pytest.raises(JournalReportError, match=why):
        parse_envelope(text)


@pytest.mark.parametrize("text", [EXCHANGE_TEXT, M365_TEXT])
def test_attached_original_is_returned_byte_for_byte(text: str) -> None:
    got = parse_report(report(text))
    assert hashlib.sha256(got.original).hexdigest() == hashlib.sha256(ORIGINAL).hexdigest()


def test_original_with_lf_line_endings_and_8bit_is_kept_exactly() -> None:
    original = "From: a@corp.example\nSubject: Grüße\n\nÄpfel\n".encode()
    assert parse_report(report(EXCHANGE_TEXT, original)).original == original


def test_report_marker_is_the_ms_journal_report_header() -> None:
    assert is_journal_report(parse(report(EXCHANGE_TEXT)))
    assert not is_journal_report(parse(report(EXCHANGE_TEXT, header=False)))


@pytest.mark.parametrize(("data", "why"), [
    (report(EXCHANGE_TEXT, attach=False), "no attached original"),
    (b"X-MS-Journal-Report: \r\nSubject: x\r\n\r\nSender: a@b\r\n", "not a multipart"),
    (report("nothing useful\r\n"), "no Sender"),
])
def test_malformed_report_raises(data: bytes, why: str) -> None:
    with pytest.raises(JournalReportError, match=why):
        parse_report(data)


def test_original_whose_own_boundary_extends_the_report_boundary_is_cut_whole() -> None:
    original = (b"From: a@corp.example\r\nMIME-Version: 1.0\r\n"
                b'Content-Type: multipart/alternative; boundary="jrnl-b0und-inner"\r\n\r\n'
                b"--jrnl-b0und-inner\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
                b"--jrnl-b0und-inner--\r\n")
    assert parse_report(report(EXCHANGE_TEXT, original)).original == original
