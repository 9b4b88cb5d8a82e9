"""``coffer archive verify`` finds every kind of tampering, and accepts a crashed archive."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from archive_verify_cli import run_coffer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from packs import cut_record, drop_key, flip_byte, packs_dir, record_of, rewrite

from archive.facade import Archive
from archive.ledger import Ledger, entry_hash
from archive.pack import RECORD_HEADER_LEN
from archive.store import BlobStore, SegmentView
from archive.verify import Finding, Verifier, verify

REPO = Path(__file__).resolve().parents[2]


def make_archive(data_dir: Path, n: int = 6) -> list[str]:
    """n messages (checkpoint every 4 entries), one audit entry; returns the hashes."""
    with Archive.open(data_dir, checkpoint_every=4, segment_entries=5) as a:
        refs = a.put_many([b"Subject: message %d\r\n\r\nbody %d\r\n" % (i, i) for i in range(n)],
                          [{"archive_id": i} for i in range(n)])
        a.append("audit", action="search", results=2)
        a.checkpoint()
    return [r.sha256 for r in refs]


def run_verify(data_dir: Path, **kw: object) -> tuple[bool, list[Finding]]:
    summary, findings = verify(data_dir / "archive", **kw)  # type: ignore[arg-type]
    return summary.ok, findings


def errors(findings: list[Finding]) -> set[str]:
    return {f.code for f in findings if f.severity == "error"}


def ledger_lines(data_dir: Path) -> list[tuple[Path, list[bytes]]]:
    segs = sorted((data_dir / "archive" / "ledger").glob("*.jsonl"))
    return [(s, s.read_bytes().splitlines(keepends=True)) for s in segs]


def find_line(data_dir: Path, seq: int) -> tuple[Path, list[bytes], int]:
    for seg, lines in ledger_lines(data_dir):
        for i, line in enumerate(lines):
            if json.loads(line)["seq"] == seq:
                return seg, lines, i
    raise AssertionError(f"no seq {seq}")


def test_untouched_archive_verifies_clean(tmp_path: Path) -> None:
    make_archive(tmp_path)
    ok, findings = run_verify(tmp_path)
    assert ok
    assert [f for f in findings if f.severity != "info"] == []


def test_flipped_byte_in_a_record_is_reported_altered(tmp_path: Path) -> None:
    shas = make_archive(tmp_path)
    flip_byte(tmp_path, shas[2], RECORD_HEADER_LEN + 3)
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert [(f.code, f.sha256) for f in findings if f.severity == "error"] == [
        ("blob_altered", shas[2])]


def test_flipped_byte_in_a_record_header_is_reported(tmp_path: Path) -> None:
    shas = make_archive(tmp_path)
    flip_byte(tmp_path, shas[2], 1)  # the magic: the segment no longer frames
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert {"segment_corrupt", "blob_missing", "store_index_mismatch"} <= errors(findings)
    assert shas[2] in {f.sha256 for f in findings if f.code == "blob_missing"}


def test_deleted_record_is_reported_missing(tmp_path: Path) -> None:
    shas = make_archive(tmp_path)
    cut_record(tmp_path, shas[0], cover_tracks=True)  # record, index and key entry
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert [(f.code, f.sha256) for f in findings if f.severity == "error"] == [
        ("blob_missing", shas[0])]


def test_record_cut_out_of_a_segment_is_reported(tmp_path: Path) -> None:
    shas = make_archive(tmp_path)
    cut_record(tmp_path, shas[3], cover_tracks=False)
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert errors(findings) == {"blob_missing", "store_index_mismatch", "store_extra_file"}
    assert [f.sha256 for f in findings if f.code == "blob_missing"] == [shas[3]]


def test_truncated_segment_is_reported(tmp_path: Path) -> None:
    shas = make_archive(tmp_path)
    loc = record_of(tmp_path, shas[-1])
    pack = packs_dir(tmp_path) / f"{loc.segment}.pack"
    rewrite(pack, pack.read_bytes()[:loc.offset + 10])  # acknowledged records cut off
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert [f.sha256 for f in findings if f.code == "blob_missing"] == [shas[-1]]
    assert "store_index_mismatch" in errors(findings)


def test_deleted_ledger_entry_is_reported_missing(tmp_path: Path) -> None:
    make_archive(tmp_path)
    seg, lines, i = find_line(tmp_path, 3)
    del lines[i]
    seg.write_bytes(b"".join(lines))
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert "ledger_entry_missing" in errors(findings)
    assert [f.seq for f in findings if f.code == "ledger_entry_missing"] == [3]
    # Its blob is now listed nowhere: an extra item.
    assert "blob_unlisted" in errors(findings)


def test_altered_ledger_entry_is_reported(tmp_path: Path) -> None:
    make_archive(tmp_path)
    seg, lines, i = find_line(tmp_path, 2)
    obj = json.loads(lines[i])
    obj["archive_id"] = 999
    lines[i] = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    seg.write_bytes(b"".join(lines))
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert errors(findings) == {"ledger_entry_altered"}
    assert [f.seq for f in findings if f.code == "ledger_entry_altered"] == [2]


def test_altered_and_rehashed_entry_breaks_the_next_link(tmp_path: Path) -> None:
    make_archive(tmp_path)
    seg, lines, i = find_line(tmp_path, 2)
    obj = json.loads(lines[i])
    obj["archive_id"] = 999
    obj["hash"] = entry_hash(obj)
    lines[i] = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    seg.write_bytes(b"".join(lines))
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert "ledger_link_broken" in errors(findings)


def test_reordered_ledger_entries_are_reported(tmp_path: Path) -> None:
    make_archive(tmp_path)
    seg, lines, i = find_line(tmp_path, 2)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    seg.write_bytes(b"".join(lines))
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert errors(findings) == {"ledger_reordered"}


def test_rewritten_chain_is_caught_by_the_signed_checkpoint(tmp_path: Path) -> None:
    """Delete entry 2 and renumber and rehash everything after it: links are consistent
    again, but the attacker cannot re-sign the checkpoints."""
    make_archive(tmp_path)
    entries = [json.loads(line) for _, lines in ledger_lines(tmp_path) for line in lines]
    del entries[1]
    prev = "0" * 64
    for seq, e in enumerate(entries, 1):
        e["seq"], e["prev"] = seq, prev
        if e["kind"] == "checkpoint":
            e["head_seq"], e["head_hash"] = seq - 1, prev
        e["hash"] = prev = entry_hash(e)
    ledger_dir = tmp_path / "archive" / "ledger"
    for seg in ledger_dir.glob("*.jsonl"):
        seg.unlink()
    (ledger_dir / "000000000001.jsonl").write_bytes(
        b"".join(json.dumps(e).encode() + b"\n" for e in entries))
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert "checkpoint_bad_signature" in errors(findings)
    assert "ledger_link_broken" not in errors(findings)  # the forgery is otherwise consistent


def test_checkpoint_signed_by_another_key_is_reported_forged(tmp_path: Path) -> None:
    make_archive(tmp_path)
    forger = Ledger(tmp_path / "archive" / "ledger", signer=Ed25519PrivateKey.generate())
    forged = forger.checkpoint()
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert [(f.code, f.seq) for f in findings if f.severity == "error"] == [
        ("checkpoint_bad_signature", forged.seq)]


def test_extra_blob_with_no_ledger_entry_is_reported(tmp_path: Path) -> None:
    make_archive(tmp_path)
    with Archive.open(tmp_path) as a:
        [planted] = a.store.write_many([b"planted message"])  # no ledger entry
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert [(f.code, f.sha256) for f in findings if f.severity == "error"] == [
        ("blob_unlisted", planted.sha256)]


def test_stray_file_in_the_store_is_reported(tmp_path: Path) -> None:
    make_archive(tmp_path)
    (tmp_path / "archive" / "store" / "notes.txt").write_text("hello")
    ok, findings = run_verify(tmp_path)
    assert not ok and errors(findings) == {"store_extra_file"}


def test_shredded_blob_is_reported_tombstoned_not_tampered(tmp_path: Path) -> None:
    shas = make_archive(tmp_path)
    with Archive.open(tmp_path) as a:
        a.shred(shas[1], reason="retention expired")
        a.shred(shas[2], reason="retention expired", delete_blob=True)
    ok, findings = run_verify(tmp_path)
    assert ok, findings
    assert [(f.code, f.sha256) for f in findings if f.code == "blob_tombstoned"] == [
        ("blob_tombstoned", shas[1])]


def test_data_key_deleted_without_a_tombstone_is_tampering(tmp_path: Path) -> None:
    shas = make_archive(tmp_path)
    drop_key(tmp_path, shas[0])
    ok, findings = run_verify(tmp_path)
    assert not ok and errors(findings) == {"data_key_missing"}


def test_ciphertext_only_mode_works_without_the_archive_keys(tmp_path: Path) -> None:
    shas = make_archive(tmp_path)
    keys = tmp_path / "archive" / "keys"
    for p in keys.iterdir():
        if p.name != "ledger-signing.pub":
            p.unlink()
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.mode == "ciphertext-only" and summary.blobs_decrypted == 0
    cut_record(tmp_path, shas[0], cover_tracks=True)
    ok, findings = run_verify(tmp_path)
    assert not ok and errors(findings) == {"blob_missing"}


def test_public_key_kept_apart_overrides_a_replaced_one(tmp_path: Path) -> None:
    make_archive(tmp_path)
    pub = tmp_path / "archive" / "keys" / "ledger-signing.pub"
    officer_copy = tmp_path / "officer.pub"
    shutil.copy(pub, officer_copy)
    # An attacker re-signs everything with a new key and replaces the .pub file.
    from cryptography.hazmat.primitives import serialization

    forger = Ed25519PrivateKey.generate()
    pub.write_bytes(forger.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    Ledger(tmp_path / "archive" / "ledger", signer=forger).checkpoint()
    ok, _ = run_verify(tmp_path, public_key_path=officer_copy)
    assert not ok


def test_cli_json_prints_one_object_per_finding_and_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shas = make_archive(tmp_path)
    assert run_coffer(["archive", "verify", "--data-dir", str(tmp_path), "--json"]) == 0
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert objs[-1]["type"] == "summary" and objs[-1]["ok"] is True
    assert objs[-1]["blobs"] == 6 and objs[-1]["mode"] == "full"
    cut_record(tmp_path, shas[0], cover_tracks=True)
    assert run_coffer(["archive", "verify", "--data-dir", str(tmp_path), "--json"]) == 1
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o for o in objs if o["type"] == "finding" and o["severity"] == "error"] == [{
        "type": "finding", "severity": "error", "code": "blob_missing", "sha256": shas[0],
        "message": f"blob {shas[0]} is in the ledger but not in the store (deleted)"}]
    assert objs[-1]["ok"] is False and objs[-1]["errors"] == 1


def test_cli_with_config_file_and_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_archive(tmp_path / "data")
    cfg = tmp_path / "coffer.yaml"
    cfg.write_text("data_dir: data\nlisteners:\n  - name: inbound\n    tls: none\n")
    assert run_coffer(["archive", "verify", "--config", str(cfg), "--progress"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("OK: 6 blobs (6 decrypted")
    assert "verify: blobs 6/6" in out.err


def test_cli_refuses_a_world_readable_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_archive(tmp_path)
    key = tmp_path / "archive" / "keys" / "archive-k1.key"
    key.chmod(0o644)
    assert run_coffer(["archive", "verify", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{key}: key file is accessible" in err


def test_torn_ledger_tail_is_a_warning_then_truncated_and_recorded_on_open(tmp_path: Path) -> None:
    make_archive(tmp_path)
    seg, _lines = ledger_lines(tmp_path)[-1]
    with open(seg, "ab") as fh:
        fh.write(b'{"seq":12,"time":"20')
    ok, findings = run_verify(tmp_path)
    assert ok
    assert [f.code for f in findings if f.severity == "warning"] == ["ledger_torn_tail"]
    # The next writer to open the archive truncates it and says so in the ledger.
    with Archive.open(tmp_path) as a:
        last = list(a.ledger.entries())[-1]
    assert (last.kind, last.fields["truncated_bytes"]) == ("ledger_repaired", 20)
    ok, findings = run_verify(tmp_path)
    assert ok and not [f for f in findings if f.severity == "warning"]


WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from archive.facade import Archive
    a = Archive.open(Path(sys.argv[1]), checkpoint_every=50, segment_entries=40)
    n = 0
    while True:
        batch = [os.urandom(64) + b"crash test message %d" % (n + i) for i in range(16)]
        # Also a duplicate of an earlier message now and then (dedup under crash).
        batch.append(b"crash test message dup %d" % (n % 5))
        a.put_many(batch, [{"archive_id": n + i} for i in range(len(batch))])
        a.append("audit", action="batch", n=n)
        n += len(batch)
        print(n, flush=True)
""")


