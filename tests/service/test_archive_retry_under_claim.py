"""When the archive comes back the service makes what its outage deferred due now: a
``retry`` event per message, written under the message's claim (gateway.service
._retry_deferred_by_archive), so an attempt in progress cannot race or undo it."""

from __future__ import annotations

import time
from pathlib import Path

from claimkit import claimed_by_another_process

from gateway.archive_health import ARCHIVE_UNAVAILABLE
from gateway.envelope import Envelope
from gateway.queue.spool import Spool
from gateway.service import _retry_deferred_by_archive


def _deferred(spool: Spool, error: str = str(ARCHIVE_UNAVAILABLE)) -> str:
    qid = spool.store(Envelope("a@src.test", ["b@dst.test"]), b"Subject: x\r\n\r\nbody\r\n")
    spool.append_event(qid, {"ev": "attempt", "attempts": 1, "next_at": time.time() + 600,
                             "error": error})
    return qid


def _events(spool: Spool, qid: str) -> list[str]:
    return [e["ev"] for e in spool.events(qid)]


def test_messages_the_archive_deferred_are_made_due_and_others_left_alone(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    archive, other = _deferred(spool), _deferred(spool, "451 4.4.1 no answer")
    assert _retry_deferred_by_archive(spool, time.time()) == [archive]
    assert _events(spool, archive) == ["attempt", "retry"]
    assert _events(spool, other) == ["attempt"]
    assert spool.read_state(archive, []).next_attempt_at == 0.0


def test_a_message_claimed_by_an_attempt_in_progress_is_skipped_not_written(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", fsync=False)
    busy, free = _deferred(spool), _deferred(spool)
    with claimed_by_another_process(spool, busy):
        assert _retry_deferred_by_archive(spool, time.time()) == [free]
    assert _events(spool, busy) == ["attempt"]
    # Left for the next pass, which finds it free.
    assert _retry_deferred_by_archive(spool, time.time()) == [busy]


def test_a_claim_this_process_keeps_for_its_worker_is_not_taken_over(tmp_path: Path) -> None:
    """A worker keeps the claim of a message whose delivery results the disk refused
    (Spool.retain): a retry taking that claim would let it go when done, and another
    process could deliver the message again before those results are written."""
    spool = Spool(tmp_path / "spool", fsync=False)
    qid = _deferred(spool)
    with spool.claimed(qid) as fd:
        assert fd is not None
        spool.retain(qid, fd)
    assert _retry_deferred_by_archive(spool, time.time()) == []
    assert _events(spool, qid) == ["attempt"]
    with Spool(tmp_path / "spool", fsync=False).claim(qid) as mine:
        assert not mine  # still kept: no other process can take it
    with spool.claim(qid) as mine:
        assert mine  # the worker itself takes it back
    spool.keep_claims(0)
