"""The write-once blob store and the Archive facade, on real files."""

from __future__ import annotations

import asyncio
import hashlib
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from packs import cut_record, flip_byte, key_table, packs_dir, record_count, record_of, rewrite

from archive.errors import (
    ArchiveError,
    BlobIntegrityError,
    BlobNotFoundError,
    BlobShreddedError,
    LedgerError,
)
from archive.facade import Archive, BatchWriter
from archive.pack import RECORD_HEADER_LEN, parse_key_table
from archive.verify import verify

MARKER = b"Zq7-COFFER-PLAINTEXT-MARKER-41d9"
MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\n"
    b"Subject: quarterly figures " + MARKER + b"\r\n\r\n"
    + b"Body line with the marker " + MARKER + b" and 8-bit \xe9\xe8 bytes.\r\n" * 40
)


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    a = Archive.open(tmp_path)
    yield a
    a.close()


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def records(a: Archive) -> int:
    return record_count(a.paths.root.parent)


def test_round_trip_returns_the_exact_bytes(archive: Archive) -> None:
    ref = archive.put(MESSAGE)
    assert ref.sha256 == hashlib.sha256(MESSAGE).hexdigest()
    assert ref.size == len(MESSAGE) and ref.new
    assert archive.get(ref.sha256) == MESSAGE
    empty = archive.put(b"")
    assert archive.get(empty.sha256) == b""


def test_record_is_compressed_into_a_read_only_segment(archive: Archive) -> None:
    ref = archive.put(MESSAGE)
    loc = record_of(archive.paths.root.parent, ref.sha256)
    assert loc.length == ref.stored_size < len(MESSAGE) / 2
    path = archive.paths.store / "packs" / f"{loc.segment}.pack"
    assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0  # appended by its writer's fd only
    # Four files per message before (blob and key file, twice with the receipt): now
    # every message of a batch goes into the same three.
    archive.put_many([b"second %d" % i for i in range(20)])
    assert sorted(p.suffix for p in (archive.paths.store / "packs").iterdir()) == [
        ".ack", ".keys", ".pack"]


def test_same_bytes_twice_are_stored_once(archive: Archive) -> None:
    first = archive.put(MESSAGE)
    (blob,) = (archive.paths.store / "packs").glob("*.pack")
    before = blob.stat()
    second = archive.put(MESSAGE)
    assert first.new and not second.new
    assert second.sha256 == first.sha256
    assert records(archive) == 1
    after = blob.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    kinds = [(e.kind, e.fields["new"]) for e in archive.ledger.entries()]
    assert kinds == [("message_stored", True), ("message_stored", False)]


def test_same_bytes_twice_in_one_batch_are_stored_once(archive: Archive) -> None:
    refs = archive.put_many([MESSAGE, b"other", MESSAGE],
                            [{"archive_id": 1}, {"archive_id": 2}, {"archive_id": 3}])
    assert [r.new for r in refs] == [True, True, False]
    assert records(archive) == 2
    ids = [e.fields["archive_id"] for e in archive.ledger.entries()]
    assert ids == [1, 2, 3]


def test_no_plaintext_of_a_message_anywhere_under_the_archive_dir(archive: Archive) -> None:
    archive.put(MESSAGE, {"archive_id": 7})
    archive.put(MARKER)  # even a message that is nothing but the marker
    archive.checkpoint()
    files = all_files(archive.paths.root)
    assert len(files) > 5
    for path in files:
        data = path.read_bytes()
        assert MARKER not in data, path
        assert MARKER.lower() not in data.lower(), path


def test_each_blob_has_its_own_data_key_wrapped_by_the_archive_key(archive: Archive) -> None:
    a, b = archive.put(b"message one"), archive.put(b"message two")
    keys = {}
    for ref in (a, b):
        loc = record_of(archive.paths.root.parent, ref.sha256)
        entry = key_table(archive.paths.root.parent, loc.segment).keys[loc.dkid]
        assert entry.kid == archive.keys.current.id
        keys[ref.sha256] = (loc.dkid, entry.wrapped)
    assert keys[a.sha256] != keys[b.sha256]


def test_record_relabelled_with_another_hash_fails_to_decrypt(tmp_path: Path) -> None:
    with Archive.open(tmp_path) as arc:
        a, b = arc.put(b"message A"), arc.put(b"message B")
    # Remove B, then relabel A's record and key entry as B's: the AAD binds the SHA-256.
    cut_record(tmp_path, b.sha256, cover_tracks=True)
    loc = record_of(tmp_path, a.sha256)
    pack = packs_dir(tmp_path) / f"{loc.segment}.pack"
    data = pack.read_bytes()
    sha_at = loc.offset + 5
    rewrite(pack, data[:sha_at] + bytes.fromhex(b.sha256) + data[sha_at + 32:])
    with Archive.open(tmp_path) as arc:
        with pytest.raises(BlobIntegrityError, match=b.sha256):
            arc.get(b.sha256)
        with pytest.raises(BlobNotFoundError):
            arc.get(a.sha256)


