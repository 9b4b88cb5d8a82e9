"""RFC 3461 DSN parameters over a real socket: offered, checked, stored with the envelope."""

from __future__ import annotations

import aiosmtplib
from receive_helpers import Connect, StartGateway, greeted

MSG = b"From: a@ext.example\r\nTo: bob@local.example\r\nSubject: hi\r\n\r\nHello\r\n"


async def test_dsn_parameters_are_accepted_and_stored_in_the_spooled_envelope(
    start_gateway: StartGateway
) -> None:
    gw = await start_gateway()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port(), start_tls=False,
                               local_hostname="client.example") as client:
        await client.ehlo()
        assert client.supports_extension("dsn")
        await client.mail("a@ext.example", options=["RET=HDRS", "ENVID=QQ+2B314"])
        await client.rcpt("bob@local.example", options=["NOTIFY=never"])
        await client.rcpt("carol@local.example",
                          options=["NOTIFY=DELAY,SUCCESS", "ORCPT=rfc822;Carol@local.example"])
        await client.rcpt("dave@local.example")
        code, _ = await client.data(MSG)
        assert code == 250
    [m] = gw.spooled()
    env = m.envelope
    assert env.mail_options == ["RET=HDRS", "ENVID=QQ+2B314"]
    assert env.rcpt_to == ["bob@local.example", "carol@local.example", "dave@local.example"]
    assert env.rcpt_options == [["NOTIFY=NEVER"],
                                ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;Carol@local.example"],
                                []]
    # What the spool holds survives a restart: read it back from the file.
    reloaded = gw.spool.load(gw.accepted[0]).envelope
    assert reloaded.rcpt_options == env.rcpt_options
    assert reloaded.mail_options == env.mail_options


async def test_bad_dsn_parameters_are_501_5_5_4_and_leave_the_transaction_as_it_was(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    for bad in ("RET=BODY", "RET", "ENVID=a=b", "ENVID=" + "x" * 101, "RET=FULL RET=HDRS"):
        assert (await c.cmd(f"MAIL FROM:<a@ext.example> {bad}")).startswith("501 5.5.4 "), bad
    # No transaction was opened by any of them.
    assert await c.cmd("RCPT TO:<bob@local.example>") == "503 5.5.1 Need MAIL command first"
    assert await c.cmd("MAIL FROM:<a@ext.example> RET=FULL") == "250 2.1.0 Sender OK"
    for bad in ("NOTIFY=NEVER,FAILURE", "NOTIFY=SOMETIMES", "NOTIFY=", "ORCPT=bob@x.example",
                "ORCPT=rfc822;b=c@x.example", "NOTIFY=NEVER NOTIFY=NEVER",
                "ORCPT=utf-8;jörg@x.example"):
        assert (await c.cmd(f"RCPT TO:<bob@local.example> {bad}")).startswith("501 5.5.4 "), bad
    # None of the refused recipients joined the transaction.
    assert await c.cmd("DATA") == "503 5.5.1 Need RCPT command first"
    assert (await c.cmd("RCPT TO:<bob@local.example> BOGUS=1")).startswith("555 5.5.4 ")
    assert await c.cmd("RCPT TO:<bob@local.example> NOTIFY=FAILURE") == \
        "250 2.1.5 Recipient OK"
    assert await c.cmd("DATA") == "354 End data with <CR><LF>.<CR><LF>"
    assert (await c.cmd(b"Subject: s\r\n\r\nbody\r\n.\r\n")).startswith("250 ")
    [m] = gw.spooled()
    assert m.envelope.mail_options == ["RET=FULL"]
    assert m.envelope.rcpt_options == [["NOTIFY=FAILURE"]]


async def test_orcpt_in_utf8_with_smtputf8_and_no_parameters_after_helo(
    start_gateway: StartGateway, raw: Connect
) -> None:
    gw = await start_gateway()
    c = await greeted(gw, raw)
    assert await c.cmd("MAIL FROM:<a@ext.example> SMTPUTF8") == "250 2.1.0 Sender OK"
    # RFC 6533 §3: raw UTF-8 in the utf-8 address type within an SMTPUTF8 transaction.
    assert await c.cmd("RCPT TO:<jörg@local.example> ORCPT=utf-8;jörg@local.example") == \
        "250 2.1.5 Recipient OK"
    await c.cmd("DATA")
    assert (await c.cmd(b"Subject: s\r\n\r\nbody\r\n.\r\n")).startswith("250 ")
    [m] = gw.spooled()
    assert m.envelope.rcpt_options == [["ORCPT=utf-8;jörg@local.example"]]

    await c.cmd("HELO client.example")  # no service extensions after HELO
    assert await c.cmd("MAIL FROM:<a@ext.example>") == "250 2.1.0 Sender OK"
    assert (await c.cmd("RCPT TO:<bob@local.example> NOTIFY=NEVER")).startswith("501 5.5.4 ")
