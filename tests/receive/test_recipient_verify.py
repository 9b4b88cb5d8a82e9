"""Unknown recipients refused at RCPT (no backscatter): the list file and next-hop probes.

The next hop is the real loopback aiosmtpd server of the delivery tests
(tests/deliver/nexthop.py), told which users it does not know; it counts the
connections and RCPT commands it sees, so a cache hit is seen not to reach it.
The SMTP side is the real listener of the other receive tests, driven by the raw
client and, end to end, by smtplib.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

# The next-hop server lives with the delivery tests (conftest.py puts it on the path).
from nexthop import NextHop, make_tls
from receive_helpers import (
    LOCAL,
    UNKNOWN_TEXT,
    Clock,
    Connect,
    Gateway,
    StartGateway,
    mailbox,
    make_gate,
    rcpt_replies,
    verify_config,
)

from gateway import config, metrics
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.preflight import preflight
from gateway.receive.recipient_probe import (
    REASON_REFUSED_BY_HOP,
    REASON_UNLISTED,
    REASON_UNVERIFIED,
    RecipientGate,
    Refusal,
)


@pytest.fixture
async def down_port() -> int:
    """A loopback port nothing listens on (a next hop that is down)."""
    h = NextHop()
    await h.start()
    await h.stop()
    return h.port


# -- the probe, against a loopback next hop ------------------------------------------

async def test_a_user_the_next_hop_knows_is_accepted_and_nothing_is_sent(
    tmp_path: Path, hop: NextHop, gates: list[RecipientGate]
) -> None:
    gate = make_gate(gates, verify_config(tmp_path, hop.port))
    assert await gate.refusal(mailbox(f"alice@{LOCAL}")) is None
    assert hop.mail_args == ["FROM:<>"]  # the null sender: no notice can come of it
    assert hop.rcpt_args == [f"TO:<alice@{LOCAL}>"]
    assert hop.received == []


async def test_an_unknown_user_is_550_5_1_1_with_the_next_hops_text(
    tmp_path: Path, hop: NextHop, gates: list[RecipientGate]
) -> None:
    gate = make_gate(gates, verify_config(tmp_path, hop.port))
    refusal = await gate.refusal(mailbox(f"nobody@{LOCAL}"))
    assert refusal is not None and refusal.reason == REASON_REFUSED_BY_HOP
    assert str(refusal.reply) == (
        f"550 5.1.1 <nobody@{LOCAL}>: recipient rejected by next hop: "
        f"<nobody@{LOCAL}>: User unknown in virtual mailbox table")
    assert refusal.detail == f"550 {UNKNOWN_TEXT}"


async def test_a_next_hop_that_is_down_gives_450_4_1_1(
    tmp_path: Path, down_port: int, gates: list[RecipientGate]
) -> None:
    gate = make_gate(gates, verify_config(tmp_path, down_port))
    refusal = await gate.refusal(mailbox(f"alice@{LOCAL}"))
    assert refusal is not None and refusal.reason == REASON_UNVERIFIED
    assert str(refusal.reply) == (f"450 4.1.1 <alice@{LOCAL}>: Recipient address rejected: "
                                  "unverified address, try again later")


async def test_a_next_hop_that_is_down_accepts_when_so_configured(
    tmp_path: Path, down_port: int, gates: list[RecipientGate]
) -> None:
    gate = make_gate(gates, verify_config(tmp_path, down_port, undetermined="accept"))
    assert await gate.refusal(mailbox(f"alice@{LOCAL}")) is None


async def test_a_4xx_from_the_next_hop_is_undetermined(
    tmp_path: Path, hop: NextHop, gates: list[RecipientGate]
) -> None:
    gate = make_gate(gates, verify_config(tmp_path, hop.port))
    refusal = await gate.refusal(mailbox(f"busy@{LOCAL}"))
    assert refusal is not None and refusal.reply.code == 450
    assert refusal.detail == "450 4.2.1 Mailbox busy, try later"


async def _probe_a_stalling_hop(
    tmp_path: Path, gates: list[RecipientGate],
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[Refusal | None, asyncio.Server]:
    """Verify alice@ at a loopback server run by ``handler``, with a 300 ms
    verify_timeout; the server is closed (to new connections) on return."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        gate = make_gate(gates, verify_config(tmp_path, server.sockets[0].getsockname()[1],
                                 verify_timeout="300ms"))
        return await gate.refusal(mailbox(f"alice@{LOCAL}")), server
    finally:
        server.close()


