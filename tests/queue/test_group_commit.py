"""Directory fsyncs are shared by concurrent spool writers, never skipped for any of them."""

from __future__ import annotations

import threading
from pathlib import Path

from gateway.envelope import Envelope
from gateway.queue.spool import Spool, _DirSync


def test_a_covered_rename_needs_no_new_fsync_and_a_later_one_does(tmp_path: Path) -> None:
    ds = _DirSync(tmp_path)
    first, second = ds.renamed(), ds.renamed()
    ds.sync(second)  # one fsync covers every rename before it started
    assert ds.rounds == 1
    ds.sync(first)
    assert ds.rounds == 1
    ds.sync(ds.renamed())  # a rename after the last fsync gets a fresh one
    assert ds.rounds == 2


def test_concurrent_stores_are_all_durable_with_fewer_directory_fsyncs(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=True)
    n = 32
    start = threading.Barrier(n)
    qids: list[str] = []
    lock = threading.Lock()

    def store(i: int) -> None:
        env = Envelope(mail_from="a@src.test", rcpt_to=[f"r{i}@dst.test"], received_at=1.0 + i)
        start.wait()
        qid = spool.store(env, f"Subject: {i}\r\n\r\nbody\r\n".encode())
        with lock:
            qids.append(qid)

    threads = [threading.Thread(target=store, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(qids) == spool.queue_ids()
    assert len(qids) == n
    ds = spool._queue_dir_sync
    # Every store returned only after an fsync that began after its rename...
    assert ds._synced == ds._renamed == n
    # ...and never more than one fsync per store.
    assert 1 <= ds.rounds <= n
