"""``coffer backup create DEST`` / ``coffer backup restore SRC``: consistent, verifiable copies.

The gateway keeps running while a backup is made.  Consistency comes from the
order of the steps, each of which only ever sees append-only data grow:

1. the full-text index (SQLite FTS5) is snapshotted with the sqlite3 backup API;
2. the metadata database is snapshotted: SQLite with the sqlite3 backup API,
   PostgreSQL with pg_dump at an exported REPEATABLE READ snapshot
   (reports.pg_backup; the dump is DEST/metadata.pgdump).  The archive stage
   writes blob and ledger entry *before* the database row, so every row in this
   snapshot has its blob and ledger entry already;
3. a signed checkpoint is written to the ledger now, and the ledger is copied
   up to and including it (later entries are left out);
4. every store segment is copied up to the last record that ledger prefix names,
   with the key table and index entries of the records copied;
5. the keys are copied (0700 directory, 0600 files).

The copy is then checked with archive.verify (store + ledger + checkpoints
against the copied public key).  A message archived between steps 2 and 3 is
in the copied store and ledger but not in the copied database: after a restore,
``coffer archive rebuild --force`` would add it back; it is reported as a count.
On restore, blobs the database says were indexed after the index snapshot are
marked unindexed again, so the indexer of the running gateway catches up.

PostgreSQL: ``coffer backup restore --database URL`` restores the dump with
pg_restore into that database, which must be empty (``createdb``).  The pg
full-text index lives in the database and comes with it.  The whoosh index is
not copied (it is rebuilt with ``coffer archive reindex``).

BACKUPS CONTAIN THE ARCHIVE KEYS unless ``--no-keys``: whoever has the backup can
read every archived message.  Keep backups encrypted and access-controlled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import update

from archive.documents import is_message_entry
from archive.facade import Archive
from archive.ledger import Ledger, read_lines
from archive.metadata import Blob, Metadata
from archive.pack import KeyTable, encode_ack
from archive.segment import Location
from archive.store import PACK_DIR, BlobStore, SegmentView
from archive.verify import Finding, verify
from reports import pg_backup
from reports.common import LedgerIndex, Progress, metadata_url, record_audit
from reports.errors import BackupError

MANIFEST = "BACKUP.json"
KEYS_WARNING = ("WARNING: this backup contains the archive keys: anyone who can read it can "
                "decrypt every archived message. Store it encrypted, with restricted access.")


@dataclass
class BackupResult:
    dest: Path
    checkpoint_seq: int
    blobs: int
    findings: list[Finding] = field(default_factory=list)
    missed_rows: int = 0


@dataclass
class RestoreResult:
    ok: bool
    findings: list[Finding]


def _sqlite_path(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def _snapshot(src: Path, dst: Path) -> None:
    """sqlite3 online backup: a consistent copy even while writers commit."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()
    os.chmod(dst, 0o640)


def create_backup(data_dir: Path, dest: Path, *, database: str | None = None,
                  keys: bool = True, officer: str = "unknown",
                  progress: bool | None = None) -> BackupResult:
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest}: not empty; a backup needs a new directory")
    archive = Archive.open(data_dir, create=False)
    try:
        root = dest / "archive"
        root.mkdir(parents=True, mode=0o750)
        started = datetime.now(UTC)
        url = metadata_url(data_dir, database)
        fts = archive.paths.root / "index" / "fts5.db"
        if fts.exists():
            _snapshot(fts, root / "index" / "fts5.db")
        db_rows, kind = _snapshot_database(url, dest)
        checkpoint = archive.checkpoint()
        _copy_ledger(archive.paths.ledger, root / "ledger", checkpoint.seq)
        ledger = LedgerIndex.read(root / "ledger")
        blobs = _copy_store(archive.paths.store, root / "store", set(ledger.stored),
                            Progress("backup", len(ledger.stored), enabled=progress))
        if keys:
            _copy_keys(archive.paths.keys, root / "keys")
            print(KEYS_WARNING, file=sys.stderr)
        else:
            (root / "keys").mkdir(mode=0o700)
            shutil.copy2(archive.paths.keys / "ledger-signing.pub", root / "keys")
        missed = 0
        if db_rows is not None:
            # Documents and receipts are blobs the ledger stores, not messages.
            stored = sum(1 for e in Ledger(root / "ledger").entries() if is_message_entry(e))
            missed = max(0, stored - db_rows)
        info = {"created": started.isoformat(), "checkpoint_seq": checkpoint.seq,
                "checkpoint_head_hash": checkpoint.fields["head_hash"], "blobs": blobs,
                "index_snapshot_started": started.isoformat() if fts.exists() else None,
                "database": kind,
                "database_schema": pg_backup.libpq(url).schema if kind == "postgresql"
                else None,
                "keys": keys, "receipts_not_in_database": missed}
        (dest / MANIFEST).write_text(json.dumps(info, indent=1) + "\n")
        _, findings = verify(root, use_keys=keys)
        with Metadata(url) as meta:
            record_audit(meta, archive, officer, "backup", result_count=blobs,
                         target=str(dest.resolve()), detail={"checkpoint_seq": checkpoint.seq})
    finally:
        archive.close()
    return BackupResult(dest, checkpoint.seq, blobs,
                        [f for f in findings if f.severity == "error"], missed)


