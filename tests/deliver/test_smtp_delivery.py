"""SMTP delivery to a real loopback next hop: per-recipient results, reuse, TLS modes."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from nexthop import DROP, NextHop, TlsPair

from gateway.config import Config
from gateway.deliver.deliverer import Deliverer
from gateway.envelope import Envelope
from gateway.queue.state import RcptStatus

MSG = (b"From: a@src.test\r\nTo: x@dst.test\r\nSubject: hi\r\n"
       b"Message-ID: <m1@src.test>\r\n\r\nbody\r\n")


def _env(*rcpts: str, sender: str = "a@src.test") -> Envelope:
    return Envelope(mail_from=sender, rcpt_to=list(rcpts))


async def test_mixed_250_450_550_in_one_transaction_give_per_recipient_outcomes(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    nexthop.rules = {"b@dst.test": "450 4.2.0 Mailbox busy", "c@dst.test": "550 5.1.1 No such user"}
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{nexthop.port}?tls=off"}))
    try:
        rcpts = ["a@dst.test", "b@dst.test", "c@dst.test"]
        out = await d.deliver(_env(*rcpts), MSG, rcpts)
    finally:
        await d.aclose()
    assert [o.status for o in out] == [RcptStatus.DELIVERED, RcptStatus.DEFERRED,
                                       RcptStatus.BOUNCED]
    assert out[1].reply == "450 4.2.0 Mailbox busy"
    assert out[2].reply == "550 5.1.1 No such user"
    assert out[0].route == f"smtp:127.0.0.1:{nexthop.port}"
    assert nexthop.mail_commands == 1  # one transaction for all three
    assert len(nexthop.received) == 1
    assert nexthop.received[0].rcpt_tos == ["a@dst.test"]
    assert nexthop.received[0].data.rstrip(b"\r\n") == MSG.rstrip(b"\r\n")
    assert nexthop.received[0].helo == "coffer.test"  # delivery.helo_name, else hostname


async def test_connection_is_reused_for_later_messages_to_the_same_destination(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{nexthop.port}?tls=off"}))
    try:
        for _ in range(3):
            out = await d.deliver(_env("a@dst.test"), MSG, ["a@dst.test"])
            assert out[0].status is RcptStatus.DELIVERED
        # A refused transaction is reset (RSET) and the connection still reused.
        nexthop.rules = {"z@dst.test": "550 5.1.1 No such user"}
        out = await d.deliver(_env("z@dst.test"), MSG, ["z@dst.test"])
        assert out[0].status is RcptStatus.BOUNCED
        out = await d.deliver(_env("a@dst.test"), MSG, ["a@dst.test"])
        assert out[0].status is RcptStatus.DELIVERED
    finally:
        await d.aclose()
    assert nexthop.connections == 1
    assert len(nexthop.received) == 4


async def test_stale_pooled_connection_is_replaced_without_losing_the_message(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{nexthop.port}?tls=off"}))
    try:
        await d.deliver(_env("a@dst.test"), MSG, ["a@dst.test"])
        # The next hop closes the idle connection (as servers do after a timeout).
        nexthop.rules = {"drop@dst.test": DROP}
        out = await d.deliver(_env("drop@dst.test"), MSG, ["drop@dst.test"])
        assert out[0].status is RcptStatus.DEFERRED
        out = await d.deliver(_env("a@dst.test"), MSG, ["a@dst.test"])
    finally:
        await d.aclose()
    assert out[0].status is RcptStatus.DELIVERED
    assert nexthop.connections == 2


async def test_dropped_connection_defers_every_recipient_not_yet_refused(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    nexthop.rules = {"b@dst.test": "550 5.1.1 No such user", "c@dst.test": DROP}
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{nexthop.port}?tls=off"}))
    try:
        rcpts = ["a@dst.test", "b@dst.test", "c@dst.test", "d@dst.test"]
        out = await d.deliver(_env(*rcpts), MSG, rcpts)
    finally:
        await d.aclose()
    # a was accepted at RCPT but no DATA reply came: not delivered, retried later.
    assert [o.status for o in out] == [RcptStatus.DEFERRED, RcptStatus.BOUNCED,
                                       RcptStatus.DEFERRED, RcptStatus.DEFERRED]
    assert out[0].reply.startswith("451 4.4.2")
    assert nexthop.received == []


async def test_data_refusal_applies_to_every_accepted_recipient(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    nexthop.data_reply = "554 5.6.0 Content refused"
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{nexthop.port}?tls=off"}))
    try:
        out = await d.deliver(_env("a@dst.test", "b@dst.test"), MSG, ["a@dst.test", "b@dst.test"])
    finally:
        await d.aclose()
    assert [(o.status, o.reply) for o in out] == [
        (RcptStatus.BOUNCED, "554 5.6.0 Content refused")] * 2


async def test_refused_connection_is_a_temporary_failure(
    make_cfg: Callable[..., Config]
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{port}?tls=off"}))
    try:
        out = await d.deliver(_env("a@dst.test"), MSG, ["a@dst.test"])
    finally:
        await d.aclose()
    assert out[0].status is RcptStatus.DEFERRED
    assert out[0].reply.startswith("451 4.4.1")


async def test_tls_required_without_starttls_defers_and_sends_nothing_in_clear(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{nexthop.port}?tls=required"}))
    try:
        out = await d.deliver(_env("a@dst.test"), MSG, ["a@dst.test"])
    finally:
        await d.aclose()
    assert out[0].status is RcptStatus.DEFERRED
    assert out[0].reply.startswith("451 4.7.10")
    assert nexthop.mail_commands == 0 and nexthop.received == []


async def test_tls_required_delivers_over_verified_starttls(
    tls: TlsPair, make_cfg: Callable[..., Config]
) -> None:
    hop = NextHop(tls_context=tls.server)
    await hop.start()
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{hop.port}?tls=required"}),
                  tls_context=tls.client)
    try:
        out = await d.deliver(_env("a@dst.test"), MSG, ["a@dst.test"])
    finally:
        await d.aclose()
        await hop.stop()
    assert out[0].status is RcptStatus.DELIVERED
    assert hop.received[0].tls


async def test_tls_required_refuses_an_unverifiable_certificate(
    tls: TlsPair, make_cfg: Callable[..., Config]
) -> None:
    hop = NextHop(tls_context=tls.server)
    await hop.start()
    # The system trust store does not know the test CA.
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{hop.port}?tls=required"}))
    try:
        out = await d.deliver(_env("a@dst.test"), MSG, ["a@dst.test"])
    finally:
        await d.aclose()
        await hop.stop()
    assert out[0].status is RcptStatus.DEFERRED
    assert "4.7.10" in out[0].reply
    assert hop.received == []


async def test_opportunistic_tls_encrypts_without_verifying(
    tls: TlsPair, make_cfg: Callable[..., Config]
) -> None:
    hop = NextHop(tls_context=tls.server)
    await hop.start()
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{hop.port}"}))
    try:
        out = await d.deliver(_env("a@dst.test"), MSG, ["a@dst.test"])
    finally:
        await d.aclose()
        await hop.stop()
    assert out[0].status is RcptStatus.DELIVERED
    assert hop.received[0].tls


async def test_implicit_tls_route_delivers_over_verified_tls(
    tls: TlsPair, make_cfg: Callable[..., Config]
) -> None:
    hop = NextHop(implicit_tls=tls.server)
    await hop.start()
    d = Deliverer(make_cfg({"*": f"smtps://127.0.0.1:{hop.port}"}), tls_context=tls.client)
    try:
        out = await d.deliver(_env("a@dst.test"), MSG, ["a@dst.test"])
    finally:
        await d.aclose()
        await hop.stop()
    assert out[0].status is RcptStatus.DELIVERED
    assert hop.received[0].tls


async def test_recipient_without_route_is_deferred_not_bounced(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    d = Deliverer(make_cfg({"dst.test": f"smtp://127.0.0.1:{nexthop.port}?tls=off"}))
    try:
        out = await d.deliver(_env("a@dst.test", "b@other.test"), MSG,
                              ["a@dst.test", "b@other.test"])
    finally:
        await d.aclose()
    assert [o.status for o in out] == [RcptStatus.DELIVERED, RcptStatus.DEFERRED]
    assert "4.4.4" in out[1].reply


async def test_destination_concurrency_caps_open_connections(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{nexthop.port}?tls=off"},
                           destination_concurrency=2))
    try:
        outs = await asyncio.gather(*(
            d.deliver(_env(f"r{i}@dst.test"), MSG, [f"r{i}@dst.test"]) for i in range(10)))
    finally:
        await d.aclose()
    assert all(o[0].status is RcptStatus.DELIVERED for o in outs)
    assert nexthop.connections <= 2
    assert len(nexthop.received) == 10


async def test_internationalised_address_goes_with_smtputf8(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{nexthop.port}?tls=off"}))
    rcpt = "jürgen@dst.test"
    try:
        out = await d.deliver(_env(rcpt), MSG, [rcpt])
    finally:
        await d.aclose()
    assert out[0].status is RcptStatus.DELIVERED
    assert nexthop.delivered_to(rcpt) == 1


async def test_internationalised_address_bounces_when_next_hop_lacks_smtputf8(
    make_cfg: Callable[..., Config]
) -> None:
    hop = NextHop(smtputf8=False)
    await hop.start()
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{hop.port}?tls=off"}))
    rcpt = "jürgen@dst.test"
    try:
        out = await d.deliver(_env(rcpt), MSG, [rcpt])
    finally:
        await d.aclose()
        await hop.stop()
    assert out[0].status is RcptStatus.BOUNCED and "5.6.7" in out[0].reply
    assert hop.mail_commands == 0
