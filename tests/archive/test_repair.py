"""``coffer archive repair``: a store segment header a power loss damaged is rebuilt only
when the segment proves what it was (archive.store, BlobStore.repair_header)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from packs import flip_byte, packs_dir, record_of, rewrite

from archive.facade import Archive
from archive.metadata import Metadata
from archive.pack import RECORD_HEADER_LEN, encode_segment_header
from archive.verify import verify
from gateway.cli import main

MESSAGES = [b"Subject: message %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(5)]


def make_archive(data_dir: Path) -> list[str]:
    """A closed archive (no writer left) holding MESSAGES in one segment, and its database."""
    meta = Metadata.for_data_dir(data_dir)
    meta.migrate()
    meta.close()
    with Archive.open(data_dir) as a:
        refs = a.put_many(MESSAGES, [{"archive_id": i} for i in range(len(MESSAGES))])
    return [r.sha256 for r in refs]


def the_pack(data_dir: Path) -> Path:
    (pack,) = packs_dir(data_dir).glob("*.pack")
    return pack


def garble(path: Path, upto: int, fill: bytes) -> bytes:
    """Overwrite the first ``upto`` bytes as a power loss without a journal can."""
    data = path.read_bytes()
    rewrite(path, (fill * upto)[:upto] + data[upto:])
    path.chmod(0o440)
    return path.read_bytes()


def repair(capsys: pytest.CaptureFixture[str], data_dir: Path, *extra: str
           ) -> tuple[int, list[dict[str, object]], str]:
    code = main(["archive", "repair", "--json", "--data-dir", str(data_dir),
                 "--officer", "alice", *extra])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def kinds(data_dir: Path) -> list[str]:
    with Archive.open(data_dir) as a:
        return [e.kind for e in a.ledger.entries()]


def audit_actions(data_dir: Path) -> list[tuple[str, str]]:
    meta = Metadata.for_data_dir(data_dir)
    try:
        return [(e.who, e.action) for e in meta.audit_events()]
    finally:
        meta.close()


def error_codes(data_dir: Path) -> set[str]:
    _, findings = verify(data_dir / "archive")
    return {f.code for f in findings if f.severity == "error"}


@pytest.mark.parametrize("fill", [b"\0", b"\xa5\x17\x3c"], ids=["zeros", "garbage"])
def test_a_writers_segment_whose_header_was_lost_is_rebuilt_and_verifies_clean(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], fill: bytes) -> None:
    shas = make_archive(tmp_path)
    pack = the_pack(tmp_path)
    name = pack.name.removesuffix(".pack")
    whole = pack.read_bytes()
    damaged = garble(pack, 7, fill)
    assert error_codes(tmp_path) == {"segment_header_damaged"}

    code, rows, err = repair(capsys, tmp_path, "--progress")

    assert code == 0 and "repair: 1/1 segments" in err
    (row, summary) = rows
    assert row["segment"] == name and row["action"] == "repaired"
    assert row["old_header"] == damaged[:7].hex()
    assert row["new_header"] == encode_segment_header().hex()
    assert row["records"] == row["authenticated"] == len(MESSAGES)
    assert summary == {"type": "summary", "damaged": 1, "repaired": 1, "would_repair": 0,
                       "refused": 0, "dry_run": False, "ok": True}
    assert pack.read_bytes() == whole  # exactly the header the writer wrote
    assert pack.stat().st_mode & 0o777 == 0o440
    assert not list(packs_dir(tmp_path).glob("*.tmp"))
    summary_, findings = verify(tmp_path / "archive")
    assert summary_.ok and summary_.warnings == 0, findings
    with Archive.open(tmp_path) as a:
        assert a.damaged_segments() == {}
        assert [a.get(sha) for sha in shas] == MESSAGES
        (entry,) = [e for e in a.ledger.entries() if e.kind == "store_repaired"]
        audits = [e.fields for e in a.ledger.entries() if e.kind == "audit"]
    assert entry.fields["repaired_segment"] == name
    assert entry.fields["old_header_hex"] == damaged[:7].hex()
    assert entry.fields["new_header_hex"] == encode_segment_header().hex()
    assert "first record starts at byte 7" in str(entry.fields["reason"])
    assert [(a["action"], a["result_count"]) for a in audits] == [("repair", 1)]
    assert audit_actions(tmp_path) == [("alice", "repair")]


def test_a_dry_run_says_what_it_would_do_and_changes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_archive(tmp_path)
    pack = the_pack(tmp_path)
    damaged = garble(pack, 7, b"\0")
    before = kinds(tmp_path)

    code, rows, _ = repair(capsys, tmp_path, "--dry-run")

    assert code == 0
    assert rows[0]["action"] == "would_repair" and rows[-1]["would_repair"] == 1
    assert pack.read_bytes() == damaged
    assert kinds(tmp_path) == before
    assert audit_actions(tmp_path) == []
    code = main(["archive", "repair", "--dry-run", "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith(f"would repair {pack.name.removesuffix('.pack')}: ")
    assert "1 would be repaired, 0 left as they are" in err
    assert error_codes(tmp_path) == {"segment_header_damaged"}


def test_a_segment_whose_first_records_the_damage_reached_is_refused_and_left_as_it_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The first record that parses is not at byte 7: the header is not all that was
    lost, and nothing says what the lost bytes were."""
    shas = make_archive(tmp_path)
    first = record_of(tmp_path, shas[0])
    pack = the_pack(tmp_path)
    damaged = garble(pack, first.offset + first.length, b"\0")

    code, rows, err = repair(capsys, tmp_path)

    assert code == 1
    assert rows[0]["action"] == "refused" and rows[-1]["refused"] == 1
    assert f"starts at byte {first.offset + first.length}, not at byte 7" in str(
        rows[0]["reason"])
    assert pack.read_bytes() == damaged
    assert "store_repaired" not in kinds(tmp_path)
    assert audit_actions(tmp_path) == [("alice", "repair")]  # the attempt is audited
    main(["archive", "repair", "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert out.startswith("cannot repair ") and "nothing changed" in out
    assert "restore them from a backup" in err


def test_a_compactions_segment_is_refused_because_the_names_it_superseded_are_lost(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shas = make_archive(tmp_path)
    old = the_pack(tmp_path).name.removesuffix(".pack")
    with Archive.open(tmp_path) as a:
        a.shred(shas[0], reason="retention", delete_blob=True)
        assert a.compact().segments == 1
    pack = the_pack(tmp_path)
    assert pack.read_bytes().startswith(encode_segment_header([old]))
    damaged = garble(pack, 7, b"\0")

    code, rows, _ = repair(capsys, tmp_path)

    assert code == 1 and rows[0]["action"] == "refused"
    assert "compaction's output" in str(rows[0]["reason"])
    assert pack.read_bytes() == damaged
    assert "store_repaired" not in kinds(tmp_path)


def test_a_segment_whose_record_does_not_authenticate_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Framing alone proves nothing: every record with a data key must decrypt."""
    shas = make_archive(tmp_path)
    flip_byte(tmp_path, shas[3], RECORD_HEADER_LEN + 4)  # in its ciphertext
    pack = the_pack(tmp_path)
    damaged = garble(pack, 7, b"\0")

    code, rows, _ = repair(capsys, tmp_path)

    assert code == 1 and rows[0]["action"] == "refused"
    assert f"(blob {shas[3]}) does not authenticate" in str(rows[0]["reason"])
    assert pack.read_bytes() == damaged


def test_a_segment_a_writer_holds_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Another process holds the segment's flock, as a writer appending to it does."""
    make_archive(tmp_path)
    pack = the_pack(tmp_path)
    damaged = garble(pack, 7, b"\0")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         str(pack)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        code, rows, _ = repair(capsys, tmp_path)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
        assert holder.stdout is not None
        holder.stdout.close()
    assert code == 1 and rows[0]["action"] == "refused"
    assert "a writer holds the segment (its flock)" in str(rows[0]["reason"])
    assert pack.read_bytes() == damaged
    code, rows, _ = repair(capsys, tmp_path)  # the writer gone, it is repaired
    assert code == 0 and rows[0]["action"] == "repaired"


def test_with_no_damaged_segment_repair_does_nothing_and_succeeds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_archive(tmp_path)
    pack = the_pack(tmp_path)
    whole = pack.read_bytes()
    code = main(["archive", "repair", "--data-dir", str(tmp_path), "--progress"])
    out, err = capsys.readouterr()
    assert code == 0 and out == ""
    assert "nothing to repair" in err
    assert pack.read_bytes() == whole
    assert [action for _, action in audit_actions(tmp_path)] == ["repair"]


def test_a_header_is_not_replaced_unless_its_ledger_entry_was_written(tmp_path: Path) -> None:
    """The ledger entry (the old bytes are evidence) comes before the rename: if it
    fails, the damaged file stays as it was and the new one is removed."""
    from archive.facade import ArchivePaths
    from archive.keys import KeyRing
    from archive.store import BlobStore, HeaderRepair

    make_archive(tmp_path)
    pack = the_pack(tmp_path)
    damaged = garble(pack, 7, b"\0")
    paths = ArchivePaths(tmp_path)
    store = BlobStore(paths.store, KeyRing.open(paths.keys, create=False), fsync_threads=1)

    def ledger_fails(plan: HeaderRepair) -> None:
        raise OSError(28, "No space left on device")

    try:
        with pytest.raises(OSError):
            store.repair_header(pack.name.removesuffix(".pack"), commit=ledger_fails)
        assert store.damaged_segments() == {pack.name.removesuffix(".pack"):
                                            "not a Coffer pack segment (bad magic)"}
    finally:
        store.close()
    assert pack.read_bytes() == damaged
    assert not list(packs_dir(tmp_path).glob("*.tmp"))
