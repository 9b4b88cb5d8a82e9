"""Several nodes, one bucket: each node's ledger chain is sealed and mirrored under Object Lock,
and ``verify`` on any node checks every chain against every blob (archive.cluster)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from seaweed import Seaweed, seaweed

from archive.cluster import mirrored_nodes, seal_and_mirror, verify_cluster
from archive.facade import Archive
from archive.keys import KeyRing
from archive.ledger import Ledger, segments
from archive.s3config import S3Config
from archive.verify import verify

__all__ = ["seaweed"]  # the fixture, imported for pytest


def _cfg(sw: Seaweed, **kw: Any) -> S3Config:
    return S3Config.model_validate({
        "endpoint": sw.endpoint, "region": sw.region, "bucket": Seaweed.bucket_name("b"),
        "key_bucket": Seaweed.bucket_name("k"), "addressing_style": "path",
        "access_key_id": sw.access_key, "secret_access_key": sw.secret_key,
        "create_bucket": True, "connect_timeout": 2, "read_timeout": 10, "max_attempts": 1,
        **kw})


@pytest.fixture
def nodes(seaweed: Seaweed, tmp_path: Path) -> Iterator[tuple[S3Config, list[Archive]]]:
    """Two nodes: separate data directories, one copy of the archive keys, one bucket."""
    cfg = _cfg(seaweed)
    KeyRing.open(tmp_path / "a" / "archive" / "keys", create=True)
    shutil.copytree(tmp_path / "a" / "archive" / "keys", tmp_path / "b" / "archive" / "keys")
    archives = [Archive.open(tmp_path / n, s3=cfg) for n in ("a", "b")]
    try:
        yield cfg, archives
    finally:
        for a in archives:
            a.close()


def _write(archive: Archive, node: str, n: int) -> None:
    for i in range(n):
        archive.put_many([f"{node} message {i}\r\n".encode() * 20], [{"qid": f"{node}{i}"}])


def test_seal_signs_the_head_and_closes_the_segment_once(tmp_path: Path) -> None:
    keys = KeyRing.open(tmp_path / "keys", create=True)
    ledger = Ledger(tmp_path / "ledger", signer=keys.signer)
    assert not ledger.seal()  # empty
    ledger.append_many([("message_stored", {"sha256": "a" * 64})] * 3)
    assert ledger.seal()
    names = [p.name for _, p in segments(tmp_path / "ledger")]
    assert names == ["000000000001.jsonl", "000000000005.jsonl"]  # 3 entries + checkpoint
    assert [e.kind for e in ledger.entries()][-1] == "checkpoint"
    assert not ledger.seal()  # nothing new
    ledger.append("audit", action="search")
    assert ledger.seal(close=False)  # a checkpoint only
    assert [p.name for _, p in segments(tmp_path / "ledger")][-1] == "000000000005.jsonl"
    assert [e.kind for e in ledger.entries()][-2:] == ["audit", "checkpoint"]


def test_two_nodes_writing_at_once_verify_from_either_node(
        nodes: tuple[S3Config, list[Archive]], tmp_path: Path) -> None:
    cfg, (a, b) = nodes
    writers = [threading.Thread(target=_write, args=(arc, name, 15))
               for arc, name in ((a, "a"), (b, "b"))]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    for arc, name in ((a, "a"), (b, "b")):
        res = seal_and_mirror(arc, cfg, name)
        assert res is not None and res.segments and res.checkpoints
    assert mirrored_nodes(a.store.s3, cfg) == ["a", "b"]  # type: ignore[attr-defined]
    for node in ("a", "b"):
        summary, findings = verify_cluster(tmp_path / node / "archive", cfg, node,
                                           data_dir=tmp_path / node, grace=0)
        assert summary.ok, [str(f) for f in findings]
        assert summary.blobs == 30 and summary.blobs_decrypted == 30
        assert not [f for f in findings if f.severity != "info"], [str(f) for f in findings]
    # Each node's own chain is still an ordinary ledger the single-node verify accepts.
    summary, findings = verify(tmp_path / "a" / "archive")
    assert not [f for f in findings if f.code.startswith("ledger")], findings


def test_a_blob_no_sealed_chain_lists_is_a_warning_while_young_then_an_error(
        nodes: tuple[S3Config, list[Archive]], tmp_path: Path) -> None:
    cfg, (a, b) = nodes
    _write(a, "a", 2)
    seal_and_mirror(a, cfg, "a")
    _write(b, "b", 1)  # node b has not sealed: its entry is only on its own disk
    summary, findings = verify_cluster(tmp_path / "a" / "archive", cfg, "a",
                                       data_dir=tmp_path / "a", grace=3600)
    assert summary.ok and [f.code for f in findings if f.severity == "warning"] == [
        "blob_unsealed"]
    summary, findings = verify_cluster(tmp_path / "a" / "archive", cfg, "a",
                                       data_dir=tmp_path / "a", grace=0)
    assert not summary.ok and [f.code for f in findings if f.severity == "error"] == [
        "blob_unlisted"]
    seal_and_mirror(b, cfg, "b")
    summary, findings = verify_cluster(tmp_path / "a" / "archive", cfg, "a",
                                       data_dir=tmp_path / "a", grace=0)
    assert summary.ok, [str(f) for f in findings]


def test_a_local_chain_edited_after_it_was_mirrored_is_reported(
        nodes: tuple[S3Config, list[Archive]], tmp_path: Path) -> None:
    cfg, (a, _b) = nodes
    _write(a, "a", 3)
    seal_and_mirror(a, cfg, "a")
    first = segments(tmp_path / "a" / "archive" / "ledger")[0][1]
    lines = first.read_bytes().splitlines(keepends=True)
    first.write_bytes(b"".join(lines[:1] + lines[2:]))  # an entry deleted on the node
    summary, findings = verify_cluster(tmp_path / "a" / "archive", cfg, "a",
                                       data_dir=tmp_path / "a", grace=0)
    codes = {f.code for f in findings if f.severity == "error"}
    assert not summary.ok and "mirror_segment_differs" in codes
    assert "ledger_entry_missing" in codes or "ledger_link_broken" in codes
