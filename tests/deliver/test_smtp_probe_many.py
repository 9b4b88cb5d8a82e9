"""SmtpClient.probe_many: several recipients asked about in one next-hop session.

With PIPELINING the whole probe is one RFC 2920 group (``MAIL FROM:<>``, every
``RCPT TO``, ``RSET``): the scripted server of the pipelining tests answers
nothing until the group's last command has arrived, so an answer proves the
group.  Against aiosmtpd, with and without PIPELINING, both paths give every
recipient the answer its own :meth:`SmtpClient.probe` would have given, up to the
point where a session ends (421, lost connection); the recipients after it are
left unanswered.
"""

from __future__ import annotations

import time

import pytest
from grouppeers import GroupServer, answers
from nexthop import DROP, NextHop

from gateway.deliver.smtp import Destination, ProbeResult, SmtpClient

RCPTS = ["a@dst.test", "b@dst.test", "c@dst.test", "d@dst.test"]


def _client(command_timeout: float = 5.0) -> SmtpClient:
    return SmtpClient(helo_name="coffer.test", connect_timeout=5.0,
                      command_timeout=command_timeout)


async def _ask(client: SmtpClient, port: int, rcpts: list[str],
               server_name: str = "nexthop.test") -> dict[str, ProbeResult]:
    got: dict[str, ProbeResult] = {}

    def answer(rcpt: str, result: ProbeResult) -> None:
        assert rcpt not in got  # each recipient answered once
        got[rcpt] = result

    await client.probe_many(Destination("127.0.0.1", port, "off", server_name), rcpts, answer)
    return got


async def test_a_pipelining_next_hop_gets_mail_every_rcpt_and_rset_in_one_group(
    scripted: list[GroupServer],
) -> None:
    srv = GroupServer(answers(b="550 5.1.1 No such user", c="451 4.3.0 Try later"))
    await srv.start()
    scripted.append(srv)
    client = _client()
    try:
        got = await _ask(client, srv.port, RCPTS[:3], "scripted.test")
        again = await _ask(client, srv.port, ["d@dst.test"], "scripted.test")
    finally:
        await client.aclose()
    assert got == {"a@dst.test": ProbeResult("250 2.1.5 ok", answered=True),
                   "b@dst.test": ProbeResult("550 5.1.1 No such user", answered=True),
                   "c@dst.test": ProbeResult("451 4.3.0 Try later", answered=True)}
    assert srv.groups[0] == [b"MAIL FROM:<>", b"RCPT TO:<a@dst.test>", b"RCPT TO:<b@dst.test>",
                             b"RCPT TO:<c@dst.test>", b"RSET"]
    assert again == {"d@dst.test": ProbeResult("250 2.1.5 ok", answered=True)}
    assert srv.connections == 1  # in step after the group: reused


SCENARIOS: list[tuple[str, dict[str, object]]] = [
    ("mixed", {"rules": {"b@dst.test": "550 5.1.1 No", "c@dst.test": "450 4.2.0 Busy"}}),
    ("mail refused", {"mail_reply": "550 5.7.1 Null sender refused"}),
    ("drop at mail", {"mail_reply": DROP}),
    ("drop at rcpt", {"rules": {"b@dst.test": DROP}}),
    ("421 at rcpt", {"rules": {"b@dst.test": "421 4.3.2 Shutting down"}}),
]


async def _run(pipelining: bool, setup: dict[str, object]) -> list[dict[str, ProbeResult]]:
    hop = NextHop(pipelining=pipelining)
    for attr, value in setup.items():
        setattr(hop, attr, value)
    await hop.start()
    client = _client()
    try:
        first = await _ask(client, hop.port, RCPTS)
        hop.rules, hop.mail_reply = {}, "250 2.1.0 ok"
        second = await _ask(client, hop.port, ["e@dst.test"])
        return [{k: ProbeResult(v.reply.replace(str(hop.port), "PORT"), v.answered)
                 for k, v in got.items()} for got in (first, second)]
    finally:
        await client.aclose()
        await hop.stop()