def test_kill_9_during_ingest_leaves_an_archive_that_verify_accepts(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            for _ in range(3 + round_ * 2):  # let some batches be acknowledged
                assert proc.stdout.readline(), proc.stderr.read() if proc.stderr else ""
            time.sleep(0.003 * (round_ + 1))  # and kill in the middle of a later one
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        assert proc.returncode == -signal.SIGKILL
        ok, findings = run_verify(tmp_path)
        assert ok, [f for f in findings if f.severity == "error"]
        assert {f.code for f in findings if f.severity == "warning"} <= {
            "ledger_torn_tail", "batch_interrupted", "blob_unacknowledged", "segment_torn_tail",
            "store_extra_file"}
    # The next writer finishes the interrupted batch; then nothing is left to warn about.
    with Archive.open(tmp_path) as a:
        a.checkpoint()
        live = {e.fields["sha256"] for e in a.ledger.entries() if e.kind == "message_stored"}
        for sha in live:
            assert a.get(sha)
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.warnings == 0, findings


def test_garbage_in_the_ledger_is_reported_never_a_crash(tmp_path: Path) -> None:
    make_archive(tmp_path)
    seg, lines, i = find_line(tmp_path, 2)
    bogus = {"seq": 99, "time": "t", "kind": "message_stored", "sha256": "../../etc/passwd",
             "prev": "0" * 64}
    bogus["hash"] = entry_hash(bogus)
    lines[i:i] = [b"not json\n", b"[1, 2]\n", b'{"seq": 98, "x": NaN, "hash": "h", '
                  b'"prev": "p", "kind": "k", "time": "t"}\n', json.dumps(bogus).encode() + b"\n"]
    seg.write_bytes(b"".join(lines))
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert [f.code for f in findings if f.code == "ledger_malformed"] == ["ledger_malformed"] * 3
    assert "ledger_entry_altered" in errors(findings)  # the NaN line


def test_verify_while_a_writer_is_running_reports_no_errors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline()
        for _ in range(5):
            ok, findings = run_verify(tmp_path)
            assert ok, [f for f in findings if f.severity == "error"]
            assert proc.stdout.readline()  # the writer is still making progress
    finally:
        proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def test_a_record_half_written_when_the_store_was_read_is_not_reported_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a running writer makes: verify reads the store while the last record
    is half on disk, then reads a ledger that already lists it.  The record lies past
    the whole records that scan saw (scan.end), though before the file size it saw."""
    make_archive(tmp_path)
    real_read_store = Verifier._read_store

    def read_store_mid_write(self: Verifier, store: BlobStore) -> list[SegmentView]:
        views = real_read_store(self, store)
        view = max(views, key=lambda v: v.scan.end)
        last = view.scan.records.pop()
        view.scan.end = last.offset
        view.scan.size = last.offset + last.length // 2  # half of it written
        view.acked = min(view.acked, last.offset)
        return views

    monkeypatch.setattr(Verifier, "_read_store", read_store_mid_write)
    ok, findings = run_verify(tmp_path)
    assert ok, [f for f in findings if f.severity == "error"]


KILLED_BETWEEN_RECORDS_AND_KEYS = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import archive.store as store
    from archive.facade import Archive
    real = store.write_all
    calls = 0
    def write_all(fd, data):
        # _write_records writes a batch's records, then its keys: die between the two
        # (in the second batch), as a kill -9 can.
        global calls
        real(fd, data)
        calls += 1
        if calls == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    store.write_all = write_all
    a = Archive.open(Path(sys.argv[1]))
    a.put_many([b"first batch message"], [{"archive_id": 1}])
    a.put_many([b"message whose key was never written"], [{"archive_id": 2}])
""")


