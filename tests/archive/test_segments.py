"""Pack segments on real files: crash recovery, shredding, deletion and compaction."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from archive_verify_cli import run_coffer
from packs import key_table, packs_dir, record_count, record_of

from archive.errors import BlobShreddedError
from archive.facade import Archive
from archive.pack import encode_segment_header
from archive.verify import verify

MSGS = [b"Subject: segment test %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(5)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def codes(findings: list, severity: str) -> set[str]:  # type: ignore[type-arg]
    return {f.code for f in findings if f.severity == severity}


def test_torn_tail_is_a_warning_then_cut_by_the_next_writer(tmp_path: Path) -> None:
    with Archive.open(tmp_path) as a:
        a.put_many(MSGS)
    loc = record_of(tmp_path, sha(MSGS[-1]))
    pack = packs_dir(tmp_path) / f"{loc.segment}.pack"
    whole = pack.read_bytes()
    # A crash half-way through appending a batch: part of a record, and its key entry.
    pack.chmod(0o640)
    pack.write_bytes(whole + whole[loc.offset:loc.offset + 40])
    keys = packs_dir(tmp_path) / f"{loc.segment}.keys"
    entry = key_table(tmp_path, loc.segment).keys[loc.dkid].encoded
    keys.write_bytes(keys.read_bytes() + entry.replace(bytes.fromhex(loc.dkid), b"\x01" * 8))
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok, findings
    assert codes(findings, "warning") == {"segment_torn_tail", "store_extra_file"}
    with Archive.open(tmp_path) as a:
        assert a.recovered == []  # nothing whole was left unacknowledged
        assert all(a.get(sha(m)) == m for m in MSGS)
    assert pack.read_bytes() == whole
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.warnings == 0, findings


def test_shred_replaces_the_key_table_and_the_writer_keeps_appending(tmp_path: Path) -> None:
    with Archive.open(tmp_path) as a:
        a.put_many(MSGS[:2])
        loc = record_of(tmp_path, sha(MSGS[0]))
        keys = packs_dir(tmp_path) / f"{loc.segment}.keys"
        before = keys.stat().st_ino
        wrapped = key_table(tmp_path, loc.segment).keys[loc.dkid].wrapped
        a.shred(sha(MSGS[0]), reason="retention")
        assert keys.stat().st_ino != before  # a new file, renamed into place
        assert wrapped not in keys.read_bytes()
        with pytest.raises(BlobShreddedError):
            a.get(sha(MSGS[0]))
        a.put(MSGS[2])  # same writer, same segment: appends to the new key table
        assert record_of(tmp_path, sha(MSGS[2])).segment == loc.segment
        assert a.get(sha(MSGS[2])) == MSGS[2] and a.get(sha(MSGS[1])) == MSGS[1]
    assert set(key_table(tmp_path, loc.segment).keys) == {
        record_of(tmp_path, sha(m)).dkid for m in MSGS[1:3]}
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.tombstoned == 1, findings


def test_another_process_sees_a_shred_and_a_new_blob(tmp_path: Path) -> None:
    with Archive.open(tmp_path) as reader, Archive.open(tmp_path) as writer:
        writer.put(MSGS[0])
        assert reader.get(sha(MSGS[0])) == MSGS[0]
        writer.shred(sha(MSGS[0]), reason="retention")
        with pytest.raises(BlobShreddedError):
            reader.get(sha(MSGS[0]))
        assert reader.put(MSGS[1]).new
        assert not writer.put(MSGS[1]).new  # the reader's process stored it first


def test_compaction_removes_deleted_records_and_keeps_the_rest(tmp_path: Path) -> None:
    with Archive.open(tmp_path) as a:
        a.put_many(MSGS)
        a.shred(sha(MSGS[1]), reason="retention", delete_blob=True)
        a.shred(sha(MSGS[3]), reason="retention")  # shredded, not deleted: kept
        (old,) = [p.stem for p in packs_dir(tmp_path).glob("*.pack")]
    with Archive.open(tmp_path) as a:
        result = a.compact()
        assert (result.segments, result.removed_records) == (1, 1)
        assert result.freed_bytes > len(MSGS[1]) / 2
        assert [a.get(sha(m)) == m for m in (MSGS[0], MSGS[2], MSGS[4])] == [True] * 3
        assert not a.exists(sha(MSGS[1])) and a.exists(sha(MSGS[3]))
        assert list(a.ledger.entries())[-1].kind == "store_compacted"
        assert a.compact().segments == 0  # nothing left to do
    (new,) = [p.stem for p in packs_dir(tmp_path).glob("*.pack")]
    assert new != old and record_count(tmp_path) == 4
    head = (packs_dir(tmp_path) / f"{new}.pack").read_bytes()
    assert head.startswith(encode_segment_header([old]))
    assert bytes.fromhex(sha(MSGS[1])) not in head
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.warnings == 0, findings
    assert [f.sha256 for f in findings if f.code == "blob_tombstoned"] == [sha(MSGS[3])]


def test_compaction_interrupted_before_removing_the_old_segment_is_finished(
        tmp_path: Path) -> None:
    with Archive.open(tmp_path) as a:
        a.put_many(MSGS)
        a.shred(sha(MSGS[0]), reason="retention", delete_blob=True)
    saved = tmp_path / "saved"
    shutil.copytree(packs_dir(tmp_path), saved)
    with Archive.open(tmp_path) as a:
        assert a.compact().segments == 1
    # The crash: the new segment is in place, the old one not removed yet.
    for p in saved.iterdir():
        shutil.copy2(p, packs_dir(tmp_path) / p.name)
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok, findings
    assert codes(findings, "warning") == {"compaction_unfinished"}
    with Archive.open(tmp_path) as a:
        assert all(a.get(sha(m)) == m for m in MSGS[1:])
    assert len(list(packs_dir(tmp_path).glob("*.pack"))) == 1
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.warnings == 0, findings


def test_a_live_writers_segment_is_left_for_the_next_compaction(tmp_path: Path) -> None:
    with Archive.open(tmp_path) as a:
        a.put_many(MSGS)
        a.shred(sha(MSGS[0]), reason="retention", delete_blob=True)
        assert a.compact().segments == 0  # this process still appends to it
        assert a.get(sha(MSGS[1])) == MSGS[1]


def test_deleted_blob_stored_again_survives_compaction(tmp_path: Path) -> None:
    with Archive.open(tmp_path) as a:
        a.put(MSGS[0])
        a.shred(sha(MSGS[0]), reason="retention", delete_blob=True)
    with Archive.open(tmp_path) as a:
        assert a.put(MSGS[0]).new  # a new record (new dkid), in a new segment
    with Archive.open(tmp_path) as a:
        assert a.compact().removed_records == 1
        assert a.get(sha(MSGS[0])) == MSGS[0]
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.warnings == 0, findings


def test_cli_compact_prints_what_it_freed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Archive.open(tmp_path) as a:
        a.put_many(MSGS)
        a.shred(sha(MSGS[2]), reason="retention", delete_blob=True)
    assert run_coffer(["archive", "compact", "--data-dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["segments"] == 1 and out["records"] == 1 and out["freed_bytes"] > 0
    assert run_coffer(["archive", "compact", "--data-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("compacted 0 segment(s)")


def test_a_refused_batch_leaves_the_writers_segment_in_use(tmp_path: Path) -> None:
    with Archive.open(tmp_path) as a:
        a.put(MSGS[0])
        a.shred(sha(MSGS[0]), reason="retention")
        with pytest.raises(BlobShreddedError):
            a.put_many([MSGS[1], MSGS[0]])  # refused whole, before anything is written
        assert not a.exists(sha(MSGS[1]))
        a.put(MSGS[2])
    assert len(list(packs_dir(tmp_path).glob("*.pack"))) == 1
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.warnings == 0, findings


def test_a_full_segment_is_closed_and_the_next_batch_starts_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import archive.store

    monkeypatch.setattr(archive.store, "SEGMENT_RECORDS", 3)
    more = [b"Subject: more %d\r\n\r\nbody\r\n" % i for i in range(7)]
    with Archive.open(tmp_path) as a:
        for i in range(0, len(more), 2):
            a.put_many(more[i:i + 2])
        assert all(a.get(sha(m)) == m for m in more)
    # Batches of 2, 2, 2, 1 into segments of at most 3 records: 2 | 2 | 2 + 1.
    assert len(list(packs_dir(tmp_path).glob("*.pack"))) == 3
    with Archive.open(tmp_path) as a:
        assert a.recovered == [] and all(a.get(sha(m)) == m for m in more)
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.warnings == 0 and summary.blobs == 7, findings


def test_a_settled_listing_is_reused_until_the_packs_directory_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """refresh() lists the packs directory again only when a stat of it changed; a
    segment another process creates afterwards is still found at once."""
    import os

    from archive.store import BlobStore

    listings: list[int] = []
    real = BlobStore.segment_names

    def counted(self: BlobStore) -> list[str]:
        listings.append(1)
        return real(self)

    monkeypatch.setattr(BlobStore, "segment_names", counted)
    with Archive.open(tmp_path) as a, Archive.open(tmp_path) as b:
        a.put(MSGS[0])
        assert isinstance(a.store, BlobStore) and isinstance(b.store, BlobStore)
        packs = packs_dir(tmp_path)
        # Just changed: not settled, so every refresh lists it again.
        listings.clear()
        b.store.refresh()
        b.store.refresh()
        assert len(listings) == 2
        hour_ago = os.stat(packs).st_mtime_ns - 3600 * 10**9
        os.utime(packs, ns=(hour_ago, hour_ago))  # (the ctime is now, but long settled
        monkeypatch.setattr("archive.store._DIR_SETTLE_NS", -(10**12))  # for the test)
        listings.clear()
        for _ in range(3):
            b.store.refresh()
        assert len(listings) == 1  # then the stat alone
        assert b.get(sha(MSGS[0])) == MSGS[0]
        before = set(b.store.segment_names())
        with Archive.open(tmp_path) as c:
            c.put(MSGS[1])  # another writer: a segment of its own
        assert set(b.store.segment_names()) - before
        listings.clear()
        assert b.get(sha(MSGS[1])) == MSGS[1]  # a new segment: the directory changed
        assert listings


def _scan_one_read_per_record(fd: int, name: str, start: int) -> object:
    """archive.segment.scan as it was: one pread and one parse_record_header per record
    (the reference the windowed scan is held to)."""
    import os

    from archive.pack import FormatError, parse_record_header
    from archive.segment import RECORD_HEADER_LEN, Location, Scan

    size = os.fstat(fd).st_size
    out = Scan(end=start, size=size)
    pos = start
    while pos + RECORD_HEADER_LEN <= size:
        try:
            head = parse_record_header(os.pread(fd, RECORD_HEADER_LEN, pos))
        except FormatError as exc:
            out.corrupt_at, out.corrupt = pos, str(exc)
            break
        if pos + head.total > size:
            break
        out.records.append(Location(name, pos, head.total, head.sha256, head.dkid))
        pos += head.total
    out.end = pos
    return out


def test_the_windowed_scan_finds_what_one_read_per_record_finds(tmp_path: Path) -> None:
    import os
    import random

    from archive import segment

    rng = random.Random(5)
    # Small and large records (larger than a scan window), incompressible or not.
    blobs = [b"Subject: %d\r\n\r\n" % i + (rng.randbytes(rng.choice([10, 900, 5000, 70000]))
                                             if i % 3 else b"x" * rng.choice([100, 90000]))
             for i in range(40)]
    with Archive.open(tmp_path) as a:
        for i in range(0, len(blobs), 7):
            a.put_many(blobs[i:i + 7])
    [pack] = list(packs_dir(tmp_path).glob("*.pack"))
    whole = pack.read_bytes()
    name = pack.name.removesuffix(".pack")
    fd = os.open(pack, os.O_RDONLY)
    try:
        head = segment.read_segment_header(fd)
        assert head is not None
        good = segment.scan(fd, name, head[1])
    finally:
        os.close(fd)
    assert len(good.records) == len(blobs) and good.corrupt_at is None and good.torn == 0
    offsets = [r.offset for r in good.records]
    variants = {
        "whole": whole,
        "torn record": whole[:offsets[20] + 1000],
        "torn header": whole[:offsets[30] + 20],
        "bad magic": whole[:offsets[12]] + b"XXXX" + whole[offsets[12] + 4:],
        "bad version": whole[:offsets[25] + 4] + b"\x09" + whole[offsets[25] + 5:],
        "short length": whole[:offsets[33] + 45] + b"\x00\x00\x00\x03"
        + whole[offsets[33] + 49:],
        "trailing junk": whole + b"\x00" * 30,
    }
    for label, data in variants.items():
        path = tmp_path / f"{label}.pack"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            for start in (head[1], offsets[5], offsets[19]):
                assert segment.scan(fd, name, start) == _scan_one_read_per_record(
                    fd, name, start), (label, start)
        finally:
            os.close(fd)


def test_compaction_leaves_a_segment_whose_header_is_damaged_as_it_is(tmp_path: Path) -> None:
    """Rewriting it would drop its damaged bytes, which may hold committed records a
    backup can still restore: it waits for the operator (docs/recovery.md)."""
    with Archive.open(tmp_path) as a:
        a.put_many(MSGS)
        a.shred(sha(MSGS[1]), reason="retention", delete_blob=True)
    (pack,) = packs_dir(tmp_path).glob("*.pack")
    pack.chmod(0o640)
    damaged = bytes(7) + pack.read_bytes()[7:]
    pack.write_bytes(damaged)
    with Archive.open(tmp_path) as a:
        assert a.compact().segments == 0
        assert a.get(sha(MSGS[2])) == MSGS[2]
    assert pack.read_bytes() == damaged