async def test_a_next_hop_that_never_answers_is_undetermined_after_the_probe_timeout(
    tmp_path: Path, gates: list[RecipientGate]
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # no greeting, ever
        writer.close()

    refusal, server = await _probe_a_stalling_hop(tmp_path, gates, silent)
    assert refusal is not None and refusal.reason == REASON_UNVERIFIED
    # The abandoned probe closed its connection: the server has none left.
    await asyncio.wait_for(server.wait_closed(), 5)


async def test_a_probe_that_times_out_at_rcpt_drops_its_connection(
    tmp_path: Path, gates: list[RecipientGate]
) -> None:
    closed = asyncio.Event()

    async def stalls_at_rcpt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stall.test ESMTP\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"EHLO"):
                writer.write(b"250 stall.test\r\n")
            elif line.upper().startswith(b"MAIL"):
                writer.write(b"250 2.1.0 Ok\r\n")
            # RCPT: no answer, ever
        closed.set()
        writer.close()

    refusal, _ = await _probe_a_stalling_hop(tmp_path, gates, stalls_at_rcpt)
    assert refusal is not None and refusal.reason == REASON_UNVERIFIED
    await asyncio.wait_for(closed.wait(), 5)  # not kept open, not pooled


async def test_a_probe_follows_the_routes_tls_rules(
    tmp_path: Path, gates: list[RecipientGate]
) -> None:
    tls = make_tls(tmp_path)
    hop = NextHop(tls_context=tls.server, rules={f"nobody@{LOCAL}": f"550 {UNKNOWN_TEXT}"})
    await hop.start()
    try:
        cfg = Config.model_validate({
            "data_dir": str(tmp_path),
            "relay": {"local_domains": [LOCAL], "recipients": {"verify": True}},
            "delivery": {"routes": {LOCAL: f"smtp://127.0.0.1:{hop.port}?tls=required"}},
        })
        verified = RecipientGate.from_config(cfg, tls_context=tls.client)
        gates.append(verified)
        refusal = await verified.refusal(mailbox(f"nobody@{LOCAL}"))
        assert refusal is not None and refusal.reason == REASON_REFUSED_BY_HOP
        # The system trust store does not know the test CA: no answer, as delivery
        # would not send there either.  (Another data_dir: not the first one's verdict.)
        (tmp_path / "other").mkdir()
        unverified = make_gate(gates, cfg.model_copy(update={"data_dir": tmp_path / "other"}))
        refusal = await unverified.refusal(mailbox(f"nobody@{LOCAL}"))
        assert refusal is not None and refusal.reason == REASON_UNVERIFIED
        assert "4.7.10" in refusal.detail
        assert hop.rcpt_args == [f"TO:<nobody@{LOCAL}>"]  # over TLS, once
    finally:
        await hop.stop()


async def test_a_cached_answer_does_not_reach_the_next_hop(
    tmp_path: Path, hop: NextHop, gates: list[RecipientGate]
) -> None:
    gate = make_gate(gates, verify_config(tmp_path, hop.port))
    for address in (f"alice@{LOCAL}", f"ALICE@{LOCAL.upper()}", f"alice@{LOCAL}"):
        assert await gate.refusal(mailbox(address)) is None
    for _ in range(2):
        refusal = await gate.refusal(mailbox(f"nobody@{LOCAL}"))
        assert refusal is not None and refusal.reply.code == 550
    assert hop.rcpt_args == [f"TO:<alice@{LOCAL}>", f"TO:<nobody@{LOCAL}>"]
    assert hop.connections == 1  # and the second probe reused the first one's connection


