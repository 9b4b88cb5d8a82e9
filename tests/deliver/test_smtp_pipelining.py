"""RFC 2920 PIPELINING in delivery: one write per command group, replies in order.

A scripted loopback server (``GroupServer``) decides exactly when and how its
replies arrive: when it advertises PIPELINING it answers nothing until the whole
group up to DATA has arrived (a one-by-one client would wait forever, so a
delivery proves the group), and it can send a group's replies in one segment or
byte by byte.  The aiosmtpd next hop (``NextHop``) serves the same cases with
and without PIPELINING so that the two client paths are compared on one server.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from grouppeers import GroupServer, answers
from hypothesis import given
from hypothesis import strategies as st
from nexthop import DROP, NextHop

from gateway.deliver.smtp import Destination, SmtpClient, _wire_body

MSG = b"From: a@src.test\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"


async def _server(servers: list[GroupServer], answer: Callable[[bytes], str],
                  **kw: object) -> GroupServer:
    srv = GroupServer(answer, **kw)  # type: ignore[arg-type]
    await srv.start()
    servers.append(srv)
    return srv


def _client(command_timeout: float = 5.0) -> SmtpClient:
    return SmtpClient(helo_name="coffer.test", connect_timeout=5.0,
                      command_timeout=command_timeout)


def _dest(port: int) -> Destination:
    return Destination("127.0.0.1", port, "off", "scripted.test")


@pytest.mark.parametrize("trickle", [False, True], ids=["one-segment", "byte-by-byte"])
async def test_mail_rcpts_and_data_go_as_one_group_with_per_recipient_replies(
    scripted: list[GroupServer], trickle: bool
) -> None:
    srv = await _server(scripted, answers(b="450 4.2.0 Mailbox busy",
                                          c="550-5.1.1 No such\r\n550 5.1.1 user"),
                        trickle=trickle)
    client = _client()
    try:
        res = await client.send(_dest(srv.port), "a@src.test",
                                ["a@dst.test", "b@dst.test", "c@dst.test"], MSG)
        again = await client.send(_dest(srv.port), "a@src.test", ["d@dst.test"], MSG)
    finally:
        await client.aclose()
    assert res.replies == {"a@dst.test": "250 2.0.0 queued",
                           "b@dst.test": "450 4.2.0 Mailbox busy",
                           "c@dst.test": "550 5.1.1 No such 5.1.1 user"}
    assert not res.session_failed
    assert again.replies == {"d@dst.test": "250 2.0.0 queued"}
    assert srv.connections == 1  # the connection stayed in step and was reused
    assert srv.groups[0] == [b"MAIL FROM:<a@src.test>", b"RCPT TO:<a@dst.test>",
                             b"RCPT TO:<b@dst.test>", b"RCPT TO:<c@dst.test>", b"DATA"]
    # Content: dot-stuffed (RFC 5321 §4.5.2) exactly as aiosmtplib's data() would send it.
    assert srv.contents[0] == MSG.replace(b"\r\n.", b"\r\n..")


async def test_refused_data_command_applies_to_every_accepted_recipient_then_rset(
    scripted: list[GroupServer],
) -> None:
    srv = await _server(scripted, answers(b="550 5.1.1 No such user",
                                          data="554 5.3.0 Not now"))
    client = _client()
    try:
        res = await client.send(_dest(srv.port), "a@src.test", ["a@dst.test", "b@dst.test"],
                                MSG)
        again = await client.send(_dest(srv.port), "a@src.test", ["c@dst.test"], MSG)
    finally:
        await client.aclose()
    assert res.replies == {"a@dst.test": "554 5.3.0 Not now",
                           "b@dst.test": "550 5.1.1 No such user"}
    assert srv.contents == []  # DATA refused: no content sent with the first one
    assert [g[0] for g in srv.groups[:2]] == [b"MAIL FROM:<a@src.test>", b"RSET"]
    assert again.replies == {"c@dst.test": "554 5.3.0 Not now"}
    assert srv.connections == 1


async def test_no_recipient_accepted_yet_354_sends_an_empty_content(
    scripted: list[GroupServer],
) -> None:
    # A non-conforming server accepts DATA after refusing every RCPT: the client
    # ends the transaction with a lone "." and nothing is delivered.
    srv = await _server(scripted, answers(a="550 5.1.1 No such user"), final="554 5.5.1 empty")
    client = _client()
    try:
        res = await client.send(_dest(srv.port), "a@src.test", ["a@dst.test"], MSG)
        again = await client.send(_dest(srv.port), "a@src.test", ["b@dst.test"], MSG)
    finally:
        await client.aclose()
    assert res.replies == {"a@dst.test": "550 5.1.1 No such user"}
    assert srv.contents[0] == b""
    assert again.replies == {"b@dst.test": "554 5.5.1 empty"}
    assert srv.connections == 1


async def test_refused_mail_from_keeps_the_connection_in_step(
    scripted: list[GroupServer],
) -> None:
    def answer(cmd: bytes) -> str:
        if cmd.startswith(b"MAIL FROM:<bad"):
            return "550 5.7.1 Sender refused"
        if cmd.startswith(b"RCPT") and refusing:
            return "503 5.5.1 need MAIL"
        if cmd.startswith(b"DATA") and refusing:
            return "503 5.5.1 need RCPT"
        return answers()(cmd)

    refusing = True
    srv = await _server(scripted, answer)
    client = _client()
    try:
        res = await client.send(_dest(srv.port), "bad@src.test", ["a@dst.test", "b@dst.test"],
                                MSG)
        refusing = False
        again = await client.send(_dest(srv.port), "a@src.test", ["a@dst.test"], MSG)
    finally:
        await client.aclose()
    assert res.replies == dict.fromkeys(["a@dst.test", "b@dst.test"], "550 5.7.1 Sender refused")
    assert not res.session_failed
    assert again.replies == {"a@dst.test": "250 2.0.0 queued"}
    assert srv.connections == 1


async def test_connection_dropped_after_mail_fails_the_session_and_delivers_nothing(
    scripted: list[GroupServer],
) -> None:
    srv = await _server(scripted, lambda cmd: DROP)
    client = _client()
    try:
        res = await client.send(_dest(srv.port), "a@src.test", ["a@dst.test", "b@dst.test"],
                                MSG)
    finally:
        await client.aclose()
    assert res.session_failed  # nothing judged: another MX host may do better
    assert set(res.replies) == {"a@dst.test", "b@dst.test"}
    assert all(r.startswith("451 4.4.2 Connection to scripted.test") for r in res.replies.values())
    assert srv.contents == []


async def test_connection_dropped_after_some_rcpt_replies_defers_the_rest(
    scripted: list[GroupServer],
) -> None:
    def answer(cmd: bytes) -> str:
        return DROP if cmd.startswith(b"RCPT TO:<c@") else answers(b="550 5.1.1 No")(cmd)

    srv = await _server(scripted, answer)
    client = _client()
    try:
        res = await client.send(_dest(srv.port), "a@src.test",
                                ["a@dst.test", "b@dst.test", "c@dst.test"], MSG)
    finally:
        await client.aclose()
    assert not res.session_failed
    assert res.replies["b@dst.test"] == "550 5.1.1 No"
    for rcpt in ("a@dst.test", "c@dst.test"):  # a was accepted but never got its DATA reply
        assert res.replies[rcpt].startswith("451 4.4.2 Connection to scripted.test")


async def test_421_to_a_recipient_closes_and_defers_the_unjudged(
    scripted: list[GroupServer],
) -> None:
    srv = await _server(scripted, answers(b="421 4.3.2 Shutting down"))
    client = _client()
    try:
        res = await client.send(_dest(srv.port), "a@src.test",
                                ["a@dst.test", "b@dst.test", "c@dst.test"], MSG)
    finally:
        await client.aclose()
    assert res.replies["b@dst.test"] == "421 4.3.2 Shutting down"
    for rcpt in ("a@dst.test", "c@dst.test"):
        assert res.replies[rcpt] == (
            "451 4.4.2 Connection to scripted.test[127.0.0.1]:"
            f"{srv.port} lost: 421 4.3.2 Shutting down")
    assert srv.contents == []


async def test_reply_timeout_defers_and_closes(scripted: list[GroupServer]) -> None:
    srv = await _server(scripted, answers(), stall=1.0)
    client = _client(command_timeout=0.3)
    try:
        res = await client.send(_dest(srv.port), "a@src.test", ["a@dst.test"], MSG)
        idle = client._pools[("127.0.0.1", srv.port, "off", "scripted.test", ())].idle
    finally:
        await client.aclose()
    assert res.replies["a@dst.test"].startswith("451 4.4.2 Timeout talking to scripted.test")
    assert idle == []  # a connection out of step is never reused


async def test_next_hop_without_pipelining_gets_one_command_at_a_time(
    scripted: list[GroupServer],
) -> None:
    srv = await _server(scripted, answers(b="550 5.1.1 No such user"), pipelining=False)
    client = _client()
    try:
        res = await client.send(_dest(srv.port), "a@src.test", ["a@dst.test", "b@dst.test"],
                                MSG)
    finally:
        await client.aclose()
    assert res.replies == {"a@dst.test": "250 2.0.0 queued",
                           "b@dst.test": "550 5.1.1 No such user"}
    assert srv.groups[:4] == [[b"MAIL FROM:<a@src.test>"], [b"RCPT TO:<a@dst.test>"],
                              [b"RCPT TO:<b@dst.test>"], [b"DATA"]]


# -- the same scenarios against aiosmtpd, with and without PIPELINING ----------------

SCENARIOS: list[tuple[str, dict[str, object]]] = [
    ("mixed", {"rules": {"b@dst.test": "450 4.2.0 Busy", "c@dst.test": "550 5.1.1 No"}}),
    ("all refused", {"rules": {"a@dst.test": "550 5.1.1 No", "b@dst.test": "550 5.1.1 No",
                               "c@dst.test": "450 4.2.0 Busy"}}),
    ("content refused", {"data_reply": "554 5.6.0 Content refused"}),
    ("mail refused", {"mail_reply": "550 5.7.1 Sender refused"}),
    ("drop at mail", {"mail_reply": DROP}),
    ("drop at rcpt", {"rules": {"b@dst.test": DROP}}),
    ("drop at data", {"data_reply": DROP}),
]


async def _run(pipelining: bool, setup: dict[str, object]) -> list[tuple[dict[str, str], bool]]:
    hop = NextHop(pipelining=pipelining)
    await hop.start()
    client = _client()
    dest = Destination("127.0.0.1", hop.port, "off", "nexthop.test")
    try:
        results = []
        for attr, value in setup.items():
            setattr(hop, attr, value)
        res = await client.send(dest, "a@src.test", ["a@dst.test", "b@dst.test", "c@dst.test"],
                                MSG)
        results.append((res.replies, res.session_failed))
        hop.rules, hop.mail_reply, hop.data_reply = {}, "250 2.1.0 ok", "250 2.0.0 Ok: queued"
        res = await client.send(dest, "a@src.test", ["d@dst.test"], MSG)
        results.append((res.replies, res.session_failed))
        return [(
            {k: v.replace(str(hop.port), "PORT") for k, v in replies.items()}, failed)
            for replies, failed in results] + [({"received": str(len(hop.received)),
                                                 "data": repr([m.data for m in hop.received])},
                                                False)]
    finally:
        await client.aclose()
        await hop.stop()


@pytest.mark.parametrize("setup", [s for _, s in SCENARIOS], ids=[n for n, _ in SCENARIOS])
async def test_pipelined_and_one_by_one_give_the_same_results(setup: dict[str, object]) -> None:
    assert await _run(True, setup) == await _run(False, setup)


# -- the content on the wire --------------------------------------------------------

@given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"\r\n.", b"\xff",
                                 b" "]), max_size=30).map(b"".join))
def test_wire_body_is_what_aiosmtplib_would_send(data: bytes) -> None:
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    assert _wire_body(data) == expected


@pytest.mark.parametrize("data", [
    b"Subject: lf only\n\n.dot first\nbody\n..two dots\n",
    b"Subject: mixed\r\n\r\nlone cr\rbare lf\n.\r\nno final newline",
    b".starts with a dot\r\n",
    b"",
], ids=["lf", "mixed", "leading-dot", "empty"])
async def test_content_a_stage_may_produce_arrives_the_same_on_both_paths(data: bytes) -> None:
    got = []
    for pipelining in (True, False):
        hop = NextHop(pipelining=pipelining)
        await hop.start()
        client = _client()
        try:
            res = await client.send(Destination("127.0.0.1", hop.port, "off", "nexthop.test"),
                                    "a@src.test", ["a@dst.test"], data)
        finally:
            await client.aclose()
            await hop.stop()
        assert res.replies["a@dst.test"].startswith("250")
        got.append(hop.received[0].data)
    assert got[0] == got[1]
