"""``coffer archive verify``: prove the store and the ledger are what was written.

Needs only ``archive/store``, ``archive/ledger`` and the ledger's public key --
not the database -- so it also shows that nobody edited the database to hide a
message.  With the archive keys present (``archive/keys``) every blob is
decrypted and its SHA-256 recomputed ("full" mode); without them only record
framing, presence, the segment indexes, data key entries and the ledger are
checked ("ciphertext-only").

What is checked, and the finding codes (severity error unless noted):

  ledger_malformed         a line that is not a ledger entry
  ledger_torn_tail         (warning) the last line of the last segment is incomplete:
                           a crash during an append that was never acknowledged
  ledger_entry_altered     an entry's content does not match its own hash
  ledger_link_broken       an entry's ``prev`` is not the hash of the entry before it
  ledger_entry_missing     a sequence number never appears (a deleted entry)
  ledger_reordered         an entry appears after a later one
  ledger_duplicate         a sequence number appears twice
  ledger_segment_misnamed  a segment's name does not match its first entry
  checkpoint_head_mismatch a checkpoint names a head that is not the entry before it
  checkpoint_bad_signature a checkpoint whose signature the public key rejects
  checkpoint_unchecked     (warning) no public key, signatures not checked
  ledger_unsigned_tail     (info) entries after the last checkpoint
  blob_missing             the ledger lists a blob (not tombstoned) the store lacks; a
                           blob deleted after expiry has a tombstone, so it is not missing
  blob_unlisted            a record no ledger entry mentions (an extra item)
  blob_unacknowledged      (warning) a record after its segment's acknowledged length that
                           the ledger lacks: a batch interrupted by a crash, or running
  batch_interrupted        (warning) such a tail in a segment whose writer died
                           (see archive.store; the next writer finishes it)
  segment_torn_tail        (warning) bytes of a record cut short at a segment's end
  segment_unfinished       (warning) a segment whose writer died creating it, before its
                           headers were whole: it holds no record (the next writer
                           removes it and says so in the ledger, ``store_repaired``)
  segment_corrupt          a segment whose records cannot be framed (bytes inserted,
                           removed or altered)
  segment_header_damaged   a segment whose header does not parse (a power loss on a file
                           system that lost fsynced bytes, or tampering) and which holds,
                           or may hold, committed messages: the ones in the ledger still
                           framed after the damage are named (and checked); those lost
                           with it are blob_missing.  One that holds nothing committed is
                           removed by the next writer instead (``store_repaired``); one
                           whose header ``coffer archive repair`` can prove is rebuilt
  store_index_mismatch     a segment's .ack says more is acknowledged than the segment
                           holds, or not at a record boundary (records removed)
  compaction_unfinished    (warning) a segment a compaction replaced, not removed yet
  blob_altered             a record that fails to decrypt or whose hash is wrong, or a
                           key table that does not parse
  data_key_missing         a live blob without its data key (shredded untracked)
  blob_tombstoned          (info) a shredded blob whose ciphertext is still present
  shred_incomplete         (warning) tombstoned, but the data key still exists
  store_extra_file         a file the store never writes, or a data key with no record
                           (a warning for leftovers of an interrupted write)
  archive_key_missing      a blob wrapped with an archive key we do not have

Exit status 1 when any error is found, else 0.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archive.errors import ArchiveError, KeyFileError
from archive.keys import SIGNING_PUB_FILE, KeyRing, load_public_key, verify_signature
from archive.ledger import (
    GENESIS,
    SEGMENT_NAME,
    checkpoint_payload,
    entry_hash,
    read_lines,
    segments,
)
from archive.segment import Location, ack_on_boundary
from archive.store import (
    LOCK_FILE,
    PACK_DIR,
    SEGMENT_FILE,
    SHA_RE,
    BlobStore,
    SegmentView,
)

Severity = Literal["error", "warning", "info"]
_MAX_GAP = 1_000_000  # report larger seq jumps as one range, never materialise them
LIVE_KINDS = frozenset({"message_stored", "blob_recovered"})


@dataclass(frozen=True)
class Finding:
    severity: Severity
    code: str
    message: str
    path: str | None = None
    sha256: str | None = None
    seq: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"type": "finding", **{k: v for k, v in asdict(self).items() if v is not None}}

    def __str__(self) -> str:
        return f"{self.severity.upper()} {self.code}: {self.message}"


@dataclass
class Summary:
    mode: str = "full"
    ledger_entries: int = 0
    checkpoints: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    blobs: int = 0
    blobs_decrypted: int = 0
    tombstoned: int = 0
    errors: int = 0
    warnings: int = 0

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def as_dict(self) -> dict[str, Any]:
        return {"type": "summary", **asdict(self), "ok": self.ok}


Progress = Callable[[str, int, int | None], None]


@dataclass
class _LedgerState:
    blobs: dict[str, str] = field(default_factory=dict)  # sha256 -> "live" | "tombstoned"


class Verifier:
    def __init__(
        self,
        archive_root: Path,
        *,
        public_key: Ed25519PublicKey | None,
        keyring: KeyRing | None,
        on_finding: Callable[[Finding], None] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.root = archive_root
        self.public_key = public_key
        self.keyring = keyring
        self.on_finding = on_finding
        self.progress = progress
        self.findings: list[Finding] = []
        self.summary = Summary(mode="full" if keyring else "ciphertext-only")

    def report(self, severity: Severity, code: str, message: str, **where: Any) -> None:
        f = Finding(severity, code, message, **where)
        self.findings.append(f)
        if severity == "error":
            self.summary.errors += 1
        elif severity == "warning":
            self.summary.warnings += 1
        if self.on_finding:
            self.on_finding(f)

    def run(self) -> Summary:
        # Order matters when a writer is running: a batch lists its records in the
        # segment's .ack only after its ledger append, so reading the store (each
        # segment's .ack first), then the ledger, never mistakes a record being
        # written for an extra one.
        store = BlobStore(self.root / "store", self.keyring, fsync_threads=1)
        try:
            views = self._read_store(store)
            state = self.verify_ledger(self.root / "ledger")
            self._verify_store(store, views, state)
        finally:
            store.close()
        return self.summary

    # -- the ledger -----------------------------------------------------------------

    def verify_ledger(self, path: Path) -> _LedgerState:
        state = _LedgerState()
        segs = segments(path)
        last_seg = segs[-1][1] if segs else None
        first_of = {p: first for first, p in segs}
        self._extra_ledger_files(path)
        phys_seq: int | None = 0  # seq of the physically previous entry (None: unknown)
        phys_hash = GENESIS
        max_seq = 0
        missing: set[int] = set()
        big_gaps: list[tuple[int, int]] = []
        last_checkpoint = 0
        if self.public_key is None:
            self.report("warning", "checkpoint_unchecked",
                        "no ledger public key: checkpoint signatures were not checked")
        for raw in read_lines(path, segs):
            where = f"{raw.segment}:{raw.lineno}"
            if not raw.complete:
                if raw.segment == last_seg:
                    self.report("warning", "ledger_torn_tail",
                                f"{where}: incomplete last line (a crash during an append "
                                "that was never acknowledged; the next writer truncates it)",
                                path=str(raw.segment))
                else:
                    self.report("error", "ledger_malformed",
                                f"{where}: incomplete line inside the ledger",
                                path=str(raw.segment))
                phys_seq = None
                continue
            try:
                obj = json.loads(raw.data)
                seq, stored_hash, prev = obj["seq"], obj["hash"], obj["prev"]
                kind = obj["kind"]
                if not (isinstance(seq, int) and isinstance(stored_hash, str)
                        and isinstance(prev, str) and isinstance(kind, str)):
                    raise TypeError("seq, hash, prev or kind has the wrong type")
            except (ValueError, KeyError, TypeError) as exc:
                self.report("error", "ledger_malformed", f"{where}: not a ledger entry ({exc})",
                            path=str(raw.segment))
                phys_seq = None
                continue
            self.summary.ledger_entries += 1
            if raw.lineno == 1 and first_of.get(raw.segment) != seq:
                self.report("error", "ledger_segment_misnamed",
                            f"{raw.segment.name}: first entry has seq {seq}",
                            path=str(raw.segment), seq=seq)
            try:
                actual = entry_hash(obj)
            except ValueError:  # NaN or Infinity: no writer produces them
                actual = ""
            if actual != stored_hash:
                self.report("error", "ledger_entry_altered",
                            f"{where}: entry {seq} does not match its hash (content altered)",
                            path=str(raw.segment), seq=seq)
            # Ordering: every seq from 1 to the maximum must appear exactly once, in order.
            if seq > max_seq:
                gap = seq - max_seq - 1
                if gap > _MAX_GAP:
                    big_gaps.append((max_seq + 1, seq - 1))
                elif gap > 0:
                    missing.update(range(max_seq + 1, seq))
                max_seq = seq
            elif seq in missing:
                missing.discard(seq)
                self.report("error", "ledger_reordered",
                            f"{where}: entry {seq} appears after entry {max_seq}",
                            path=str(raw.segment), seq=seq)
            else:
                self.report("error", "ledger_duplicate", f"{where}: seq {seq} appears again",
                            path=str(raw.segment), seq=seq)
            if phys_seq is not None and seq == phys_seq + 1 and prev != phys_hash:
                self.report("error", "ledger_link_broken",
                            f"{where}: entry {seq} does not link to entry {phys_seq} "
                            "(an entry was replaced or rewritten)",
                            path=str(raw.segment), seq=seq)
            if kind == "checkpoint":
                self.summary.checkpoints += 1
                last_checkpoint = seq
                self._check_checkpoint(obj, where, str(raw.segment), phys_seq, phys_hash)
            if not self._track_blob(state, kind, obj):
                self.report("error", "ledger_malformed",
                            f"{where}: entry {seq} ({kind}) has no valid sha256",
                            path=str(raw.segment), seq=seq)
            phys_seq, phys_hash = seq, stored_hash
            self.summary.head_seq, self.summary.head_hash = seq, stored_hash
        for lo, hi in _ranges(sorted(missing)) + big_gaps:
            what = f"entry {lo}" if lo == hi else f"entries {lo}..{hi}"
            self.report("error", "ledger_entry_missing", f"ledger {what} missing (deleted)",
                        seq=lo)
        unsigned = self.summary.head_seq - last_checkpoint
        if unsigned > 0:
            self.report("info", "ledger_unsigned_tail",
                        f"{unsigned} entries after the last checkpoint are not signed yet "
                        "(run `coffer archive checkpoint`)", seq=last_checkpoint + 1)
        return state

    def _extra_ledger_files(self, path: Path) -> None:
        if not path.is_dir():
            return
        for p in sorted(path.iterdir()):
            if p.name == ".lock" or SEGMENT_NAME.match(p.name):
                continue
            self.report("error", "store_extra_file", f"{p}: not a ledger segment", path=str(p))

    def _check_checkpoint(self, obj: dict[str, Any], where: str, seg: str,
                          phys_seq: int | None, phys_hash: str) -> None:
        seq = obj["seq"]
        head_seq, head_hash = obj.get("head_seq"), obj.get("head_hash")
        if head_seq != seq - 1 or (phys_seq == seq - 1 and head_hash != phys_hash):
            self.report("error", "checkpoint_head_mismatch",
                        f"{where}: checkpoint {seq} names head {head_seq} {head_hash}, "
                        "which is not the entry before it", path=seg, seq=seq)
        if self.public_key is None:
            return
        try:
            sig = base64.b64decode(str(obj.get("signature", "")), validate=True)
            payload = checkpoint_payload(int(str(head_seq)), str(head_hash))
        except ValueError:
            sig, payload = b"", b""
        if not verify_signature(self.public_key, sig, payload):
            self.report("error", "checkpoint_bad_signature",
                        f"{where}: checkpoint {seq} is not signed by the ledger key "
                        "(forged or altered)", path=seg, seq=seq)

    @staticmethod
    def _track_blob(state: _LedgerState, kind: str, obj: dict[str, Any]) -> bool:
        """Follow a blob's life in the ledger; False if a blob entry names no valid hash."""
        if kind not in LIVE_KINDS and kind != "tombstone":
            return True
        sha = obj.get("sha256")
        if not isinstance(sha, str) or not SHA_RE.match(sha):
            return False
        state.blobs[sha] = "live" if kind in LIVE_KINDS else "tombstoned"
        return True

    # -- the store ------------------------------------------------------------------

    def _read_store(self, store: BlobStore) -> list[SegmentView]:
        """Every segment as it is now; anything the store never writes is reported."""
        root = store.root
        if not root.is_dir():
            return []
        for p in sorted(root.iterdir()):
            if not ((p.name == LOCK_FILE and p.is_file()) or (p.name == PACK_DIR and p.is_dir())):
                self.report("error", "store_extra_file", f"{p}: not a file the store writes",
                            path=str(p))
        if not store.packs.is_dir():
            return []
        names = sorted(os.listdir(store.packs))
        packs = {m.group(1) for n in names
                 if (m := SEGMENT_FILE.match(n)) and m.group(2) == "pack"}
        for n in names:
            m = SEGMENT_FILE.match(n)
            path = str(store.packs / n)
            if m and m.group(1) in packs:
                continue
            if n.endswith(".tmp") or m:
                if (store.packs / n).exists():
                    self.report("warning", "store_extra_file",
                                f"{path}: left by an interrupted segment creation, key "
                                "table rewrite or compaction (the next writer removes it)",
                                path=path)
            else:
                self.report("error", "store_extra_file", f"{path}: not a file the store writes",
                            path=path)
        views = []
        for name in sorted(packs):
            try:
                views.append(store.inspect(name))
            except FileNotFoundError:
                continue  # compacted while we were listing
        return views

    def _verify_store(self, store: BlobStore, views: list[SegmentView],
                      state: _LedgerState) -> None:
        superseded = {old for v in views for old in v.supersedes}
        present: set[str] = set()
        todo: list[tuple[SegmentView, Location, bool]] = []
        for view in views:
            path = str(store.packs / f"{view.name}.pack")
            if view.name in superseded:
                self.report("warning", "compaction_unfinished",
                            f"{path}: replaced by a compacted segment but not removed yet "
                            "(the next writer removes it)", path=path)
                continue
            self._check_segment(store, view, path)
            if view.damaged:
                self._report_damaged(view, path, state)
            for r in view.scan.records:
                if r.dkid in view.keys.dead:
                    continue  # deleted after shredding: compaction drops its bytes
                present.add(r.sha256)
                todo.append((view, r, r.offset >= view.acked))
        self.summary.blobs = len(todo)
        for i, (view, r, unacked_rec) in enumerate(todo, 1):
            if self.progress:
                self.progress("blobs", i, len(todo))
            self._verify_record(store, view, r, state.blobs.get(r.sha256), unacked_rec)
        # Up to the last whole record each scan saw: a record half on disk then was
        # being written, and may be listed by the ledger we read after it.
        seen = {v.name: v.scan.end for v in views}
        damaged = [v.name for v in views if v.damaged]
        lost = f"; or lost in the damaged segment(s) {', '.join(damaged)}" if damaged else ""
        for sha, st in sorted(state.blobs.items()):
            if st == "live" and sha not in present and not self._stored_since(store, sha, seen):
                self.report("error", "blob_missing",
                            f"blob {sha} is in the ledger but not in the store (deleted{lost})",
                            sha256=sha)
            elif st == "tombstoned":
                self.summary.tombstoned += 1

    @staticmethod
    def _stored_since(store: BlobStore, sha: str, seen: dict[str, int]) -> bool:
        """Was ``sha`` stored after we read the store (beyond the bytes we read)?"""
        state, loc = store.locate(sha)
        return (state != "absent" and loc is not None
                and (loc.segment not in seen or loc.offset >= seen[loc.segment]))

    def _report_damaged(self, view: SegmentView, path: str, state: _LedgerState) -> None:
        """A segment whose header does not parse (BlobStore._settle_damaged kept it: it
        holds, or may hold, committed messages)."""
        listed = sorted({r.sha256 for r in view.scan.records if r.sha256 in state.blobs})
        first = view.scan.records[0].offset if view.scan.records else view.header_len
        self.report("error", "segment_header_damaged",
                    f"{path}: its segment header does not parse ({view.damaged}): its "
                    f"first {first} bytes are unreadable (a power loss on a file system that lost "
                    "fsynced bytes, or tampering).  "
                    + (f"{len(listed)} message(s) in the ledger are framed after them and "
                       f"checked below: {', '.join(listed)}.  " if listed else "")
                    + "Messages it held in the unreadable bytes are reported as "
                    "blob_missing; run coffer archive repair (it rebuilds the header if "
                    "the segment proves it), else restore the segment from a backup",
                    path=path)

    def _check_segment(self, store: BlobStore, view: SegmentView, path: str) -> None:
        """Framing, index and key table of one segment."""
        if view.stillborn:
            self.report("warning", "segment_unfinished",
                        f"{path}: its writer died creating it; it holds no record (the "
                        "next writer removes it)", path=path)
            return
        if view.keys_error:
            self.report("error", "blob_altered", f"{view.name}.keys: {view.keys_error}",
                        path=str(store.packs / f"{view.name}.keys"))
        if view.scan.corrupt_at is not None:
            self.report("error", "segment_corrupt",
                        f"{path}: byte {view.scan.corrupt_at}: {view.scan.corrupt} (bytes "
                        "inserted, removed or altered; the records after it cannot be read)",
                        path=path)
        elif view.scan.torn:
            self.report("warning", "segment_torn_tail",
                        f"{path}: {view.scan.torn} bytes of a record cut short by a crash "
                        "(never acknowledged; the next writer truncates them)", path=path)
        if not ack_on_boundary(view.acked, view.scan.records, view.header_len):
            self.report("error", "store_index_mismatch",
                        f"{view.name}.ack: {view.acked} bytes acknowledged, which is not the "
                        "end of a record in the segment (records removed or moved)",
                        path=str(store.packs / f"{view.name}.ack"))
        unacked = any(r.offset >= view.acked for r in view.scan.records)
        if unacked and not view.live_writer:
            self.report("warning", "batch_interrupted",
                        f"{path}: its writer died before acknowledging its last batch; "
                        "the next writer finishes it", path=path)
        in_segment = {r.dkid for r in view.scan.records}
        for dkid in sorted(set(view.keys.keys) - in_segment):
            kpath = str(store.packs / f"{view.name}.keys")
            if view.damaged:
                self.report("warning", "store_extra_file",
                            f"{kpath}: data key {dkid}, whose record was in the damaged "
                            "bytes of the segment (see segment_header_damaged)", path=kpath)
            elif view.scan.torn or unacked:
                self.report("warning", "store_extra_file",
                            f"{kpath}: data key {dkid} from an unfinished write", path=kpath)
            else:
                self.report("error", "store_extra_file",
                            f"{kpath}: data key {dkid}, whose record is not in the segment",
                            path=kpath)

    def _verify_record(self, store: BlobStore, view: SegmentView, r: Location,
                       st: str | None, unacked: bool) -> None:
        sha = r.sha256
        where = {"path": f"{store.packs / view.name}.pack@{r.offset}", "sha256": sha}
        if st is None:
            if unacked:
                self.report("warning", "blob_unacknowledged",
                            f"blob {sha} from an interrupted or running batch, not yet in "
                            "the ledger", **where)
            else:
                self.report("error", "blob_unlisted",
                            f"blob {sha} is in the store but in no ledger entry (extra)",
                            **where)
        key = view.keys.keys.get(r.dkid)
        if st == "tombstoned":
            if key is None:
                self.report("info", "blob_tombstoned",
                            f"blob {sha} was shredded (tombstone in the ledger); its "
                            "unreadable ciphertext is still stored", **where)
            else:
                self.report("warning", "shred_incomplete",
                            f"blob {sha} is tombstoned but its data key remains "
                            "(run the shred again)", **where)
            return
        if key is None:
            # An unacknowledged record's key may have been appended after we read the
            # key table (records go first): only an acknowledged one must have it.
            if st == "live" and not unacked:
                self.report("error", "data_key_missing",
                            f"blob {sha}: its data key is gone but the ledger has no "
                            "tombstone (shredded outside the archive)", **where)
            return
        if self.keyring is None:
            return
        try:
            self.keyring.get(key.kid)
            store.open_record(store.read_record(r), view.keys, sha)
            self.summary.blobs_decrypted += 1
        except FileNotFoundError:
            return  # compacted while we were verifying
        except KeyFileError as exc:
            self.report("error", "archive_key_missing", f"blob {sha}: {exc}", **where)
        except ArchiveError as exc:
            self.report("error", "blob_altered", str(exc), **where)


