"""`coffer recipients verify|cache list|cache forget` on the verdicts file the gateway uses.

The next hop is the loopback mail store of tests/deliver/nexthop.py; a RecipientGate on
the same data_dir stands for the running gateway, so what the CLI stores or forgets is
seen at the next RCPT, by counting the RCPTs the next hop receives.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import load
from gateway.receive.addresses import parse_path
from gateway.receive.recipient_probe import RecipientGate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "deliver"))
from nexthop import NextHop

LOCAL = "local.example"
UNKNOWN = "550 5.1.1 <nobody@local.example>: User unknown in virtual mailbox table"


@pytest.fixture
async def hop() -> AsyncIterator[NextHop]:
    h = NextHop(rules={f"nobody@{LOCAL}": UNKNOWN})
    await h.start()
    yield h
    await h.stop()


@pytest.fixture
def conf(tmp_path: Path, hop: NextHop) -> str:
    path = tmp_path / "coffer.yaml"
    path.write_text(
        f"data_dir: {json.dumps(str(tmp_path))}\n"
        "listeners:\n  - {name: in, tls: none}\n"
        f"relay:\n  local_domains: [{LOCAL}]\n  recipients: {{verify: true}}\n"
        f"delivery:\n  routes: {{{LOCAL}: 'smtp://127.0.0.1:{hop.port}?tls=off'}}\n")
    return str(path)


@pytest.fixture
async def gateway(conf: str) -> AsyncIterator[RecipientGate]:
    """The running gateway's recipient checks (the real clock, as the CLI's)."""
    gate = RecipientGate.from_config(load(Path(conf)))
    yield gate
    await gate.aclose()


async def _rcpt(gate: RecipientGate, local: str) -> int:
    refusal = await gate.refusal(parse_path(f"<{local}@{LOCAL}>"))
    return 250 if refusal is None else refusal.reply.code


async def _coffer(*argv: str) -> int:
    # In a thread: `verify` runs its own event loop while the next hop serves on this one.
    return await asyncio.to_thread(main, list(argv))


def _json(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


async def test_verify_prints_the_next_hops_reply_and_the_gateway_uses_the_verdict(
    conf: str, hop: NextHop, gateway: RecipientGate, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _coffer("recipients", "verify", f"Nobody@{LOCAL}", "--config", conf) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"Nobody@{LOCAL}: unknown",
                       f"next hop 127.0.0.1[127.0.0.1]:{hop.port} answered: {UNKNOWN}"]
    assert out[2].startswith("remembered until ")
    assert await _rcpt(gateway, "nobody") == 550
    assert hop.rcpt_args == [f"TO:<Nobody@{LOCAL}>"]  # the gateway did not ask again


async def test_verify_probes_again_even_when_an_answer_is_remembered(
    conf: str, hop: NextHop, gateway: RecipientGate, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _rcpt(gateway, "alice") == 250
    assert await _coffer("recipients", "verify", f"alice@{LOCAL}", "--json",
                         "--config", conf) == 0
    [row] = _json(capsys.readouterr().out)
    assert (row["verdict"], row["reply"][:3], row["stored"]) == ("valid", "250", True)
    assert len(hop.rcpt_args) == 2


async def test_verify_refuses_an_address_outside_the_local_domains(
    conf: str, hop: NextHop, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _coffer("recipients", "verify", "someone@ext.example", "--config", conf) == 2
    assert "not in relay.local_domains" in capsys.readouterr().err
    assert hop.connections == 0


async def test_list_shows_the_verdicts_and_unknown_only_the_refused(
    conf: str, gateway: RecipientGate, capsys: pytest.CaptureFixture[str]
) -> None:
    await _rcpt(gateway, "alice")
    await _rcpt(gateway, "nobody")
    capsys.readouterr()
    assert await _coffer("recipients", "cache", "list", "--json", "--config", conf) == 0
    rows = _json(capsys.readouterr().out)
    assert [(r["address"], r["verdict"]) for r in rows] == [
        (f"alice@{LOCAL}", "valid"), (f"nobody@{LOCAL}", "unknown")]
    assert await _coffer("recipients", "cache", "list", "--unknown", "--config", conf) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith(f"nobody@{LOCAL}") and line.endswith(UNKNOWN)


async def test_forget_makes_the_next_rcpt_probe_again_and_is_logged_with_the_operator(
    conf: str, hop: NextHop, gateway: RecipientGate, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _rcpt(gateway, "nobody") == 550
    hop.rules.pop(f"nobody@{LOCAL}")  # the user is created in the mail store
    assert await _rcpt(gateway, "nobody") == 550  # still the remembered answer
    capsys.readouterr()
    assert await _coffer("recipients", "cache", "forget", f"NOBODY@{LOCAL}",
                         "--config", conf) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"NOBODY@{LOCAL}: 1 verdict(s) forgotten")
    [audit] = [json.loads(line) for line in captured.err.splitlines()
               if '"recipient_cache_forget"' in line]
    assert audit["target"] == f"NOBODY@{LOCAL}" and audit["verdicts"] == 1 and audit["by"]
    assert await _rcpt(gateway, "nobody") == 250
    assert hop.rcpt_args.count(f"TO:<nobody@{LOCAL}>") == 2


async def test_forget_a_domain_or_all_and_nothing_to_forget_is_exit_1(
    conf: str, gateway: RecipientGate, capsys: pytest.CaptureFixture[str]
) -> None:
    for local in ("alice", "bob", "nobody"):
        await _rcpt(gateway, local)
    assert await _coffer("recipients", "cache", "forget", "@other.example",
                         "--config", conf) == 1
    assert await _coffer("recipients", "cache", "forget", "@LOCAL.example", "--json",
                         "--config", conf) == 0
    assert _json(capsys.readouterr().out) == [
        {"target": "@LOCAL.example", "action": "forget", "verdicts": 3}]
    await _rcpt(gateway, "alice")
    assert await _coffer("recipients", "cache", "forget", "--all", "--config", conf) == 0
    assert await _coffer("recipients", "cache", "forget", "--all", "--config", conf) == 1
    assert await _coffer("recipients", "cache", "forget", "not an address",
                         "--config", conf) == 2
