"""External scanners: real spamd and rspamd on loopback; failures never crash."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from scanners import Daemon, free_port
from spamkit import message

from gateway.check.spam import external
from gateway.check.spam.config import (
    ExternalConfig,
    RspamdConfig,
    SpamConfig,
    SpamdConfig,
)
from gateway.check.spam.heuristics import GTUBE
from gateway.check.spam.scorer import Scorer
from gateway.check.spam.stage import SCANNER_UNAVAILABLE, SpamStage
from gateway.envelope import Envelope
from gateway.pipeline import Action, MessageContext

ENV = Envelope("alice@example.com", ["bob@example.org"], client_ip="192.0.2.10",
               helo="mail.example.com")


def ctx(data: bytes) -> MessageContext:
    return MessageContext(envelope=ENV, data=data, qid="Q1")


async def test_spamd_reports_gtube_as_spam_with_its_rule_names(spamd: Daemon) -> None:
    report = await external.spamd_scan(SpamdConfig(address=spamd.address, timeout=30),
                                       message(f"test\n{GTUBE}\n"))
    assert report.is_spam and report.score >= 1000
    assert "GTUBE" in report.symbols
    clean = await external.spamd_scan(SpamdConfig(address=spamd.address, timeout=30),
                                      message())
    assert not clean.is_spam and clean.score < clean.required


async def test_spamd_score_becomes_a_weighted_symbol_of_the_stage(spamd: Daemon) -> None:
    cfg = SpamConfig(bayes={"enabled": False},
                     external={"spamd": {"address": spamd.address, "timeout": 30,
                                         "weight": 0.5}})
    stage = SpamStage(Scorer(cfg))
    try:
        result = await stage.run(ctx(message(f"test\n{GTUBE}\n")))
    finally:
        stage.close()
    assert result.action is Action.CONTINUE
    spamd_facts = result.facts["external"]["spamd"]
    assert spamd_facts["is_spam"] and "GTUBE" in spamd_facts["symbols"]
    assert result.facts["symbols"]["SPAMASSASSIN"] == pytest.approx(
        round(spamd_facts["score"] * 0.5, 3))
    assert result.facts["verdict"] == "spam"


async def test_rspamd_checkv2_gives_scores_per_symbol(rspamd: Daemon) -> None:
    cfg = RspamdConfig(url=f"http://{rspamd.address}", timeout=30)
    bare = b"Subject: hi\r\n\r\nhello\r\n"  # no From, Date, Message-ID
    report = await external.rspamd_scan(cfg, bare, ENV, "Q1")
    assert report.symbols.get("MISSING_FROM", 0) > 0
    assert report.score == pytest.approx(sum(report.symbols.values()), abs=0.01)
    gtube = await external.rspamd_scan(cfg, message(f"test\n{GTUBE}\n"), ENV)
    assert gtube.action == "reject" and gtube.is_spam and "GTUBE" in gtube.symbols


async def test_rspamd_in_the_stage(rspamd: Daemon) -> None:
    cfg = SpamConfig(bayes={"enabled": False},
                     external={"rspamd": {"url": f"http://{rspamd.address}", "timeout": 30}})
    stage = SpamStage(Scorer(cfg))
    try:
        result = await stage.run(ctx(b"Subject: hi\r\n\r\nhello\r\n"))
    finally:
        stage.close()
    assert result.facts["external"]["rspamd"]["score"] > 0
    assert result.facts["symbols"]["RSPAMD"] == result.facts["external"]["rspamd"]["score"]


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP peer that accepts and never answers (a hung scanner)."""
    conns: list[asyncio.StreamWriter] = []

    async def hold(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for w in conns:
            w.close()
        server.close()
        await server.wait_closed()


def closed_port() -> int:
    return free_port()  # bound then closed: connections are refused


@pytest.mark.parametrize("on_error", ["pass", "tempfail"])
async def test_a_refused_scanner_follows_the_configured_action(on_error: str) -> None:
    cfg = SpamConfig(bayes={"enabled": False},
                     external=ExternalConfig(spamd=SpamdConfig(address=f"127.0.0.1:{closed_port()}"),
                                             on_error=on_error))
    stage = SpamStage(Scorer(cfg))
    try:
        result = await stage.run(ctx(message()))
    finally:
        stage.close()
    assert "error" in result.facts["external"]["spamd"]
    if on_error == "pass":
        assert result.action is Action.CONTINUE and result.facts["verdict"] == "ham"
    else:
        assert result.action is Action.TEMPFAIL and result.reply == SCANNER_UNAVAILABLE


async def test_a_hung_scanner_times_out_into_an_error(silent_server: int) -> None:
    cfg = RspamdConfig(url=f"http://127.0.0.1:{silent_server}", timeout=0.2)
    with pytest.raises(external.ScannerError, match="no answer within"):
        await external.rspamd_scan(cfg, message())


def test_unreadable_replies_are_scanner_errors() -> None:
    with pytest.raises(external.ScannerError):
        external.parse_spamd_reply(b"HELLO\r\n\r\n")
    with pytest.raises(external.ScannerError, match="EX_USAGE"):
        external.parse_spamd_reply(b"SPAMD/1.0 64 EX_USAGE\r\n\r\n")
    with pytest.raises(external.ScannerError, match="HTTP 500"):
        external.parse_rspamd_reply(b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\nno")
    with pytest.raises(external.ScannerError, match="unreadable"):
        external.parse_rspamd_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n{[}]")


def test_envelope_values_cannot_inject_http_headers() -> None:
    env = Envelope("a@example.com\r\nPassword: x", ["b@example.org"], helo="h\nX: y")
    _, _, request = external.rspamd_request(RspamdConfig(), b"m", env)
    head = request.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nPassword:" not in head and b"\nX: y" not in head


def test_free_port_is_refused_when_closed() -> None:
    port = closed_port()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1).close()


async def test_a_message_larger_than_max_size_is_not_sent_to_scanners() -> None:
    cfg = SpamConfig(bayes={"enabled": False}, max_size=2048,
                     external=ExternalConfig(spamd=SpamdConfig(address=f"127.0.0.1:{closed_port()}"),
                                             on_error="tempfail"))
    stage = SpamStage(Scorer(cfg))
    try:
        result = await stage.run(ctx(message(("x" * 70 + "\n") * 40)))
    finally:
        stage.close()
    assert result.action is Action.CONTINUE  # no connection was tried, so no tempfail
    assert "skipped" in result.facts["external"]["spamd"]
