"""Several nodes, one archive: per-node ledger chains joined in S3, and verifying them all.

The choice (docs/architecture.md, "Ledger with several nodes").  Each node keeps
its own hash chain in its own data directory, exactly as a single node does
(archive.ledger: one fsync per batch, no network round trip on the SMTP path),
signed with the archive's one Ed25519 key (every node has a copy of
``archive/keys``).  Every ``archive.ledger_seal`` the node seals its chain (a
signed checkpoint, then the segment is closed: ``Ledger.seal``) and mirrors the
closed segments and every checkpoint to the blob bucket under Object Lock::

    <prefix>nodes/<node>/ledger/segments/<first seq>.jsonl     COMPLIANCE-locked
    <prefix>nodes/<node>/ledger/checkpoints/<seq>.json         COMPLIANCE-locked

So no chain is ever written by two processes, no node waits for another, and a
node that is down costs the others nothing; what a node wrote is in WORM storage
at most one seal interval later.  The alternative, one chain serialised through
PostgreSQL, would put a cluster-wide lock and a database round trip in every
archive write and make the database (which verify must not trust) the ledger's
home.

``coffer archive verify`` on any node (:func:`verify_cluster`) checks its own
chain from its data directory, compares it with its locked copy, downloads and
checks every other node's locked chain, then checks every blob in the bucket
against the union: a blob no chain lists is an error -- unless it is younger than
``grace`` (twice the seal interval), when the node that stored it may not have
sealed yet: that is a warning, ``blob_unsealed``, and a later verify decides.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archive.errors import ArchiveError, BlobShreddedError, KeyFileError
from archive.facade import Archive
from archive.keys import KeyRing
from archive.s3config import S3Config
from archive.s3store import S3, S3BlobStore, S3LedgerMirror, SyncResult
from archive.verify import Finding, Progress, Summary, Verifier, _LedgerState, verify_keys

log = logging.getLogger("coffer.archive.cluster")

# Mirror findings that mean "not copied yet" rather than "changed".
_PENDING = frozenset({"segment_not_mirrored"})


def node_mirror(s3: S3, cfg: S3Config, node: str) -> S3LedgerMirror:
    """The locked copy of ``node``'s ledger chain in the blob bucket."""
    return S3LedgerMirror(s3, cfg.bucket, prefix=f"{cfg.prefix}nodes/{node}/",
                          retention=cfg.ledger_retention)


def mirrored_nodes(s3: S3, cfg: S3Config) -> list[str]:
    """Every node that has mirrored a ledger chain to the bucket."""
    root = f"{cfg.prefix}nodes/"
    return sorted({name[len(root):].split("/", 1)[0] for name, _ in s3.keys(cfg.bucket, root)
                   if "/" in name[len(root):]})


def seal_and_mirror(archive: Archive, cfg: S3Config | None, node: str) -> SyncResult | None:
    """Seal this node's chain if anything was appended; mirror it when the store is S3.

    A single node (local store) only signs its head: nothing copies the segment, so
    it stays open and the ledger keeps its large segments.
    """
    if cfg is None or not isinstance(archive.store, S3BlobStore):
        archive.ledger.seal(close=False)
        return None
    archive.ledger.seal()
    return node_mirror(archive.store.s3, cfg, node).sync(archive.paths.ledger)