def _snapshot_database(url: str, dest: Path) -> tuple[int | None, str | None]:
    """Step 2: (message rows in the snapshot, "sqlite" | "postgresql"), or (None, None)
    when there is no database to copy."""
    src_db = _sqlite_path(url)
    if src_db is not None:
        if not src_db.exists():
            return None, None
        _snapshot(src_db, dest / "archive" / "meta.db")
        with Metadata(f"sqlite:///{dest / 'archive' / 'meta.db'}") as copy:
            return copy.count(), "sqlite"
    return pg_backup.dump(url, dest / pg_backup.DUMP_NAME), "postgresql"


def _copy_ledger(src: Path, dst: Path, upto: int) -> None:
    """Every complete line with seq <= upto, in the same segment files."""
    dst.mkdir(parents=True, mode=0o750)
    with contextlib.ExitStack() as stack:
        out: BinaryIO | None = None
        current: Path | None = None
        for raw in read_lines(src):
            if not raw.complete or json.loads(raw.data)["seq"] > upto:
                break
            if raw.segment != current:
                stack.close()
                current = raw.segment
                out = stack.enter_context(open(dst / raw.segment.name, "wb"))
            assert out is not None
            out.write(raw.data + b"\n")


def _copy_store(src: Path, dst: Path, shas: set[str], bar: Progress) -> int:
    """Each segment up to its last record named in the copied ledger.

    A writer appends to a segment in ledger order, so the records the ledger prefix
    names are a prefix of each segment: the copy stops at the first record the
    prefix does not name (a later batch, or one still being written), and never
    copies a partial record.  Key tables and indexes are written for exactly the
    records copied.
    """
    (dst / PACK_DIR).mkdir(parents=True, mode=0o750)
    store = BlobStore(src, None, fsync_threads=1)
    copied = 0
    try:
        views = [store.inspect(n) for n in store.segment_names()]
        superseded = {old for v in views for old in v.supersedes}
        for view in views:
            if view.name in superseded:
                continue  # its records are in the compacted segment that replaced it
            if view.stillborn:
                continue  # its writer died creating it: no record, recover() removes it
            records = []
            for r in view.scan.records:
                if r.sha256 not in shas:
                    break
                records.append(r)
            copied += _copy_segment(store, view, records, dst / PACK_DIR)
            bar.update(copied)
    finally:
        store.close()
    bar.done(copied)
    return copied


def _copy_segment(store: BlobStore, view: SegmentView, records: list[Location],
                  dst: Path) -> int:
    end = records[-1].offset + records[-1].length if records else view.header_len
    with open(store.packs / f"{view.name}.pack", "rb") as fh:
        data = os.pread(fh.fileno(), end, 0)
    keep = {r.dkid for r in records}
    table = KeyTable(keys={k: e for k, e in view.keys.keys.items() if k in keep},
                     dead={k: e for k, e in view.keys.dead.items() if k in keep})
    for ext, body in (("pack", data), ("keys", table.encode()),
                      ("ack", encode_ack(end))):
        (dst / f"{view.name}.{ext}").write_bytes(body)
    return sum(1 for k in keep if k not in table.dead)


def _copy_keys(src: Path, dst: Path) -> None:
    dst.mkdir(mode=0o700)
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            shutil.copyfile(p, dst / p.name)
            os.chmod(dst / p.name, 0o644 if p.name.endswith(".pub") else 0o600)


def restore_backup(src: Path, data_dir: Path, *, database: str | None = None,
                   officer: str = "unknown", progress: bool | None = None) -> RestoreResult:
    info_path = src / MANIFEST
    if not info_path.is_file():
        raise BackupError(f"{src}: not a Coffer backup (no {MANIFEST})")
    info = json.loads(info_path.read_text())
    target = data_dir / "archive"
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target}: an archive is already here; restore into an empty "
                          "data directory (move the old one aside first)")
    url = metadata_url(data_dir, database)
    dump = src / pg_backup.DUMP_NAME
    if info.get("database") == "postgresql" and _sqlite_path(url) is not None:
        raise BackupError(f"{src}: the metadata is a PostgreSQL dump; give --database URL "
                          "of an empty PostgreSQL database to restore it into")
    if info.get("database") == "postgresql" and not dump.is_file():
        raise BackupError(f"{dump}: missing (the backup's PostgreSQL dump)")
    bar = Progress("restore", enabled=progress)
    if info.get("database") == "postgresql":
        pg_backup.restore(dump, url, info.get("database_schema"))  # before any file is copied
    shutil.copytree(src / "archive", target, dirs_exist_ok=True)
    os.chmod(target / "keys", 0o700)
    bar.done(info.get("blobs", 0))
    restored_db = (info.get("database") == "postgresql"
                   or _sqlite_path(url) == target / "meta.db")
    if info.get("index_snapshot_started") and restored_db:
        # Indexed after the index snapshot: the copied index lacks them; index again.
        since = datetime.fromisoformat(info["index_snapshot_started"])
        with Metadata(url) as meta, meta.session() as s:
            s.execute(update(Blob).where(Blob.indexed_at >= since).values(indexed_at=None))
    summary, findings = verify(target, use_keys=bool(info.get("keys", True)))
    errors = [f for f in findings if f.severity == "error"]
    if restored_db or database:
        archive = Archive.open(data_dir, create=False) if info.get("keys", True) else None
        try:
            with Metadata(url) as meta:
                record_audit(meta, archive, officer, "restore", result_count=summary.blobs,
                             target=str(src.resolve()),
                             detail={"checkpoint_seq": info.get("checkpoint_seq")})
        finally:
            if archive is not None:
                archive.close()
    return RestoreResult(summary.ok, errors)
