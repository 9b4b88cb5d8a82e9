"""Finished messages' spool files are written over by new ones (Spool's _Recycler),
and nobody who opened one under its old name takes it for that message."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.envelope import Envelope
from gateway.errors import SpoolError
from gateway.queue import spool as spool_mod
from gateway.queue.spool import RECYCLE_FILES, RECYCLE_MAX_BYTES, STATE_MARK, Spool


def _env(rcpt: str = "bob@dst.example") -> Envelope:
    return Envelope(mail_from="alice@src.example", rcpt_to=[rcpt], client_ip="127.0.0.1",
                    helo="client.example", received_at=1_700_000_000.0)


def _finish(spool: Spool, qid: str) -> None:
    """What the worker does with a delivered message: remove it under its claim."""
    with spool.claimed_sized(qid) as got:
        assert got is not None
        spool.remove(qid, recycle=True)


def _free(spool: Spool) -> list[Path]:
    return list((spool.root / "free").iterdir())


def test_a_finished_message_file_is_written_over_by_the_next_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.store(_env(), b"Subject: first\r\n\r\nshort\r\n")
    spool.append_event(first, {"ev": "attempt", "attempts": 1})  # sets STATE_MARK
    inode = spool.msg_path(first).stat().st_ino
    _finish(spool, first)
    assert not spool.exists(first) and len(_free(spool)) == 1
    long = b"Subject: second\r\n\r\n" + b"a" * 50_000 + b"\r\n"
    second = spool.store(_env("carol@dst.example"), long)
    st = spool.msg_path(second).stat()
    assert st.st_ino == inode and _free(spool) == [] and spool.recycler.reused == 1
    assert st.st_mode & STATE_MARK == 0  # no .state log of its own
    msg = spool.load(second)
    assert msg.data == long and msg.envelope.rcpt_to == ["carol@dst.example"]
    assert msg.state.pending == ["carol@dst.example"]


def test_a_file_is_never_cut_shorter_the_largest_that_fits_is_taken(tmp_path: Path) -> None:
    # Cutting a file frees blocks, which waits for the device on a file system
    # mounted with discard: a file a little longer is blanked past the new message,
    # and a message much smaller than every free file gets a new one.
    spool = Spool(tmp_path)
    sizes = {n: spool.store(_env(), b"Subject: s\r\n\r\n" + b"x" * n + b"\r\n")
             for n in (10_000, 20_000, 40_000)}
    spool.append_stage(sizes[20_000], {"ev": "stage", "stage": "archive", "facts": {}})
    inodes = {n: spool.msg_path(q).stat().st_ino for n, q in sizes.items()}
    for qid in sizes.values():
        _finish(spool, qid)
    tiny = spool.store(_env(), b"Subject: t\r\n\r\nx\r\n")
    assert spool.msg_path(tiny).stat().st_ino not in inodes.values()
    same = b"Subject: s\r\n\r\n" + b"y" * 20_000 + b"\r\n"  # shorter by the record
    qid = spool.store(_env(), same)
    path = spool.msg_path(qid)
    assert path.stat().st_ino == inodes[20_000]
    msg = spool.load(qid)
    assert msg.data == same and msg.state.stages_done == set()  # the old record blanked
    assert path.read_bytes().endswith(b" \n")
    spool.append_stage(qid, {"ev": "stage", "stage": "check", "facts": {}})
    assert spool.load(qid).state.stages_done == {"check"}
    assert sorted(p.stat().st_size for p in _free(spool))[0] < 11_000  # the 10 kB one


def test_a_reused_file_handed_to_the_worker_appends_stage_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.keep_claims(10)
    first = spool.store(_env(), b"Subject: one\r\n\r\nbody\r\n")
    _finish(spool, first)
    second = spool.store(_env(), b"Subject: two\r\n\r\n" + b"x" * 9000 + b"\r\n")
    assert spool.recycler.reused == 1
    with spool.claimed_sized(second) as got:
        assert got is not None
        fd, _size = got
        spool.append_stage(second, {"ev": "stage", "stage": "archive"}, sync=False, fd=fd)
    spool.keep_claims(0)
    msg = spool.load(second)
    assert msg.data == b"Subject: two\r\n\r\n" + b"x" * 9000 + b"\r\n"
    assert msg.state.stages_done == {"archive"}


def test_a_claim_opened_under_a_name_since_reused_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    old = spool.store(_env(), b"Subject: old\r\n\r\nx\r\n")
    stale = os.open(spool.msg_path(old), os.O_RDWR)  # opened before the message finished
    try:
        _finish(spool, old)
        new = spool.store(_env(), b"Subject: new\r\n\r\ny\r\n")
        assert os.fstat(stale).st_ino == spool.msg_path(new).stat().st_ino
        # What claimed_sized does with the stale descriptor once it has its lock:
        real_open = os.open

        def open_stale(path: str, flags: int, mode: int = 0o777) -> int:
            return os.dup(stale) if path.endswith(f"{old}.msg") else real_open(path, flags, mode)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "open", open_stale)
            with spool.claimed_sized(old) as got:
                assert got is None
        assert spool.load(new).data == b"Subject: new\r\n\r\ny\r\n"
    finally:
        os.close(stale)


def test_a_free_file_someone_still_locks_is_not_reused(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.keep_claims(10)
    old = spool.store(_env(), b"Subject: old\r\n\r\nx\r\n")
    with spool.claimed_sized(old) as got:
        assert got is not None
        spool.remove(old, recycle=True)
    (free,) = _free(spool)
    holder = os.open(free, os.O_RDONLY)  # e.g. another process's stale claim attempt
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        new = spool.store(_env(), b"Subject: new\r\n\r\ny\r\n")
        assert spool.msg_path(new).stat().st_ino != os.fstat(holder).st_ino
        assert spool.recycler.reused == 0 and _free(spool) == []
    finally:
        os.close(holder)
    spool.keep_claims(0)
    assert spool.load(new).data == b"Subject: new\r\n\r\ny\r\n"


def test_a_file_is_offered_for_reuse_only_once_its_claim_is_let_go(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    old = spool.store(_env(), b"Subject: old\r\n\r\nx\r\n")
    with spool.claimed_sized(old) as got:
        assert got is not None
        spool.remove(old, recycle=True)
        spool.store(_env(), b"Subject: meanwhile\r\n\r\ny\r\n")
        assert spool.recycler.reused == 0  # still locked by this claim
    spool.store(_env(), b"Subject: after\r\n\r\nz\r\n")
    assert spool.recycler.reused == 1


def test_an_operator_delete_and_large_files_are_unlinked_not_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    deleted = spool.store(_env(), b"Subject: secret\r\n\r\nx\r\n")
    with spool.claim(deleted):
        spool.remove(deleted)  # recycle=False: an operator's delete
    big = spool.store(_env(), b"Subject: big\r\n\r\n" + b"b" * RECYCLE_MAX_BYTES + b"\r\n")
    _finish(spool, big)
    assert _free(spool) == []


def test_the_pool_is_bounded_and_taken_over_by_the_next_process(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    qids = [spool.store(_env(), b"Subject: n\r\n\r\nx\r\n") for _ in range(RECYCLE_FILES + 5)]
    for qid in qids:
        _finish(spool, qid)
    assert len(_free(spool)) == RECYCLE_FILES
    again = Spool(tmp_path)  # a restart: the files left in free/ are used again
    qid = again.store(_env(), b"Subject: later\r\n\r\ny\r\n")
    assert again.recycler.reused == 1 and len(_free(again)) == RECYCLE_FILES - 1
    assert again.load(qid).data == b"Subject: later\r\n\r\ny\r\n"


def test_reading_a_message_that_finished_meanwhile_is_not_reading_its_successor(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    old = spool.store(_env(), b"Subject: old\r\n\r\nx\r\n")
    _finish(spool, old)
    spool.store(_env(), b"Subject: new\r\n\r\ny\r\n")
    with pytest.raises(SpoolError, match="no such queued message"):
        spool.load(old)
    with pytest.raises(FileNotFoundError):
        spool.read_header(old)
    assert spool.events(old) == []


WRITER = """
import sys, time
from pathlib import Path
from gateway.envelope import Envelope
from gateway.queue.spool import Spool
spool = Spool(Path(sys.argv[1]))
inflight, i, end = [], 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    env = Envelope(mail_from=f"s{i}@src.example", rcpt_to=["b@dst.example"],
                   client_ip="127.0.0.1", helo="h", received_at=time.time())
    inflight.append(spool.store(env, (b"message %d " % i) * (1 + i % 50)))
    i += 1
    for qid in inflight[:-8]:  # finish the older ones, as a worker would
        with spool.claimed_sized(qid) as got:
            if got is not None:
                spool.remove(qid, recycle=True)
                inflight.remove(qid)