class ClusterVerifier(Verifier):
    """archive.verify.Verifier for an archive whose blobs are in S3 and whose ledger is one
    chain per node (see the module docstring)."""

    def __init__(self, archive_root: Path, store: S3BlobStore, cfg: S3Config, node: str, *,
                 public_key: Ed25519PublicKey | None, keyring: KeyRing | None,
                 grace: float, clock: Callable[[], datetime] | None = None,
                 on_finding: Callable[[Finding], None] | None = None,
                 progress: Progress | None = None) -> None:
        super().__init__(archive_root, public_key=public_key, keyring=keyring,
                         on_finding=on_finding, progress=progress)
        self.store = store
        self.cfg = cfg
        self.node = node
        self.grace = timedelta(seconds=grace)
        self.clock = clock or (lambda: datetime.now(UTC))

    def run(self) -> Summary:
        # The bucket first, then the chains: a blob stored while we read the chains
        # is then listed by one, never mistaken for an extra one.
        listing = list(self.store.listing())
        state = self.verify_ledger(self.root / "ledger")
        self._compare_mirror()
        for other in mirrored_nodes(self.store.s3, self.cfg):
            if other != self.node:
                self._merge(state, self._verify_node(other))
        self._verify_bucket(listing, state)
        return self.summary

    def _compare_mirror(self) -> None:
        mirror = node_mirror(self.store.s3, self.cfg, self.node)
        for p in mirror.verify(self.root / "ledger"):
            pending = p.code in _PENDING
            self.report("warning" if pending else "error", f"mirror_{p.code}",
                        f"node {self.node}: {p}")

    def _verify_node(self, node: str) -> _LedgerState:
        with tempfile.TemporaryDirectory(prefix=f"coffer-verify-{node}-") as tmp:
            node_mirror(self.store.s3, self.cfg, node).download(Path(tmp))
            return self.verify_ledger(Path(tmp))

    @staticmethod
    def _merge(into: _LedgerState, chain: _LedgerState) -> None:
        for sha, st in chain.blobs.items():
            if into.blobs.get(sha) != "tombstoned":  # a shred in any chain is final
                into.blobs[sha] = st

    def _verify_bucket(self, listing: list[tuple[str, datetime | None]],
                       state: _LedgerState) -> None:
        now = self.clock()
        self.summary.blobs = len(listing)
        present: set[str] = set()
        for i, (sha, modified) in enumerate(listing, 1):
            if self.progress:
                self.progress("blobs", i, len(listing))
            present.add(sha)
            where = {"path": f"s3://{self.store.bucket}/{self.store.name(sha)}", "sha256": sha}
            st = state.blobs.get(sha)
            if st is None:
                if modified is not None and now - modified < self.grace:
                    self.report("warning", "blob_unsealed",
                                f"blob {sha} was stored at {modified:%H:%M:%S} and no sealed "
                                "ledger chain lists it yet (nodes seal every "
                                "archive.ledger_seal): verify again later", **where)
                else:
                    self.report("error", "blob_unlisted",
                                f"blob {sha} is in the bucket but in no node's ledger (extra)",
                                **where)
            if st == "tombstoned":
                self.summary.tombstoned += 1
                continue
            self._read(sha, where)
        for sha, st in sorted(state.blobs.items()):
            if st == "live" and sha not in present and not self.store.exists(sha):
                self.report("error", "blob_missing",
                            f"blob {sha} is in a ledger but not in the bucket (deleted)",
                            path=f"s3://{self.store.bucket}/{self.store.name(sha)}", sha256=sha)

    def _read(self, sha: str, where: dict[str, str]) -> None:
        try:
            if self.keyring is None:
                if not self.store.data_key_present(sha):
                    raise BlobShreddedError(f"blob {sha}: no data key")
                return
            self.store.read(sha)
            self.summary.blobs_decrypted += 1
        except BlobShreddedError:
            self.report("error", "data_key_missing",
                        f"blob {sha}: its data key is gone but no ledger has a tombstone "
                        "(shredded outside the archive)", **where)
        except KeyFileError as exc:
            self.report("error", "archive_key_missing", f"blob {sha}: {exc}", **where)
        except ArchiveError as exc:
            self.report("error", "blob_altered", str(exc), **where)


def verify_cluster(archive_root: Path, cfg: S3Config, node: str, *, data_dir: Path,
                   grace: float, public_key_path: Path | None = None, use_keys: bool = True,
                   on_finding: Callable[[Finding], None] | None = None,
                   progress: Progress | None = None) -> tuple[Summary, list[Finding]]:
    """``coffer archive verify`` for a node whose archive is in S3 (module docstring)."""
    public_key, keyring = verify_keys(archive_root, public_key_path, use_keys=use_keys)
    # Verify reads: it never creates a bucket, whatever create_bucket says.
    store = S3BlobStore.open(cfg.model_copy(update={"create_bucket": False}), keyring, data_dir)
    try:
        v = ClusterVerifier(archive_root, store, cfg, node, public_key=public_key,
                            keyring=keyring, grace=grace, on_finding=on_finding,
                            progress=progress)
        return v.run(), v.findings
    finally:
        store.close()
