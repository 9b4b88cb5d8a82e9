"""The ledger's remembered head (archive.ledger._Head): the same chain as reading the tail.

An appender remembers the head it last wrote instead of listing the directory and
reading the last segment's tail before every batch.  Several Ledger objects on one
directory stand for several processes (each its own memory, one flock).  Every
interleaving below must give byte for byte the ledger that appenders which always
read the tail (a new Ledger object per append) write.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from archive.ledger import Ledger

SIGNER = Ed25519PrivateKey.generate()


def _clock() -> Callable[[], datetime]:
    ticks: Iterator[int] = itertools.count()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return lambda: start + timedelta(milliseconds=next(ticks))


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.jsonl"))}


Op = tuple[int, str, int]  # (which appender, what, how many entries)


def _script(seed: int) -> list[Op]:
    rng = random.Random(seed)
    ops: list[Op] = []
    for _ in range(60):
        what = rng.choice(["append", "append", "append", "seal", "seal_open", "checkpoint",
                           "head"])
        ops.append((rng.randrange(3), what, rng.randrange(1, 6)))
    return ops


def _run(path: Path, ops: list[Op], *, remember: bool) -> None:
    clock = _clock()

    def make() -> Ledger:
        return Ledger(path, signer=SIGNER, segment_entries=7, checkpoint_every=5, clock=clock)

    appenders = [make() for _ in range(3)]
    for n, (who, what, count) in enumerate(ops):
        ledger = appenders[who] if remember else make()
        if what == "append":
            ledger.append_many([("audit", {"op": n, "i": i}) for i in range(count)])
        elif what == "seal":
            ledger.seal()
        elif what == "seal_open":
            ledger.seal(close=False)
        elif what == "checkpoint":
            ledger.checkpoint()
        else:
            ledger.head()


def test_remembered_heads_write_the_chain_that_reading_the_tail_writes(tmp_path: Path) -> None:
    for seed in range(8):
        ops = _script(seed)
        _run(tmp_path / f"remember{seed}", ops, remember=True)
        _run(tmp_path / f"read{seed}", ops, remember=False)
        assert _files(tmp_path / f"remember{seed}") == _files(tmp_path / f"read{seed}")
        assert len(_files(tmp_path / f"read{seed}")) > 3  # segments rotated and sealed


def test_an_entry_another_appender_wrote_is_not_overwritten_or_forked(tmp_path: Path) -> None:
    a, b = Ledger(tmp_path), Ledger(tmp_path)
    first = a.append("audit", n=1)
    second = b.append("audit", n=2)
    third = a.append("audit", n=3)  # a's remembered head (1) is stale: the file grew
    assert (second.prev, third.prev, third.seq) == (first.hash, second.hash, 3)


def test_a_segment_another_appender_started_is_found(tmp_path: Path) -> None:
    """seal() makes an empty segment without touching the last one: its name is what
    tells the other appenders that their remembered head is no longer the place to write."""
    a, b = Ledger(tmp_path, signer=SIGNER), Ledger(tmp_path, signer=SIGNER)
    a.append("audit", n=1)
    b.append("audit", n=2)
    a.append("audit", n=3)
    assert b.seal(close=True)  # checkpoint into the old segment, then a new empty one
    assert a.seal(close=True) is False  # sealed already: nothing to do
    entry = a.append("audit", n=4)
    names = sorted(p.name for p in tmp_path.glob("*.jsonl"))
    assert names[-1] == f"{entry.seq:012d}.jsonl"
    assert (tmp_path / names[-1]).read_bytes().count(b"\n") == 1
    chain = list(a.entries())
    assert [e.seq for e in chain] == list(range(1, len(chain) + 1))
    assert all(x.hash == y.prev for x, y in itertools.pairwise(chain))


def test_a_torn_line_left_by_a_crashed_appender_is_repaired_by_the_next(tmp_path: Path) -> None:
    a = Ledger(tmp_path)
    a.append("audit", n=1)
    seg = next(tmp_path.glob("*.jsonl"))
    with open(seg, "ab") as fh:  # another process died in the middle of its write
        fh.write(b'{"seq":2,"time":"2026')
    e = a.append("audit", n=2)
    assert e.seq == 3 and a.repaired_bytes == len(b'{"seq":2,"time":"2026')
    kinds = [x.kind for x in a.entries()]
    assert kinds == ["audit", "ledger_repaired", "audit"]


def test_a_replaced_segment_file_is_read_again(tmp_path: Path) -> None:
    """A restore (a new file by rename, another inode) is never mistaken for ours."""
    a = Ledger(tmp_path)
    a.append("audit", n=1)
    a.append("audit", n=2)
    seg = next(tmp_path.glob("*.jsonl"))
    lines = seg.read_bytes().splitlines(keepends=True)
    tmp = seg.with_suffix(".tmp")
    tmp.write_bytes(lines[0])
    tmp.rename(seg)
    e = a.append("audit", n=3)
    assert e.seq == 2  # the chain as the file now holds it, not as remembered
