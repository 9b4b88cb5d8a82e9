"""The indexer loop of `coffer serve` works through a backlog without pausing, and under
steady traffic takes about a second of mail per batch (gateway.service.index_loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

import gateway.service as service
from archive.facade import Archive
from archive.metadata import Metadata
from gateway.archive_stage import ArchiveStage
from gateway.config import defaults
from gateway.envelope import Envelope
from gateway.pipeline import MessageContext


def _message(i: int) -> bytes:
    return (f"From: a@src.test\r\nTo: b@dst.test\r\nSubject: pacing {i}\r\n"
            f"Message-ID: <{i}@src.test>\r\n\r\nbody {i}\r\n").encode()


async def _archive(stage: ArchiveStage, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await stage.run(MessageContext(
            Envelope("a@src.test", ["b@dst.test"], received_at=1_700_000_000.0 + i),
            _message(i), qid=f"Q{i}"))


async def _until(cond: Callable[[], bool], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch the loop's indexer runs."""
    seen: list[int] = []
    run_once = service._StageIndexer.run_once

    def counting(self: service._StageIndexer, batch: int = 500) -> int:
        n = run_once(self, batch)
        seen.append(n)
        return n

    monkeypatch.setattr(service._StageIndexer, "run_once", counting)
    monkeypatch.setattr(service, "INDEX_BATCH", 4)
    return seen


async def test_a_backlog_is_indexed_without_pauses_then_batches_wait_for_idle(
        tmp_path: Path, batches: list[int]) -> None:
    cfg = defaults(tmp_path)
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    stage = ArchiveStage(Archive.open(tmp_path), meta)
    await _archive(stage, 10)  # a backlog: more than two full batches
    loop_task = asyncio.create_task(service.index_loop(stage, cfg, idle=30.0))
    try:
        # Full pages are worked on back to back; the partial one ends the run.
        assert await _until(lambda: not meta.unindexed(), 20.0), batches
        assert batches[:3] == [4, 4, 2]
        await _archive(stage, 3, start=10)
        await asyncio.sleep(0.5)
        assert len(batches) == 3  # waiting out ``idle``: steady traffic gathers
        assert len(meta.unindexed()) == 3
    finally:
        loop_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop_task
        await stage.close()


async def test_an_idle_loop_indexes_new_mail_within_about_idle(
        tmp_path: Path, batches: list[int]) -> None:
    cfg = defaults(tmp_path)
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    stage = ArchiveStage(Archive.open(tmp_path), meta)
    loop_task = asyncio.create_task(service.index_loop(stage, cfg, idle=0.2))
    try:
        await asyncio.sleep(0.3)
        await _archive(stage, 3)
        assert await _until(lambda: not meta.unindexed(), 5.0)
        assert sum(batches) == 3
    finally:
        loop_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop_task
        await stage.close()
