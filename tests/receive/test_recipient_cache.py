"""Recipient verdicts in DATA_DIR/recipients.db: shared by gateways on one data_dir (the
worker processes), kept across restarts, expired and purged, and memory when unusable.

The next hop is the loopback mail store of tests/deliver/nexthop.py; it counts the RCPT
commands it sees, so an answer taken from the file is seen not to reach it.  Each gate
or gateway opens the file with its own SQLite connection, as each worker does.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

# The next hop of the delivery tests (conftest.py puts it on the path; `hop` knows every
# user but nobody@, 550, and busy@, 450).
from nexthop import NextHop
from receive_helpers import (
    LOCAL,
    Clock,
    Connect,
    StartGateway,
    mailbox,
    make_gate,
    rcpt_replies,
    verify_config,
)

from gateway.receive.addresses import Mailbox
from gateway.receive.recipient_probe import RecipientGate
from gateway.receive.recipients import Cached, Verdict
from gateway.receive.verify_store import FILE_NAME, VerdictStore
from gateway.shared_db import BUSY_TIMEOUT_MS


def _patient(gate: RecipientGate) -> RecipientGate:
    """``gate`` with its verdicts file waiting 2 s for a lock instead of the loop's 5 ms:
    on a loaded machine a purge thread descheduled while it holds the lock would make an
    answer go to memory (correct, tested in tests/gateway/test_shared_db.py), and this
    file's tests count the rows the file holds."""
    cache = gate.prober.cache if gate.prober is not None else None
    store = getattr(cache, "store", None)
    assert isinstance(store, VerdictStore)
    store.file.busy_timeout_ms = BUSY_TIMEOUT_MS  # for a connection opened again
    store.file.conn().execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return gate


def _mb(local: str) -> Mailbox:
    return mailbox(f"{local}@{LOCAL}")


async def _rcpt(port: int, raw: Connect, *locals_: str) -> list[str]:
    return await rcpt_replies(port, raw, *(f"{local}@{LOCAL}" for local in locals_))


def _rows_in_file(tmp_path: Path) -> list[str]:
    """Every address in the file, expired or not (what `cache list` does not show)."""
    with sqlite3.connect(tmp_path / FILE_NAME) as db:
        return [r[0] for r in db.execute("SELECT address FROM verdicts ORDER BY address")]


async def test_two_gateways_on_one_data_dir_probe_an_address_once(
    start_gateway: StartGateway, raw: Connect, hop: NextHop
) -> None:
    settings: dict[str, Any] = {
        "relay": {"recipients": {"verify": True}},
        "delivery": {"routes": {LOCAL: f"smtp://127.0.0.1:{hop.port}?tls=off"}}}
    first, second = await start_gateway(**settings), await start_gateway(**settings)
    [refused] = await _rcpt(first.port(), raw, "nobody")
    assert await _rcpt(second.port(), raw, "nobody", "alice") == [
        refused, "250 2.1.5 Recipient OK"]
    assert await _rcpt(first.port(), raw, "alice") == ["250 2.1.5 Recipient OK"]
    assert refused.startswith("550 5.1.1 ")
    assert hop.rcpt_args == [f"TO:<nobody@{LOCAL}>", f"TO:<alice@{LOCAL}>"]


async def test_a_restarted_gateway_keeps_the_verdicts(
    start_gateway: StartGateway, raw: Connect, hop: NextHop
) -> None:
    settings: dict[str, Any] = {
        "relay": {"recipients": {"verify": True}},
        "delivery": {"routes": {LOCAL: f"smtp://127.0.0.1:{hop.port}?tls=off"}}}
    before = await start_gateway(**settings)
    answers = await _rcpt(before.port(), raw, "alice", "nobody")
    await before.listeners.close(drain_timeout=1.0)
    after = await start_gateway(**settings)
    assert await _rcpt(after.port(), raw, "alice", "nobody") == answers
    assert len(hop.rcpt_args) == 2


