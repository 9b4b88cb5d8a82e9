"""RFC 3461 DSN parameters: syntax, canonical forms, and reading them back (pure)."""

from __future__ import annotations

import pytest

from gateway.dsn_params import (
    DsnParamError,
    mail_param,
    message_request,
    rcpt_param,
    recipient_request,
    recipient_requests,
    xtext_decode,
    xtext_encode,
)
from gateway.envelope import Envelope


def test_xtext_decodes_hexchars_and_refuses_plus_equals_and_lower_case_hex() -> None:
    assert xtext_decode("bob+2Bfilter@example.com") == "bob+filter@example.com"
    assert xtext_decode("a+3Db") == "a=b"
    for bad in ("a+b", "a=b", "a+2b", "a b", "a+4", "é"):
        with pytest.raises(DsnParamError):
            xtext_decode(bad)


def test_xtext_encode_round_trips_and_escapes_plus_equals_space_and_utf8() -> None:
    for text in ("bob@example.com", "a+b=c d", "x\ty"):
        assert xtext_decode(xtext_encode(text)) == text
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_encode("é") == "+C3+A9"


@pytest.mark.parametrize(("value", "canonical"), [
    ("NEVER", "NOTIFY=NEVER"),
    ("never", "NOTIFY=NEVER"),
    ("FAILURE", "NOTIFY=FAILURE"),
    ("delay,success", "NOTIFY=SUCCESS,DELAY"),
    ("FAILURE,DELAY,SUCCESS", "NOTIFY=SUCCESS,FAILURE,DELAY"),
])
def test_notify_canonical_form(value: str, canonical: str) -> None:
    assert rcpt_param("NOTIFY", value, smtputf8=False) == canonical


@pytest.mark.parametrize("value", [
    None, "", "NEVER,FAILURE", "FAILURE,FAILURE", "SOMETIMES", "SUCCESS,", ",DELAY",
])
def test_notify_never_alone_no_repeats_no_unknown_words(value: str | None) -> None:
    with pytest.raises(DsnParamError):
        rcpt_param("NOTIFY", value, smtputf8=False)


def test_orcpt_keeps_the_xtext_and_lower_cases_the_address_type() -> None:
    assert rcpt_param("ORCPT", "RFC822;bob+2Bx@example.com", smtputf8=False) == \
        "ORCPT=rfc822;bob+2Bx@example.com"
    assert rcpt_param("ORCPT", "x400;whatever", smtputf8=False) == "ORCPT=x400;whatever"


@pytest.mark.parametrize("value", [
    "bob@example.com",  # no addr-type
    "rfc822;",  # no address
    ";bob@example.com",
    "rfc 822;bob@example.com",
    "rfc822;bob=x@example.com",  # "=" must be +3D
    "rfc822;+0D+0Abob@example.com",  # decodes to a line break: not printable
    "rfc822;jörg@example.com",  # rfc822 xtext is ASCII
    "rfc822;" + "a" * 500,
])
def test_orcpt_refuses_bad_syntax(value: str) -> None:
    with pytest.raises(DsnParamError):
        rcpt_param("ORCPT", value, smtputf8=True)


def test_orcpt_utf8_type_raw_only_with_smtputf8_escaped_always() -> None:
    # RFC 6533 §3: utf-8-addr-unitext in an SMTPUTF8 transaction, -xtext otherwise.
    assert rcpt_param("ORCPT", "utf-8;jörg@example.com", smtputf8=True) == \
        "ORCPT=utf-8;jörg@example.com"
    with pytest.raises(DsnParamError):
        rcpt_param("ORCPT", "utf-8;jörg@example.com", smtputf8=False)
    assert rcpt_param("ORCPT", "UTF-8;j\\x{F6}rg@example.com", smtputf8=False) == \
        "ORCPT=utf-8;j\\x{F6}rg@example.com"
    with pytest.raises(DsnParamError):
        rcpt_param("ORCPT", "utf-8;j\\x{D800}rg@example.com", smtputf8=False)


def test_ret_and_envid() -> None:
    assert mail_param("RET", "hdrs") == "RET=HDRS"
    assert mail_param("RET", "FULL") == "RET=FULL"
    assert mail_param("ENVID", "QQ314159+2Bx") == "ENVID=QQ314159+2Bx"
    assert mail_param("ENVID", "a" * 100) == "ENVID=" + "a" * 100
    for key, value in (("RET", "BODY"), ("RET", None), ("ENVID", "a" * 101),
                       ("ENVID", "a=b"), ("ENVID", "+07bell"), ("ENVID", None)):
        with pytest.raises(DsnParamError):
            mail_param(key, value)


def test_requests_read_back_from_the_stored_options() -> None:
    msg = message_request(["BODY=8BITMIME", "RET=HDRS", "ENVID=id+2B1"])
    assert (msg.ret, msg.envid, msg.envid_xtext) == ("HDRS", "id+1", "id+2B1")
    assert message_request([]) == message_request(["SMTPUTF8"])
    assert message_request([]).ret is None

    never = recipient_request(["NOTIFY=NEVER"])
    assert not never.wants("FAILURE") and not never.wants("SUCCESS")
    both = recipient_request(["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;b+2Bx@y.example"])
    assert both.wants("SUCCESS") and both.wants("DELAY") and not both.wants("FAILURE")
    assert both.original_recipient == "rfc822; b+x@y.example"
    default = recipient_request([])
    assert default.wants("FAILURE") and not default.wants("SUCCESS")
    assert default.wants("DELAY") and default.original_recipient == ""
    assert recipient_request(["ORCPT=utf-8;j\\x{F6}rg@y.example"]).original_recipient == \
        "utf-8; jörg@y.example"


def test_recipient_requests_ignore_options_out_of_step_with_the_recipients() -> None:
    env = Envelope("a@x.example", ["b@y.example", "c@y.example"],
                   rcpt_options=[["NOTIFY=NEVER"], []])
    assert set(recipient_requests(env)) == {"b@y.example"}
    env.rcpt_options = [["NOTIFY=NEVER"]]
    assert recipient_requests(env) == {}
