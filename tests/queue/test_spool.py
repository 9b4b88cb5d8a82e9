"""The spool keeps every acknowledged message, and never half of one."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.envelope import Envelope, TlsInfo
from gateway.errors import SpoolError, SpoolFullError
from gateway.offload import HopPool
from gateway.queue.spool import Spool, _FreeSpace, store_from_loop
from gateway.queue.state import RcptStatus


def _env(*rcpts: str) -> Envelope:
    return Envelope(
        mail_from="alice@src.example", rcpt_to=list(rcpts) or ["bob@dst.example"],
        client_ip="127.0.0.1", helo="client.example", tls=TlsInfo("TLSv1.3", "TLS_AES_256_GCM"),
        auth_user="alice", received_at=1_700_000_000.0,
    )


def test_store_then_load_returns_exact_bytes_and_envelope(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = b"Subject: hi\r\n\r\nbody \xff\x00 bytes\r\n"
    qid = spool.store(_env("bob@dst.example", "carol@dst.example"), data, {"check": {"x": 1}})
    msg = spool.load(qid)
    assert msg.data == data
    assert msg.envelope == _env("bob@dst.example", "carol@dst.example")
    assert msg.facts == {"check": {"x": 1}}
    assert msg.state.pending == ["bob@dst.example", "carol@dst.example"]
    assert list(spool.tmp_dir.iterdir()) == []


def test_queue_ids_are_unique_and_time_ordered(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ids = [spool.store(_env(), b"x") for _ in range(50)]
    assert len(set(ids)) == 50
    assert spool.queue_ids() == sorted(ids)


def test_recipient_final_status_is_never_revised(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qid = spool.store(_env("a@d.example", "b@d.example"), b"x")
    spool.append_events(qid, [
        {"ev": "rcpt", "rcpt": "a@d.example", "status": "delivered", "reply": "250 ok"},
        {"ev": "rcpt", "rcpt": "b@d.example", "status": "deferred", "reply": "451 later"},
    ])
    # A later, conflicting event for a delivered recipient must not make it pending again.
    spool.append_event(qid, {"ev": "rcpt", "rcpt": "a@d.example", "status": "deferred"})
    state = spool.load(qid).state
    assert state.recipients["a@d.example"].status is RcptStatus.DELIVERED
    assert state.pending == ["b@d.example"]


def test_torn_last_state_line_is_ignored(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qid = spool.store(_env("a@d.example"), b"x")
    spool.append_event(qid, {"ev": "rcpt", "rcpt": "a@d.example", "status": "delivered"})
    with open(spool.state_path(qid), "ab") as fh:
        fh.write(b'{"ev":"rcpt","rcpt":"a@d.exa')  # crash in the middle of an append
    assert spool.load(qid).state.finished


def test_stage_records_follow_the_message_and_leave_its_bytes_alone(tmp_path: Path) -> None:
    # After-queue stage completions are appended to the .msg file: no .state file
    # is created for them, the message reads back byte for byte, a torn last
    # record (crash mid-append) is ignored, and they fold with the .state log.
    spool = Spool(tmp_path)
    data = b"Subject: hi\r\n\r\n{\"ev\":\"stage\",\"stage\":\"fake\"}\n"
    qid = spool.store(_env("a@d.example", "b@d.example"), data)
    spool.append_stage(qid, {"ev": "stage", "stage": "transform"}, sync=False)
    spool.append_stage(qid, {"ev": "stage", "stage": "archive", "facts": {"sha256": "ab"}})
    assert not spool.state_path(qid).exists()
    with open(spool.msg_path(qid), "ab") as fh:
        fh.write(b'{"ev":"stage","stage":"tor')
    spool.append_event(qid, {"ev": "rcpt", "rcpt": "a@d.example", "status": "delivered"})
    msg = spool.load(qid)
    assert msg.data == data
    assert msg.state.stages_done == {"transform", "archive"}
    assert msg.state.stage_facts == {"archive": {"sha256": "ab"}}
    assert msg.state.pending == ["b@d.example"]
    assert spool.read_state(qid, ["a@d.example", "b@d.example"]).stages_done == \
        {"transform", "archive"}
    assert [e["ev"] for e in spool.events(qid)] == ["stage", "stage", "rcpt"]
    with pytest.raises(ValueError):
        spool.append_stage(qid, {"ev": "rcpt", "rcpt": "b@d.example", "status": "delivered"})


def test_truncated_spool_file_is_reported_not_delivered(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qid = spool.store(_env(), b"0123456789")
    path = spool.msg_path(qid)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(SpoolError, match="truncated"):
        spool.load(qid)


def test_claim_is_exclusive_across_processes(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qid = spool.store(_env(), b"x")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from gateway.queue.spool import Spool
            with Spool(Path({str(tmp_path)!r})).claim({qid!r}) as ok:
                print(ok, flush=True)
                sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        with spool.claim(qid) as ok:
            assert ok is False
    finally:
        holder.kill()  # kill -9: the kernel must release the lock
        holder.wait()
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.stdout.close()
    with spool.claim(qid) as ok:
        assert ok is True


def test_disk_full_raises_spool_full_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SpoolFullError):
        spool.store(_env(), b"x" * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert spool.queue_ids() == []
    assert list(spool.tmp_dir.iterdir()) == []


def test_free_space_reserve_refuses_before_writing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=1 << 62)  # more than any disk has
    assert not spool.has_room(10)
    with pytest.raises(SpoolFullError):
        spool.store(_env(), b"x")
    assert spool.queue_ids() == []


def test_remove_forgets_message_and_state(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qid = spool.store(_env(), b"x")
    spool.append_event(qid, {"ev": "attempt", "attempts": 1})
    spool.remove(qid)
    assert not spool.exists(qid)
    assert not spool.state_path(qid).exists()


def test_clean_tmp_removes_only_stale_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    stale = spool.tmp_dir / "OLD.msg"
    stale.write_bytes(b"half")
    time.sleep(0.3)  # setting an old mtime (utime) would make the ctime new
    fresh = spool.tmp_dir / "NEW.msg"
    fresh.write_bytes(b"being written")
    assert spool.clean_tmp(older_than=0.2) == 1
    assert not stale.exists() and fresh.exists()


def test_clean_tmp_keeps_a_reused_file_just_renamed_in_with_its_old_mtime(
        tmp_path: Path) -> None:
    # A finished message's file taken from free/ for a new message is renamed into
    # tmp/ and written over a moment later; a process starting in between must not
    # take it for a crash's leftover by its old modification time.
    spool = Spool(tmp_path)
    old = Path(spool.recycler.dir) / "X.msg"
    old.write_bytes(b"a delivered message")
    time.sleep(0.3)
    taken = spool.tmp_dir / "NEW.msg"
    os.rename(old, taken)
    assert taken.stat().st_mtime < time.time() - 0.2
    assert spool.clean_tmp(older_than=0.2) == 0
    assert taken.exists()


def test_load_through_the_claim_descriptor_equals_load_by_name(tmp_path: Path) -> None:
    # The worker reads a message through its claim's descriptor; it must see exactly
    # what a load by name sees: bytes, envelope, facts, stage records, state log, and
    # a once-stage's saved output.
    spool = Spool(tmp_path)
    data = b"Subject: hi\r\n\r\n" + bytes(range(256)) * 300 + b"\r\n"
    qid = spool.store(_env("a@d.example", "b@d.example"), data, {"check": {"x": [1, "\xe9"]}})
    spool.append_stage(qid, {"ev": "stage", "stage": "archive", "facts": {"id": 7}}, sync=False)
    spool.append_event(qid, {"ev": "rcpt", "rcpt": "a@d.example", "status": "delivered",
                             "reply": "250 ok"})
    for step in ("plain", "with .data"):
        if step == "with .data":
            spool.save_data(qid, b"Subject: changed\r\n\r\nx\r\n")
        with spool.claimed(qid) as fd:
            assert fd is not None
            by_fd = spool.load(qid, fd)
        by_name = spool.load(qid)
        assert by_fd == by_name
    assert by_fd.data == b"Subject: changed\r\n\r\nx\r\n" and by_fd.received == data
    assert by_fd.state.pending == ["b@d.example"]
    assert by_fd.state.stages_done == {"archive"}


def test_claim_of_a_message_removed_while_waiting_for_its_lock_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    spool = Spool(tmp_path)
    qid = spool.store(_env(), b"x")
    real_flock = fcntl.flock

    def flock_after_removal(fd: int, op: int) -> None:
        spool.remove(qid)  # the previous holder finished the message while we waited
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_removal)
    with spool.claimed(qid) as fd:
        assert fd is None
    monkeypatch.undo()
    with spool.claim(qid) as mine:
        assert not mine


class _Disk:
    """A fake file system's free space and a clock, for the free-space cache."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.now = 0.0
        self.statfs = 0

    def measure(self, _path: Path) -> int:
        self.statfs += 1
        return self.free


