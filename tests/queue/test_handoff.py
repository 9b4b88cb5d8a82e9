"""Claims kept from the store for this process's worker (Spool.keep_claims).

The fast path must give the worker exactly what reading the file back gives, keep
every other claimant out until the worker takes the message, and never keep a claim
nobody will take.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bench.relay import make_messages, message_sizes
from gateway.config import Config, QueueConfig
from gateway.deliver.deliverer import Outcome
from gateway.envelope import Envelope, TlsInfo
from gateway.offload import HopPool
from gateway.pipeline import StageResult
from gateway.queue.spool import Spool, store_from_loop
from gateway.queue.state import RcptStatus
from gateway.queue.worker import QueueWorker

ROOT = Path(__file__).resolve().parents[2]


def _corpus_messages(limit: int) -> list[bytes]:
    root = os.environ.get("COFFER_CORPUS") or str(ROOT.parent / "shared" / "corpus")
    mime = Path(root) / "mime"
    if not mime.is_dir():
        return []
    files = sorted(p for p in mime.rglob("*") if p.is_file() and p.stat().st_size < 300_000)
    return [p.read_bytes() for p in files[:limit]]


def _messages() -> list[bytes]:
    return make_messages(message_sizes(40, 11), 11) + _corpus_messages(40)


def _envelope(i: int) -> Envelope:
    return Envelope(
        mail_from="" if i % 7 == 0 else f"sénder{i}@src.example",
        rcpt_to=[f"rcpt{j}@dst.example" for j in range(1 + i % 3)],
        client_ip="127.0.0.1", client_port=40000 + i, helo="client.example",
        tls=TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384") if i % 2 else None,
        auth_user="alice" if i % 5 == 0 else None, received_at=1_700_000_000.0 + i / 7,
        mail_options=["BODY=8BITMIME"] + (["SMTPUTF8"] if i % 3 == 0 else []),
        rcpt_options=[["NOTIFY=FAILURE"] for _ in range(1 + i % 3)],
    )


def _facts(i: int) -> dict[str, Any]:
    return {
        "trace": [{"stage": s, "action": "continue", "ms": 0.125 * i} for s in ("spf", "spam")],
        "spam": {"score": i / 3, "tests": ["BAYES_50", "ünïcode"], "n": i},
        "runner": {"action": "quarantine"} if i % 11 == 0 else {},
    }


@pytest.fixture
async def pool() -> AsyncIterator[HopPool]:
    p = HopPool(4)
    yield p
    p.shutdown()


async def test_a_kept_claim_loads_exactly_what_the_file_holds(
    tmp_path: Path, pool: HopPool
) -> None:
    spool = Spool(tmp_path)
    spool.keep_claims(1000)
    reader = Spool(tmp_path)  # reads the files back, the ordinary way
    messages = _messages()
    qids = [await store_from_loop(spool, pool, _envelope(i), data, _facts(i))
            for i, data in enumerate(messages)]
    # An operator's command appends to the state log without the claim.
    reader.append_event(qids[3], {"ev": "held", "stage": "operator", "error": "wait"})
    for qid in qids:
        with spool.claimed_sized(qid) as claim:
            assert claim is not None
            fd, size = claim
            assert qid in spool._fresh  # the hand-off, not a fresh open
            assert size == spool.msg_path(qid).stat().st_size
            kept = spool.load(qid, fd, size)
            assert kept == reader.load(qid)
            assert kept == spool.load(qid)  # without the claim's descriptor: from the file
    assert spool.load(qids[3]).state.held


async def test_a_kept_claim_keeps_everyone_else_out_until_it_is_taken(
    tmp_path: Path, pool: HopPool
) -> None:
    spool = Spool(tmp_path)
    spool.keep_claims(10)
    other = Spool(tmp_path)  # another open file description: like another process
    qid = await store_from_loop(spool, pool, _envelope(1), b"Subject: x\r\n\r\nbody\r\n")
    with other.claim(qid) as ok:
        assert ok is False
    with spool.claimed_sized(qid) as claim:
        assert claim is not None
        with other.claim(qid) as ok:
            assert ok is False
    with other.claim(qid) as ok:  # the worker let it go: the ordinary claim again
        assert ok is True
    with spool.claimed_sized(qid) as claim:  # taken once only
        assert claim is not None
        assert qid not in spool._fresh


async def test_claims_nobody_will_take_are_let_go(tmp_path: Path, pool: HopPool) -> None:
    spool = Spool(tmp_path)
    other = Spool(tmp_path)
    spool.keep_claims(3)
    qids = [await store_from_loop(spool, pool, _envelope(i), b"x\r\n") for i in range(5)]

    def free(qid: str) -> bool:
        with other.claim(qid) as ok:
            return ok

    # Beyond the limit the oldest go first.
    assert [free(q) for q in qids] == [True, True, False, False, False]
    spool.append_event(qids[2], {"ev": "held", "stage": "decide", "error": "x"})  # runner held
    assert free(qids[2])
    spool.remove(qids[3])  # a failed split's cleanup
    assert not spool.msg_path(qids[3]).exists()
    assert free(qids[4]) is False
    spool.keep_claims(0)  # the worker stops
    assert free(qids[4])
    assert spool._handoffs == {}
    qid = await store_from_loop(spool, pool, _envelope(9), b"y\r\n")  # not kept any more
    assert free(qid)


def test_the_synchronous_store_keeps_its_claim_too(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.keep_claims(4)
    qid = spool.store(_envelope(2), b"Subject: s\r\n\r\nb\r\n", {"k": [1, 2]})
    with Spool(tmp_path).claim(qid) as ok:
        assert ok is False
    with spool.claimed_sized(qid) as claim:
        assert claim is not None
        assert spool.load(qid, *claim) == Spool(tmp_path).load(qid)


async def test_a_kept_claim_dies_with_its_process(tmp_path: Path) -> None:
    # kill -9 between the 250 and the worker taking it: the kernel drops the lock and
    # the message is there for whoever comes next, intact.
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import asyncio, sys
            from pathlib import Path
            from gateway.envelope import Envelope
            from gateway.offload import HopPool
            from gateway.queue.spool import Spool, store_from_loop
            async def main():
                spool = Spool(Path({str(tmp_path)!r}))
                spool.keep_claims(8)
                env = Envelope(mail_from="a@src.example", rcpt_to=["b@dst.example"])
                data = b"Subject: k\\r\\n\\r\\nx\\r\\n"
                qid = await store_from_loop(spool, HopPool(1), env, data)
                print(qid, flush=True)
                sys.stdin.readline()
            asyncio.run(main())
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    spool = Spool(tmp_path)
    try:
        assert child.stdout is not None
        qid = child.stdout.readline().strip()
        with spool.claim(qid) as ok:
            assert ok is False  # kept for the child's worker
    finally:
        child.kill()
        child.wait()
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.stdout.close()
    with spool.claimed_sized(qid) as claim:
        assert claim is not None
        msg = spool.load(qid, *claim)
    assert msg.data == b"Subject: k\r\n\r\nx\r\n"
    assert msg.state.pending == ["b@dst.example"]


class _Archive:
    name = "archive"
    once = True

    async def run(self, ctx: Any) -> StageResult:
        return StageResult(facts={"archive": {"id": ctx.qid}})


class _Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, list[str]]] = []

    async def deliver(self, envelope: Envelope, data: bytes, rcpts: Any, *,
                      qid: str = "") -> list[Outcome]:
        self.got.append((qid, data, list(rcpts)))
        return [Outcome(r, RcptStatus.DELIVERED, "250 ok", "test") for r in rcpts]

    async def aclose(self) -> None:
        pass


async def test_a_running_worker_takes_what_its_process_spooled(
    tmp_path: Path, pool: HopPool
) -> None:
    spool = Spool(tmp_path / "spool")
    sink = _Sink()
    cfg = Config(hostname="coffer.test", data_dir=tmp_path, queue=QueueConfig())
    worker = QueueWorker(cfg, spool, [_Archive()], sink, executor=pool)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0)
    messages = make_messages(message_sizes(12, 5), 5)
    qids = []
    for i, data in enumerate(messages):
        facts = _facts(i + 1)
        del facts["runner"]  # no quarantine: every message is delivered
        qid = await store_from_loop(spool, pool, _envelope(i + 1), data, facts)
        qids.append(qid)
        worker.notify(qid)
    for _ in range(500):
        if len(sink.got) == len(messages) and not spool.queue_ids():
            break
        await asyncio.sleep(0.01)
    await worker.stop()
    await task
    assert sorted(q for q, _, _ in sink.got) == sorted(qids)
    assert {q: d for q, d, _ in sink.got} == dict(zip(qids, messages, strict=True))
    assert spool.queue_ids() == []
    assert spool._handoffs == {} and spool._fresh == {}
    # Stopped: claims are no longer kept (nothing would take them).
    qid = await store_from_loop(spool, pool, _envelope(1), b"late\r\n")
    with Spool(spool.root).claim(qid) as ok:
        assert ok is True


async def test_the_state_mark_tells_a_kept_claim_whether_to_look_for_a_log(
    tmp_path: Path, pool: HopPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    spool.keep_claims(10)
    operator = Spool(tmp_path)
    plain, held, own, late = [
        await store_from_loop(spool, pool, _envelope(i), b"Subject: m\r\n\r\nx\r\n")
        for i in range(1, 5)]
    operator.append_event(held, {"ev": "held", "stage": "operator", "error": "stop"})
    assert spool.msg_path(held).stat().st_mode & 0o777 == 0o700
    assert spool.msg_path(plain).stat().st_mode & 0o777 == 0o600

    looked: list[str] = []
    real = Spool._state_events

    def spy(self: Spool, qid: str) -> list[dict[str, Any]]:
        if self is spool:
            looked.append(qid)
        return real(self, qid)

    monkeypatch.setattr(Spool, "_state_events", spy)
    for qid in (plain, held):
        with spool.claimed_sized(qid) as claim:
            assert claim is not None
            assert spool.load(qid, *claim) == operator.load(qid)
            spool.remove(qid, sync=False)
    assert looked == [held]
    # The worker's own records (a deferral, a bounce) are removed with the message.
    with spool.claimed_sized(own) as claim:
        assert claim is not None
        spool.load(own, *claim)
        spool.append_events(own, [{"ev": "rcpt", "rcpt": "rcpt0@dst.example",
                                   "status": "bounced", "reply": "550 no", "route": "t"}])
        spool.remove(own)
    # So is a log an operator begins while the worker holds the message.
    with spool.claimed_sized(late) as claim:
        assert claim is not None
        assert spool.load(late, *claim).state.held is False
        operator.append_event(late, {"ev": "held", "stage": "operator", "error": "late"})
        spool.remove(late)
    assert sorted(p.name for p in spool.queue_dir.iterdir()) == []