def test_records_written_without_their_keys_by_a_killed_writer_are_cut_not_shredded(
        tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RECORDS_AND_KEYS,
                           str(tmp_path)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    # The next writer recovers: the keyless record is gone, so the same bytes (the
    # gateway retrying that message after a restart) are stored, not refused as shredded.
    with Archive.open(tmp_path) as a:
        ref = a.put_many([b"message whose key was never written"], [{"archive_id": 3}])[0]
        assert a.get(ref.sha256) == b"message whose key was never written"
    ok, findings = run_verify(tmp_path)
    assert ok, [f for f in findings if f.severity == "error"]


KILLED_CREATING_A_SEGMENT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import archive.store as store
    from archive.facade import Archive
    point = sys.argv[2]
    a = Archive.open(Path(sys.argv[1]))
    a.put_many([b"acknowledged message"], [{"archive_id": 1}])
    store.SEGMENT_RECORDS = 1  # the next batch needs a new segment
    real_write, real_rename = store.write_all, os.rename
    steps = []
    def step(what):
        steps.append(what)
        if "%s%d" % (what, steps.count(what)) == point:
            os.kill(os.getpid(), signal.SIGKILL)
    def write_all(fd, data):
        real_write(fd, data)
        step("write")
    def rename(src, dst):
        real_rename(src, dst)
        if "/packs/" in str(dst):
            step("rename")
    store.write_all = write_all
    os.rename = rename
    a.put_many([b"message whose segment was being created"], [{"archive_id": 2}])
""")


@pytest.mark.parametrize("point", ["write1", "write2", "rename1", "rename2", "rename3"])
def test_kill_9_while_creating_a_segment_leaves_an_archive_that_verify_accepts(
        tmp_path: Path, point: str) -> None:
    """Killed after the .pack header (write1), the key table header (write2) or each
    rename into place: an older writer left a named .pack whose .keys was empty
    there, which verify reported as an altered key table and Archive.open failed on."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLED_CREATING_A_SEGMENT, str(tmp_path),
                           point], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    ok, findings = run_verify(tmp_path)
    assert ok, [f for f in findings if f.severity == "error"]
    assert {f.code for f in findings if f.severity == "warning"} <= {"store_extra_file"}
    with Archive.open(tmp_path) as a:
        ref = a.put(b"message whose segment was being created")
        assert a.get(ref.sha256) == b"message whose segment was being created"
        live = {e.fields["sha256"] for e in a.ledger.entries() if e.kind == "message_stored"}
        assert all(a.get(sha) for sha in live) and len(live) == 2
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.warnings == 0, findings