def _spool_on(tmp_path: Path, disk: _Disk, reserve: int) -> Spool:
    spool = Spool(tmp_path, min_free_bytes=reserve)
    spool.free_space = _FreeSpace(tmp_path, ttl=1.0, margin=1000, measure=disk.measure,
                                  clock=lambda: disk.now)
    return spool


def test_free_space_far_above_the_reserve_is_measured_once_per_interval(
    tmp_path: Path,
) -> None:
    disk = _Disk(free=1_000_000)
    spool = _spool_on(tmp_path, disk, reserve=100)
    assert all(spool.has_room(10) for _ in range(50))
    assert disk.statfs == 1
    disk.now = 1.5  # the interval is over: measured again
    assert spool.has_room(10)
    assert disk.statfs == 2


def test_free_space_near_the_reserve_is_measured_at_every_check(tmp_path: Path) -> None:
    disk = _Disk(free=1050)  # within the margin (1000) of the reserve (100)
    spool = _spool_on(tmp_path, disk, reserve=100)
    assert spool.has_room(10) and spool.has_room(10)
    assert disk.statfs == 2
    disk.free = 105  # another process filled the disk meanwhile: refused at once
    assert not spool.has_room(10)


def test_bytes_spooled_since_the_measurement_count_against_the_cached_figure(
    tmp_path: Path,
) -> None:
    disk = _Disk(free=20_000)
    spool = _spool_on(tmp_path, disk, reserve=100)
    assert spool.has_room(10)
    spool.store(_env(), b"x" * 19_000)  # the cached figure drops into the margin
    disk.free = 50  # and the disk really is below the reserve now
    assert not spool.has_room(10)  # re-measured within the interval, and refused
    with pytest.raises(SpoolFullError):
        spool.store(_env(), b"y")
    assert len(spool.queue_ids()) == 1


