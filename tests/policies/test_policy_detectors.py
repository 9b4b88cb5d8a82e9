"""Pure predicates: DLP validators, direction, magic-byte sniffing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.envelope import Envelope
from policies.conditions import (
    derive_direction,
    find_cards,
    find_ibans,
    find_ssns,
    iban_ok,
    luhn_ok,
    ssn_ok,
    unicode_domain,
)
from policies.engine import evaluate
from policies.loader import load_policy
from policies.message import sniff


@pytest.mark.parametrize("number", ["4111111111111111", "5500000000000004", "340000000000009",
                                    "6011000990139424", "3530111333300000", "4012888888881881"])
def test_luhn_accepts_test_card_numbers(number: str) -> None:
    assert luhn_ok(number)
    assert find_cards(f"card {number} here") == [number]


def test_luhn_rejects_a_changed_digit() -> None:
    assert not luhn_ok("4111111111111112")
    assert find_cards("4111111111111112") == []


def test_cards_need_a_known_issuer_and_are_not_found_inside_longer_numbers() -> None:
    # Luhn-valid but issuer prefix 1 is not a card network.
    assert luhn_ok("1234567812345670")
    assert find_cards("1234567812345670") == []
    assert find_cards("order 94111111111111111") == []
    assert find_cards("0000000000000000") == []


def test_cards_with_separators() -> None:
    assert find_cards("4111-1111-1111-1111 and 5500 0000 0000 0004") == [
        "4111111111111111", "5500000000000004"]


@pytest.mark.parametrize("iban", ["DE89370400440532013000", "GB82WEST12345698765432",
                                  "CH9300762011623852957", "NL91ABNA0417164300",
                                  "FR1420041010050500013M02606"])
def test_iban_checksum_accepts_registry_examples(iban: str) -> None:
    assert iban_ok(iban)


def test_iban_checksum_rejects_changed_check_digits_and_wrong_length() -> None:
    assert not iban_ok("DE88370400440532013000")
    assert not iban_ok("DE8937040044053201300")  # one digit short for DE
    assert not iban_ok("ZZ89370400440532013000")  # no such country


def test_ibans_are_found_grouped_and_cut_at_the_registry_length() -> None:
    assert find_ibans("IBAN: GB82 WEST 1234 5698 7654 32 BIC NWBKGB2L") == [
        "GB82WEST12345698765432"]
    assert find_ibans("DE89 3704 0044 0532 0130 00") == ["DE89370400440532013000"]


@pytest.mark.parametrize(("ssn", "ok"), [
    ("536-22-8726", True), ("000-12-3456", False), ("666-12-3456", False),
    ("900-12-3456", False), ("536-00-8726", False), ("536-22-0000", False),
    ("078-05-1120", False),
])
def test_ssn_validity_rules(ssn: str, ok: bool) -> None:
    area, group, serial = ssn.split("-")
    assert ssn_ok(area, group, serial) is ok
    assert (find_ssns(f"ssn {ssn}.") == [ssn]) is ok


def test_ssn_separators_must_agree() -> None:
    assert find_ssns("536 22 8726") == ["536-22-8726"]
    assert find_ssns("536-22 8726") == []
    assert find_ssns("phone 1-536-22-8726") == []


@pytest.mark.parametrize(("sender", "rcpts", "auth", "expected"), [
    ("a@outside.example", ["b@example.com"], None, "inbound"),
    ("a@example.com", ["b@outside.example"], None, "outbound"),
    ("a@example.com", ["b@example.com", "c@EXAMPLE.COM"], None, "internal"),
    ("a@outside.example", ["b@far.example"], "alice", "outbound"),
    ("a@outside.example", ["b@far.example"], None, "relay"),
    ("", ["b@example.com"], None, "inbound"),
    ("a@example.com", ["b@example.com", "c@outside.example"], None, "outbound"),
])
def test_direction_from_the_envelope(sender: str, rcpts: list[str], auth: str | None,
                                     expected: str) -> None:
    env = Envelope(sender, rcpts, auth_user=auth)
    assert derive_direction(env, ["example.com"]) == expected


@pytest.mark.parametrize(("data", "mime"), [
    (b"%PDF-1.7\n", "application/pdf"),
    (b"MZ\x90\x00", "application/x-msdownload"),
    (b"\x7fELF\x02", "application/x-executable"),
    (b"\x89PNG\r\n\x1a\n....", "image/png"),
    (b"\xff\xd8\xff\xe0", "image/jpeg"),
    (b"PK\x03\x04....word/document.xml",
     "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
    (b"PK\x03\x04....data.bin", "application/zip"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
    (b"#!/bin/sh\necho hi", "text/x-script"),
    (b"<!DOCTYPE html><html>", "text/html"),
    ("plain text, caf\u00e9".encode(), "text/plain"),
    (b"\x00\x01\x02\x03", "application/octet-stream"),
    (b"", "application/x-empty"),
])
def test_sniff_recognises_common_types(data: bytes, mime: str) -> None:
    assert sniff(data) == mime


def test_international_domains_match_in_either_form(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules:\n"
                    "  - {name: u, when: {recipient.domain: münchen.example}, then: [quarantine]}\n"
                    "  - {name: a, when: {sender: {in: [info@xn--zrich-kva.example]}},"
                    " then: [discard]}\n", encoding="utf-8")
    policy = load_policy(path)
    d = evaluate(policy, Envelope("info@zürich.example", ["a@xn--mnchen-3ya.example"]), b"")
    assert [r.matched for r in d.rules] == [True, True]
    assert unicode_domain("xn--bad-") == "xn--bad-"  # not decodable: left as it is
