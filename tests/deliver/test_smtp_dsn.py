"""RFC 3461 pass-through: a DSN-capable next hop gets RET/ENVID/NOTIFY/ORCPT; others don't.

The ``nexthop`` fixture runs every test with and without PIPELINING, so both
client paths are held to the same commands.
"""

from __future__ import annotations

from collections.abc import Callable

from nexthop import NextHop

from gateway.config import Config
from gateway.deliver.deliverer import Deliverer
from gateway.envelope import Envelope
from gateway.queue.state import RcptStatus

MSG = b"From: a@src.test\r\nTo: x@dst.test\r\nSubject: hi\r\n\r\nbody\r\n"


def _env() -> Envelope:
    return Envelope(
        mail_from="a@src.test", rcpt_to=["b@dst.test", "c@dst.test", "d@dst.test"],
        mail_options=["BODY=8BITMIME", "RET=HDRS", "ENVID=QQ+2B314"],
        rcpt_options=[["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;B+2Bx@dst.test"],
                      ["NOTIFY=NEVER"], []],
    )


async def _deliver(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> tuple[list[RcptStatus], str]:
    """Each recipient's status, and the one success notice they are all owed."""
    d = Deliverer(make_cfg({"*": f"smtp://127.0.0.1:{nexthop.port}?tls=off"}))
    try:
        env = _env()
        out = await d.deliver(env, MSG, env.rcpt_to)
    finally:
        await d.aclose()
    assert [o.rcpt for o in out] == ["b@dst.test", "c@dst.test", "d@dst.test"]
    (notice,) = {o.notice for o in out}
    return [o.status for o in out], notice


async def test_dsn_parameters_go_to_a_next_hop_that_offers_dsn(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    nexthop.dsn = True
    result = await _deliver(nexthop, make_cfg)
    # Delivered, and no notice of ours: the next hop took the request on (§5.2.1).
    assert result == ([RcptStatus.DELIVERED] * 3, "")
    (mail,) = nexthop.mail_args
    assert mail.startswith("FROM:<a@src.test> ")
    assert mail.split()[1:] == ["SIZE=" + str(len(MSG)), "RET=HDRS", "ENVID=QQ+2B314"]
    assert nexthop.rcpt_args == [
        "TO:<b@dst.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+2Bx@dst.test",
        "TO:<c@dst.test> NOTIFY=NEVER",
        "TO:<d@dst.test>",
    ]
    assert nexthop.received[0].rcpt_tos == ["b@dst.test", "c@dst.test", "d@dst.test"]


async def test_no_dsn_parameters_to_a_next_hop_without_dsn_and_a_relayed_notice_is_owed(
    nexthop: NextHop, make_cfg: Callable[..., Config]
) -> None:
    result = await _deliver(nexthop, make_cfg)
    # RFC 3461 §5.2.2: the next hop cannot report success, so we will ("relayed").
    assert result == ([RcptStatus.DELIVERED] * 3, "relayed")
    (mail,) = nexthop.mail_args
    assert mail.split()[1:] == ["SIZE=" + str(len(MSG))]
    assert nexthop.rcpt_args == ["TO:<b@dst.test>", "TO:<c@dst.test>", "TO:<d@dst.test>"]
