"""Sending rate limits on real sockets: an authenticated submission client is stopped
with 450 4.7.1 at MAIL or RCPT, nothing beyond the limit is spooled, the limit holds
across gateways on one data directory, and it lifts with time or `coffer ratelimit reset`.

Two gateways here (two sets of listeners, each with its own connection to
DATA_DIR/ratelimit.db) share one limit with an injected clock; two real worker
processes of `coffer serve` are in tests/service/test_rate_limits_workers.py, and two
processes racing on the file itself in test_rate_store.py.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from receive_helpers import (
    PASSWORD,
    USER,
    Connect,
    Gateway,
    RawClient,
    StartGateway,
    TlsFiles,
    tls_session,
)

from gateway import metrics
from gateway.cli import main as coffer
from gateway.config import RateLimitRule

SUBMISSION = {"name": "submission", "role": "submission", "address": "127.0.0.1:0",
              "tls": "starttls"}
HOUR = 3600.0
T0 = 500_000 * HOUR + 60  # a minute into a fixed window


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _limits(**rule: Any) -> dict[str, Any]:
    return {"listeners": [SUBMISSION],
            "rate_limits": [{"key": "auth_user", "roles": ["submission"], **rule}]}


async def _login(gw: Gateway, raw: Connect, tls_files: TlsFiles) -> RawClient:
    c = await tls_session(gw, raw, tls_files)
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    assert (await c.cmd(f"AUTH PLAIN {blob}")).startswith("235 ")
    return c


async def _send(c: RawClient, *rcpts: str) -> str:
    """One transaction; the first reply that is not a success, or the DATA reply."""
    reply = await c.cmd(f"MAIL FROM:<{USER}>")
    if not reply.startswith("250"):
        return reply
    for r in rcpts:
        reply = await c.cmd(f"RCPT TO:<{r}>")
        if not reply.startswith("250"):
            await c.cmd("RSET")
            return reply
    assert (await c.cmd("DATA")).startswith("354")
    return await c.cmd(b"Subject: hi\r\n\r\nhi\r\n.\r\n")


def _rejected() -> float:
    return metrics.REGISTRY.get_sample_value("coffer_messages_rejected_total",
                                             {"reason": "rate_limited"}) or 0.0


async def test_messages_over_the_limit_get_450_4_7_1_at_mail_and_are_not_spooled(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="coffer")
    before = _rejected()
    gw = await start_gateway(clock=Clock(), **_limits(messages="3/1h"))
    c = await _login(gw, raw, tls_files)
    for _ in range(3):
        assert (await _send(c, "x@ext.example")).startswith("250 ")
    assert await c.cmd(f"MAIL FROM:<{USER}>") == (
        f"450 4.7.1 Sending rate limit exceeded for user {USER} (3 messages per 1h); "
        "try again later")
    assert (await c.cmd(f"MAIL FROM:<{USER}>")).startswith("450 4.7.1 ")
    assert len(gw.spooled()) == 3
    assert _rejected() == before + 2
    warnings = [r for r in caplog.records if r.getMessage() == "rate_limit_exceeded"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # once per window
    assert getattr(warnings[0], "fields", {})["key"] == USER


async def test_recipients_over_the_limit_get_450_4_7_1_at_rcpt(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await start_gateway(clock=Clock(), **_limits(recipients="5/1h"))
    c = await _login(gw, raw, tls_files)
    assert (await _send(c, "a@ext.example", "b@ext.example", "c@ext.example",
                        "d@ext.example")).startswith("250 ")
    assert await c.cmd(f"MAIL FROM:<{USER}>") == "250 2.1.0 Sender OK"
    assert await c.cmd("RCPT TO:<e@ext.example>") == "250 2.1.5 Recipient OK"
    assert (await c.cmd("RCPT TO:<f@ext.example>")).startswith(
        f"450 4.7.1 Sending rate limit exceeded for user {USER} (5 recipients per 1h)")
    assert (await c.cmd("DATA")).startswith("354")
    assert (await c.cmd(b"Subject: hi\r\n\r\nhi\r\n.\r\n")).startswith("250 ")
    assert sorted(r for m in gw.spooled() for r in m.envelope.rcpt_to) == [
        f"{x}@ext.example" for x in "abcde"]


async def test_the_limit_lifts_as_the_window_slides(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    clock = Clock()
    gw = await start_gateway(clock=clock, **_limits(messages="2/1h"))
    c = await _login(gw, raw, tls_files)
    for _ in range(2):
        assert (await _send(c, "x@ext.example")).startswith("250 ")
    assert (await _send(c, "x@ext.example")).startswith("450 4.7.1 ")
    clock.now += HOUR  # the previous hour still weighs 59/60 of 2: no room yet
    assert (await _send(c, "x@ext.example")).startswith("450 4.7.1 ")
    clock.now += HOUR / 2  # half of it: room for one
    assert (await _send(c, "x@ext.example")).startswith("250 ")
    assert (await _send(c, "x@ext.example")).startswith("450 4.7.1 ")
    clock.now += 2 * HOUR
    assert (await _send(c, "x@ext.example")).startswith("250 ")
    assert len(gw.spooled()) == 4


async def test_two_gateways_on_one_data_dir_share_the_limit(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    clock = Clock()
    one = await start_gateway(clock=clock, **_limits(messages="3/1h"))
    two = await start_gateway(clock=clock, **_limits(messages="3/1h"))
    c1, c2 = await _login(one, raw, tls_files), await _login(two, raw, tls_files)
    assert (await _send(c1, "x@ext.example")).startswith("250 ")
    assert (await _send(c2, "x@ext.example")).startswith("250 ")
    assert (await _send(c1, "x@ext.example")).startswith("250 ")
    assert (await _send(c2, "x@ext.example")).startswith("450 4.7.1 ")
    assert (await _send(c1, "x@ext.example")).startswith("450 4.7.1 ")
    assert len(one.spooled()) + len(two.spooled()) == 3


async def test_an_exempt_network_is_not_counted(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await start_gateway(clock=Clock(), **_limits(messages="1/1h",
                                                      exempt_networks=["127.0.0.0/8"]))
    c = await _login(gw, raw, tls_files)
    for _ in range(3):
        assert (await _send(c, "x@ext.example")).startswith("250 ")


def _config_file(gw: Gateway, tmp_path: Path) -> Path:
    path = tmp_path / "coffer.yaml"
    path.write_text(f"data_dir: {json.dumps(str(gw.cfg.data_dir))}\n"
                    "listeners:\n  - name: in\n    tls: none\n")
    return path


async def test_coffer_ratelimit_list_shows_the_key_and_reset_lifts_the_block(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gw = await start_gateway(**_limits(messages="2/1h"))  # the real clock, as the CLI's
    c = await _login(gw, raw, tls_files)
    for _ in range(2):
        assert (await _send(c, "x@ext.example")).startswith("250 ")
    assert (await _send(c, "x@ext.example")).startswith("450 4.7.1 ")
    conf = str(_config_file(gw, tmp_path))
    capsys.readouterr()
    assert coffer(["ratelimit", "list", "--json", "--config", conf]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["key"], row["kind"], row["count"], row["limit"], row["state"]) == (
        USER, "messages", 2, 2, "over")
    assert coffer(["ratelimit", "reset", USER, "--config", conf]) == 0
    # Audited like `coffer queue hold`: one log line naming the key and the operator.
    [audit] = [json.loads(line) for line in capsys.readouterr().err.splitlines()
               if '"ratelimit_reset"' in line]
    assert audit["key"] == USER and audit["by"]
    assert (await _send(c, "x@ext.example")).startswith("250 ")
    assert coffer(["ratelimit", "reset", "nobody@local.example", "--config", conf]) == 1


async def test_a_reload_applies_new_limits_at_once_and_keeps_the_counts(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await start_gateway(clock=Clock(), **_limits(messages="2/1h"))
    c = await _login(gw, raw, tls_files)
    for _ in range(2):
        assert (await _send(c, "x@ext.example")).startswith("250 ")
    assert (await _send(c, "x@ext.example")).startswith("450 4.7.1 ")
    rules = [{"key": "auth_user", "roles": ["submission"], "messages": "3/1h"}]
    gw.listeners.reconfigure(gw.cfg.model_copy(update={
        "rate_limits": [RateLimitRule.model_validate(r) for r in rules]}))
    assert (await _send(c, "x@ext.example")).startswith("250 ")  # the third of three
    assert (await _send(c, "x@ext.example")).startswith("450 4.7.1 ")