@pytest.mark.parametrize(("pack", "keys"), [
    (b"", b""), (b"CFP", None), (b"CFPS\x01\x00\x00", None), (b"CFPS\x01\x00\x00", b""),
    (b"CFPS\x01\x00\x00", b"CF")])
def test_a_segment_an_older_writer_died_creating_is_a_warning_then_removed_and_ledgered(
        tmp_path: Path, pack: bytes, keys: bytes | None) -> None:
    """What an older _new_writer (files created under their final names) left when
    killed: part of a header, or a header and a .keys without its own."""
    shas = make_archive(tmp_path)
    name = "18ec89a50b60e234-8ad63118"
    (packs_dir(tmp_path) / f"{name}.pack").write_bytes(pack)
    if keys is not None:
        (packs_dir(tmp_path) / f"{name}.keys").write_bytes(keys)
        (packs_dir(tmp_path) / f"{name}.ack").write_bytes(b"")
    ok, findings = run_verify(tmp_path)
    assert ok, [f for f in findings if f.severity == "error"]
    assert [f.code for f in findings if f.severity == "warning"] == ["segment_unfinished"]
    with Archive.open(tmp_path) as a:
        last = list(a.ledger.entries())[-1]
        assert all(a.get(sha) for sha in shas)
    assert (last.kind, last.fields["removed_segments"]) == ("store_repaired", [name])
    assert not list(packs_dir(tmp_path).glob(f"{name}.*"))
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.warnings == 0, findings


