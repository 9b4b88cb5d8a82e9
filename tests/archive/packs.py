"""Reading and tampering with pack segments in tests, the way an attacker with
write access to the store directory would: by editing the files directly."""

from __future__ import annotations

import os
from pathlib import Path

from archive.pack import KeyTable, encode_ack, parse_acks, parse_key_table
from archive.segment import Location
from archive.store import BlobStore


def packs_dir(data_dir: Path) -> Path:
    return data_dir / "archive" / "store" / "packs"


def record_of(data_dir: Path, sha: str) -> Location:
    """The (single) record of ``sha`` in the store under ``data_dir``."""
    store = BlobStore(data_dir / "archive" / "store", None, fsync_threads=1)
    try:
        found = [r for n in store.segment_names() for r in store.inspect(n).scan.records
                 if r.sha256 == sha]
    finally:
        store.close()
    assert len(found) == 1, found
    return found[0]


def record_count(data_dir: Path) -> int:
    store = BlobStore(data_dir / "archive" / "store", None, fsync_threads=1)
    try:
        return sum(len(store.inspect(n).scan.records) for n in store.segment_names())
    finally:
        store.close()


def rewrite(path: Path, data: bytes) -> None:
    os.chmod(path, 0o640)
    path.write_bytes(data)


def flip_byte(data_dir: Path, sha: str, at: int) -> None:
    """Flip one bit of byte ``at`` of the record (0 = the record's first byte)."""
    loc = record_of(data_dir, sha)
    path = packs_dir(data_dir) / f"{loc.segment}.pack"
    data = bytearray(path.read_bytes())
    data[loc.offset + at] ^= 0x40
    rewrite(path, bytes(data))


def cut_record(data_dir: Path, sha: str, *, cover_tracks: bool) -> None:
    """Remove a record's bytes from its segment; ``cover_tracks`` also fixes the
    acknowledgement log and key table so that nothing but the ledger can tell."""
    loc = record_of(data_dir, sha)
    base = packs_dir(data_dir) / loc.segment
    pack = Path(f"{base}.pack")
    data = pack.read_bytes()
    rewrite(pack, data[:loc.offset] + data[loc.offset + loc.length:])
    if not cover_tracks:
        return
    ack_path = Path(f"{base}.ack")
    acks = [end - loc.length if end > loc.offset else end
            for end in parse_acks(ack_path.read_bytes())]
    rewrite(ack_path, b"".join(encode_ack(end) for end in acks))
    _drop_key(Path(f"{base}.keys"), loc.dkid)


def drop_key(data_dir: Path, sha: str) -> None:
    """Delete a blob's data key entry from its key table (shredding behind the ledger)."""
    loc = record_of(data_dir, sha)
    _drop_key(packs_dir(data_dir) / f"{loc.segment}.keys", loc.dkid)


def _drop_key(path: Path, dkid: str) -> None:
    table = parse_key_table(path.read_bytes())
    rewrite(path, table.encode({dkid}))


def key_table(data_dir: Path, segment: str) -> KeyTable:
    return parse_key_table((packs_dir(data_dir) / f"{segment}.keys").read_bytes())