def test_flipped_ciphertext_byte_is_an_integrity_error(archive: Archive) -> None:
    ref = archive.put(MESSAGE)
    flip_byte(archive.paths.root.parent, ref.sha256, RECORD_HEADER_LEN + 10)
    with pytest.raises(BlobIntegrityError, match="authentication failed"):
        archive.get(ref.sha256)


def test_unknown_hash_is_not_found(archive: Archive) -> None:
    with pytest.raises(BlobNotFoundError):
        archive.get("0" * 64)


def test_shredded_blob_cannot_be_read_and_cannot_be_stored_again(archive: Archive) -> None:
    ref = archive.put(MESSAGE)
    archive.shred(ref.sha256, reason="retention expired")
    assert archive.exists(ref.sha256)  # the ciphertext stays until deleted
    with pytest.raises(BlobShreddedError, match="data key was destroyed"):
        archive.get(ref.sha256)
    with pytest.raises(BlobShreddedError, match="cannot be stored again"):
        archive.put(MESSAGE)
    last = list(archive.ledger.entries())[-1]
    assert (last.kind, last.fields["sha256"]) == ("tombstone", ref.sha256)


def test_shred_with_delete_removes_the_blob_and_allows_storing_again(archive: Archive) -> None:
    ref = archive.put(MESSAGE)
    archive.shred(ref.sha256, reason="retention expired", delete_blob=True)
    assert not archive.exists(ref.sha256)
    with pytest.raises(BlobNotFoundError):
        archive.get(ref.sha256)
    again = archive.put(MESSAGE)
    assert again.new and archive.get(ref.sha256) == MESSAGE
    summary, _ = verify(archive.paths.root)
    assert summary.ok


def test_key_rotation_new_blobs_use_new_key_and_old_blobs_still_open(tmp_path: Path) -> None:
    with Archive.open(tmp_path) as a:
        old = a.put(b"before rotation")
        new_kid = a.rotate_key()
        new = a.put(b"after rotation")
        for ref, kid in ((old, "k1"), (new, new_kid)):
            loc = record_of(tmp_path, ref.sha256)
            assert key_table(tmp_path, loc.segment).keys[loc.dkid].kid == kid
    assert new_kid == "k2"
    with Archive.open(tmp_path, create=False) as a:  # a fresh process sees both keys
        assert a.get(old.sha256) == b"before rotation"
        assert a.get(new.sha256) == b"after rotation"
        assert [e.kind for e in a.ledger.entries()][1] == "key_rotated"


def test_interrupted_batch_is_recovered_into_the_ledger_on_next_open(tmp_path: Path) -> None:
    a = Archive.open(tmp_path)

    def ledger_fails(start: int, refs: object) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        a.store.write_many([b"linked but never ledgered"], ledger_fails)
    a.close()
    # Before any writer reopens it, verify sees an unacknowledged blob: a warning.
    summary, findings = verify(a.paths.root)
    assert summary.ok
    assert {f.code for f in findings if f.severity == "warning"} == {
        "blob_unacknowledged", "batch_interrupted"}
    with Archive.open(tmp_path) as b:
        assert [r.sha256 for r in b.recovered] == [
            hashlib.sha256(b"linked but never ledgered").hexdigest()]
        assert list(b.ledger.entries())[-1].kind == "blob_recovered"
        # The interrupted segment is never appended to again: the next batch starts
        # a new one, and the recovered record stays readable.
        b.put(b"after the recovery")
        assert len(list(b.paths.store.joinpath("packs").glob("*.pack"))) == 2
        assert b.get(b.recovered[0].sha256) == b"linked but never ledgered"
    summary, findings = verify(a.paths.root)
    assert summary.ok and summary.warnings == 0, findings


async def test_batch_writer_group_commits_concurrent_puts(archive: Archive) -> None:
    writer = BatchWriter(archive, max_batch=8)
    try:
        msgs = [b"message %d" % i for i in range(20)]
        refs = await asyncio.gather(*(writer.put(m, {"archive_id": i})
                                      for i, m in enumerate(msgs)))
    finally:
        await writer.close()
    assert [r.sha256 for r in refs] == [hashlib.sha256(m).hexdigest() for m in msgs]
    assert sorted(e.fields["archive_id"] for e in archive.ledger.entries()
                  if e.kind == "message_stored") == list(range(20))
    assert all(archive.get(r.sha256) == m for r, m in zip(refs, msgs, strict=True))


