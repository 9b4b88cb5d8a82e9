"""Never an open relay: the recipient matrix, over real SMTP (like Postfix's smtpd_check tests).

Local domains are ``local.example`` and ``Other.Example``.  Each row is one RCPT
from an untrusted, unauthenticated client on 127.0.0.1 and the reply it must
get: 250 for a local mailbox, 550 5.7.1 for relaying (including relaying hidden
in the local part or a source route), 553 5.1.3 for what is not an RFC 5321
path at all.  The same rows are then sent from a trusted network and by an
authenticated client, where relaying is allowed but bad syntax still is not.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from receive_helpers import (
    PASSWORD,
    USER,
    Connect,
    Gateway,
    RawClient,
    StartGateway,
    TlsFiles,
    greeted,
)

from gateway.receive.addresses import parse_path
from gateway.receive.relay_control import RelayRules, check_recipient

OK, RELAY, SYNTAX = "250 2.1.5", "550 5.7.1", "553 5.1.3"

MATRIX = [
    # plain local and foreign recipients
    ("<bob@local.example>", OK),
    ("<BOB@LOCAL.EXAMPLE>", OK),
    ("<bob@other.example>", OK),
    ("<bob@Other.EXAMPLE>", OK),
    ("bob@local.example", OK),  # no angle brackets (old clients)
    ('<"bob"@local.example>', OK),  # a quoted local part without routing
    ('<"bob smith"@local.example>', OK),
    ("<Postmaster>", OK),  # RFC 5321 §4.5.1
    ("<x@ext.example>", RELAY),
    ("x@ext.example", RELAY),
    # exact domains only: no suffix, prefix or sub-domain matching
    ("<x@sub.local.example>", RELAY),
    ("<x@xlocal.example>", RELAY),
    ("<x@local.example.ext.example>", RELAY),
    ("<x@example>", RELAY),
    # relaying hidden in the local part (allow_untrusted_routing = no)
    ('<"x@ext.example"@local.example>', RELAY),
    ('<"x@ext.example@"@local.example>', RELAY),
    ('<"x\\@ext.example"@local.example>', RELAY),
    ("<x%ext.example@local.example>", RELAY),
    ('<"x%ext.example"@local.example>', RELAY),
    ("<ext.example!x@local.example>", RELAY),
    ('<"ext.example!x"@local.example>', RELAY),
    # source routes are ignored (RFC 5321 §4.1.1.3, appendix C): the mailbox decides
    ("<@local.example:x@ext.example>", RELAY),
    ("<@local.example,@other.example:x@ext.example>", RELAY),
    ("<@ext.example:bob@local.example>", OK),
    # address literals are never local domains
    ("<x@[127.0.0.1]>", RELAY),
    ("<x@[192.0.2.1]>", RELAY),
    ("<x@[IPv6:::1]>", RELAY),
    ("<x%ext.example@[127.0.0.1]>", RELAY),
    # not RFC 5321 paths
    ("<x@ext.example@local.example>", SYNTAX),
    ("<x@local.example@ext.example>", SYNTAX),
    ("<x\\@ext.example@local.example>", SYNTAX),
    ("<x@local.example.>", SYNTAX),  # trailing dot
    ("<x@ext.example.>", SYNTAX),
    ("<x@.local.example>", SYNTAX),
    ("<x@local..example>", SYNTAX),
    ("<x@-local.example>", SYNTAX),
    ("<x@local.example%ext.example>", SYNTAX),
    ("<x@local.example:25>", SYNTAX),
    ("<x@[1.2.3.4.5]>", SYNTAX),
    ("<x@[ext.example]>", SYNTAX),
    ("<x@[tag:content]>", SYNTAX),
    ("<@ext.example x@local.example>", SYNTAX),
    ("<x.@local.example>", SYNTAX),
    ("<.x@local.example>", SYNTAX),
    ("<x..y@local.example>", SYNTAX),
    ("<local.example>", SYNTAX),
    ("<@local.example>", SYNTAX),
    ('<"x@local.example>', SYNTAX),
    ("<>", SYNTAX),
]
IDS = [row[0] for row in MATRIX]


async def _session(gw: Gateway, raw: Callable[..., Awaitable[RawClient]]) -> RawClient:
    c: RawClient = await raw(gw.port())
    await c.line()
    c.send(b"EHLO client.example\r\n")
    await c.reply()
    return c


async def _rcpt_replies(
    gw: Gateway, raw: Callable[..., Awaitable[RawClient]], rows: list[tuple[str, str]],
    c: RawClient | None = None,
) -> list[tuple[str, str]]:
    got = []
    for i, (path, _) in enumerate(rows):
        # A new session every 10 rows keeps under the hard error limit (20).
        if c is None or (i % 10 == 0 and i):
            c = await _session(gw, raw)
        # A fresh transaction per row, so the recipient limit never interferes.
        assert await c.cmd("RSET") == "250 2.0.0 Reset OK"
        assert await c.cmd("MAIL FROM:<sender@ext.example>") == "250 2.1.0 Sender OK"
        got.append((path, (await c.cmd(f"RCPT TO:{path}"))[:9]))
    return got


async def test_open_relay_matrix_untrusted_client(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(listeners=[{"name": "inbound", "address": "127.0.0.1:0",
                                         "tls": "none"}])
    assert await _rcpt_replies(gw, raw, MATRIX) == [(p, want) for p, want in MATRIX]


async def test_open_relay_matrix_nothing_relayed_reaches_the_spool(
    start_gateway: StartGateway, raw: Connect
) -> None:
    # Every row in one transaction: only the local recipients are recorded.
    gw = await start_gateway(listeners=[{"name": "inbound", "address": "127.0.0.1:0",
                                         "tls": "none"}])
    c = await _session(gw, raw)
    await c.cmd("MAIL FROM:<sender@ext.example>")
    for path, want in MATRIX:
        if want == OK:  # the refused rows are proven above; 20 of them would end the session
            await c.cmd(f"RCPT TO:{path}")
    for path in ("<x@ext.example>", '<"x@ext.example"@local.example>', "<x@[127.0.0.1]>"):
        assert (await c.cmd(f"RCPT TO:{path}")).startswith("550 5.7.1")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(b"Subject: x\r\n\r\ny\r\n.\r\n")).startswith("250 ")
    [m] = gw.spooled()
    assert m.envelope.rcpt_to == [
        "bob@local.example", "BOB@LOCAL.EXAMPLE", "bob@other.example", "bob@Other.EXAMPLE",
        '"bob"@local.example', '"bob smith"@local.example', "postmaster@local.example",
    ]


async def test_trusted_network_may_relay_but_not_send_bad_syntax(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        listeners=[{"name": "inbound", "address": "127.0.0.1:0", "tls": "none"}],
    )
    expected = [(p, SYNTAX if want == SYNTAX else OK) for p, want in MATRIX]
    assert await _rcpt_replies(gw, raw, MATRIX) == expected


async def test_authenticated_client_may_relay(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    import base64

    gw = await start_gateway()
    c = await greeted(gw, raw)
    await c.cmd("STARTTLS")
    await c.start_tls(tls_files.client_context())
    c.send(b"EHLO client.example\r\n")
    await c.reply()
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    assert await c.cmd(f"AUTH PLAIN {blob}") == "235 2.7.0 Authentication successful"
    rows = [("<x@ext.example>", OK), ('<"x@ext.example"@local.example>', OK),
            ("<x@local.example.>", SYNTAX)]
    assert await _rcpt_replies(gw, raw, rows, c) == rows


async def test_tls_alone_does_not_allow_relaying(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    await c.cmd("STARTTLS")
    await c.start_tls(tls_files.client_context())
    c.send(b"EHLO client.example\r\n")
    await c.reply()
    rows = [("<x@ext.example>", RELAY)]
    assert await _rcpt_replies(gw, raw, rows, c) == rows


@pytest.mark.parametrize(("path", "want"), [r for r in MATRIX if r[1] != SYNTAX
                                            and r[0] != "<Postmaster>"],
                         ids=[r[0] for r in MATRIX if r[1] != SYNTAX and r[0] != "<Postmaster>"])
def test_relay_rules_pure(path: str, want: str) -> None:
    rules = RelayRules(frozenset({"local.example", "other.example"}))
    if not path.startswith("<"):
        path = f"<{path}>"
    denied = check_recipient(rules, parse_path(path), may_relay=False)
    assert (denied is None) == (want == OK)
    assert check_recipient(rules, parse_path(path), may_relay=True) is None


def test_trusted_networks_match_ipv4_mapped_ipv6() -> None:
    import ipaddress

    rules = RelayRules(frozenset(), (ipaddress.ip_network("192.0.2.0/24"),))
    assert rules.is_trusted("192.0.2.7") and rules.is_trusted("::ffff:192.0.2.7")
    assert not rules.is_trusted("198.51.100.1") and not rules.is_trusted("garbage")