print(i, spool.recycler.reused)
"""


def test_another_process_never_loads_a_reused_file_as_the_message_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One process spools and finishes messages as fast as it can, so its files are
    # written over at once; this one claims and reads whatever it finds queued, as a
    # second worker (or `coffer queue show`) does, and must only ever see a message
    # as it was spooled: its sender and its bytes carry the same number.
    repo = Path(__file__).resolve().parents[2]
    spool = Spool(tmp_path)
    # Widen the windows between opening a file by name and locking or reading it, in
    # which the writer may finish the message and write another over its file.
    real_flock, real_read = fcntl.flock, spool_mod._read_fd
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (time.sleep(0.002),
                                                        real_flock(fd, op))[1])
    monkeypatch.setattr(spool_mod, "_read_fd", lambda fd, n: (time.sleep(0.002),
                                                              real_read(fd, n))[1])
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "1.0"],
                            env={**os.environ, "PYTHONPATH": str(repo)},
                            stdout=subprocess.PIPE, text=True)
    seen = 0
    while proc.poll() is None:
        for qid in spool.queue_ids():
            try:
                with spool.claimed_sized(qid) as got:
                    msg = None if got is None else spool.load(qid, *got)
                by_name = spool.load(qid)
            except SpoolError as exc:
                assert "no such queued message" in str(exc)
                continue
            for m in (msg, by_name):
                if m is not None:
                    n = re.fullmatch(r"s(\d+)@src\.example", m.envelope.mail_from)
                    assert n is not None
                    assert m.data == (b"message %s " % n.group(1).encode()) * (
                        1 + int(n.group(1)) % 50)
                    seen += 1
    out, _ = proc.communicate()
    assert proc.returncode == 0
    stored, reused = map(int, out.split())
    assert reused > stored // 2 and seen > 0