@pytest.mark.parametrize("setup", [s for _, s in SCENARIOS], ids=[n for n, _ in SCENARIOS])
async def test_pipelined_and_one_by_one_probes_give_the_same_answers(
    setup: dict[str, object],
) -> None:
    assert await _run(True, setup) == await _run(False, setup)


async def test_each_recipient_gets_what_its_own_probe_would_up_to_a_broken_session() -> None:
    [mixed, _] = await _run(True, {"rules": {"b@dst.test": "550 5.1.1 No",
                                             "c@dst.test": "450 4.2.0 Busy"}})
    assert mixed == {"a@dst.test": ProbeResult("250 2.1.5 Recipient ok", answered=True),
                     "b@dst.test": ProbeResult("550 5.1.1 No", answered=True),
                     "c@dst.test": ProbeResult("450 4.2.0 Busy", answered=True),
                     "d@dst.test": ProbeResult("250 2.1.5 Recipient ok", answered=True)}
    # A refused null sender judges nobody: every recipient gets it, unanswered.
    [refused, _] = await _run(True, {"mail_reply": "550 5.7.1 Null sender refused"})
    assert refused == dict.fromkeys(RCPTS, ProbeResult("550 5.7.1 Null sender refused",
                                                       answered=False))
    # A 421 (RFC 5321 §3.8) or a lost connection at b: a is answered, b gets what its
    # own probe would, c and d were never asked (the caller asks again).
    [closing, after] = await _run(True, {"rules": {"b@dst.test": "421 4.3.2 Shutting down"}})
    assert closing == {"a@dst.test": ProbeResult("250 2.1.5 Recipient ok", answered=True),
                       "b@dst.test": ProbeResult("421 4.3.2 Shutting down", answered=False)}
    assert after == {"e@dst.test": ProbeResult("250 2.1.5 Recipient ok", answered=True)}
    [dropped, _] = await _run(True, {"rules": {"b@dst.test": DROP}})
    assert set(dropped) == {"a@dst.test", "b@dst.test"}
    assert not dropped["b@dst.test"].answered
    assert dropped["b@dst.test"].reply.startswith("451 4.4.2 Connection to nexthop.test")


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_a_recipient_whose_reply_times_out_ends_the_session(pipelining: bool) -> None:
    hop = NextHop(pipelining=pipelining, delays={"b@dst.test": 1.0})
    await hop.start()
    client = _client(command_timeout=0.3)
    try:
        started = time.monotonic()
        got = await _ask(client, hop.port, RCPTS)
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
        await hop.stop()
    assert got["a@dst.test"] == ProbeResult("250 2.1.5 Recipient ok", answered=True)
    assert got["b@dst.test"].reply.startswith("451 4.4.2 Timeout talking to nexthop.test")
    assert not got["b@dst.test"].answered
    assert set(got) == {"a@dst.test", "b@dst.test"}
    assert elapsed < 0.9  # not waiting for the slow reply


async def test_an_address_that_would_split_the_command_line_is_never_sent() -> None:
    hop = NextHop(pipelining=True)
    await hop.start()
    client = _client()
    try:
        got = await _ask(client, hop.port, ["a@dst.test", "x@dst.test\r\nRSET"])
    finally:
        await client.aclose()
        await hop.stop()
    assert got["x@dst.test\r\nRSET"] == ProbeResult("553 5.1.3 Invalid recipient address",
                                                    answered=False)
    assert hop.rcpt_args == ["TO:<a@dst.test>"]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_on_mail_says_when_the_null_sender_was_accepted(pipelining: bool) -> None:
    hop = NextHop(pipelining=pipelining)
    await hop.start()
    client = _client()
    dest = Destination("127.0.0.1", hop.port, "off", "nexthop.test")
    calls: list[str] = []
    try:
        await client.probe_many(dest, RCPTS[:2], lambda _r, _p: None,
                                lambda: calls.append("accepted"))
        hop.mail_reply = "550 5.7.1 Null sender refused"
        await client.probe_many(dest, RCPTS[2:], lambda _r, _p: None,
                                lambda: calls.append("refused"))
    finally:
        await client.aclose()
        await hop.stop()
    assert calls == ["accepted"]
