"""``Archive``: the one object the gateway's archive stage and the metadata code use.

    archive = Archive.open(cfg.data_dir)            # creates keys on first use
    ref = archive.put(raw_bytes, {"archive_id": mid})
    archive.get(ref.sha256) == raw_bytes
    archive.append("hold_placed", case="C-17", query_sha256=...)
    archive.shred(ref.sha256, reason="retention")   # tombstone + destroy the data key

It composes the key ring (archive.keys), the blob store (archive.store) and the
ledger (archive.ledger): every stored message gets a ``message_stored`` ledger
entry in the same group commit, so there is never an acknowledged blob the
ledger does not know.  ``BatchWriter`` gives asyncio callers group commit
without having to batch themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archive.errors import ArchiveError
from archive.keys import KeyRing
from archive.ledger import Ledger, LedgerEntry, Timestamper
from archive.store import BlobRef, BlobStore, CompactResult, HeaderRepair, Recovered, check_sha

if TYPE_CHECKING:
    from archive.s3config import S3Config
    from archive.s3store import BlobBackend

Record = Mapping[str, Any]
_Item = tuple[bytes, Record, "asyncio.Future[BlobRef]"]
_Group = list[_Item]  # items that must share one batch (one ledger append)


class ArchivePaths:
    """Where the archive lives under a data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "archive"
        self.store = self.root / "store"
        self.ledger = self.root / "ledger"
        self.keys = self.root / "keys"


