"""The hash-chained ledger: links, segments, checkpoints, torn tails, concurrent appenders."""

from __future__ import annotations

import base64
import fcntl
import gc
import hashlib
import itertools
import json
import multiprocessing
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from archive.errors import LedgerError
from archive.keys import load_public_key, verify_signature
from archive.ledger import GENESIS, Ledger, checkpoint_payload, entry_hash, read_lines
from archive.verify import verify


def test_each_entry_commits_to_the_previous_one(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    a = ledger.append("audit", action="search", results=3)
    b = ledger.append("hold_placed", case="C-1")
    assert (a.seq, a.prev) == (1, GENESIS)
    assert (b.seq, b.prev) == (2, a.hash)
    stored = list(ledger.entries())
    assert stored == [a, b]
    assert all(e.hash == entry_hash(e.as_dict()) for e in stored)
    assert ledger.head() == (2, b.hash)


def test_segments_rotate_and_the_chain_reads_back_in_order(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger", segment_entries=3)
    ledger.append_many([("audit", {"n": i}) for i in range(5)])
    for i in range(5, 10):
        ledger.append("audit", n=i)
    names = sorted(p.name for p in (tmp_path / "ledger").glob("*.jsonl"))
    assert names == ["000000000001.jsonl", "000000000004.jsonl", "000000000007.jsonl",
                     "000000000010.jsonl"]
    entries = list(ledger.entries())
    assert [e.seq for e in entries] == list(range(1, 11))
    assert [e.fields["n"] for e in entries] == list(range(10))
    # A reopened ledger (another process) continues the same chain.
    again = Ledger(tmp_path / "ledger", segment_entries=3)
    e = again.append("audit", n=10)
    assert (e.seq, e.prev) == (11, entries[-1].hash)


def test_checkpoints_are_signed_every_n_entries(tmp_path: Path) -> None:
    signer = Ed25519PrivateKey.generate()
    ledger = Ledger(tmp_path / "ledger", signer=signer, checkpoint_every=4)
    for i in range(7):
        ledger.append("audit", n=i)
    kinds = [e.kind for e in ledger.entries()]
    # A batch that reaches a multiple of 4 is followed by a checkpoint (seq 5 and 9).
    assert kinds == ["audit"] * 4 + ["checkpoint"] + ["audit"] * 3 + ["checkpoint"]
    cp = next(e for e in ledger.entries() if e.kind == "checkpoint")
    head = list(ledger.entries())[3]
    assert (cp.fields["head_seq"], cp.fields["head_hash"]) == (head.seq, head.hash)
    sig = base64.b64decode(cp.fields["signature"])
    signer.public_key().verify(sig, checkpoint_payload(head.seq, head.hash))


def test_archive_checkpoint_verifies_with_the_published_public_key(tmp_path: Path) -> None:
    from archive.facade import Archive

    with Archive.open(tmp_path) as a:
        a.put(b"x")
        cp = a.checkpoint()
        pub = load_public_key(a.paths.keys / "ledger-signing.pub")
    payload = checkpoint_payload(cp.fields["head_seq"], cp.fields["head_hash"])
    assert verify_signature(pub, base64.b64decode(cp.fields["signature"]), payload)


def test_reserved_field_names_are_refused(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    with pytest.raises(LedgerError, match="prev"):
        ledger.append("audit", prev="forged")
    assert list(ledger.entries()) == []


def test_torn_last_line_is_truncated_by_the_next_append_and_recorded(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    first = ledger.append("audit", n=1)
    seg = tmp_path / "ledger" / "000000000001.jsonl"
    with open(seg, "ab") as fh:  # what a crash in the middle of a write leaves
        fh.write(b'{"seq":2,"time":"2026-')
    assert ledger.head() == (1, first.hash)
    nxt = Ledger(tmp_path / "ledger").append("audit", n=2)
    entries = list(ledger.entries())
    assert [e.kind for e in entries] == ["audit", "ledger_repaired", "audit"]
    assert entries[1].fields["truncated_bytes"] == len(b'{"seq":2,"time":"2026-')
    assert entries[1].prev == first.hash and nxt.seq == 3
    assert seg.read_bytes().endswith(b"\n")


def test_a_line_finished_while_it_is_read_ends_the_segment_not_a_new_line(
        tmp_path: Path) -> None:
    # A verifier reading beside a running writer: the torn line it saw must not be
    # followed by the line's remainder (written meanwhile) as a malformed line.
    ledger = Ledger(tmp_path / "ledger")
    ledger.append("audit", n=1)
    seg = tmp_path / "ledger" / "000000000001.jsonl"
    with open(seg, "ab") as fh:
        fh.write(b'{"seq":2,"time":"2026-')
    lines = read_lines(tmp_path / "ledger")
    assert next(lines).complete
    torn = next(lines)
    assert not torn.complete
    with open(seg, "ab") as fh:
        fh.write(b'11-29T00:00:00Z"}\n')
    assert list(lines) == []


class _LocalTsa:
    """Stands in for an RFC 3161 TSA client (no network): returns a recognisable token."""

    def token(self, digest: bytes) -> bytes:
        return b"TST:" + digest


def test_timestamper_hook_stores_its_token_in_the_checkpoint(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger", signer=Ed25519PrivateKey.generate(),
                    timestamper=_LocalTsa())
    ledger.append("audit")
    cp = ledger.checkpoint()
    digest = hashlib.sha256(checkpoint_payload(1, cp.prev)).digest()
    assert base64.b64decode(cp.fields["tsa_token"]) == b"TST:" + digest


def _append_worker(path: str, worker: int, n: int) -> None:
    ledger = Ledger(Path(path), segment_entries=7)
    for i in range(n):
        if i % 3 == 0:
            ledger.append_many([("audit", {"w": worker, "i": i}), ("audit", {"w": worker})])
        else:
            ledger.append("audit", w=worker, i=i)


def test_appenders_in_several_processes_serialise_into_one_chain(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_worker, args=(str(tmp_path / "ledger"), w, 30))
             for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = list(Ledger(tmp_path / "ledger").entries())
    assert [e.seq for e in entries] == list(range(1, 4 * 40 + 1))
    for before, after in itertools.pairwise(entries):
        assert after.prev == before.hash
    summary, findings = verify(tmp_path)  # ledger at <root>/ledger, no store: chain only
    assert [f.code for f in findings if f.severity == "error"] == []
    assert summary.ledger_entries == 160


def test_values_json_cannot_represent_are_refused_and_plain_ones_pass(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    for bad in ({"score": float("nan")}, {"what": object()}, {"score": float("inf")}):
        with pytest.raises(LedgerError, match="JSON values"):
            ledger.append("audit", **bad)
    ledger.append("audit", name="Zoë \udcff", n=10**30, ok=True, gone=None)
    [entry] = list(ledger.entries())
    assert entry.fields == {"name": "Zoë \udcff", "n": 10**30, "ok": True, "gone": None}


def test_a_line_is_written_as_json_dumps_writes_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    [entry] = ledger.append_many([("audit", {"b": "é", "a": [1, 2.5], "c": {"z": 1}})])
    line = (tmp_path / "ledger" / "000000000001.jsonl").read_bytes()
    assert line == json.dumps(entry.as_dict(), ensure_ascii=True,
                              separators=(",", ":")).encode() + b"\n"
    assert entry.hash == hashlib.sha256(json.dumps(
        {k: v for k, v in entry.as_dict().items() if k != "hash"}, sort_keys=True,
        separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def test_plain_entries_take_the_built_once_encoders_and_write_what_json_dumps_writes(
        tmp_path: Path) -> None:
    # The common case (str, int, bool, None fields) skips JSONEncoder.encode: the lines
    # and hashes must still be what the generic encoders give, byte for byte.
    import enum

    from archive import ledger as ledger_mod

    class Level(enum.IntEnum):
        HIGH = 3

    assert ledger_mod._C_LINE is not None and ledger_mod._C_CANONICAL is not None
    batch = [
        ("message_stored", {"sha256": "ab" * 32, "size": 10234, "stored_size": 0, "new": True,
                            "qid": "Q1", "receipt": "cd" * 32}),
        ("audit", {"zeta": 'quote " back \\ tab \t nl \n \x01', "alpha": "Zoë \udcff 日本",
                   "n": -(10**30), "ok": False, "gone": None, "Upper": ""}),
        ("audit", {"level": Level.HIGH, "b": 1}),  # a subclass: the generic path
        ("audit", {}),
    ]
    ledger = Ledger(tmp_path / "ledger")
    entries = ledger.append_many(batch)
    lines = (tmp_path / "ledger" / "000000000001.jsonl").read_bytes().splitlines(keepends=True)
    assert len(lines) == len(entries) == len(batch)
    for entry, line in zip(entries, lines, strict=True):
        assert line == json.dumps(entry.as_dict(), ensure_ascii=True,
                                  separators=(",", ":")).encode() + b"\n"
        body = {k: v for k, v in entry.as_dict().items() if k != "hash"}
        assert entry.hash == hashlib.sha256(json.dumps(
            body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
            allow_nan=False).encode()).hexdigest()
    assert list(ledger.entries())[1].fields == batch[1][1]


def test_the_lock_file_is_opened_once_per_process(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    ledger.append("audit", n=1)
    fd = ledger._lock.fd
    ledger.append("audit", n=2)
    assert ledger._lock.fd == fd
    ledger.close()
    ledger.append("audit", n=3)  # opens it again
    assert [e.fields["n"] for e in ledger.entries()] == [1, 2, 3]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_waits_for_the_lock_its_parent_holds(tmp_path: Path) -> None:
    # The child inherits the parent's open lock file: taking the flock through it
    # would succeed at once (same open file description), so it must open its own.
    ledger = Ledger(tmp_path / "ledger")
    ledger.append("audit", n=1)
    done = tmp_path / "child-done"
    fcntl.flock(ledger._lock.fd, fcntl.LOCK_EX)  # as another appender would hold it
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                ledger.append("audit", n=2)
                done.write_text("x")
            finally:
                os._exit(0)
        time.sleep(0.5)
        assert not done.exists()  # still waiting for the parent's lock
    finally:
        fcntl.flock(ledger._lock.fd, fcntl.LOCK_UN)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and done.exists()
    assert [e.fields["n"] for e in ledger.entries()] == [1, 2]


def test_a_ledger_dropped_without_close_gives_its_lock_file_back(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    ledger.append("audit", n=1)
    fd = ledger._lock.fd
    del ledger
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("segment_entries", [100, 1_000_000])
def test_entries_since_reads_the_tail_from_any_segment_layout(
        tmp_path: Path, segment_entries: int) -> None:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    ticks = iter(range(10_000))
    ledger = Ledger(tmp_path / "ledger", segment_entries=segment_entries,
                    clock=lambda: t0 + timedelta(seconds=next(ticks)))
    for i in range(0, 3000, 50):  # ~400 KB: the binary search, not the scan, finds it
        ledger.append_many([("note", {"n": n, "pad": "x" * 80}) for n in range(i, i + 50)])
    everything = list(ledger.entries())
    for k in (0, 1, 1234, 2999):
        since = datetime.fromisoformat(everything[k].time)
        # One time per append: the entries of that batch before k are in the tail too.
        want = [e.seq for e in everything if datetime.fromisoformat(e.time) >= since]
        assert want[0] <= everything[k].seq
        assert [e.seq for e in ledger.entries_since(since)] == want
    assert list(ledger.entries_since(t0 + timedelta(days=1))) == []


def test_entries_since_containing_yields_only_the_entries_whose_line_holds_the_bytes(
        tmp_path: Path) -> None:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    ledger = Ledger(tmp_path / "ledger", segment_entries=4, clock=lambda: t0)
    ledger.append_many([("message_stored", {"qid": f"Q{n}", "sha256": "0" * 64})
                        for n in range(10)])
    found = list(ledger.entries_since(t0, containing=b'"Q7"'))
    assert [e.fields["qid"] for e in found] == ["Q7"]
    assert list(ledger.entries_since(t0, containing=b'"Q70"')) == []
    assert len(list(ledger.entries_since(t0))) == 10
