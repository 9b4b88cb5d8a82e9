"""The running gateway: configuration, spool, SMTP listeners, queue worker, metrics.

:func:`run` is ``coffer serve``.  It wires the relay spine together::

    listeners (gateway.receive.server) ─▶ Runner (before-queue stages, spool, 250)
        ─▶ worker.notify(qid) ─▶ QueueWorker (after-queue stages, Deliverer)

Signals
    SIGTERM, SIGINT  drain: stop accepting connections, let SMTP transactions in
                     progress finish (their 250 is sent only after the spool fsync),
                     let delivery attempts in progress finish, all within the drain
                     timeout; whatever is left stays queued.  Exit 0.
    SIGHUP           reload the configuration file atomically.  A file that does not
                     load (or fails the preflight checks) is ignored and the error is
                     logged with file, line and key; the old configuration keeps
                     running.  Relay domains, trusted networks, limits, routes and the
                     log level apply at once; listener addresses, data_dir, the
                     number of workers, the imap and s3 sections and archive.database,
                     .index and .node need a restart (logged as such, old values kept).
    SIGUSR1          rescan the spool now (``coffer queue retry/release`` sends it).

Several workers (``queue.workers`` > 1): a supervisor process forks N children.
Each child binds the listener ports with SO_REUSEPORT (the kernel spreads new
connections across them) and runs its own queue worker on the shared spool,
where the per-message ``flock`` claims keep two children from delivering the
same message.  The supervisor restarts a child that dies, forwards SIGTERM,
SIGINT, SIGHUP and SIGUSR1, and a child whose supervisor disappears drains and
exits.  Each child serves metrics on ``metrics.address`` port + its index.  A
configuration mistake at the children's first start stops the supervisor (exit 2).

An archive backend that cannot be reached at start does not stop a process: it
listens and refuses new mail with 451 until a probe opens the archive
(gateway.archive_stage.ArchivePending, Service._open_pending).

The pid file ``<data_dir>/coffer.pid`` is held under an exclusive ``flock`` for
the life of the service: a second ``coffer serve`` on the same data directory
refuses to start, and a pid file left by kill -9 is recognised as stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archive.cluster import seal_and_mirror
from archive.imap.embedded import EmbeddedImap
from archive.index import Index, IndexDoc, Indexer
from archive.joblock import JobLock
from archive.location import location_from_config
from gateway import config as config_mod
from gateway import log, profiling
from gateway.archive_health import (
    ARCHIVE_UNAVAILABLE,
    backend_unavailable,
    describe,
    unavailable_at_start,
)
from gateway.archive_stage import ArchivePending, ArchiveStage, open_archive_stage
from gateway.check.arc import ArcSealStage
from gateway.check.spam.stage import SpamStage
from gateway.check.stage import CheckStage
from gateway.config import Config
from gateway.decide import DecideStage
from gateway.deliver.deliverer import Deliverer, next_hop_context
from gateway.deliver.mta_sts_fetch import refresh_loop
from gateway.deliver.routes import parse_routes
from gateway.deliver.tlsrpt_send import TlsReporter
from gateway.deliver.tlsrpt_store import TlsReportStore
from gateway.deliver.tlsrpt_store import open_store as open_tls_reports
from gateway.errors import CofferError, ConfigError
from gateway.metrics_http import MetricsServer
from gateway.offload import HopPool
from gateway.pipeline import Stage
from gateway.preflight import preflight
from gateway.queue.spool import Spool
from gateway.queue.worker import QueueWorker
from gateway.receive.relay_control import RelayRules
from gateway.receive.server import Listeners, start_listeners
from gateway.runner import Runner
from gateway.transform.dkim_sign import DkimSignStage
from gateway.transform.encrypt_split import EncryptSplitStage
from gateway.transform.encrypt_stage import EncryptStage
from policies.loader import load_policy
from policies.schema import Policy

DRAIN_TIMEOUT = 30.0
PID_FILE = "coffer.pid"
EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
# Spool fsyncs (fsync + rename + fsync dir) run in these threads (a HopPool: a
# cheaper hop than a ThreadPoolExecutor's); more threads than sessions waiting on
# fsync buys nothing, fewer serialises them.
SPOOL_THREADS = 16


class AlreadyRunning(CofferError):
    pass


# -- configuration -----------------------------------------------------------


def load_checked(path: Path) -> Config:
    """Load and preflight a configuration file (ConfigError names file:line:key)."""
    cfg = config_mod.load(path)
    preflight(cfg)
    return cfg


def setup_logging(cfg: Config) -> None:
    log.setup(cfg.log.level, cfg.log.format, cfg.path(cfg.log.file) if cfg.log.file else None)


_ARCHIVE_AT_START = ("database", "index", "node")  # archive.* keys a reload cannot apply


def restart_required(old: Config, new: Config) -> list[str]:
    """Keys whose change a running process cannot apply (pure)."""
    keys: list[str] = []
    if old.data_dir != new.data_dir:
        keys.append("data_dir")
    if [lst.model_dump() for lst in old.listeners] != [lst.model_dump() for lst in new.listeners]:
        keys.append("listeners")
    if old.queue.workers != new.queue.workers:
        keys.append("queue.workers")
    if old.imap != new.imap:
        keys.append("imap")
    # The archive stage, indexer and IMAP server opened these at start.
    keys += [f"archive.{k}" for k in _ARCHIVE_AT_START
             if getattr(old.archive, k) != getattr(new.archive, k)]
    if old.s3 != new.s3:
        keys.append("s3")
    # The deliverer built its certificate checks (next hops, MTA-STS) from it at start.
    if old.delivery.ca_file != new.delivery.ca_file:
        keys.append("delivery.ca_file")
    # The TLS report counting and the daily job were set up (or not) at start.
    if old.delivery.tls_rpt != new.delivery.tls_rpt:
        keys.append("delivery.tls_rpt")
    return keys


def effective_reload(old: Config, new: Config) -> Config:
    """``new``, except the keys that need a restart keep their running values."""
    return new.model_copy(
        update={
            "data_dir": old.data_dir,
            "listeners": old.listeners,
            "queue": new.queue.model_copy(update={"workers": old.queue.workers}),
            "imap": old.imap,
            "archive": new.archive.model_copy(
                update={k: getattr(old.archive, k) for k in _ARCHIVE_AT_START}),
            "s3": old.s3,
            "delivery": new.delivery.model_copy(update={"ca_file": old.delivery.ca_file,
                                                        "tls_rpt": old.delivery.tls_rpt}),
        }
    )


# -- pid file ------------------------------------------------------------------


class PidFile:
    """``<data_dir>/coffer.pid`` under an exclusive flock held while we run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        # A `coffer queue` command may hold a shared lock for an instant to check
        # whether we are alive: retry briefly before calling it a running gateway.
        deadline = time.monotonic() + 1.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                other = os.read(fd, 64).decode(errors="replace").strip()
                os.close(fd)
                raise AlreadyRunning(
                    f"another coffer serve (pid {other or '?'}) is running on {self.path.parent}"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


# -- one process: listeners + worker ---------------------------------------------


POLICY_POLL = 2.0  # seconds between checks of the policy files for changes


class PolicyHolder:
    """The current policy; replaced whole on reload, so a message never sees half of one."""

    def __init__(self, cfg: Config) -> None:
        self.policy: Policy | None = self.load(cfg)

    @staticmethod
    def load(cfg: Config) -> Policy | None:
        """The configured policy, or None; raises a located PolicyError on any mistake."""
        return load_policy(cfg.path(cfg.policy)) if cfg.policy is not None else None

    def __call__(self) -> Policy | None:
        return self.policy

    def stamp(self) -> tuple[tuple[str, int, int], ...]:
        """What the policy was read from, as (file, mtime, size): a change means reload."""
        files = self.policy.files if self.policy is not None else ()
        out = []
        for name in files:
            try:
                st = os.stat(name)
            except OSError:
                out.append((name, -1, -1))
                continue
            out.append((name, st.st_mtime_ns, st.st_size))
        return tuple(out)


async def watch_policy(holder: PolicyHolder, cfg: Callable[[], Config],
                       interval: float = POLICY_POLL) -> None:
    """Reload the policy when one of its files changes (the policy file, its includes and
    lists).  Like SIGHUP: a policy with any error is refused and the running one stays."""
    seen = holder.stamp()
    while True:
        await asyncio.sleep(interval)
        now = await asyncio.to_thread(holder.stamp)
        if now == seen:
            continue
        seen = now
        try:
            policy = await asyncio.to_thread(PolicyHolder.load, cfg())
        except CofferError as exc:
            where = exc if isinstance(exc, ConfigError) else None
            log.event("policy_reload_failed", level=logging.ERROR, error=str(exc),
                      file=where.file if where else None, line=where.line if where else None,
                      key=where.key if where else None)
            continue
        holder.policy = policy
        seen = await asyncio.to_thread(holder.stamp)  # includes may have changed too
        log.event("policy_reloaded", digest=policy.digest if policy else None)


def before_queue_stages(cfg: Config, policy: PolicyHolder,
                        encrypt: EncryptStage | None = None) -> list[Stage]:
    """check (sender auth, spam) -> decide, run while the client waits; then, given the
    transform stage, the opportunistic encryption's split (transform.encrypt_split)."""
    stages: list[Stage] = []
    check = CheckStage.from_config(cfg) if cfg.check.checks else None
    if check is not None:
        stages.append(check)
    if cfg.spam.enabled:
        # The spam scorer reads the check stage's verdicts and shares its resolver.
        stages.append(SpamStage.from_config(cfg, resolver=check.resolver if check else None))
    stages.append(DecideStage(policy, cfg.relay.local_domains, hostname=cfg.hostname))
    if encrypt is not None:
        stages.append(EncryptSplitStage(encrypt))
    return stages


def after_queue_stages(cfg: Config) -> list[Stage]:
    """transform (encrypt, DKIM sign, ARC seal) -> archive, on the spooled copy.

    The archive keeps the message exactly as it is delivered (after signing and
    encryption); nothing is delivered that was not archived first.

    Signing comes after any transformation that changes the body, and the ARC seal
    after signing, so both verify downstream (RFC 6376 §5.3, RFC 8617 §5.1).

    An archive backend that cannot be reached yet gives an ArchivePending in the
    archive's place (every message deferred, new mail refused with 451) until
    Service._watch_archive opens it; a backend that refuses the configuration raises
    ConfigError.
    """
    stages: list[Stage] = [EncryptStage.open(cfg.data_dir, cfg.crypto)]
    if cfg.check.dkim_signing:
        stages.append(DkimSignStage.from_config(cfg.check.dkim_signing, cfg.path))
    if cfg.check.arc_sealing is not None:
        authserv = cfg.check.authserv_id or cfg.hostname
        stages.append(ArcSealStage.from_config(cfg.check.arc_sealing, authserv, cfg.path))
    stages.append(open_archive_stage(cfg))
    return stages


class _StageIndexer(Indexer):
    """An Indexer that takes what the archive stage already extracted from a message.

    The archive stage parsed the exact bytes it stored; fetching the blob back
    (decrypt, decompress) and parsing it again gave the same result for twice the
    CPU.  Blobs archived by another process (or evicted) are fetched as before.

    With several worker processes (``lock``), every worker runs one and each takes
    only the blobs whose extraction it holds, one indexer at a time (an exclusive
    ``flock`` on ``lock``: the full-text index keeps a single writer); the one with
    ``leftovers`` also takes, fetching them, the blobs nobody took for
    ``LEFTOVER_AFTER`` seconds (archived by a process that died, evicted, imported).
    Measured before: worker 0 fetched and re-extracted every message worker 1 had
    archived (0.45 s of CPU per 2,000 messages, 3 % of the relay's).
    """

    def __init__(self, stage: ArchiveStage, index: Index, *, lock: Path | None = None,
                 leftovers: bool = True, monotonic: Callable[[], float] = time.monotonic,
                 ) -> None:
        super().__init__(stage.meta, index, stage.archive.get)
        self.stage = stage
        self.lock = lock
        self.leftovers = leftovers
        self.monotonic = monotonic
        self._first_seen: dict[int, float] = {}
        # Whether the last run_once found a full page of waiting blobs (more may wait,
        # its own or other workers'): index_loop then goes on without pausing.
        self.backlog = False

    def run_once(self, batch: int = 500) -> int:
        if self.lock is None:
            return self._index_batch(batch, select=False)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a thread (index_loop): blocking is fine
            return self._index_batch(batch, select=True)
        finally:
            os.close(fd)  # releases the lock

    def _index_batch(self, batch: int, *, select: bool) -> int:
        pending = self.meta.unindexed(batch)
        self.backlog = len(pending) >= batch
        take = self._select(pending) if select else pending
        if take:
            self.index.add(self.docs(take))
            self.meta.mark_indexed([b for b, _ in take], self.clock())
        return len(take)

    def _select(self, pending: list[tuple[int, str]]) -> list[tuple[int, str]]:
        now = self.monotonic()
        self._first_seen = {b: self._first_seen.get(b, now) for b, _ in pending}
        return [(b, sha) for b, sha in pending if self.stage.holds_extracted(sha)
                or (self.leftovers and now - self._first_seen[b] >= LEFTOVER_AFTER)]

    def docs(self, blobs: Iterable[tuple[int, str]]) -> list[IndexDoc]:
        out: list[IndexDoc] = []
        missed: list[tuple[int, str]] = []
        for blob_id, sha256 in blobs:
            ex = self.stage.take_extracted(sha256)
            if ex is None:
                missed.append((blob_id, sha256))
            else:
                out.append(IndexDoc.from_extracted(blob_id, ex, sha256))
        return out + super().docs(missed) if missed else out


# Extractions kept for the indexer: it runs about once a second, so this covers
# bursts of several hundred messages per second; past it, it fetches the blob.
KEEP_EXTRACTED = 2048
# Seconds a blob waits for the worker that archived it before worker 0 indexes it.
LEFTOVER_AFTER = 10.0
INDEX_LOCK = "index.lock"
# Blobs per indexer batch.  Only a backlog (a full page of waiting blobs) is worked
# on without a pause; otherwise the loop waits ``idle`` after each batch, so under
# steady traffic a batch holds about a second of mail: the full-text commit (and its
# segment merges), the metadata update and the lock round trips are paid once a
# second, not once per handful of messages.
INDEX_BATCH = 500


async def index_loop(stage: ArchiveStage, cfg: Config, idle: float = 1.0, *,
                     worker_index: int = 0, workers: int = 1) -> None:
    """Index newly archived messages in batches, off the SMTP path (lag: about ``idle`` s).

    Every worker of every node runs this loop, each for what it archived (worker 0
    also for leftovers: _StageIndexer); the job lock (archive.joblock) lets one
    process of the cluster at a time take a batch, so a shared PostgreSQL index is
    written once per message.
    """
    while True:
        try:
            index = await asyncio.to_thread(location_from_config(cfg).open_index, stage.meta)
            break
        except Exception as exc:
            if backend_unavailable(exc):
                # The database went away during the start-up: an outage like one at run
                # time (one archive_backend_down line, 451 at MAIL), over at the first
                # probe that finds it again; this loop opens the index once it is back.
                stage.health.mark_down(describe(exc))
            else:
                log.event("index_failed", level=logging.ERROR, error=describe(exc))
            await asyncio.sleep(max(idle, cfg.archive.health_probe))
    # The last of the start-up's database work in this process (with the catch-up's
    # line on worker 0): a database lost after this is an outage at run time.
    log.event("index_opened", index=index.name)
    indexer = _StageIndexer(stage, index,
                            lock=cfg.data_dir / INDEX_LOCK if workers > 1 else None,
                            leftovers=worker_index == 0)
    lock = JobLock("index", stage.meta, cfg.data_dir)
    stage.keep_extracted = KEEP_EXTRACTED

    def one_batch() -> bool:
        """Index a batch if this process holds the job: True to go on at once (it took
        some and a full page was waiting)."""
        with lock.attempt() as mine:
            if not mine:
                return False
            return indexer.run_once(INDEX_BATCH) > 0 and indexer.backlog

    try:
        while True:
            try:
                more = await asyncio.to_thread(one_batch)
            except Exception as exc:  # rebuildable, or the backend is down: retry later
                log.event("index_failed", level=logging.ERROR, error=describe(exc))
                more = False
            if not more:
                await asyncio.sleep(idle)
    finally:
        stage.keep_extracted = 0
        index.close()


async def catch_up_at_start(stage: ArchiveStage) -> bool:
    """Restore the metadata rows of ledger messages the database lost (a power loss
    takes its newest transactions), looking at the ledger tail only
    (reports.rebuild.catch_up, tail_start).  One log line when it restored anything.

    False when the database could not be reached: the backend is then marked down,
    like an outage at run time, and the caller runs this again once it is back."""
    from reports.rebuild import audit_catch_up, catch_up, tail_start

    def run() -> Any:
        res = catch_up(stage.archive, stage.meta, since=tail_start(stage.meta),
                       progress=False)
        if res.restored or res.audit_events or res.holds or res.hold_releases:
            audit_catch_up(stage.meta, stage.archive, "coffer serve", res)
        return res

    try:
        res = await asyncio.to_thread(run)
    except Exception as exc:
        if backend_unavailable(exc):
            stage.health.mark_down(describe(exc))
            return False
        # Not an outage: the operator's tool is `coffer archive rebuild --missing`.
        log.event("archive_catch_up_failed", level=logging.ERROR, error=describe(exc))
        return True
    if res.restored or res.audit_events or res.holds or res.hold_releases or res.warnings:
        log.event("archive_caught_up", level=logging.WARNING, restored=res.restored,
                  checked=res.checked, since=res.since, receipts=res.receipts,
                  audit_events=res.audit_events, holds=res.holds,
                  hold_releases=res.hold_releases,
                  shredded=res.shredded, links=res.links, warnings=res.warnings[:20])
    else:
        log.event("archive_catch_up_done", checked=res.checked, since=res.since)
    return True


def close_stages(stages: list[Stage]) -> None:
    for stage in stages:
        if isinstance(stage, CheckStage | SpamStage | EncryptStage):
            stage.close()


@dataclass
class Service:
    """One gateway process: everything but the signal handling and the pid file."""

    cfg_path: Path
    cfg: Config
    worker_index: int = 0
    reuse_port: bool = False
    drain_timeout: float = DRAIN_TIMEOUT
    spool: Spool = field(init=False)
    _executor: HopPool | None = field(default=None, init=False)
    _listeners: Listeners | None = field(default=None, init=False)
    _worker: QueueWorker | None = field(default=None, init=False)
    _deliverer: Deliverer | None = field(default=None, init=False)
    _worker_task: asyncio.Task[None] | None = field(default=None, init=False)
    _metrics: MetricsServer | None = field(default=None, init=False)
    runner: Runner | None = field(default=None, init=False)
    policy: PolicyHolder = field(init=False)
    _after_stages: list[Stage] = field(default_factory=list, init=False)
    _indexer_task: asyncio.Task[None] | None = field(default=None, init=False)
    _policy_task: asyncio.Task[None] | None = field(default=None, init=False)
    _health_task: asyncio.Task[None] | None = field(default=None, init=False)
    _seal_task: asyncio.Task[None] | None = field(default=None, init=False)
    _catch_up_task: asyncio.Task[None] | None = field(default=None, init=False)
    _catch_up_owed: bool = field(default=False, init=False)  # the database was down for it
    _imap: EmbeddedImap | None = field(default=None, init=False)
    _bg: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _tls_tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)

    async def start(self) -> None:
        cfg = self.cfg
        self.spool = Spool(cfg.spool_dir, fsync=cfg.queue.fsync,
                           min_free_bytes=cfg.queue.min_free_space)
        removed = self.spool.clean_tmp()
        if removed:
            log.event("spool_tmp_cleaned", files=removed)
        self._executor = HopPool(SPOOL_THREADS, thread_name_prefix="spool")
        self.policy = PolicyHolder(cfg)
        self._after_stages = after_queue_stages(cfg)
        tls_reports = open_tls_reports(cfg.data_dir) if cfg.delivery.tls_rpt.enabled else None
        self._deliverer = Deliverer(cfg, executor=self._executor, tls_reports=tls_reports)
        self._worker = QueueWorker(
            cfg, self.spool, self._after_stages, self._deliverer, executor=self._executor
        )
        slot = self._archive_slot()
        # The archive, unless its backend could not be reached yet (slot: ArchivePending).
        archive = slot if isinstance(slot, ArchiveStage) else None
        self.runner = Runner(
            self.spool,
            before_queue_stages(cfg, self.policy, next(
                (st for st in self._after_stages if isinstance(st, EncryptStage)), None)),
            on_queued=self._worker.notify,
            executor=self._executor, refuse=slot.health.refusal if slot else None,
            journal_addresses=cfg.archive.journal.addresses,
            journal_retention=cfg.archive.journal.retention,
        )
        # The worker starts first: a message accepted in the first millisecond is
        # notified to a worker that is already running.
        self._worker_task = asyncio.create_task(self._worker.run(), name="queue-worker")
        self._start_tls_jobs(tls_reports)
        if cfg.policy is not None:
            self._policy_task = asyncio.create_task(
                watch_policy(self.policy, lambda: self.cfg), name="policy-watch")
        if archive is not None:
            slot = await self._start_archive(archive)
        self._archive_rejected(cfg)
        if slot is not None:
            self._health_task = asyncio.create_task(
                self._watch_archive(slot), name="archive-health")
        self._listeners = await start_listeners(cfg, self.runner, reuse_port=self.reuse_port)
        if cfg.metrics.address is not None:
            self._metrics = MetricsServer(cfg.metrics.address, self.worker_index)
            host, port = self._metrics.start()
            log.event("metrics_listening", address=f"{host}:{port}", worker=self.worker_index)
        log.event("started", pid=os.getpid(), worker=self.worker_index, config=str(self.cfg_path),
                  listeners=[lst.address for lst in cfg.listeners],
                  event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0])

    async def stop(self) -> None:
        """Drain: stop accepting, finish what is in flight (bounded), leave the rest queued."""
        started = time.monotonic()
        log.event("draining", pid=os.getpid(), timeout=self.drain_timeout)
        if self._listeners is not None:
            await self._listeners.close(self.drain_timeout)
        if self._imap is not None:
            await self._imap.close()
        if self._worker is not None:
            remaining = max(self.drain_timeout - (time.monotonic() - started), 1.0)
            await self._worker.stop(remaining)
        if self._worker_task is not None:
            try:
                await asyncio.wait_for(self._worker_task, timeout=5.0)
            except (TimeoutError, asyncio.CancelledError):
                pass
            except Exception as exc:  # the worker's own failure: log, still exit cleanly
                log.event("worker_failed", level=logging.ERROR, error=repr(exc))
        for tls_task in self._tls_tasks:  # after the worker: its last sessions are counted
            tls_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tls_task
        if self._catch_up_task is not None:
            # A thread cannot be cancelled: let it finish before its database is closed.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._catch_up_task),
                                       timeout=self.drain_timeout)
        for task in (self._indexer_task, self._policy_task, self._health_task,
                     self._seal_task, self._catch_up_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._seal_task is not None:
            # What this node wrote since the last seal goes to WORM storage now, not
            # only after the restart.
            for stage in self._after_stages:
                if isinstance(stage, ArchiveStage):
                    await self._seal(stage)
        # QueueWorker.stop closes the deliverer's connections.
        if self.runner is not None:
            close_stages(self.runner.stages)
        close_stages(self._after_stages)
        for stage in self._after_stages:
            if isinstance(stage, ArchiveStage):
                await stage.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._metrics is not None:
            self._metrics.close()
        log.event("stopped", pid=os.getpid(), seconds=round(time.monotonic() - started, 3))

    def _start_tls_jobs(self, tls_reports: TlsReportStore | None) -> None:
        """RFC 8460 reports (every worker flushes its counts; the leased claims in the
        store make one of them send, or retry, each report at a time) and, on worker 0,
        the RFC 8461 §5.1 refresh of cached MTA-STS policies."""
        assert self._deliverer is not None and self._worker is not None
        deliverer = self._deliverer
        if tls_reports is not None:
            reporter = TlsReporter(
                self.cfg, tls_reports, deliverer.resolver, self.spool,
                context=next_hop_context(self.cfg), notify=self._worker.notify,
                executor=self._executor, who=f"{self.cfg.hostname}/{self.worker_index}")
            self._tls_tasks.append(asyncio.create_task(reporter.run(), name="tls-reports"))
        if self.cfg.delivery.mta_sts and self.worker_index == 0:
            self._tls_tasks.append(asyncio.create_task(refresh_loop(deliverer.sts),
                                                       name="mta-sts-refresh"))

    def _archive_slot(self) -> ArchiveStage | ArchivePending | None:
        """The archive stage among the after-queue stages, opened or still pending."""
        return next((st for st in self._after_stages
                     if isinstance(st, ArchiveStage | ArchivePending)), None)

    async def _start_archive(self, stage: ArchiveStage) -> ArchiveStage | ArchivePending:
        """The rest of the start-up of an archive that opened: its IMAP server (which
        creates the full-text table), then the background jobs.  A backend that goes
        away meanwhile is an outage like one at run time, not a reason to stop: the
        archive is closed and left pending under the same health flag (SMTP answers
        451 at MAIL), and the first probe that opens it again finishes the start-up
        (_open_pending).  A backend that answers and refuses us still stops the start."""
        try:
            await self._start_imap(stage)
        except Exception as exc:
            if not unavailable_at_start(exc):
                raise
            with contextlib.suppress(Exception):  # what it holds is gone with the backend
                await stage.close()
            pending = ArchivePending(self.cfg, describe(exc), health=stage.health)
            self._put_stage(stage, pending)
            return pending
        self._start_archive_jobs(stage)
        return stage

    def _put_stage(self, old: Stage, new: Stage) -> None:
        """``new`` in the place of ``old`` among the after-queue stages, the worker's too."""
        self._after_stages[self._after_stages.index(old)] = new
        if self._worker is not None:
            self._worker.stages = [new if st is old else st for st in self._worker.stages]

    def _start_archive_jobs(self, archive: ArchiveStage) -> None:
        """What needs an open archive, in the background: at start, or once a backend
        that was down at start answers (_open_pending)."""
        cfg = self.cfg
        if self.worker_index == 0:
            # One process per node seals and mirrors the node's ledger chain.
            self._seal_task = asyncio.create_task(self._seal_loop(archive), name="ledger-seal")
            # The rows a power loss took from the metadata database, in the background:
            # mail flows meanwhile (the receipts lock keeps both from writing one twice).
            self._start_catch_up(archive)
        # One indexer per worker, each for what it archived; one writer at a time
        # across the cluster (index_loop).
        self._indexer_task = asyncio.create_task(
            index_loop(archive, cfg, worker_index=self.worker_index,
                       workers=cfg.queue.workers), name="archive-indexer")

    def _start_catch_up(self, archive: ArchiveStage) -> None:
        self._catch_up_owed = False

        async def catch_up() -> None:
            self._catch_up_owed = not await catch_up_at_start(archive)

        self._catch_up_task = asyncio.create_task(catch_up(), name="archive-catch-up")

    async def _start_imap(self, archive: ArchiveStage) -> None:
        if self.cfg.imap.enabled and self.worker_index == 0:
            # One IMAP server per node, reading through the archive stage's store.
            self._imap = await EmbeddedImap.start(self.cfg, archive.archive, archive.meta)

    def _archive_rejected(self, cfg: Config) -> None:
        """Messages rejected after DATA go to this process's archive stage first (or not)."""
        if self.runner is None:
            return
        archive = self._archive_slot()
        self.runner.archive_rejected = (archive.run if archive is not None
                                        and cfg.archive.rejected else None)

    async def _seal_loop(self, stage: ArchiveStage) -> None:
        """Every ``archive.ledger_seal``: sign and close this node's ledger segment and copy
        it to the bucket (archive.cluster); a failure is logged and retried next time."""
        while True:
            await asyncio.sleep(self.cfg.archive.ledger_seal)
            await self._seal(stage)

    async def _seal(self, stage: ArchiveStage) -> None:
        try:
            res = await asyncio.to_thread(seal_and_mirror, stage.archive, self.cfg.s3,
                                          self.cfg.node_name)
        except Exception as exc:  # S3 down or a ledger problem: the next round retries
            log.event("ledger_seal_failed", level=logging.ERROR, error=describe(exc))
            return
        if res is not None and (res.segments or res.checkpoints):
            log.event("ledger_mirrored", node=self.cfg.node_name, segments=len(res.segments),
                      checkpoints=len(res.checkpoints))

    async def _watch_archive(self, stage: ArchiveStage | ArchivePending) -> None:
        """While the archive backend is marked down (by a failed write, or at start), probe
        it; when it answers again, retry what the outage deferred.  A backend that is up
        is not probed: the archive writes themselves are the probe.  A stage still
        pending since the start is probed by opening it (_open_pending)."""
        while True:
            await asyncio.sleep(self.cfg.archive.health_probe)
            if not stage.health.down:
                continue
            if isinstance(stage, ArchivePending):
                opened = await self._open_pending(stage)
                if opened is None:
                    continue
                stage = opened
            else:
                try:
                    await asyncio.to_thread(stage.probe)
                except Exception as exc:  # any failure: the archive cannot take mail now
                    stage.health.mark_down(describe(exc))
                    continue
            if stage.health.mark_up():
                if self._catch_up_owed:  # the database went away during the catch-up
                    self._start_catch_up(stage)
                loop = asyncio.get_running_loop()
                qids = await loop.run_in_executor(self._executor, _retry_deferred_by_archive,
                                                  self.spool, time.time())
                log.event("archive_retry_deferred", messages=len(qids))
                if self._worker is not None:
                    for qid in qids:
                        self._worker.notify(qid)

    async def _open_pending(self, pending: ArchivePending) -> ArchiveStage | None:
        """Try to open the archive a down backend kept from opening at start; once open,
        put it in the pending stage's place and start what needs it (indexer; ledger
        seal, catch-up and IMAP on worker 0).  None while it cannot be opened."""
        try:
            stage = await asyncio.to_thread(pending.open)
        except Exception as exc:
            reason = describe(exc)
            if not unavailable_at_start(exc) and reason != pending.health.reason:
                # The backend answers now but refuses us (a database or a bucket not
                # there yet, credentials): still down, and the log says why.
                log.event("archive_open_failed", level=logging.ERROR, error=reason)
            pending.health.mark_down(reason)
            return None
        try:
            await self._start_imap(stage)
        except Exception as exc:
            if backend_unavailable(exc):  # down again already: the next probe retries
                await stage.close()
                pending.health.mark_down(describe(exc))
                return None
            # At start this would stop the process; now mail is waiting: relay it, and
            # say that the archive's IMAP access needs a restart.
            log.event("imap_unavailable", level=logging.ERROR, error=describe(exc))
        # The worker sees the real stage before the health flag lets new mail in.
        self._put_stage(pending, stage)
        self._archive_rejected(self.cfg)
        self._start_archive_jobs(stage)
        return stage

    def rescan(self) -> None:
        """SIGUSR1: pick up operator changes (retry, release) now, not at the next scan."""
        if self._worker is not None:
            task = asyncio.get_running_loop().create_task(self._rescan())
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    async def _rescan(self) -> None:
        loop = asyncio.get_running_loop()
        due = await loop.run_in_executor(self._executor, _due_now, self.spool, time.time())
        if self._worker is not None:
            for qid in due:
                self._worker.notify(qid)

    def reload(self) -> bool:
        """SIGHUP: apply a new configuration file, or keep the old one and say why.

        Everything that can fail (loading, checking, parsing routes and relay
        rules) happens before anything running is touched, so a bad file changes
        nothing.  Never raises: it runs as a signal callback.
        """
        try:
            new = load_checked(self.cfg_path)
            routes = parse_routes(new.delivery.routes, new.data_dir)
            policy = PolicyHolder.load(new)
            # validates the networks before anything changes
            RelayRules.from_config(new.relay, new.archive.journal)
        except CofferError as exc:
            where = exc if isinstance(exc, ConfigError) else None
            log.event("config_reload_failed", level=logging.ERROR, error=str(exc),
                      file=where.file if where else str(self.cfg_path),
                      line=where.line if where else None, key=where.key if where else None)
            return False
        needs_restart = restart_required(self.cfg, new)
        if needs_restart:
            log.event("config_restart_required", level=logging.WARNING, keys=needs_restart,
                      detail="these keys keep their running values until a restart")
        new = effective_reload(self.cfg, new)
        if self._listeners is not None:
            # The listeners validate everything (TLS pair, passwd file) before they
            # change anything, so this is the last point where the reload can fail.
            try:
                self._listeners.reconfigure(new)
            except ConfigError as exc:
                log.event("config_reload_failed", level=logging.ERROR, error=str(exc),
                          file=exc.file or str(self.cfg_path), line=exc.line, key=exc.key)
                return False
        old = self.cfg
        self.cfg = new
        self.policy.policy = policy
        self._archive_rejected(new)
        if self.runner is not None:
            self.runner.journal_addresses = frozenset(new.archive.journal.addresses)
            self.runner.journal_retention = new.archive.journal.retention
            # Relay domains feed the policy's idea of direction: rebuild decide only.
            self.runner.stages = [
                DecideStage(self.policy, new.relay.local_domains, hostname=new.hostname)
                if isinstance(st, DecideStage) else st for st in self.runner.stages
            ]
        try:
            setup_logging(new)
        except OSError as exc:
            setup_logging(old)
            log.event("log_reopen_failed", level=logging.ERROR, error=str(exc))
        self.spool.min_free_bytes = new.queue.min_free_space
        self.spool.fsync = new.queue.fsync
        if self._worker is not None:
            # The worker and the deliverer read these on every message; timeouts and
            # concurrency limits were fixed when they were built (restart to change).
            self._worker.cfg = new
        if self._deliverer is not None:
            self._deliverer.cfg = new
            self._deliverer.routes = routes
        if new.metrics.address != old.metrics.address:
            self._restart_metrics(new.metrics.address)
        log.event("config_reloaded", file=str(self.cfg_path),
                  local_domains=new.relay.local_domains, restart_required=needs_restart)
        return True

    def _restart_metrics(self, address: str | None) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if address is None:
            return
        server = MetricsServer(address, self.worker_index)
        try:
            host, port = server.start()
        except OSError as exc:
            log.event("metrics_unavailable", level=logging.ERROR, address=address,
                      error=str(exc))
            return
        self._metrics = server
        log.event("metrics_listening", address=f"{host}:{port}", worker=self.worker_index)


def _due_now(spool: Spool, now: float) -> list[str]:
    """Queue ids that are neither held nor waiting for a later retry (thread-safe I/O)."""
    due = []
    for qid in spool.queue_ids():
        st = spool.read_state(qid, [])
        if not st.held and st.next_attempt_at <= now:
            due.append(qid)
    return due


def _retry_deferred_by_archive(spool: Spool, now: float) -> list[str]:
    """Make the messages an archive outage deferred due now (thread-safe I/O): like
    ``coffer queue retry``, a ``retry`` event in each one's log, written under the
    message's claim (gateway.cli.claims says why).

    A message claimed now is skipped, never waited for: an attempt is in progress
    (the archive is back, so it is not deferred for the archive again), or another
    process's worker holds it, or this process's worker keeps its claim (``kept=False``:
    results it could not write yet; taking that claim would let another process
    deliver the message again).  Whoever holds it writes what became of it; one still
    deferred afterwards waits for its scheduled attempt (or the archive's next return).
    Whether it is deferred for the archive is asked again under the claim."""
    due = []
    for qid in spool.queue_ids():
        if _deferred_by_archive(spool, qid, now):
            with spool.claim(qid, kept=False) as mine:
                # Read again under the claim: the attempt that just ended may have
                # delivered it, or deferred it for another reason.
                if mine and _deferred_by_archive(spool, qid, now):
                    spool.append_event(qid, {"ev": "retry", "by": "archive-health"})
                    due.append(qid)
    return due


def _deferred_by_archive(spool: Spool, qid: str, now: float) -> bool:
    try:
        st = spool.read_state(qid, [])
    except FileNotFoundError:
        return False  # delivered and removed meanwhile
    return (not st.held and st.next_attempt_at > now
            and st.last_error == str(ARCHIVE_UNAVAILABLE))


async def serve_process(
    cfg_path: Path, cfg: Config, *, worker_index: int = 0, reuse_port: bool = False,
    drain_timeout: float = DRAIN_TIMEOUT, parent_pid: int | None = None,
) -> int:
    """Run one gateway process until SIGTERM/SIGINT (or its supervisor's death)."""
    svc = Service(cfg_path, cfg, worker_index=worker_index, reuse_port=reuse_port,
                  drain_timeout=drain_timeout)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Until the service is up a reload or rescan has nothing to act on: ignore both.
    for sig in (signal.SIGHUP, signal.SIGUSR1):
        loop.add_signal_handler(sig, lambda: None)
    try:
        await svc.start()
    except (ConfigError, OSError) as exc:
        # A port in use or a file we cannot open: one line, no traceback.
        log.event("start_failed", level=logging.ERROR, error=str(exc))
        print(f"coffer serve: cannot start: {exc}", file=sys.stderr)
        await svc.stop()
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_PROBLEM
    tune_gc()
    sampler = profiling.start_if_requested()  # COFFER_PROFILE=DIR: bench runs only
    loop.add_signal_handler(signal.SIGHUP, svc.reload)
    loop.add_signal_handler(signal.SIGUSR1, svc.rescan)
    watcher: asyncio.Task[None] | None = None
    if parent_pid is not None:
        watcher = asyncio.create_task(_watch_parent(parent_pid, stop))
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    if sampler is not None:
        sampler.stop()
    await svc.stop()
    return EXIT_OK


# Young-generation threshold once serving (CPython's default is 700 allocations).
GC_THRESHOLDS = (20000, 20, 20)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheaper once the service is up.

    Everything alive after start-up (modules, configuration, policy, database
    engines) lives as long as the process: ``gc.freeze()`` moves it out of the
    collector's sight, so collections stop traversing it again and again.  Parsing
    MIME allocates many short-lived objects, so young collections ran about every
    two messages; a larger threshold makes them rarer.  Measured with bench/relay.py
    (2,000 messages, ``queue.workers: 1``, ``gc.callbacks``): the collector's CPU went
    from 0.92 s to 0.24 s (0.34 ms per message, about 2 % of the process's CPU).  Only memory that
    reference counting cannot free (cycles) waits a little longer.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """A child whose supervisor died (kill -9) drains and exits instead of lingering."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    log.event("supervisor_gone", level=logging.WARNING, pid=os.getpid())
    stop.set()


def _loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of ``event_loop``'s loop (config key ``event_loop``).

    uvloop is the default: measured with bench/relay.py (coffer target, 2,000
    messages over 20 connections, four interleaved pairs on the shared 2-core
    machine, 2026-11-27, full pipeline) it used 5.95 ms of CPU per message
    against asyncio's 6.48 ms (-8 %, lower in every pair) - libuv's polling,
    socket I/O and callback scheduling cost less than asyncio's pure-Python
    selector loop.  ``COFFER_EVENT_LOOP`` (uvloop or asyncio), when set,
    overrides the key, so that a benchmark can compare both on one
    configuration.  Without uvloop installed, asyncio's loop runs and one log
    line says so.
    """
    choice = os.environ.get("COFFER_EVENT_LOOP", "").lower() or event_loop
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.event("event_loop_fallback", level=logging.WARNING, wanted="uvloop",
                      using="asyncio", reason="uvloop is not installed")
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def _run_async(coro: Any, event_loop: str) -> int:
    with asyncio.Runner(loop_factory=_loop_factory(event_loop)) as r:
        return int(r.run(coro))


# -- several processes: the supervisor --------------------------------------------


class Supervisor:
    """Forks ``queue.workers`` children sharing the ports; restarts any that dies."""

    # A child that dies soon after its start is failing (a port or file it cannot
    # open), not crashing once: its restarts back off from 1 s to 60 s, so a
    # persistent fault does not fork-loop; a child that ran a while restarts at once.
    MIN_RESTART_INTERVAL = 1.0
    MAX_RESTART_INTERVAL = 60.0
    HEALTHY_AFTER = 10.0
    # Exactly what one process does: a configuration mistake found when the workers first
    # start (serve_process exits EXIT_USAGE: a bad policy, TLS pair, or an archive backend
    # that refuses the configuration) stops the service instead of retrying it forever.
    # A worker restarted later keeps the backoff: the others are serving mail.

    def __init__(self, cfg_path: Path, cfg: Config, drain_timeout: float) -> None:
        self.cfg_path = cfg_path
        self.cfg = cfg
        self.drain_timeout = drain_timeout
        self.children: dict[int, int] = {}  # pid -> worker index
        self.started_at: dict[int, float] = {}  # worker index -> last start
        self.backoff: dict[int, float] = {}  # worker index -> next restart delay
        self.restarted: set[int] = set()  # worker indexes past their first start

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # child
            rc = EXIT_PROBLEM
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                            signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                # The workers write to one log: each line says which one wrote it.
                log.bind_process(worker=index)
                rc = _run_async(serve_process(
                    self.cfg_path, self.cfg, worker_index=index, reuse_port=True,
                    drain_timeout=self.drain_timeout, parent_pid=os.getppid(),
                ), self.cfg.event_loop)
            except BaseException as exc:  # never return into the supervisor's code
                with contextlib.suppress(Exception):
                    log.event("worker_crashed", level=logging.ERROR, worker=index,
                              error=repr(exc))
            finally:
                logging.shutdown()
                os._exit(rc)
        self.children[pid] = index
        self.started_at[index] = time.monotonic()
        log.event("worker_started", worker=index, pid=pid)

    def _signal_children(self, sig: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self) -> list[tuple[int, int]]:
        """(worker index, wait status) of every child that exited."""
        dead: list[tuple[int, int]] = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self.children.pop(pid, None)
            if index is not None:
                dead.append((index, status))
        return dead

    def run(self) -> int:
        handled = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD}
        # Blocked signals stay pending until sigtimedwait takes them: no handler
        # can interrupt the supervisor halfway through a fork or a reap.
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        log.event("supervisor_started", pid=os.getpid(), workers=self.cfg.queue.workers)
        for i in range(self.cfg.queue.workers):
            self._spawn(i)
        restart_due: dict[int, float] = {}
        while True:
            info = signal.sigtimedwait(handled, 0.5)
            sig = info.si_signo if info is not None else None
            if sig in (signal.SIGTERM, signal.SIGINT):
                return self._shutdown()
            if sig == signal.SIGHUP:
                self._reload()
                self._signal_children(signal.SIGHUP)
            elif sig == signal.SIGUSR1:
                self._signal_children(signal.SIGUSR1)
            for index, status in self._reap():
                log.event("worker_exited", level=logging.WARNING, worker=index,
                          status=_describe_status(status))
                if (index not in self.restarted and os.WIFEXITED(status)
                        and os.WEXITSTATUS(status) == EXIT_USAGE):
                    log.event("start_failed", level=logging.ERROR, worker=index,
                              error="configuration error (the worker's log line says which)")
                    return self._shutdown(EXIT_USAGE)
                self.restarted.add(index)
                restart_due[index] = time.monotonic() + self._restart_delay(index)
            now = time.monotonic()
            for index, due in list(restart_due.items()):
                if due <= now:
                    del restart_due[index]
                    self._spawn(index)

    def _restart_delay(self, index: int) -> float:
        lived = time.monotonic() - self.started_at.get(index, 0.0)
        if lived >= self.HEALTHY_AFTER:
            self.backoff.pop(index, None)
            return 0.0
        delay = self.backoff.get(index, self.MIN_RESTART_INTERVAL)
        self.backoff[index] = min(delay * 2, self.MAX_RESTART_INTERVAL)
        log.event("worker_restart_delayed", level=logging.WARNING, worker=index,
                  seconds=delay, lived=round(lived, 1))
        return delay

    def _reload(self) -> None:
        """Validate the file here too, so the supervisor's log says what children will do."""
        try:
            new = load_checked(self.cfg_path)
        except ConfigError as exc:
            log.event("config_reload_failed", level=logging.ERROR, error=str(exc),
                      file=exc.file, line=exc.line, key=exc.key)
            return
        keys = restart_required(self.cfg, new)
        self.cfg = effective_reload(self.cfg, new)
        setup_logging(self.cfg)
        if keys:
            log.event("config_restart_required", level=logging.WARNING, keys=keys)

    def _shutdown(self, rc: int = EXIT_OK) -> int:
        log.event("supervisor_draining", workers=len(self.children))
        self._signal_children(signal.SIGTERM)
        deadline = time.monotonic() + self.drain_timeout + 10.0
        while self.children and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, 0.2)
            for index, status in self._reap():
                log.event("worker_exited", worker=index, status=_describe_status(status))
        if self.children:
            log.event("worker_kill", level=logging.ERROR, pids=list(self.children))
            self._signal_children(signal.SIGKILL)
            while self.children:
                pid, _ = os.wait()
                self.children.pop(pid, None)
        log.event("supervisor_stopped")
        return rc


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


# -- entry point -------------------------------------------------------------------


def run(cfg_path: Path, *, drain_timeout: float = DRAIN_TIMEOUT) -> int:
    """``coffer serve``: run until SIGTERM/SIGINT; the process exit code."""
    try:
        cfg = load_checked(cfg_path)
    except ConfigError as exc:
        print(f"coffer serve: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        setup_logging(cfg)
    except OSError as exc:
        print(f"coffer serve: cannot open the log file: {exc}", file=sys.stderr)
        return EXIT_USAGE
    pid_file = PidFile(cfg.data_dir / PID_FILE)
    try:
        pid_file.acquire()
    except AlreadyRunning as exc:
        print(f"coffer serve: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except OSError as exc:
        msg = exc.strerror if exc.errno == errno.EACCES else str(exc)
        print(f"coffer serve: cannot write {pid_file.path}: {msg}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if cfg.queue.workers > 1:
            return Supervisor(cfg_path, cfg, drain_timeout).run()
        return _run_async(serve_process(cfg_path, cfg, drain_timeout=drain_timeout),
                          cfg.event_loop)
    finally:
        pid_file.release()