async def test_answers_expire_after_their_ttl_and_are_asked_again(
    tmp_path: Path, hop: NextHop, gates: list[RecipientGate]
) -> None:
    clock = Clock()
    cfg = verify_config(tmp_path, hop.port, positive_ttl="1d", negative_ttl="1h")
    gate = make_gate(gates, cfg, clock)
    await gate.refusal(mailbox(f"alice@{LOCAL}"))
    await gate.refusal(mailbox(f"nobody@{LOCAL}"))
    clock.now += 3600  # the negative answer expires, the positive one stays
    await gate.refusal(mailbox(f"alice@{LOCAL}"))
    await gate.refusal(mailbox(f"nobody@{LOCAL}"))
    assert hop.rcpt_args.count(f"TO:<alice@{LOCAL}>") == 1
    assert hop.rcpt_args.count(f"TO:<nobody@{LOCAL}>") == 2
    clock.now += 86400
    await gate.refusal(mailbox(f"alice@{LOCAL}"))
    assert hop.rcpt_args.count(f"TO:<alice@{LOCAL}>") == 2


async def test_concurrent_rcpts_for_one_address_share_one_probe(
    tmp_path: Path, hop: NextHop, gates: list[RecipientGate]
) -> None:
    gate = make_gate(gates, verify_config(tmp_path, hop.port))
    results = await asyncio.gather(*(gate.refusal(mailbox(f"nobody@{LOCAL}")) for _ in range(5)))
    assert all(r is not None and r.reply.code == 550 for r in results)
    assert hop.rcpt_args == [f"TO:<nobody@{LOCAL}>"]