def _ranges(seqs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


def verify_keys(archive_root: Path, public_key_path: Path | None, *, use_keys: bool
                ) -> tuple[Ed25519PublicKey | None, KeyRing | None]:
    """The ledger public key and (when readable and wanted) the archive keys."""
    if not archive_root.is_dir():
        raise ArchiveError(f"{archive_root}: no archive here")
    keys_dir = archive_root / "keys"
    keyring = None
    if use_keys and os.access(keys_dir, os.R_OK | os.X_OK) and (keys_dir / "current").exists():
        # Readable keys are used (and refused if their permissions are loose); an
        # auditor without access to them gets the ciphertext-only check.
        keyring = KeyRing.open(keys_dir, need_signer=False)
    pub_path = public_key_path or keys_dir / SIGNING_PUB_FILE
    public_key = load_public_key(pub_path) if pub_path.exists() or public_key_path else None
    return public_key, keyring


def verify(
    archive_root: Path,
    *,
    public_key_path: Path | None = None,
    use_keys: bool = True,
    on_finding: Callable[[Finding], None] | None = None,
    progress: Progress | None = None,
) -> tuple[Summary, list[Finding]]:
    """Verify the archive under ``archive_root`` (``<data dir>/archive``).

    The archive keys are used when ``archive/keys`` holds them (and ``use_keys``);
    otherwise the check is ciphertext-only.  A key file with loose permissions is
    refused (KeyFileError), never silently skipped.
    """
    public_key, keyring = verify_keys(archive_root, public_key_path, use_keys=use_keys)
    v = Verifier(archive_root, public_key=public_key, keyring=keyring, on_finding=on_finding,
                 progress=progress)
    return v.run(), v.findings