async def test_an_expired_answer_is_asked_again_by_any_gate_and_purged_from_the_file(
    tmp_path: Path, hop: NextHop, gates: list[RecipientGate]
) -> None:
    clock = Clock()
    cfg = verify_config(tmp_path, hop.port, positive_ttl="1d", negative_ttl="1h")
    first = _patient(make_gate(gates, cfg, clock))
    await first.refusal(_mb("alice"))
    await first.refusal(_mb("nobody"))
    clock.now += 3600  # the refusal expires, the acceptance holds
    second = _patient(make_gate(gates, cfg, clock))
    assert await second.refusal(_mb("alice")) is None
    assert hop.rcpt_args == [f"TO:<alice@{LOCAL}>", f"TO:<nobody@{LOCAL}>"]
    # The second gate's first answer starts its purge of expired rows, in its thread.
    await second.refusal(_mb("bob"))
    deadline = time.monotonic() + 30
    while _rows_in_file(tmp_path) != [f"alice@{LOCAL}", f"bob@{LOCAL}"]:
        assert time.monotonic() < deadline, _rows_in_file(tmp_path)
        await asyncio.sleep(0.01)
    refusal = await first.refusal(_mb("nobody"))
    assert refusal is not None and refusal.reply.code == 550
    assert hop.rcpt_args.count(f"TO:<nobody@{LOCAL}>") == 2


async def test_a_reload_asks_again_about_unanswered_recipients_only(
    start_gateway: StartGateway, raw: Connect, hop: NextHop
) -> None:
    gw = await start_gateway(
        relay={"recipients": {"verify": True}},
        delivery={"routes": {LOCAL: f"smtp://127.0.0.1:{hop.port}?tls=off"}})
    answers = await _rcpt(gw.port(), raw, "busy", "nobody")
    assert [a[:3] for a in answers] == ["450", "550"]
    gw.listeners.reconfigure(gw.cfg)
    assert await _rcpt(gw.port(), raw, "busy", "nobody") == answers
    assert hop.rcpt_args.count(f"TO:<busy@{LOCAL}>") == 2
    assert hop.rcpt_args.count(f"TO:<nobody@{LOCAL}>") == 1


async def test_an_unusable_file_falls_back_to_memory_with_one_log_line(
    tmp_path: Path, hop: NextHop, gates: list[RecipientGate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="coffer")
    (tmp_path / FILE_NAME).mkdir()  # SQLite cannot open a directory
    gate = make_gate(gates, verify_config(tmp_path, hop.port), Clock())
    for local in ("alice", "nobody", "alice", "nobody"):
        await gate.refusal(_mb(local))
    assert hop.rcpt_args == [f"TO:<alice@{LOCAL}>", f"TO:<nobody@{LOCAL}>"]  # remembered
    [warning] = [getattr(r, "fields", {}) for r in caplog.records
                 if r.getMessage() == "recipient_cache_unavailable"]
    assert warning["file"] == str(tmp_path / FILE_NAME)


async def test_with_the_cache_off_each_gate_remembers_for_itself_and_no_file_is_made(
    tmp_path: Path, hop: NextHop, gates: list[RecipientGate]
) -> None:
    cfg = verify_config(tmp_path, hop.port, cache=False)
    for gate in (make_gate(gates, cfg, Clock()), make_gate(gates, cfg, Clock())):
        await gate.refusal(_mb("nobody"))
        await gate.refusal(_mb("nobody"))
    assert hop.rcpt_args == [f"TO:<nobody@{LOCAL}>"] * 2
    assert not (tmp_path / FILE_NAME).exists()


def test_the_file_keeps_at_most_max_rows_dropping_those_that_expire_first(
    tmp_path: Path,
) -> None:
    # The 2 s busy timeout: the purge thread may hold the lock while a put is made.
    store = VerdictStore(tmp_path / FILE_NAME, max_rows=2, purge_every=1,
                         busy_timeout_ms=BUSY_TIMEOUT_MS)
    try:
        for i, ttl in enumerate((300.0, 100.0, 400.0, 200.0)):
            store.put(f"u{i}@{LOCAL}", Cached(Verdict.UNKNOWN, "550", 1000.0 + ttl, 1000.0))
        # The purge runs in the store's thread (tests/receive/test_verify_store_purge.py).
        deadline = time.monotonic() + 30
        while len(store.rows(1000.0)) > 2:
            assert time.monotonic() < deadline, "surplus never purged"
            time.sleep(0.01)
        assert [r.address for r in store.rows(1000.0)] == [f"u0@{LOCAL}", f"u2@{LOCAL}"]
    finally:
        store.close()
