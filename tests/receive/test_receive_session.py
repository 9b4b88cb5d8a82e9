"""The SMTP dialogue with real clients: banner, EHLO, envelope, Received, spool."""

from __future__ import annotations

import asyncio
import email
import shutil
import smtplib
import subprocess
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from receive_helpers import LOCAL, Connect, RawClient, StartGateway, TlsFiles, greeted

from gateway.config import Config
from gateway.pipeline import Action, MessageContext, StageResult
from gateway.queue.spool import Spool
from gateway.receive import start_listeners
from gateway.replies import Reply
from gateway.runner import Runner

MSG = b"From: a@ext.example\r\nTo: bob@local.example\r\nSubject: hi\r\n\r\nHello\r\n"


def _ehlo_keywords(lines: list[str]) -> list[str]:
    return [line[4:].split()[0].upper() for line in lines[1:]]


async def test_banner_names_host_and_coffer(start_gateway: StartGateway, raw: Connect) -> None:
    gw = await start_gateway()
    c: RawClient = await raw(gw.port())
    assert await c.line() == "220 mx.coffer.test ESMTP Coffer"


async def test_ehlo_offers_extensions_and_starttls_but_no_auth_in_clear(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    c: RawClient = await raw(gw.port())
    await c.line()
    c.send(b"EHLO client.example\r\n")
    lines = await c.reply()
    assert lines[0] == "250-mx.coffer.test"
    keys = _ehlo_keywords(lines)
    for ext in ("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN",
                "STARTTLS"):
        assert ext in keys
    assert "AUTH" not in keys
    assert f"SIZE {gw.cfg.limits.max_message_size}" in [x[4:] for x in lines]


async def test_ehlo_after_starttls_offers_auth_and_no_starttls(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    assert (await c.cmd("STARTTLS")).startswith("220")
    await c.start_tls(tls_files.client_context())
    c.send(b"EHLO client.example\r\n")
    keys = _ehlo_keywords(await c.reply())
    assert "STARTTLS" not in keys
    assert "AUTH" in keys


async def test_listener_without_tls_offers_neither_starttls_nor_auth(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway(listeners=[{"name": "inbound", "address": "127.0.0.1:0",
                                         "tls": "none"}])
    c: RawClient = await raw(gw.port())
    await c.line()
    c.send(b"EHLO client.example\r\n")
    keys = _ehlo_keywords(await c.reply())
    assert "STARTTLS" not in keys and "AUTH" not in keys
    assert await c.cmd("STARTTLS") == "454 4.7.0 TLS not available"


async def test_smtplib_message_is_spooled_with_envelope_and_received_header(
    start_gateway: StartGateway
) -> None:
    gw = await start_gateway()

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", gw.port(), local_hostname="client.example") as s:
            return s.sendmail("a@ext.example", ["bob@local.example"], MSG)

    assert await asyncio.to_thread(send) == {}
    [m] = gw.spooled()
    env = m.envelope
    assert env.mail_from == "a@ext.example"
    assert env.rcpt_to == ["bob@local.example"]
    assert env.client_ip == "127.0.0.1" and env.client_port > 0
    assert env.helo == "client.example"
    assert env.listener == "inbound" and env.role == "inbound"
    assert env.tls is None and env.auth_user is None
    assert env.received_at > 0
    head, _, rest = m.data.partition(b"\r\n\t")
    assert head == b"Received: from client.example ([127.0.0.1])"
    assert rest.startswith(b"by mx.coffer.test (Coffer) with ESMTP id ")
    assert b"\r\n\tfor <bob@local.example>; " in m.data
    assert m.data.endswith(MSG)
    parsed = email.message_from_bytes(m.data)
    assert parsed["Subject"] == "hi" and parsed["Received"]


async def test_reply_to_data_is_exactly_what_the_acceptor_returned(
    start_gateway: StartGateway
) -> None:
    gw = await start_gateway()

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", gw.port()) as s:
            s.ehlo("client.example")
            s.mail("a@ext.example")
            s.rcpt("bob@local.example")
            return s.data(MSG)

    code, text = await asyncio.to_thread(send)
    assert code == 250
    assert text.decode() == f"2.0.0 OK: queued as {gw.accepted[0]}"


async def test_received_for_clause_only_with_a_single_recipient(
    start_gateway: StartGateway
) -> None:
    gw = await start_gateway()

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", gw.port()) as s:
            s.sendmail("a@ext.example", ["bob@local.example", "carol@local.example"], MSG)

    await asyncio.to_thread(send)
    [m] = gw.spooled()
    assert m.envelope.rcpt_to == ["bob@local.example", "carol@local.example"]
    received = m.data.split(b"\r\n\r\n")[0].split(b"\r\nFrom:")[0]
    assert b" for " not in received and b"bob" not in received


async def test_starttls_message_records_tls_and_esmtps(
    start_gateway: StartGateway, tls_files: TlsFiles
) -> None:
    gw = await start_gateway()

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", gw.port()) as s:
            s.starttls(context=tls_files.client_context())
            s.sendmail("a@ext.example", ["bob@local.example"], MSG)

    await asyncio.to_thread(send)
    [m] = gw.spooled()
    assert m.envelope.tls is not None
    assert m.envelope.tls.version.startswith("TLSv1.")
    assert m.envelope.tls.cipher
    assert b" with ESMTPS (TLSv1." in m.data


async def test_aiosmtplib_pipelined_messages_are_each_spooled(
    start_gateway: StartGateway, tls_files: TlsFiles
) -> None:
    gw = await start_gateway()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port(),
                               tls_context=tls_files.client_context(),
                               start_tls=True) as client:
        for i in range(3):
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "a@ext.example", "bob@local.example", f"n{i}"
            msg.set_content("hello")
            errors, text = await client.send_message(msg)
            assert errors == {} and text.startswith("2.0.0 OK: queued as")
    subjects = sorted(email.message_from_bytes(m.data)["Subject"] for m in gw.spooled())
    assert subjects == ["n0", "n1", "n2"]


async def test_raw_pipelined_transaction_gets_one_reply_per_command(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    c.send(b"MAIL FROM:<a@ext.example>\r\nRCPT TO:<bob@local.example>\r\n"
           b"RCPT TO:<x@ext.example>\r\nDATA\r\n")
    assert [await c.line() for _ in range(4)] == [
        "250 2.1.0 Sender OK", "250 2.1.5 Recipient OK",
        "550 5.7.1 Relay access denied", "354 End data with <CR><LF>.<CR><LF>",
    ]
    c.send(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert (await c.line()).startswith("250 2.0.0 OK: queued as ")
    assert await c.line() == "221 2.0.0 Bye"
    [m] = gw.spooled()
    assert m.envelope.rcpt_to == ["bob@local.example"]


async def test_dot_stuffing_is_undone(start_gateway: StartGateway, raw: Connect) -> None:
    # RFC 5321 §4.5.2: a leading dot is doubled by the client and removed by us.
    gw = await start_gateway()
    c = await greeted(gw, raw)
    await c.cmd("MAIL FROM:<a@ext.example>")
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    c.send(b"Subject: dots\r\n\r\n..leading\r\n...\r\n.\r\n")
    assert (await c.line()).startswith("250 ")
    [m] = gw.spooled()
    assert m.data.endswith(b"\r\n\r\n.leading\r\n..\r\n")


async def test_empty_message_is_accepted(start_gateway: StartGateway, raw: Connect) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    await c.cmd("MAIL FROM:<>")
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    assert (await c.cmd(".")).startswith("250 ")
    [m] = gw.spooled()
    assert m.envelope.mail_from == ""
    assert m.data.startswith(b"Received: ") and m.data.endswith(b"\r\n")


async def test_eight_bit_body_and_options_are_recorded(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    assert await c.cmd("MAIL FROM:<a@ext.example> BODY=8BITMIME SIZE=100") == \
        "250 2.1.0 Sender OK"
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    body = "Subject: café\r\n\r\nGrüße\r\n".encode()
    c.send(body + b".\r\n")
    assert (await c.line()).startswith("250 ")
    [m] = gw.spooled()
    assert m.envelope.mail_options == ["BODY=8BITMIME", "SIZE=100"]
    assert m.data.endswith(body)


async def test_smtputf8_address_accepted_with_parameter(start_gateway: StartGateway,
                                                        raw: Connect) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    assert await c.cmd("MAIL FROM:<jörg@ext.example> SMTPUTF8") == "250 2.1.0 Sender OK"
    assert await c.cmd("RCPT TO:<δοκιμή@local.example>") == "250 2.1.5 Recipient OK"
    await c.cmd("DATA")
    assert (await c.cmd(b"Subject: x\r\n\r\ny\r\n.\r\n")).startswith("250 ")
    [m] = gw.spooled()
    assert m.envelope.mail_from == "jörg@ext.example"
    assert m.envelope.rcpt_to == ["δοκιμή@local.example"]
    assert m.envelope.smtputf8 and "SMTPUTF8" in m.envelope.mail_options
    assert b" with UTF8SMTP id " in m.data


@pytest.mark.parametrize("command", [
    "MAIL FROM:<jörg@ext.example>",
    "RCPT TO:<δοκιμή@local.example>",
])
async def test_utf8_address_without_smtputf8_is_refused_553_5_6_7(
    start_gateway: StartGateway, raw: Connect, command: str
) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    if command.startswith("RCPT"):
        await c.cmd("MAIL FROM:<a@ext.example>")
    assert (await c.cmd(command)).startswith("553 5.6.7 ")


async def test_unknown_parameters_and_bad_sequence_get_enhanced_codes(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    c: RawClient = await raw(gw.port())
    await c.line()
    assert await c.cmd("MAIL FROM:<a@ext.example>") == "503 5.5.1 Send EHLO or HELO first"
    await c.cmd("EHLO client.example")
    assert await c.cmd("RCPT TO:<bob@local.example>") == "503 5.5.1 Need MAIL command first"
    assert (await c.cmd("MAIL FROM:<a@ext.example> FOO=1")).startswith("555 5.5.4 ")
    assert (await c.cmd("MAIL FROM:<a@ext.example> BODY=BINARYMIME")).startswith("555 5.5.4")
    assert await c.cmd("MAIL FROM:<a@ext.example>") == "250 2.1.0 Sender OK"
    assert await c.cmd("MAIL FROM:<a@ext.example>") == "503 5.5.1 Nested MAIL command"
    assert await c.cmd("DATA") == "503 5.5.1 Need RCPT command first"
    assert (await c.cmd("RCPT TO:<bob@local.example> FOO=1")).startswith("555 5.5.4")
    assert await c.cmd("RSET") == "250 2.0.0 Reset OK"
    assert await c.cmd("VRFY bob") == \
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery"
    assert await c.cmd("BDAT 10 LAST") == "500 5.5.2 Syntax error, command unrecognised"
    assert await c.cmd("NOOP") == "250 2.0.0 OK"


async def test_bad_sender_syntax_is_553_5_1_7(start_gateway: StartGateway, raw: Connect) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    assert (await c.cmd("MAIL FROM:<a@@ext.example>")).startswith("553 5.1.7 ")
    assert (await c.cmd("MAIL FROM:<a@ext.example.>")).startswith("553 5.1.7 ")


async def test_helo_session_is_smtp_in_received_header(start_gateway: StartGateway) -> None:
    gw = await start_gateway()

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", gw.port()) as s:
            s.helo("old.example")
            s.sendmail("a@ext.example", ["bob@local.example"], MSG)

    await asyncio.to_thread(send)
    [m] = gw.spooled()
    assert b"Received: from old.example ([127.0.0.1])\r\n\tby mx.coffer.test (Coffer) with SMTP " \
        in m.data


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (apt swaks)")
async def test_swaks_starttls_message_arrives(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    proc = await asyncio.to_thread(
        subprocess.run,
        ["swaks", "--server", "127.0.0.1", "--port", str(gw.port()), "--tls",
         "--from", "a@ext.example", "--to", f"bob@{LOCAL}", "--ehlo", "swaks.example",
         "--header", "Subject: via swaks", "--body", "hello from swaks"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [m] = gw.spooled()
    assert m.envelope.helo == "swaks.example" and m.envelope.tls is not None
    assert b"Subject: via swaks" in m.data and b"hello from swaks" in m.data


async def test_rejections_are_counted_by_reason_and_sessions_logged(
    start_gateway: StartGateway, raw: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway import metrics

    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    relay_before = sample("coffer_messages_rejected_total", reason="relay_denied")
    conn_before = sample("coffer_smtp_connections_total", listener="inbound")
    caplog.set_level("INFO", logger="coffer")
    gw = await start_gateway()
    c = await greeted(gw, raw)
    await c.cmd("MAIL FROM:<a@ext.example>")
    assert (await c.cmd("RCPT TO:<x@ext.example>")).startswith("550 5.7.1")
    assert await c.cmd("QUIT") == "221 2.0.0 Bye"
    await c.rest()
    await gw.sessions_down_to(0)
    assert sample("coffer_messages_rejected_total", reason="relay_denied") == relay_before + 1
    assert sample("coffer_smtp_connections_total", listener="inbound") == conn_before + 1
    events = {r.getMessage(): getattr(r, "fields", {}) for r in caplog.records}
    assert events["smtp_connect"]["client"] == "127.0.0.1"
    assert events["smtp_reject"]["reason"] == "relay_denied"
    assert events["smtp_reject"]["recipient"] == "x@ext.example"
    assert events["smtp_disconnect"]["reason"] == "quit"
    assert events["smtp_disconnect"]["commands"] == 4


async def test_commands_pipelined_before_half_close_are_still_answered(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    await c.cmd("MAIL FROM:<a@ext.example>")
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    c.send(b"Subject: last words\r\n\r\nbye\r\n.\r\nQUIT\r\n")
    c.writer.write_eof()  # like `nc -N`: the client closes its side at once
    lines = await c.rest()
    assert lines[0].startswith("250 2.0.0 OK: queued as ")
    assert lines[1:] == ["221 2.0.0 Bye"]
    assert len(gw.spooled()) == 1


async def test_eof_in_the_middle_of_data_spools_nothing(start_gateway: StartGateway,
                                                        raw: Connect) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    await c.cmd("MAIL FROM:<a@ext.example>")
    await c.cmd("RCPT TO:<bob@local.example>")
    await c.cmd("DATA")
    c.send(b"Subject: cut\r\n\r\nhalf a messa")
    c.writer.write_eof()
    assert await c.rest() == []
    await gw.sessions_down_to(0)
    assert gw.spooled() == []


class _Stage:
    """A before-queue stage that rejects mail from one sender and stamps the rest."""

    name = "decide"
    once = False

    async def run(self, ctx: MessageContext) -> StageResult:
        if ctx.envelope.mail_from == "spammer@ext.example":
            return StageResult(Action.REJECT, reply=Reply(550, "5.7.1", "No thanks, spammer"))
        return StageResult(headers=[("X-Stage", f"saw {len(ctx.envelope.rcpt_to)} rcpt")])


async def test_stage_results_reach_the_client_verbatim(tmp_path: Path, raw: Connect) -> None:
    cfg = Config.model_validate({
        "hostname": "mx.coffer.test", "data_dir": str(tmp_path),
        "relay": {"local_domains": [LOCAL]},
        "listeners": [{"name": "inbound", "address": "127.0.0.1:0", "tls": "none"}],
    })
    spool = Spool(tmp_path / "spool", fsync=False)
    listeners = await start_listeners(cfg, Runner(spool, [_Stage()]))
    try:
        c: RawClient = await raw(listeners.address("inbound")[1])
        await c.line()
        await c.cmd("EHLO client.example")
        for sender, want in (("spammer@ext.example", "550 5.7.1 No thanks, spammer"),
                             ("friend@ext.example", "250 2.0.0 OK: queued as ")):
            await c.cmd(f"MAIL FROM:<{sender}>")
            await c.cmd(f"RCPT TO:<bob@{LOCAL}>")
            await c.cmd("DATA")
            assert (await c.cmd(b"Subject: x\r\n\r\ny\r\n.\r\n")).startswith(want)
    finally:
        await listeners.close(drain_timeout=1)
    [qid] = spool.queue_ids()
    m = spool.load(qid)
    assert m.envelope.mail_from == "friend@ext.example"
    assert m.data.startswith(b"X-Stage: saw 1 rcpt\r\nReceived: from client.example ")


async def test_invalid_utf8_in_a_command_is_500_5_5_2(start_gateway: StartGateway,
                                                      raw: Connect) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    assert await c.cmd(b"MAIL FROM:<\xff\xfe@ext.example> SMTPUTF8\r\n") == \
        "500 5.5.2 Command is not valid UTF-8"
    assert await c.cmd(b"NOOP\rRSET\r\n") == "500 5.5.2 Syntax error, command unrecognised"
    assert await c.cmd("NOOP") == "250 2.0.0 OK"