def test_a_segment_with_a_header_and_records_is_never_taken_for_unfinished(
        tmp_path: Path) -> None:
    """An emptied .keys beside records is tampering (an error), not a dead writer's
    leftover to remove."""
    make_archive(tmp_path)
    keys = next(packs_dir(tmp_path).glob("*.keys"))
    rewrite(keys, b"")
    ok, findings = run_verify(tmp_path)
    assert not ok and "blob_altered" in errors(findings)
    assert "segment_unfinished" not in {f.code for f in findings}


# -- a segment header lost to a power loss ------------------------------------------------


def _garble(path: Path, upto: int, fill: bytes) -> bytes:
    """Overwrite the first ``upto`` bytes of ``path`` the way a power loss on a file
    system without a journal can (a block never written: zeros, or stale bytes)."""
    data = path.read_bytes()
    rewrite(path, (fill * upto)[:upto] + data[upto:])
    return path.read_bytes()


def _unledgered_segment(data_dir: Path, message: bytes) -> Path:
    """A newer segment holding one whole record the ledger never got (its batch's ledger
    append was lost): what the writer of an archive's last batch left."""
    from archive.facade import ArchivePaths
    from archive.keys import KeyRing

    paths = ArchivePaths(data_dir)
    before = set(packs_dir(data_dir).glob("*.pack"))
    store = BlobStore(paths.store, KeyRing.open(paths.keys, create=False), fsync_threads=1)
    try:
        store.write_many([message])  # no ledger append
    finally:
        store.close()
    (new,) = set(packs_dir(data_dir).glob("*.pack")) - before
    return new


