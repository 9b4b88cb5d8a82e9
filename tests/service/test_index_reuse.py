"""The indexer in `coffer serve` reuses the archive stage's extraction instead of re-reading
the blob, and indexes exactly what a fresh extraction of the stored blob would give."""

from __future__ import annotations

from pathlib import Path

from archive.facade import Archive
from archive.index import Indexer, open_index
from archive.metadata import Metadata
from gateway.archive_stage import ArchiveStage
from gateway.envelope import Envelope
from gateway.pipeline import MessageContext
from gateway.service import _StageIndexer


def _message(token: str) -> bytes:
    return (f"From: Alice <alice@src.test>\r\nTo: bob@dst.test\r\nSubject: report {token}\r\n"
            f"Message-ID: <{token}@src.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n"
            f"The zeppelin figures for {token} are attached.\r\n").encode()


async def _archive(stage: ArchiveStage, token: str) -> str:
    ctx = MessageContext(
        envelope=Envelope(mail_from="alice@src.test", rcpt_to=["bob@dst.test"],
                          client_ip="127.0.0.1", received_at=1_700_000_000.0),
        data=_message(token), qid=f"Q{token}",
    )
    result = await stage.run(ctx)
    return str(result.facts["sha256"])


async def test_indexer_takes_the_stages_extraction_and_fetches_no_blob(tmp_path: Path) -> None:
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    stage = ArchiveStage(Archive.open(tmp_path), meta)
    index = open_index("fts5", data_dir=tmp_path)
    try:
        stage.keep_extracted = 8
        kept = await _archive(stage, "kept")
        stage.keep_extracted = 0  # this one must be fetched back from the store
        other = await _archive(stage, "fetched")
        pending = meta.unindexed()
        assert {sha for _, sha in pending} == {kept, other}
        # What a plain Indexer builds from the stored blobs is the reference.
        expected = Indexer(meta, index, stage.archive.get).docs(pending)

        fetched: list[str] = []
        indexer = _StageIndexer(stage, index)

        def fetch(sha256: str) -> bytes:
            fetched.append(sha256)
            return stage.archive.get(sha256)

        indexer.fetch = fetch
        stage.keep_extracted = 8
        docs = indexer.docs(pending)
        assert fetched == [other]
        assert sorted(docs, key=lambda d: d.doc_id) == sorted(expected, key=lambda d: d.doc_id)
        assert stage.take_extracted(kept) is None  # handed over once, not kept forever
    finally:
        index.close()
        await stage.close()


async def test_kept_extractions_are_bounded(tmp_path: Path) -> None:
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    stage = ArchiveStage(Archive.open(tmp_path), meta)
    try:
        stage.keep_extracted = 2
        shas = [await _archive(stage, f"m{i}") for i in range(4)]
        assert [stage.take_extracted(s) is not None for s in shas] == [False, False, True, True]
    finally:
        await stage.close()


async def test_each_worker_indexes_what_it_archived_and_worker_0_the_leftovers(
        tmp_path: Path) -> None:
    # Two workers (two stages over one data directory, as two processes): each
    # indexer takes the blobs whose extraction it holds, without fetching; a blob
    # nobody holds is left alone until it is overdue, then worker 0 fetches it.
    from gateway.service import INDEX_LOCK, LEFTOVER_AFTER

    stages = []
    for _ in range(2):
        meta = Metadata.for_data_dir(tmp_path)
        meta.migrate()
        stages.append(ArchiveStage(Archive.open(tmp_path), meta))
    index = open_index("fts5", data_dir=tmp_path)
    now = [1000.0]
    fetched: list[str] = []
    try:
        indexers = []
        for i, stage in enumerate(stages):
            stage.keep_extracted = 8
            ix = _StageIndexer(stage, index, lock=tmp_path / INDEX_LOCK, leftovers=i == 0,
                               monotonic=lambda: now[0])

            def fetch(sha256: str, stage: ArchiveStage = stage) -> bytes:
                fetched.append(sha256)
                return stage.archive.get(sha256)

            ix.fetch = fetch
            indexers.append(ix)
        mine0 = await _archive(stages[0], "zero")
        mine1 = await _archive(stages[1], "one")
        stages[1].keep_extracted = 0
        orphan = await _archive(stages[1], "orphan")  # its extraction is not kept

        assert indexers[0].run_once() == 1  # only its own: "one" is worker 1's
        assert indexers[1].run_once() == 1
        assert indexers[1].run_once() == 0  # never the orphan: worker 0's job
        assert indexers[0].run_once() == 0  # not overdue yet
        assert fetched == []
        now[0] += LEFTOVER_AFTER
        assert indexers[0].run_once() == 1
        assert fetched == [orphan]
        assert stages[0].meta.unindexed() == []
        assert not {mine0, mine1} & set(fetched)
    finally:
        index.close()
        for stage in stages:
            await stage.close()