async def test_batch_writer_put_many_never_splits_a_group_across_batches(
    tmp_path: Path,
) -> None:
    class Recording(Archive):
        """The real archive, remembering the records of each group commit."""

        batches: list[list[object]] = []

        def put_many(self, datas: Any, records: Any = None) -> Any:
            self.batches.append([dict(r).get("g") for r in records or []])
            return super().put_many(datas, records)

    archive = Recording.open(tmp_path)
    writer = BatchWriter(archive, max_batch=2)
    try:
        singles = [asyncio.ensure_future(writer.put(b"single %d" % i)) for i in range(3)]
        await asyncio.sleep(0)  # the singles queue first: the group may meet max_batch
        group = await writer.put_many([b"receipt", b"message"], [{"g": 0}, {"g": 1}])
        await asyncio.gather(*singles)
    finally:
        await writer.close()
        archive.close()
    assert [r.sha256 for r in group] == [hashlib.sha256(b).hexdigest()
                                         for b in (b"receipt", b"message")]
    (with_group,) = [b for b in Recording.batches if 0 in b]
    # Same batch, in order, even where max_batch (2) would have cut it.
    assert with_group[with_group.index(0):] == [0, 1]


async def test_batch_writer_close_finishes_queued_puts_then_refuses_more(
    archive: Archive,
) -> None:
    writer = BatchWriter(archive, max_batch=4)
    pending = [asyncio.ensure_future(writer.put(b"queued %d" % i)) for i in range(10)]
    await asyncio.sleep(0)  # let them queue
    await writer.close()
    refs = await asyncio.gather(*pending)
    assert len({r.sha256 for r in refs}) == 10
    with pytest.raises(ArchiveError, match="closed"):
        await writer.put(b"too late")


async def test_batch_writer_reports_a_failed_batch_to_each_caller(tmp_path: Path) -> None:
    a = Archive.open(tmp_path)
    a.shred(a.put(b"shredded").sha256, reason="test")
    writer = BatchWriter(a)
    try:
        with pytest.raises(BlobShreddedError):
            await writer.put(b"shredded")
        assert (await writer.put(b"fine")).new  # the writer keeps working
    finally:
        await writer.close()
        a.close()


def test_record_that_is_not_json_is_refused_before_anything_is_written(
    archive: Archive,
) -> None:
    from datetime import datetime

    with pytest.raises(LedgerError, match="fields must be JSON values"):
        archive.put(MESSAGE, {"received": datetime(2026, 1, 1)})
    with pytest.raises(LedgerError, match="may not be named"):
        archive.put(MESSAGE, {"seq": 1})
    assert records(archive) == 0 and list(archive.ledger.entries()) == []


def test_put_many_larger_than_one_chunk_keeps_records_in_order(archive: Archive) -> None:
    from archive.store import MAX_BATCH

    n = MAX_BATCH * 2 + 3
    msgs = [b"bulk %d" % i for i in range(n)]
    refs = archive.put_many(msgs, [{"archive_id": i} for i in range(n)])
    entries = [e for e in archive.ledger.entries() if e.kind == "message_stored"]
    assert [e.fields["archive_id"] for e in entries] == list(range(n))
    assert [e.fields["sha256"] for e in entries] == [r.sha256 for r in refs]


def _store_worker(data_dir: str, worker: int) -> None:
    with Archive.open(Path(data_dir)) as a:
        for i in range(0, 40, 8):
            shared = [b"shared message %d" % j for j in range(i, i + 8)]
            own = [b"own message %d of %d" % (j, worker) for j in range(2)]
            a.put_many(shared + own, [{"w": worker}] * 10)


def test_processes_storing_the_same_messages_at_once_store_each_once(tmp_path: Path) -> None:
    import multiprocessing

    Archive.open(tmp_path).close()  # keys first, so the workers only race on blobs
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_store_worker, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Archive.open(tmp_path) as a:
        assert records(a) == 40 + 3 * 2
        keys = sum(len(parse_key_table(p.read_bytes()).keys)
                   for p in a.paths.store.joinpath("packs").glob("*.keys"))
        assert keys == 40 + 3 * 2
        entries = [e for e in a.ledger.entries() if e.kind == "message_stored"]
        assert len(entries) == 3 * 5 * 10
        shared_new: dict[str, list[bool]] = {}
        for e in entries:
            shared_new.setdefault(e.fields["sha256"], []).append(e.fields["new"])
        assert all(flags.count(True) == 1 for flags in shared_new.values())
        assert a.get(hashlib.sha256(b"shared message 7").hexdigest()) == b"shared message 7"
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.warnings == 0, findings