class Archive:
    """Blob store + ledger + keys.  Thread-safe; several processes may share one archive.

    Synchronous (each call may fsync): asyncio code uses ``BatchWriter`` or
    ``asyncio.to_thread``.
    """

    def __init__(self, paths: ArchivePaths, keys: KeyRing, store: BlobBackend,
                 ledger: Ledger) -> None:
        self.paths = paths
        self.keys = keys
        self.store = store
        self.ledger = ledger
        self.recovered: list[Recovered] = []

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        create: bool = True,
        segment_entries: int = 10000,
        checkpoint_every: int = 1000,
        clock: Callable[[], datetime] | None = None,
        timestamper: Timestamper | None = None,
        compression_level: int = 3,
        s3: S3Config | None = None,
    ) -> Archive:
        """Open for reading and writing; finishes any batch a crashed writer left.

        With ``s3`` the blobs live in that bucket under Object Lock (archive.s3store);
        the ledger and the keys stay under ``data_dir`` (each node its own chain).
        """
        paths = ArchivePaths(data_dir)
        if not create and not paths.keys.exists():
            raise ArchiveError(f"{paths.root}: no archive here (no keys directory)")
        if create:
            paths.root.mkdir(parents=True, exist_ok=True, mode=0o750)
            paths.store.mkdir(exist_ok=True, mode=0o750)
        keys = KeyRing.open(paths.keys, create=create)
        store: BlobBackend
        if s3 is not None:
            from archive.s3store import S3BlobStore

            store = S3BlobStore.open(s3, keys, data_dir, level=compression_level, clock=clock)
        else:
            store = BlobStore(paths.store, keys, level=compression_level)
        ledger = Ledger(paths.ledger, signer=keys.signer, segment_entries=segment_entries,
                        checkpoint_every=checkpoint_every, clock=clock,
                        timestamper=timestamper)
        archive = cls(paths, keys, store, ledger)
        ledger.repair()
        archive.recovered = store.recover(archive._ledger_recovered, archive._ledgered,
                                          archive._ledger_repaired, archive._ledgered_live)
        return archive

    def close(self) -> None:
        self.store.close()
        self.ledger.close()

    def probe(self) -> None:
        """Raise (ObjectStoreUnavailableError) unless the blob store answers; local files
        always do."""
        from archive.s3store import S3BlobStore

        if isinstance(self.store, S3BlobStore):
            self.store.probe()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- messages --

    def put(self, data: bytes, record: Record | None = None) -> BlobRef:
        """Store ``data`` once; ``record`` (ids, not personal data) goes into the ledger."""
        return self.put_many([data], [record or {}])[0]

    def put_many(self, datas: Sequence[bytes],
                 records: Sequence[Record] | None = None) -> list[BlobRef]:
        """Group commit: one fsync round for all blobs, one ledger append."""
        if records is None:
            records = [{}] * len(datas)
        if len(records) != len(datas):
            raise ValueError("put_many: one record per message")
        for rec in records:  # fail before any blob is written, not in the ledger append
            Ledger.check_fields("message_stored", rec)

        def ledger_batch(start: int, refs: list[BlobRef]) -> None:
            # Checked above: the fields added to each record are a str, ints and a bool.
            self.ledger.append_many([
                ("message_stored", {"sha256": r.sha256, "size": r.size,
                                    "stored_size": r.stored_size, "new": r.new, **rec})
                for r, rec in zip(refs, records[start:start + len(refs)], strict=True)
            ], checked=True)

        return self.store.write_many(datas, ledger_batch)

    def get(self, sha256: str) -> bytes:
        """The exact original bytes (decrypted, decompressed, hash-checked)."""
        return self.store.read(sha256)

    def exists(self, sha256: str) -> bool:
        return self.store.exists(sha256)

    def stored_queue_id(self, qid: str, since: datetime) -> bool:
        """Whether a message spooled under the queue id ``qid`` was stored at or after
        ``since``: the gateway's archive stage writes the queue id into the
        ``message_stored`` entry of every message it keeps (archive.receipts).

        Reads only this node's ledger from ``since`` on (Ledger.entries_since: a
        binary search into the segment, not the chain's history) and parses only the
        lines that name the id.  Local files only: it answers while the metadata
        database or the object storage is down.
        """
        # As the ledger writes it (ASCII JSON), quotes included: no other id matches.
        needle = encode_basestring_ascii(qid).encode("ascii")
        return any(e.kind == "message_stored" and e.fields.get("qid") == qid
                   for e in self.ledger.entries_since(since, containing=needle))

    def shred(self, sha256: str, *, reason: str, delete_blob: bool = False,
              **fields: Any) -> LedgerEntry:
        """Crypto-shred: record a tombstone, then destroy the blob's data key.

        The tombstone comes first: if we crash before the key is gone, verify
        reports an unfinished shred and calling shred again completes it.  The
        caller (retention) must have checked that no envelope or hold still needs
        the blob: shredding is for every envelope that shares it.
        """
        return self.shred_many([(sha256, fields)], reason=reason, delete_blob=delete_blob)[0]

    def shred_many(self, items: Sequence[tuple[str, Mapping[str, Any]]], *, reason: str,
                   delete_blob: bool = False) -> list[LedgerEntry]:
        """``shred`` for many blobs: one ledger append (tombstones in this order), then
        one key table rewrite per store segment instead of one per blob."""
        for sha256, _ in items:
            check_sha(sha256)
        entries = self.ledger.append_many(
            [("tombstone", {"sha256": sha, "reason": reason, **fields}) for sha, fields in items])
        shas = [sha for sha, _ in items]
        if not isinstance(self.store, BlobStore):  # the S3 store: one object at a time
            for sha in shas:
                self.store.shred(sha)
                if delete_blob:
                    self.store.delete(sha)
        elif delete_blob:  # marking a record deleted destroys its key in the same rewrite
            self.store.delete_many(shas)
        else:
            self.store.shred_many(shas)
        return entries

    def compact(self, progress: Callable[[int, int], None] | None = None) -> CompactResult:
        """Drop the bytes of deleted (expired, shredded) records from the store's
        segments; the ledger records what was freed.  Only the local store has segments:
        an S3 object is deleted whole when it expires."""
        if not isinstance(self.store, BlobStore):
            raise ArchiveError("compaction applies to the local pack store; objects in S3 "
                               "are deleted whole when their retention ends")
        result = self.store.compact(progress)
        if result.segments:
            self.ledger.append("store_compacted", segments=result.segments,
                               records=result.removed_records, freed_bytes=result.freed_bytes)
        return result

    def repair_headers(self, *, dry_run: bool = False,
                       progress: Callable[[int, int], None] | None = None
                       ) -> list[HeaderRepair]:
        """Rebuild the header of every damaged store segment that proves what it was
        (BlobStore.repair_header); the others are left as they are, with the reason.
        Each rebuilt header gets a ``store_repaired`` ledger entry (the segment, its old
        header bytes, the reason) before the new file takes the old one's place."""
        if not isinstance(self.store, BlobStore):
            raise ArchiveError("repair applies to the local pack store; objects in S3 "
                               "have no segment header")
        names = list(self.store.damaged_segments())
        out: list[HeaderRepair] = []
        for i, name in enumerate(names, 1):
            out.append(self.store.repair_header(name, dry_run=dry_run,
                                                commit=self._ledger_header_repaired))
            if progress:
                progress(i, len(names))
        return out

    def _ledger_header_repaired(self, plan: HeaderRepair) -> None:
        self.ledger.append("store_repaired", repaired_segment=plan.segment,
                           old_header_hex=plan.old_header.hex(),
                           new_header_hex=plan.new_header.hex(), records=plan.records,
                           reason=plan.reason)

    # -- ledger --

    def append(self, kind: str, **fields: Any) -> LedgerEntry:
        return self.ledger.append(kind, **fields)

    def checkpoint(self) -> LedgerEntry:
        return self.ledger.checkpoint()

    def rotate_key(self) -> str:
        """New blobs use a new archive key from now on; old keys keep unwrapping."""
        old = self.keys.current.id
        new = self.keys.rotate().id
        self.ledger.append("key_rotated", old_key=old, new_key=new)
        return new

    def _ledgered(self) -> set[str]:
        """Every SHA-256 a message_stored or blob_recovered entry names."""
        return {str(e.fields.get("sha256")) for e in self.ledger.entries()
                if e.kind in ("message_stored", "blob_recovered")}

    def damaged_segments(self) -> dict[str, str]:
        """Store segments whose header does not parse, kept because they hold (or may
        hold) committed messages: name -> why (archive.store, BlobStore._settle_damaged)."""
        return self.store.damaged_segments() if isinstance(self.store, BlobStore) else {}

    def _ledgered_live(self) -> set[str]:
        """The SHA-256s whose last blob entry in the ledger stores them (not a tombstone):
        what the store must still hold."""
        live: set[str] = set()
        for e in self.ledger.entries():
            if e.kind in ("message_stored", "blob_recovered"):
                live.add(str(e.fields.get("sha256")))
            elif e.kind == "tombstone":
                live.discard(str(e.fields.get("sha256")))
        return live

    def _ledger_repaired(self, segments: list[str],
                         reason: str = "writer died creating the segment; it held no record",
                         dropped_records: Sequence[str] = ()) -> None:
        """Segments recover() removed (archive.store): a writer died creating them, or
        their header is damaged and they held nothing committed (``dropped_records``:
        the records framed in them, none in the ledger)."""
        extra: dict[str, Any] = {}
        if dropped_records:
            extra["dropped_records"] = list(dropped_records)
        self.ledger.append("store_repaired", removed_segments=segments, reason=reason, **extra)

    def _ledger_recovered(self, batch: list[Recovered]) -> None:
        self.ledger.append_many([
            ("blob_recovered", {"sha256": r.sha256, "stored_size": r.stored_size,
                                "journal": r.journal})
            for r in batch
        ])