@pytest.mark.parametrize("fill", [b"\0", b"\xa5\x17"])
@pytest.mark.parametrize("record", [False, True])
def test_a_garbled_header_of_a_segment_holding_nothing_committed_is_removed_and_ledgered(
        tmp_path: Path, fill: bytes, record: bool) -> None:
    """The newest segment, its header lost: with nothing in it (a block of zeros) or
    with a record no ledger entry names, it is repaired as an unfinished one is."""
    shas = make_archive(tmp_path)
    if record:
        pack = _unledgered_segment(tmp_path, b"Subject: never acknowledged\r\n\r\nx\r\n")
    else:
        pack = packs_dir(tmp_path) / "18ec89a50b60e234-8ad63118.pack"
        pack.write_bytes(b"CFPS\x01\x00\x00" + bytes(4089))
        pack.with_suffix(".keys").write_bytes(b"CFKT\x01")
        pack.with_suffix(".ack").write_bytes(b"")
    _garble(pack, 7, fill)
    ok, findings = run_verify(tmp_path)
    assert not ok and "segment_header_damaged" in errors(findings)
    with Archive.open(tmp_path) as a:
        last = list(a.ledger.entries())[-1]
        assert a.damaged_segments() == {}
        assert all(a.get(sha) for sha in shas)
        ref = a.put(b"Subject: after the power loss\r\n\r\ny\r\n")
        assert a.get(ref.sha256) == b"Subject: after the power loss\r\n\r\ny\r\n"
    name = pack.name.removesuffix(".pack")
    assert last.kind == "store_repaired" and last.fields["removed_segments"] == [name]
    assert "segment header unreadable" in last.fields["reason"]
    assert len(last.fields.get("dropped_records", [])) == int(record)
    assert not list(packs_dir(tmp_path).glob(f"{name}.*"))
    summary, findings = verify(tmp_path / "archive")
    assert summary.ok and summary.warnings == 0, findings