async def test_puts_arriving_while_a_batch_commits_share_the_next_batch(tmp_path: Path) -> None:
    class Recording(Archive):
        """The real archive, remembering each group commit's size; the first is slow."""

        sizes: list[int] = []

        def put_many(self, datas: Any, records: Any = None) -> Any:
            self.sizes.append(len(datas))
            if len(self.sizes) == 1:
                time.sleep(0.2)  # the others arrive meanwhile
            return super().put_many(datas, records)

    archive = Recording.open(tmp_path)
    writer = BatchWriter(archive)
    try:
        first = asyncio.ensure_future(writer.put(b"first"))
        await asyncio.sleep(0.05)  # the first batch is committing
        rest = await asyncio.gather(*(writer.put(b"later %d" % i) for i in range(6)))
        await first
    finally:
        await writer.close()
        archive.close()
    assert len(rest) == 6
    assert Recording.sizes == [1, 6]


def test_a_batch_cut_short_between_record_and_key_can_be_stored_again(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    # ENOSPC after the record reached the segment and before its key did (a full disk:
    # tests/service/test_full_disk.py).  Nobody was told it is stored, so the record is
    # no shred: the queue's retry of the same message must store it, not be refused.
    import archive.store as store_module

    real = store_module.write_all
    calls = {"n": 0}

    def key_write_fails(fd: int, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the batch's records first, then their keys
            raise OSError(28, "No space left on device")
        real(fd, data)

    archive.put(b"an earlier message")  # the segment exists: the next batch only appends
    monkeypatch.setattr(store_module, "write_all", key_write_fails)
    with pytest.raises(OSError, match="No space left"):
        archive.put(MESSAGE)
    monkeypatch.setattr(store_module, "write_all", real)
    ref = archive.put(MESSAGE)  # a new segment: the cut-short one is never appended to
    assert archive.get(ref.sha256) == MESSAGE
    archive.close()
    reopened = Archive.open(archive.paths.root.parent)  # recover() cuts the keyless record
    try:
        assert reopened.get(ref.sha256) == MESSAGE
        summary, _ = verify(reopened.paths.root)
        assert summary.ok
    finally:
        reopened.close()


@pytest.mark.parametrize("failing_write", [1, 2])  # the segment header, the key table's
def test_a_segment_the_disk_had_no_room_to_start_leaves_no_files(
        archive: Archive, monkeypatch: pytest.MonkeyPatch, failing_write: int) -> None:
    # ENOSPC while a new segment's headers are written (a full disk:
    # tests/service/test_full_disk.py found a .keys file without its header, which
    # verify reports as an altered blob).
    import archive.store as store_module

    real = store_module.write_all
    calls = {"n": 0}

    def header_write_fails(fd: int, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == failing_write:
            raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(store_module, "write_all", header_write_fails)
    with pytest.raises(OSError, match="No space left"):
        archive.put(MESSAGE)
    packs = archive.paths.root / "store" / "packs"
    assert not packs.exists() or list(packs.iterdir()) == []
    monkeypatch.setattr(store_module, "write_all", real)
    ref = archive.put(MESSAGE)
    assert archive.get(ref.sha256) == MESSAGE
    summary, _ = verify(archive.paths.root)
    assert summary.ok
    archive.close()


def test_a_shred_in_another_writers_segment_is_still_a_shred(tmp_path: Path) -> None:
    # The keyless-record check reads the segment's acknowledged end again: a view taken
    # while the other writer was still writing must not pass a later shred off as a
    # cut-short write.
    a = Archive.open(tmp_path)
    b = Archive.open(tmp_path)
    try:
        first = a.put(b"an earlier message")
        assert b.get(first.sha256) == b"an earlier message"  # b knows a's segment now
        ref = a.put(MESSAGE)  # appended to that segment after b read its .ack
        assert b.get(ref.sha256) == MESSAGE
        a.shred(ref.sha256, reason="retention expired")
        with pytest.raises(BlobShreddedError, match="cannot be stored again"):
            b.put(MESSAGE)
    finally:
        a.close()
        b.close()


def test_a_queue_id_is_found_among_messages_stored_since_the_given_time_only(
        tmp_path: Path) -> None:
    now = [datetime(2026, 11, 1, tzinfo=UTC)]
    a = Archive.open(tmp_path, clock=lambda: now[0])
    try:
        a.put(b"first", {"qid": "019A00000000AAAA"})
        now[0] += timedelta(hours=1)
        a.put(b"second", {"qid": "019A00000000BBBB"})
        a.append("audit", qid="019A00000000CCCC")  # names an id, stores no message
        since = now[0]
        assert a.stored_queue_id("019A00000000BBBB", since)
        assert not a.stored_queue_id("019A00000000AAAA", since)  # before the bound: unread
        assert a.stored_queue_id("019A00000000AAAA", since - timedelta(hours=2))
        assert not a.stored_queue_id("019A00000000CCCC", since - timedelta(hours=2))
        assert not a.stored_queue_id("019A00000000BBB", since)  # a prefix is another id
    finally:
        a.close()
