"""Pipelined RCPTs (RFC 2920) of local recipients are verified together.

When an RCPT needs a probe and the client has already sent more RCPTs, the ones
of those that would need a probe at their turn are asked about in the same
next-hop session (``MAIL FROM:<>``, every ``RCPT TO``, ``RSET``): a client that
pipelines a distribution list's 20 recipients waits for one probe, not 20.  The
next hop is the loopback aiosmtpd server of the delivery tests, counting its
sessions and commands, answering per recipient, slow at MAIL (each probe session
costs ``MAIL_DELAY``) or at one recipient, or dropping the connection.  The client
is the raw client, sending the whole group in one write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nexthop import DROP, NextHop
from receive_helpers import LOCAL, Connect, Gateway, RawClient, StartGateway

MAIL_DELAY = 0.3
REFUSED = "550 5.1.1 <{0}>: recipient rejected by next hop: No such user"
UNVERIFIED = "450 4.1.1 <{0}>: Recipient address rejected: unverified address, try again later"
OK = "250 2.1.5 Recipient OK"


@pytest.fixture
async def hops() -> AsyncIterator[list[NextHop]]:
    started: list[NextHop] = []
    yield started
    for h in started:
        await h.stop()


async def _hop(hops: list[NextHop], **kw: object) -> NextHop:
    h = NextHop(**kw)  # type: ignore[arg-type]
    await h.start()
    hops.append(h)
    return h


async def _gateway(start_gateway: StartGateway, hop: NextHop, **recipients: object) -> Gateway:
    return await start_gateway(
        relay={"trusted_networks": ["127.0.0.0/8"],
               "recipients": {"verify": True, **recipients}},
        delivery={"routes": {"*": f"smtp://127.0.0.1:{hop.port}?tls=off"}})


def _at(*users: str) -> list[str]:
    return [f"{u}@{LOCAL}" for u in users]


async def _pipeline(gw: Gateway, raw: Connect, rcpts: list[str],
                    before: bytes = b"MAIL FROM:<a@ext.example>\r\n") -> tuple[
                        list[str], float, RawClient]:
    """``before`` and RCPT TO each of ``rcpts`` in one write; the replies to the RCPTs,
    and the seconds from the write to the last of them."""
    c: RawClient = await raw(gw.port())
    await c.line()
    await c.cmd("EHLO client.example")
    c.send(before + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts))
    started = time.monotonic()
    got = [await c.line() for _ in range(before.count(b"\r\n") + len(rcpts))]
    return got[before.count(b"\r\n"):], time.monotonic() - started, c


@pytest.mark.parametrize("pipelining", [True, False],
                         ids=["hop-pipelining", "hop-one-by-one"])
async def test_twenty_pipelined_rcpts_are_verified_in_one_next_hop_session(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop], pipelining: bool,
) -> None:
    users = [f"user{i}" for i in range(20)]
    hop = await _hop(hops, pipelining=pipelining, mail_delay=MAIL_DELAY, rules={
        f"user3@{LOCAL}": "550 5.1.1 No such user",
        f"user7@{LOCAL}": "451 4.3.0 Try again later",
        f"user15@{LOCAL}": "550 5.1.1 No such user",
    })
    gw = await _gateway(start_gateway, hop)
    replies, elapsed, _ = await _pipeline(gw, raw, _at(*users))
    expected = [OK] * 20
    expected[3] = REFUSED.format(f"user3@{LOCAL}")
    expected[7] = UNVERIFIED.format(f"user7@{LOCAL}")
    expected[15] = REFUSED.format(f"user15@{LOCAL}")
    assert replies == expected
    assert (hop.connections, hop.mail_commands, hop.rset_commands) == (1, 1, 1)
    assert hop.rcpt_args == [f"TO:<{r}>" for r in _at(*users)]
    # One probe session's time, not twenty (one after another: 20 * MAIL_DELAY = 6 s).
    assert elapsed < 5 * MAIL_DELAY


async def test_held_replies_still_go_out_together(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop], writes: list[bytes],
) -> None:
    hop = await _hop(hops, pipelining=True, rules={f"b@{LOCAL}": "550 5.1.1 No such user"})
    gw = await _gateway(start_gateway, hop)
    c: RawClient = await raw(gw.port())
    await c.line()
    await c.cmd("EHLO client.example")
    before = len(writes)
    c.send(b"MAIL FROM:<a@ext.example>\r\n"
           + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in _at("a", "b", "c")))
    expected = ["250 2.1.0 Sender OK", OK, REFUSED.format(f"b@{LOCAL}"), OK]
    assert [await c.line() for _ in range(4)] == expected
    # RFC 2920 §3.2: held while the next command was buffered, written in one go.
    assert writes[before:] == ["".join(f"{r}\r\n" for r in expected).encode()]


async def test_only_the_uncached_recipients_are_asked_about(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop],
) -> None:
    hop = await _hop(hops, pipelining=True, rules={f"old2@{LOCAL}": "550 5.1.1 No such user"})
    gw = await _gateway(start_gateway, hop)
    c: RawClient = await raw(gw.port())
    await c.line()
    await c.cmd("EHLO client.example")
    await c.cmd("MAIL FROM:<a@ext.example>")
    for rcpt in _at("old1", "old2"):  # one at a time: remembered
        await c.cmd(f"RCPT TO:<{rcpt}>")
    hop.rcpt_args.clear()
    mails = hop.mail_commands
    replies, _, _ = await _pipeline(gw, raw, _at("new1", "old1", "new2", "old2", "new3"))
    assert replies == [OK, OK, OK, REFUSED.format(f"old2@{LOCAL}"), OK]
    assert hop.rcpt_args == [f"TO:<{r}>" for r in _at("new1", "new2", "new3")]
    assert hop.mail_commands == mails + 1


async def test_a_recipient_that_times_out_is_unverified_and_the_rest_are_asked_again(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop],
) -> None:
    hop = await _hop(hops, pipelining=True, delays={f"slow@{LOCAL}": 2.0},
                     rules={f"nobody@{LOCAL}": "550 5.1.1 No such user"})
    gw = await _gateway(start_gateway, hop, verify_timeout="300ms")
    replies, elapsed, _ = await _pipeline(gw, raw, _at("a", "b", "slow", "c", "nobody"))
    assert replies == [OK, OK, UNVERIFIED.format(f"slow@{LOCAL}"), OK,
                       REFUSED.format(f"nobody@{LOCAL}")]
    # The session that timed out was dropped; c and nobody@ went in a second one.
    assert hop.connections == 2
    assert hop.rcpt_args.count(f"TO:<slow@{LOCAL}>") == 1
    assert hop.rcpt_args[-2:] == [f"TO:<c@{LOCAL}>", f"TO:<nobody@{LOCAL}>"]
    assert elapsed < 1.5  # one timeout, not the slow reply


@pytest.mark.parametrize("how", ["421 4.3.2 Shutting down", DROP], ids=["421", "drop"])
async def test_a_session_ended_mid_way_leaves_the_rest_to_a_new_probe(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop], how: str,
) -> None:
    hop = await _hop(hops, pipelining=True, rules={
        f"stop@{LOCAL}": how, f"nobody@{LOCAL}": "550 5.1.1 No such user"})
    gw = await _gateway(start_gateway, hop)
    replies, _, _ = await _pipeline(gw, raw, _at("a", "stop", "b", "nobody"))
    # stop@ gets what its own probe would have (no answer: unverified, RFC 5321 §3.8
    # for the 421), the others their real answers from a second session.
    assert replies == [OK, UNVERIFIED.format(f"stop@{LOCAL}"), OK,
                       REFUSED.format(f"nobody@{LOCAL}")]
    assert hop.connections == 2
    assert hop.rcpt_args[:2] == [f"TO:<a@{LOCAL}>", f"TO:<stop@{LOCAL}>"]
    assert hop.rcpt_args[-2:] == [f"TO:<b@{LOCAL}>", f"TO:<nobody@{LOCAL}>"]
    assert hop.rcpt_args.count(f"TO:<stop@{LOCAL}>") == 1


async def test_buffered_recipients_of_other_domains_are_never_probed(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop],
) -> None:
    # Every domain routes to the probing next hop (and the client may relay): only
    # the domain decides.
    hop = await _hop(hops, pipelining=True, rules={f"nobody@{LOCAL}": "550 5.1.1 No such user"})
    gw = await _gateway(start_gateway, hop)
    replies, _, _ = await _pipeline(gw, raw, [f"a@{LOCAL}", "x@ext.example", "y@far.example",
                                              f"nobody@{LOCAL}"])
    assert replies == [OK, OK, OK, REFUSED.format(f"nobody@{LOCAL}")]
    assert hop.rcpt_args == [f"TO:<a@{LOCAL}>", f"TO:<nobody@{LOCAL}>"]
    assert hop.mail_commands == 1


async def test_no_more_are_probed_than_the_transaction_may_still_take(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop],
) -> None:
    hop = await _hop(hops, pipelining=True)
    gw = await start_gateway(
        limits={"max_recipients": 3},
        relay={"recipients": {"verify": True}},
        delivery={"routes": {LOCAL: f"smtp://127.0.0.1:{hop.port}?tls=off"}})
    replies, _, _ = await _pipeline(gw, raw, _at("a", "a", "b", "c", "d", "e"))
    assert replies == [OK] * 4 + ["452 4.5.3 Too many recipients"] * 2
    assert hop.rcpt_args == [f"TO:<{r}>" for r in _at("a", "b", "c")]
    assert hop.mail_commands == 1


async def test_a_malformed_rcpt_is_left_to_its_turn_and_the_look_stops_at_rset(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop],
) -> None:
    hop = await _hop(hops, pipelining=True)
    gw = await _gateway(start_gateway, hop)
    c: RawClient = await raw(gw.port())
    await c.line()
    await c.cmd("EHLO client.example")
    c.send(f"MAIL FROM:<a@ext.example>\r\nRCPT TO:<a@{LOCAL}>\r\nRCPT TO:<bad address>\r\n"
           f"RCPT TO:<b@{LOCAL}> FOO=1\r\nRCPT TO:<c@{LOCAL}>\r\nRSET\r\n"
           f"MAIL FROM:<a@ext.example>\r\nRCPT TO:<d@{LOCAL}>\r\n".encode())
    replies = [await c.line() for _ in range(8)]
    assert replies[:2] == ["250 2.1.0 Sender OK", OK]
    assert replies[2].startswith("5") and replies[3].startswith("555 ")
    assert replies[4:] == [OK, "250 2.0.0 Reset OK", "250 2.1.0 Sender OK", OK]
    # a and c together; d (after RSET, another transaction) at its own turn.
    assert hop.rcpt_args == [f"TO:<{r}>" for r in _at("a", "c", "d")]
    assert hop.mail_commands == 2


async def test_rcpts_a_session_could_not_send_are_never_probed(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop],
) -> None:
    hop = await _hop(hops, pipelining=True)
    gw = await _gateway(start_gateway, hop)
    replies, _, _ = await _pipeline(gw, raw, _at("a", "b", "c"), before=b"")
    assert replies == ["503 5.5.1 Need MAIL command first"] * 3
    assert hop.connections == 0


async def test_a_probe_under_way_is_joined_not_repeated(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop],
) -> None:
    hop = await _hop(hops, pipelining=True, delays={f"slow@{LOCAL}": 0.5})
    gw = await _gateway(start_gateway, hop)
    first: RawClient = await raw(gw.port())
    await first.line()
    await first.cmd("EHLO client.example")
    await first.cmd("MAIL FROM:<a@ext.example>")
    first.send(f"RCPT TO:<slow@{LOCAL}>\r\n".encode())
    while f"TO:<slow@{LOCAL}>" not in hop.rcpt_args:  # its probe is at the next hop
        await asyncio.sleep(0.005)
    replies, _, _ = await _pipeline(gw, raw, _at("a", "slow", "b"))
    assert replies == [OK, OK, OK]
    assert await first.line() == OK
    assert hop.rcpt_args.count(f"TO:<slow@{LOCAL}>") == 1
    assert hop.rcpt_args[-2:] == [f"TO:<a@{LOCAL}>", f"TO:<b@{LOCAL}>"]


async def test_recipients_the_list_refuses_are_never_probed(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop], tmp_path: Path,
) -> None:
    hop = await _hop(hops, pipelining=True)
    (tmp_path / "recipients.txt").write_text(f"a@{LOCAL}\nb@{LOCAL}\n")
    gw = await _gateway(start_gateway, hop, file="recipients.txt")
    replies, _, _ = await _pipeline(gw, raw, _at("a", "mallory", "b"))
    assert replies == [OK, f"550 5.1.1 <mallory@{LOCAL}>: Recipient address rejected: "
                           "user unknown", OK]
    assert hop.rcpt_args == [f"TO:<a@{LOCAL}>", f"TO:<b@{LOCAL}>"]
    assert hop.mail_commands == 1


async def test_a_next_hop_that_stalls_before_any_rcpt_costs_one_timeout_not_one_each(
    start_gateway: StartGateway, raw: Connect, hops: list[NextHop],
) -> None:
    # Stuck at MAIL FROM:<>: every recipient's own probe would have stuck there too.
    hop = await _hop(hops, pipelining=True, mail_delay=3.0)
    gw = await _gateway(start_gateway, hop, verify_timeout="300ms")
    users = ("a", "b", "c", "d", "e")
    replies, elapsed, _ = await _pipeline(gw, raw, _at(*users))
    assert replies == [UNVERIFIED.format(f"{u}@{LOCAL}") for u in users]
    assert elapsed < 3 * 0.3  # one after another: five timeouts, 1.5 s
    assert hop.mail_commands == 1