def test_a_garbled_header_of_a_segment_holding_committed_messages_is_kept_and_reported(
        tmp_path: Path) -> None:
    """Never silently dropped: the store opens (mail goes on into a new segment), the
    records after the damage are still read, and verify names the segment and them."""
    shas = make_archive(tmp_path)
    (pack,) = packs_dir(tmp_path).glob("*.pack")
    damaged = _garble(pack, 7, b"\0")
    ok, findings = run_verify(tmp_path)
    assert not ok and errors(findings) == {"segment_header_damaged"}
    (finding,) = [f for f in findings if f.code == "segment_header_damaged"]
    assert finding.path == str(pack) and all(sha in finding.message for sha in shas)
    with Archive.open(tmp_path) as a:
        assert [e.kind for e in a.ledger.entries()][-1] != "store_repaired"
        assert a.damaged_segments() == {
            pack.name.removesuffix(".pack"): "not a Coffer pack segment (bad magic)"}
        assert all(a.get(sha) for sha in shas)
        ref = a.put(b"Subject: after the power loss\r\n\r\ny\r\n")
        assert a.get(ref.sha256) == b"Subject: after the power loss\r\n\r\ny\r\n"
    assert pack.read_bytes() == damaged  # evidence is not cut, rewritten or removed
    ok, findings = run_verify(tmp_path)
    assert not ok and errors(findings) == {"segment_header_damaged"}


def test_messages_lost_with_a_garbled_header_are_named_missing_and_the_rest_read(
        tmp_path: Path) -> None:
    shas = make_archive(tmp_path)
    first = record_of(tmp_path, shas[0])
    pack = packs_dir(tmp_path) / f"{first.segment}.pack"
    damaged = _garble(pack, first.offset + first.length, b"\0")
    ok, findings = run_verify(tmp_path)
    assert not ok
    assert errors(findings) == {"segment_header_damaged", "blob_missing"}
    (missing,) = [f for f in findings if f.code == "blob_missing"]
    assert missing.sha256 == shas[0] and first.segment in missing.message
    with Archive.open(tmp_path) as a:
        assert all(a.get(sha) for sha in shas[1:])
    assert pack.read_bytes() == damaged


def test_opening_the_archive_never_cuts_a_segment_at_a_corrupt_record(tmp_path: Path) -> None:
    """A record header that does not parse ends what the store can frame; the records
    after it are committed, so recover() must not take them for a torn tail."""
    shas = make_archive(tmp_path)
    flip_byte(tmp_path, shas[2], 1)
    (pack,) = packs_dir(tmp_path).glob("*.pack")
    altered = pack.read_bytes()
    with Archive.open(tmp_path):
        pass
    assert pack.read_bytes() == altered
    ok, findings = run_verify(tmp_path)
    assert not ok and "segment_corrupt" in errors(findings)


def test_a_segment_a_power_loss_zeroed_whole_is_kept_while_the_ledger_misses_a_blob(
        tmp_path: Path) -> None:
    """Nothing in it frames, so nothing in it is named by the ledger; but a committed
    message is in no other segment: it was in this one, which must stay for a backup."""
    shas = make_archive(tmp_path)
    before = set(packs_dir(tmp_path).glob("*.pack"))
    with Archive.open(tmp_path) as a:  # another process: a segment of its own
        lost = a.put(b"Subject: in the newest segment\r\n\r\nz\r\n").sha256
    (pack,) = set(packs_dir(tmp_path).glob("*.pack")) - before
    zeroed = _garble(pack, pack.stat().st_size, b"\0")
    with Archive.open(tmp_path) as a:
        assert [e.kind for e in a.ledger.entries()][-1] != "store_repaired"
        assert all(a.get(sha) for sha in shas)
    assert pack.read_bytes() == zeroed
    ok, findings = run_verify(tmp_path)
    assert not ok and errors(findings) == {"segment_header_damaged", "blob_missing"}
    (missing,) = [f for f in findings if f.code == "blob_missing"]
    assert missing.sha256 == lost and pack.name.removesuffix(".pack") in missing.message
