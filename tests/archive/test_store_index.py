"""The store's in-memory index stays what reading the files gives (archive.store).

A writer indexes the records it appends to its own segment from what it wrote
(never reading them back), and refreshes other writers' segments from the files.
Two Archive objects on one data directory stand for two worker processes; after
every batch, each one's index must equal the index a fresh reader builds.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

import archive.store as store_module
from archive.facade import Archive
from archive.store import BlobStore


def _index(store: BlobStore) -> tuple[dict[str, tuple[object, ...]], dict[str, list[object]]]:
    segs = {name: (s.header_len, tuple(s.supersedes), s.end, tuple(s.records),
                   frozenset(s.dkids)) for name, s in store._segs.items()}
    where = {sha: sorted(locs, key=lambda loc: (loc.segment, loc.offset))
             for sha, locs in store._where.items()}
    return segs, where


def _fresh(data: Path) -> tuple[dict[str, tuple[object, ...]], dict[str, list[object]]]:
    reader = BlobStore(data / "archive" / "store", None, fsync_threads=1)
    try:
        reader.refresh()
        return _index(reader)
    finally:
        reader.close()


def test_writers_indexes_equal_a_fresh_read_of_the_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "SEGMENT_RECORDS", 7)  # segments fill and roll over
    rng = random.Random(5)
    pool = [b"Subject: %d\r\n\r\n" % i + rng.randbytes(rng.randrange(10, 3000))
            for i in range(40)]
    writers = [Archive.open(tmp_path), Archive.open(tmp_path)]
    try:
        for n in range(30):
            batch = [rng.choice(pool) for _ in range(rng.randrange(1, 6))]  # repeats too
            who = writers[rng.randrange(2)]
            refs = who.put_many(batch)
            assert [r.sha256 for r in refs] == [hashlib.sha256(b).hexdigest() for b in batch]
            # The writer's own view right after its batch: its own segment included.
            own = who.store
            assert isinstance(own, BlobStore)
            with own._mutex:
                own.refresh()  # other writers' segments, as any reader would see them
                assert _index(own) == _fresh(tmp_path), n
        for w in writers:
            assert all(w.get(hashlib.sha256(b).hexdigest()) == b for b in pool
                       if w.exists(hashlib.sha256(b).hexdigest()))
        segments = {loc.segment for locs in _fresh(tmp_path)[1].values() for loc in locs}
        assert len(segments) > 4  # several writers' segments, several rolled over
    finally:
        for w in writers:
            w.close()


def test_a_segment_whose_writer_closed_is_not_opened_again_but_its_removal_is_seen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = Archive.open(tmp_path)
    first.put_many([b"one\r\n", b"two\r\n"])
    reader = Archive.open(tmp_path)
    store = reader.store
    assert isinstance(store, BlobStore)
    store.refresh()
    (name,) = store._segs
    assert not store._segs[name].final  # its writer is alive: it may grow
    first.put_many([b"three\r\n"])
    store.refresh()
    assert len(store._segs[name].records) == 3
    first.close()  # the writer closes its segment for good
    store.refresh()
    assert store._segs[name].final
    opened: list[str] = []
    real_open = store_module.os.open

    def counting_open(path: object, *args: object, **kw: object) -> int:
        opened.append(str(path))
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module.os, "open", counting_open)
    store.refresh()
    assert not [p for p in opened if name in p]
    monkeypatch.undo()
    assert reader.get(hashlib.sha256(b"three\r\n").hexdigest()) == b"three\r\n"
    # Deleted and compacted away by someone else: the listing shows it is gone.
    other = Archive.open(tmp_path)
    other.store.delete_many([hashlib.sha256(b).hexdigest()
                             for b in (b"one\r\n", b"two\r\n", b"three\r\n")])
    other.compact()
    other.close()
    store.refresh()
    assert name not in store._segs and not store._where
    reader.close()