def test_stage_records_go_through_the_claim_descriptor(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qid = spool.store(_env(), b"Subject: x\r\n\r\nbody\r\n")
    with spool.claimed(qid) as fd:
        assert fd is not None
        spool.append_stage(qid, {"ev": "stage", "stage": "archive"}, sync=False, fd=fd)
        spool.append_stage(qid, {"ev": "stage", "stage": "sign"}, fd=fd)
        msg = spool.load(qid, fd)  # reads through the same descriptor
    assert msg.data == b"Subject: x\r\n\r\nbody\r\n"
    assert msg.state.stages_done == {"archive", "sign"}
    assert spool.load(qid).state.stages_done == {"archive", "sign"}


def test_a_claim_knows_the_size_of_the_file_it_holds(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qid = spool.store(_env(), b"x" * 100)
    spool.append_stage(qid, {"ev": "stage", "stage": "archive"})
    with spool.claimed_sized(qid) as claim:
        assert claim is not None
        fd, size = claim
        assert size == spool.msg_path(qid).stat().st_size
        assert spool.load(qid, fd, size) == spool.load(qid)
    spool.remove(qid)
    with spool.claimed_sized(qid) as claim:
        assert claim is None


async def test_a_store_the_spool_threads_cannot_take_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    pool = HopPool(1)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        await store_from_loop(spool, pool, _env(), b"x")
    assert spool.queue_ids() == []
    assert list(spool.tmp_dir.iterdir()) == []


def test_a_retained_claim_outlives_its_block_until_claimed_again_or_let_go(
        tmp_path: Path) -> None:
    here, other = Spool(tmp_path), Spool(tmp_path)  # two worker processes' views
    qid = here.store(Envelope("a@src.test", ["b@dst.test"]), b"Subject: x\r\n\r\nbody\r\n")
    with here.claimed(qid) as fd:
        assert fd is not None
        here.retain(qid, fd)
    with other.claimed(qid) as fd:
        assert fd is None  # still held by `here`
    with here.claimed(qid) as fd:
        assert fd is not None  # taken over (and let go at the end of this block)
    with other.claimed(qid) as fd:
        assert fd is not None
    with here.claimed(qid) as fd:
        assert fd is not None
        here.retain(qid, fd)
    here.keep_claims(0)  # the worker stops: every retained claim is let go
    with other.claimed(qid) as fd:
        assert fd is not None
