"""RFC 5321 path syntax, MAIL/RCPT argument splitting, and the Received header (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.envelope import Envelope, TlsInfo
from gateway.receive import addresses
from gateway.receive.addresses import (
    AddressError,
    Mailbox,
    parse_params,
    parse_path,
    split_argument,
)
from gateway.receive.received import address_literal, protocol, received_header


@pytest.mark.parametrize(("text", "local", "domain", "route"), [
    ("<a@b.example>", "a", "b.example", ()),
    ('<"a b"@b.example>', '"a b"', "b.example", ()),
    ("<@r1.example,@r2.example:a@b.example>", "a", "b.example", ("r1.example", "r2.example")),
    ("<a@[192.0.2.1]>", "a", "[192.0.2.1]", ()),
    ("<a@[IPv6:2001:db8::1]>", "a", "[IPv6:2001:db8::1]", ()),
    ("<jörg@bücher.example>", "jörg", "bücher.example", ()),
    ("<a.b+tag@x-y.example>", "a.b+tag", "x-y.example", ()),
])
def test_valid_paths_parse(text: str, local: str, domain: str, route: tuple[str, ...]) -> None:
    m = parse_path(text)
    assert (m.local, m.domain, m.route) == (local, domain, route)


@pytest.mark.parametrize("text", [
    "a@b.example", "<a@b.example", "<a@b.example.>", "<a@@b.example>", "<a b@c.example>",
    "<a@b_c.example>", "<a@-b.example>", "<a@b-.example>", "<a@[300.1.1.1]>", "<a@[IPv6:zz]>",
    "<a@b.example\x00>", "<\x85a@b.example>", "<a@" + "x" * 64 + ".example>", "<>",
])
def test_invalid_paths_raise(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text)


def test_local_unquoted_undoes_quoting_and_ascii_domain_is_idna() -> None:
    m = Mailbox(local='"x\\@ext"', domain="Bücher.Example")
    assert m.local_unquoted == "x@ext"
    assert m.ascii_domain == "xn--bcher-kva.example"
    assert not m.is_ascii
    assert Mailbox(local="a", domain="[127.0.0.1]").is_literal


@pytest.mark.parametrize(("arg", "keyword", "want"), [
    ("FROM:<a@b> SIZE=10 BODY=8BITMIME", "FROM:", ("<a@b>", ["SIZE=10", "BODY=8BITMIME"])),
    ("from: <a@b>", "FROM:", ("<a@b>", [])),
    ('TO:<"x>y"@b>', "TO:", ('<"x>y"@b>', [])),
    ("TO:a@b", "TO:", ("<a@b>", [])),
    ("FROM:<>", "FROM:", ("<>", [])),
    ("FROM:<a@b>junk", "FROM:", None),
    ("FROM:<a@b", "FROM:", None),
    ("TO:<a@b>", "FROM:", None),
    ("FROM:", "FROM:", None),
])
def test_split_argument(arg: str, keyword: str, want: object) -> None:
    assert split_argument(arg, keyword) == want


def test_parse_params() -> None:
    assert parse_params(["size=10", "SMTPUTF8"]) == {"SIZE": "10", "SMTPUTF8": None}
    assert parse_params(["SIZE="]) is None
    assert parse_params(["=1"]) is None
    assert parse_params(["SIZE=1", "size=2"]) is None


def _env(**kw: object) -> Envelope:
    base: dict[str, object] = {"mail_from": "a@x", "rcpt_to": ["b@y"], "client_ip": "192.0.2.1",
                               "helo": "client.example", "received_at": 1_800_000_000.0}
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def test_received_header_shape_rfc5321_4_4() -> None:
    hdr = received_header(_env(), hostname="mx.example", trace_id="abc.1")
    assert hdr == (
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\tby mx.example (Coffer) with ESMTP id abc.1\r\n"
        b"\tfor <b@y>; Fri, 15 Jan 2027 08:00:00 +0000\r\n"
    )


def test_received_header_hides_recipients_when_several_and_sanitises_helo() -> None:
    hdr = received_header(_env(rcpt_to=["b@y", "c@y"], helo="evil (fake) ; by x"),
                          hostname="mx.example", trace_id="t")
    assert b"for" not in hdr and b"b@y" not in hdr
    assert hdr.startswith(b"Received: from unknown ([192.0.2.1])\r\n")
    assert b"id t;\r\n\tFri, 15 Jan 2027" in hdr


@pytest.mark.parametrize(("kw", "extended", "want"), [
    ({}, False, "SMTP"),
    ({}, True, "ESMTP"),
    ({"auth_user": "u"}, True, "ESMTPA"),
    ({"tls": TlsInfo("TLSv1.3", "X")}, True, "ESMTPS"),
    ({"tls": TlsInfo("TLSv1.3", "X"), "auth_user": "u"}, True, "ESMTPSA"),
    ({"mail_options": ["SMTPUTF8"]}, True, "UTF8SMTP"),
    ({"mail_options": ["SMTPUTF8"], "tls": TlsInfo("TLSv1.3", "X")}, True, "UTF8SMTPS"),
])
def test_with_protocol_rfc3848(kw: dict[str, object], extended: bool, want: str) -> None:
    assert protocol(_env(**kw), extended=extended) == want


@pytest.mark.parametrize(("ip", "want"), [
    ("192.0.2.1", "[192.0.2.1]"), ("2001:db8::1", "[IPv6:2001:db8::1]"),
    ("::ffff:192.0.2.1", "[192.0.2.1]"), ("", "[unknown]"),
])
def test_address_literal(ip: str, want: str) -> None:
    assert address_literal(ip) == want


def _closing_bracket_by_scan(text: str) -> int:
    """The character-by-character scan that addresses._closing_bracket short-cuts."""
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


@given(st.text(alphabet='<>"\\ a@.', max_size=20))
def test_closing_bracket_is_the_scans_answer(text: str) -> None:
    assert addresses._closing_bracket(text) == _closing_bracket_by_scan(text)


def test_a_refused_path_is_refused_again_when_asked_twice() -> None:
    # parse_path is remembered; errors must not be (nor turn into a cached None).
    for _ in range(2):
        with pytest.raises(AddressError):
            parse_path("<a@@b.example>")
    assert parse_path("<a@b.example>") is parse_path("<a@b.example>")


@given(st.floats(min_value=0, max_value=4e9, allow_nan=False))
def test_received_date_is_format_datetimes(when: float) -> None:
    env = Envelope("a@b.example", ["c@d.example"], client_ip="192.0.2.1", helo="h.example",
                   received_at=when)
    field = received_header(env, hostname="mx.example", trace_id="t1").decode()
    assert field.endswith("; " + format_datetime(datetime.fromtimestamp(when, UTC)) + "\r\n")