class BatchWriter:
    """Group commit for asyncio callers: concurrent ``put`` calls share one fsync round.

    Each caller awaits its own BlobRef, which is returned only after the blob and
    its ledger entry are durable, so the SMTP 250 can follow it.  Up to
    ``in_flight`` batches are written at once (in threads).

    One by default: whatever arrives while a batch commits makes the next batch.
    A batch costs about 1 ms of CPU whatever its size (three fsyncs, the store and
    ledger locks, rereading the other writers' appends); with two in flight, a put
    arriving while one committed started a second batch of its own at once, and the
    relay's batches held half as many messages (4-5 instead of 8-9 at 20
    connections), for ~0.08 ms more CPU per message.  A message waits at most one
    commit longer; throughput still grows with the batch.
    """

    def __init__(self, archive: Archive, *, max_batch: int = 128, in_flight: int = 1) -> None:
        self.archive = archive
        self.max_batch = max_batch
        self.in_flight = in_flight
        self._queue: asyncio.Queue[_Group | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def put(self, data: bytes, record: Record | None = None) -> BlobRef:
        return (await self.put_many([data], [record or {}]))[0]

    async def put_many(self, datas: Sequence[bytes], records: Sequence[Record]) -> list[BlobRef]:
        """Several blobs in the same batch, in this order (one ledger append): e.g. a
        receipt blob before the message whose ledger entry names it."""
        if self._closed:
            raise ArchiveError("the archive batch writer is closed")
        if len(records) != len(datas):
            raise ValueError("put_many: one record per blob")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="archive-batch-writer")
        loop = asyncio.get_running_loop()
        group: _Group = [(d, r, loop.create_future()) for d, r in zip(datas, records, strict=True)]
        await self._queue.put(group)
        # Every future of the group gets the batch's outcome: await them all, so that
        # none is left with an exception nobody retrieved.
        done = await asyncio.gather(*(fut for _, _, fut in group), return_exceptions=True)
        refs: list[BlobRef] = []
        for r in done:
            if isinstance(r, BaseException):
                raise r
            refs.append(r)
        return refs

    async def close(self) -> None:
        """Finish every put already queued, then stop."""
        self._closed = True
        if self._task is not None:
            await self._queue.put(None)
            await self._task
            self._task = None

    async def _run(self) -> None:
        slots = asyncio.Semaphore(self.in_flight)
        running: set[asyncio.Task[None]] = set()
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            await slots.acquire()
            batch = list(first)
            # Whatever arrived while earlier batches were being written joins this one
            # (a group is never split, so a batch may exceed max_batch by one group).
            while len(batch) < self.max_batch and not self._queue.empty():
                group = self._queue.get_nowait()
                if group is None:
                    stop = True
                    break
                batch.extend(group)
            task = asyncio.create_task(self._commit(batch, slots))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)

    async def _commit(self, batch: list[_Item], slots: asyncio.Semaphore) -> None:
        try:
            refs = await asyncio.to_thread(
                self.archive.put_many, [b[0] for b in batch], [b[1] for b in batch]
            )
        except Exception as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        finally:
            slots.release()
        for (_, _, fut), ref in zip(batch, refs, strict=True):
            if not fut.done():
                fut.set_result(ref)