async def test_maildir_and_mx_routes_are_not_probed_and_the_log_says_so(
    tmp_path: Path, hop: NextHop, gates: list[RecipientGate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="coffer")
    cfg = Config.model_validate({
        "data_dir": str(tmp_path),
        "relay": {"local_domains": [LOCAL, "box.example"],
                  "recipients": {"verify": True}},
        "delivery": {"routes": {"box.example": "maildir:mail", "*": "mx"}},
    })
    gate = make_gate(gates, cfg)
    assert await gate.refusal(mailbox("nobody@box.example")) is None
    assert await gate.refusal(mailbox(f"nobody@{LOCAL}")) is None
    assert hop.connections == 0
    [warning] = [getattr(r, "fields", {}) for r in caplog.records
                 if r.getMessage() == "recipient_verify_skipped"]
    assert warning["domains"] == [LOCAL, "box.example"]


# -- over SMTP -------------------------------------------------------------------------

def _rejected(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value(
        "coffer_messages_rejected_total", {"reason": reason}) or 0.0


async def test_the_list_refuses_unknown_recipients_at_rcpt(
    start_gateway: StartGateway, raw: Connect, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = _rejected(REASON_UNLISTED)
    caplog.set_level("INFO", logger="coffer")
    gw, _ = await _listing(start_gateway, tmp_path, f"alice@{LOCAL}", "@other.example")
    assert await rcpt_replies(gw.port(), raw, f"Alice@{LOCAL}", f"mallory@{LOCAL}",
                       "anyone@Other.Example", "Postmaster") == [
        "250 2.1.5 Recipient OK",
        f"550 5.1.1 <mallory@{LOCAL}>: Recipient address rejected: user unknown",
        "250 2.1.5 Recipient OK",
        "250 2.1.5 Recipient OK",
    ]
    assert _rejected(REASON_UNLISTED) == before + 1
    [event] = [getattr(r, "fields", {}) for r in caplog.records
               if r.getMessage() == "smtp_reject"]
    assert event["reason"] == REASON_UNLISTED and event["recipient"] == f"mallory@{LOCAL}"


async def test_the_probe_refuses_unknown_recipients_at_rcpt(
    start_gateway: StartGateway, raw: Connect, hop: NextHop
) -> None:
    before = _rejected(REASON_REFUSED_BY_HOP)
    gw = await start_gateway(
        relay={"recipients": {"verify": True}},
        delivery={"routes": {LOCAL: f"smtp://127.0.0.1:{hop.port}?tls=off"}})
    assert await rcpt_replies(gw.port(), raw, f"alice@{LOCAL}", f"nobody@{LOCAL}") == [
        "250 2.1.5 Recipient OK",
        f"550 5.1.1 <nobody@{LOCAL}>: recipient rejected by next hop: "
        f"<nobody@{LOCAL}>: User unknown in virtual mailbox table",
    ]
    assert _rejected(REASON_REFUSED_BY_HOP) == before + 1


async def test_a_trusted_networks_relayed_mail_is_not_probed_but_its_local_mail_is(
    start_gateway: StartGateway, raw: Connect, hop: NextHop
) -> None:
    # Every domain routes to the probing next hop: only the domain decides.
    gw = await start_gateway(
        relay={"trusted_networks": ["127.0.0.0/8"], "recipients": {"verify": True}},
        delivery={"routes": {"*": f"smtp://127.0.0.1:{hop.port}?tls=off"}})
    assert await rcpt_replies(gw.port(), raw, "nobody@ext.example") == ["250 2.1.5 Recipient OK"]
    assert hop.connections == 0
    [reply] = await rcpt_replies(gw.port(), raw, f"nobody@{LOCAL}")
    assert reply.startswith("550 5.1.1 ")
    assert hop.rcpt_args == [f"TO:<nobody@{LOCAL}>"]


async def test_end_to_end_smtplib_message_goes_to_known_recipients_only(
    start_gateway: StartGateway, hop: NextHop
) -> None:
    gw = await start_gateway(
        relay={"recipients": {"verify": True}},
        delivery={"routes": {LOCAL: f"smtp://127.0.0.1:{hop.port}?tls=off"}})

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", gw.port(), local_hostname="client.example") as s:
            return s.sendmail("a@ext.example", [f"alice@{LOCAL}", f"nobody@{LOCAL}"],
                              b"Subject: hi\r\n\r\nhello\r\n")

    refused = await asyncio.to_thread(send)
    assert refused == {f"nobody@{LOCAL}": (550, (
        f"5.1.1 <nobody@{LOCAL}>: recipient rejected by next hop: "
        f"<nobody@{LOCAL}>: User unknown in virtual mailbox table").encode())}
    [m] = gw.spooled()
    assert m.envelope.rcpt_to == [f"alice@{LOCAL}"]


# -- the list file: errors at start and on reload ----------------------------------------

async def _listing(start_gateway: StartGateway, tmp_path: Path,
                   *lines: str) -> tuple[Gateway, Path]:
    """A gateway whose relay.recipients.file holds ``lines``, and that file."""
    listed = tmp_path / "recipients.txt"
    listed.write_text("".join(f"{line}\n" for line in lines))
    return await start_gateway(relay={"recipients": {"file": listed.name}}), listed


async def test_a_bad_list_file_stops_the_start_with_file_and_line(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        await _listing(start_gateway, tmp_path, f"alice@{LOCAL}", f"bob at {LOCAL}")
    assert str(err.value).startswith(f"{tmp_path / 'recipients.txt'}:2:")


async def test_a_bad_list_on_reload_keeps_the_old_list(
    start_gateway: StartGateway, raw: Connect, tmp_path: Path
) -> None:
    gw, listed = await _listing(start_gateway, tmp_path, f"alice@{LOCAL}")
    listed.write_text(f"alice@{LOCAL}\nbob@{LOCAL}\nnot an address\n")
    with pytest.raises(ConfigError) as err:
        gw.listeners.reconfigure(gw.cfg)
    assert (err.value.file, err.value.line) == (str(listed), 3)
    assert await rcpt_replies(gw.port(), raw, f"alice@{LOCAL}", f"bob@{LOCAL}") == [
        "250 2.1.5 Recipient OK",
        f"550 5.1.1 <bob@{LOCAL}>: Recipient address rejected: user unknown",
    ]
    listed.write_text(f"alice@{LOCAL}\nbob@{LOCAL}\n")
    gw.listeners.reconfigure(gw.cfg)
    assert await rcpt_replies(gw.port(), raw, f"bob@{LOCAL}") == ["250 2.1.5 Recipient OK"]


def test_check_config_locates_a_bad_list_line_and_a_missing_file(tmp_path: Path) -> None:
    conf = tmp_path / "coffer.yaml"
    conf.write_text("listeners:\n  - {name: inbound, tls: none}\n"
                    "relay:\n  recipients:\n    file: recipients.txt\n")
    cfg = config.load(conf)
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert (err.value.key, err.value.line) == ("relay.recipients.file", 5)
    (tmp_path / "recipients.txt").write_text("# users\n\n@\n")
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    assert (err.value.file, err.value.line) == (str(tmp_path / "recipients.txt"), 3)


async def test_a_session_open_across_a_reload_uses_the_new_list(
    start_gateway: StartGateway, raw: Connect, tmp_path: Path
) -> None:
    gw, listed = await _listing(start_gateway, tmp_path, f"alice@{LOCAL}")
    c = await raw(gw.port())
    await c.line()
    await c.cmd("EHLO client.example")
    await c.cmd("MAIL FROM:<a@ext.example>")
    assert (await c.cmd(f"RCPT TO:<bob@{LOCAL}>")).startswith("550 5.1.1 ")
    listed.write_text(f"alice@{LOCAL}\nbob@{LOCAL}\n")
    gw.listeners.reconfigure(gw.cfg)
    assert await c.cmd(f"RCPT TO:<bob@{LOCAL}>") == "250 2.1.5 Recipient OK"


async def test_a_reload_lets_a_probe_under_way_finish(
    start_gateway: StartGateway, raw: Connect, hop: NextHop
) -> None:
    gw = await start_gateway(
        relay={"recipients": {"verify": True}},
        delivery={"routes": {LOCAL: f"smtp://127.0.0.1:{hop.port}?tls=off"}})
    c = await raw(gw.port())
    await c.line()
    await c.cmd("EHLO client.example")
    await c.cmd("MAIL FROM:<a@ext.example>")
    c.send(f"RCPT TO:<nobody@{LOCAL}>\r\n".encode())

    async def probe_reached_the_hop() -> None:
        while not hop.rcpt_args:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(probe_reached_the_hop(), 5)
    gw.listeners.reconfigure(gw.cfg)
    assert (await c.line()).startswith("550 5.1.1 ")


async def test_a_journal_address_in_a_local_domain_needs_no_place_in_the_list(
    start_gateway: StartGateway, raw: Connect, tmp_path: Path
) -> None:
    # The journal address is Coffer's own (archived, never delivered): the list of the
    # mail store's users does not name it, and no next hop is asked about it.
    (tmp_path / "recipients.txt").write_text(f"alice@{LOCAL}\n")
    gw = await start_gateway(relay={"recipients": {"file": "recipients.txt"}},
                             archive={"journal": {"addresses": [f"journal@{LOCAL}"],
                                                  "sources": ["127.0.0.0/8"]}})
    assert await rcpt_replies(gw.port(), raw, f"journal@{LOCAL}", f"mallory@{LOCAL}") == [
        "250 2.1.5 Recipient OK",
        f"550 5.1.1 <mallory@{LOCAL}>: Recipient address rejected: user unknown",
    ]
