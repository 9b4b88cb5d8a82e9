"""The spool: messages and their envelopes on disk, durable before the 250.

Layout under the spool directory::

    tmp/<qid>.msg      being written; never read (removed at start-up)
    queue/<qid>.msg    header line, envelope JSON line, the exact message bytes, then
                       the after-queue stages' completion events (JSON lines, appended)
    queue/<qid>.state  append-only JSON event log (see gateway.queue.state)
    queue/<qid>.data   the message as an after-queue ``once`` stage left it (optional)
    free/<name>        a finished message's ``.msg`` file, kept to be written over by
                       the next message (never read; see below)

A stage's completion is appended to the ``.msg`` file itself rather than to the
``.state`` log: creating (and later removing) a ``.state`` file for every message
cost more CPU than anything else the worker did with the spool (ext4: about
0.26 ms per creation here), and a message delivered at the first attempt needs no
other event.  ``stage`` events commute with every other kind in
:func:`gateway.queue.state.fold`, so the two logs are simply concatenated.

A message is made durable by writing it under ``tmp/``, fsyncing it, renaming it
into ``queue/`` and fsyncing the directory (so both the data and the name survive
a power cut).  Only then does the SMTP layer answer 250.  Per-recipient results
are appended to the state log and fsynced before the next step relies on them,
so a restart never delivers twice to a recipient the next hop accepted.

Finished messages' files are reused rather than unlinked and created anew
(:class:`_Recycler`): on ext4 without a journal, as on this project's machines, the
kernel checks every inode freed in the last 30 seconds (``recently_deleted``)
before it hands out a new one, so at a few hundred messages a second each new file
cost 0.5-0.9 ms of CPU.  A delivered message's file leaves ``queue/`` by a rename
into ``free/`` (as atomic as the unlink it replaces); a new message takes one from
there into ``tmp/`` and writes over it from offset 0.  Whoever opened a file under
an old name therefore checks, once it holds the lock, that the name still leads
to the same inode (:func:`_named`); a queue id is never used twice, so a name that
is gone never comes back.  An operator's delete still unlinks.

Several processes may share one spool: a process works on a message only while
it holds an exclusive ``flock`` on its ``.msg`` file, which the kernel releases
if the process dies (kill -9 included).  While a worker runs, a message spooled by
its own process is locked from its creation and the claim handed to that worker
(:meth:`Spool.keep_claims`), which then need not read back what it just wrote.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

from gateway.envelope import Envelope
from gateway.errors import SpoolError, SpoolFullError
from gateway.mailparse import JsonFragments
from gateway.offload import in_thread
from gateway.queue.state import QueueState, fold, parse_events

MAGIC = b"COFFER-SPOOL 1\n"

# Set on a ``.msg`` file (owner execute: it widens no access) before a ``.state`` log
# is first written beside it.  A claim holder that took the message over from its
# store (_Handoff) checks it on the descriptor it holds instead of trying to open or
# unlink a log that is not there (two failed path look-ups per message otherwise).
# Only that in-memory fast path relies on it: it need not survive a crash, and a
# spool written without it reads the same.
STATE_MARK = stat.S_IXUSR

# One encoder for every event line and header (json.dumps with options builds one per call).
_EVENT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# The facts of each stage, by value (JsonFragments): the policy's rule trace under
# "decide" is most of a spool header and recurs from message to message.
_FACTS = JsonFragments(_EVENT_JSON)


def header_text(qid: str, envelope: dict[str, Any], facts: dict[str, Any], size: int) -> str:
    """A spool header's JSON: the text ``_EVENT_JSON`` gives for the whole header (tests
    hold the two equal), each stage's facts encoded alone (a value's encoding does not
    depend on its neighbours) and looked up in _FACTS."""
    if any(type(k) is not str for k in facts):  # json would turn such a key into text
        return _EVENT_JSON.encode({"qid": qid, "envelope": envelope, "facts": facts,
                                   "size": size})
    parts = ",".join(f"{encode_basestring(k)}:{_FACTS.encode(v)}" for k, v in facts.items())
    return (f'{{"qid":{_EVENT_JSON.encode(qid)},"envelope":{_EVENT_JSON.encode(envelope)},'
            f'"facts":{{{parts}}},"size":{_EVENT_JSON.encode(size)}}}')


def _read_fd(fd: int, size: int) -> bytes:
    """``size`` bytes from the start of an open file (fewer only if it is shorter)."""
    data = os.pread(fd, size, 0)
    while len(data) < size:  # a short read: go on until EOF
        chunk = os.pread(fd, size - len(data), len(data))
        if not chunk:
            break
        data += chunk
    return data


def _read_optional(path: str) -> bytes | None:
    """A whole file's bytes, or None if it does not exist (no file object: this runs
    several times per message, mostly for files that are not there)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read_fd(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write every byte of ``parts`` at the file's offset (one writev unless it is short)."""
    left = sum(len(p) for p in parts)
    views = [memoryview(p) for p in parts if p]
    while views:
        n = os.writev(fd, views)
        left -= n
        if not left:
            return
        while n:  # a short write: skip what went out and go on
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def _overwrite(fd: int, parts: list[bytes], keep: bool) -> None:
    """Write ``parts`` over a reused spool file (opened at offset 0, not appending),
    and over what is left of its last content a blank line, which the event log's
    reader skips (see _Recycler); give it a new file's mode (no STATE_MARK from its
    last message) and, if ``keep``, O_APPEND as :meth:`Spool.begin` opens new files."""
    st = os.fstat(fd)
    excess = st.st_size - sum(len(p) for p in parts)
    if 0 < excess <= RECYCLE_PAD_BYTES:
        parts = [*parts, b" " * (excess - 1) + b"\n"]
    _write_all(fd, parts)
    if excess > RECYCLE_PAD_BYTES:  # not chosen so (_Recycler.take): cut it
        os.ftruncate(fd, st.st_size - excess)
    if stat.S_IMODE(st.st_mode) != 0o600:
        os.fchmod(fd, 0o600)
    if keep:
        # F_SETFL sets only the status flags (O_APPEND, O_NONBLOCK, ...): opened with
        # none of them, this one is all there is to set.
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_APPEND)


def _named(path: str, st: os.stat_result) -> bool:
    """Whether ``path`` still names the file ``st`` describes.  A finished message's
    file is renamed away and may be written over for another message (_Recycler):
    a descriptor opened under the old name must not be taken for the message."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return now.st_ino == st.st_ino and now.st_dev == st.st_dev


def _store_error(exc: OSError) -> SpoolError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError(f"spool write failed: {exc}")
    return SpoolError(f"spool write failed: {exc}")


def _read_named(path: str) -> bytes | None:
    """A spool file's bytes read by name without its claim, or None if it does not
    exist or stopped being that name's file while it was read (finished and
    written over for another message: see _named)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        data = _read_fd(fd, st.st_size)
        return data if _named(path, st) else None
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def new_queue_id(now: float | None = None) -> str:
    """A unique, time-sortable queue id: 12 hex digits of milliseconds + 8 random."""
    ms = int((time.time() if now is None else now) * 1000)
    return f"{ms:012X}{secrets.token_hex(4).upper()}"


def queue_id_time(qid: str) -> float:
    """When a queue id was made (:func:`new_queue_id`), in seconds since the epoch;
    ValueError when it does not start with 12 hex digits."""
    head = qid[:12]
    if len(head) != 12 or not all(c in "0123456789abcdefABCDEF" for c in head):
        raise ValueError(f"queue id {qid!r} does not start with its time")
    return int(head, 16) / 1000.0


@dataclass(slots=True, frozen=True)
class PendingStore:
    """A message written under ``tmp/`` (Spool.begin), waiting for Spool.commit."""

    qid: str
    fd: int  # open for writing until commit
    tmp: str
    # Set when the spool keeps claims (Spool.keep_claims): the file is flock'ed from
    # its creation, and commit hands the claim over instead of closing it.
    keep: _Handoff | None = None


@dataclass(slots=True, frozen=True)
class _Handoff:
    """The claim on a message this process just spooled, kept for its own worker.

    The ``.msg`` file was locked before it had a name in ``queue/`` and has stayed
    locked since, so nobody else can have written anything beside or after it: no
    ``.data`` file (only a claim holder writes one) and no stage records.  What it
    holds is known without reading it back.  Only the ``.state`` log can have
    changed (an operator's command appends to it without the claim): the file's
    STATE_MARK says whether one may exist.
    """

    fd: int  # open for reading and appending, flock'ed
    size: int  # of the file as committed
    header: bytes  # the header line (JSON, with its newline)
    data: bytes  # the message bytes as spooled


@dataclass(slots=True)
class SpooledMessage:
    qid: str
    envelope: Envelope
    facts: dict[str, Any]
    data: bytes  # what to deliver: the once-stages' output (.data) if any, else ``received``
    state: QueueState
    received: bytes | None = None  # the bytes as received (.msg) when ``data`` replaced them
    has_data: bool = False  # a .data file exists (loaded, or saved by the claim holder)


class _DirSync:
    """Group commit for a directory's fsync, shared by threads (thread-safe).

    ``renamed()`` is called after a rename into the directory; ``sync(ticket)``
    returns once an fsync of the directory that *started after* that rename has
    completed.  Writers that renamed while another thread's fsync was running all
    share the next one, so N concurrent messages cost one or two directory fsyncs
    instead of N, and each still gets its 250 only after its name is durable.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._renamed = 0  # tickets handed out
        self._synced = 0  # every ticket <= this is durable
        self._running = False
        self.rounds = 0  # directory fsyncs done (observability, tests)
        # The directory stays open: an open and a close per fsync were two more
        # syscalls (and GIL hand-offs) in the spool threads.  Closed with the object.
        self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        weakref.finalize(self, os.close, self._fd)

    def renamed(self) -> int:
        with self._cond:
            self._renamed += 1
            return self._renamed

    def sync(self, ticket: int) -> None:
        with self._cond:
            while True:
                if self._synced >= ticket:
                    return
                if not self._running:
                    self._running = True
                    target = self._renamed  # every rename so far precedes this fsync
                    break
                self._cond.wait()
        ok = False
        try:
            os.fsync(self._fd)
            ok = True
        finally:
            with self._cond:
                self._running = False
                if ok:
                    self.rounds += 1
                    self._synced = max(self._synced, target)
                self._cond.notify_all()


# Finished messages' files kept for reuse, per process, and the largest kept: the
# pool's disk use is bounded by their product (64 MiB), and a file is written over
# only by messages about its size (most are tens of kB).
RECYCLE_FILES = 64
RECYCLE_MAX_BYTES = 1024 * 1024
# How much longer than a new message a reused file may be: the rest is blanked.
RECYCLE_PAD_BYTES = 4096


class _Recycler:
    """The ``free/`` directory: finished messages' files waiting to be written over
    (thread-safe: the event loop and the spool threads both take files).

    A file is never cut shorter: that frees blocks, and on a file system mounted
    with ``discard`` (as here) waits for the device (0.2 ms a file; truncates in the
    event loop stalled every session for up to 10 ms).  A new message takes the
    largest free file at most RECYCLE_PAD_BYTES longer than itself and blanks the
    rest (one line of spaces: a file's stage records follow the message bytes, and
    a message's are a few hundred bytes, so one the same size as the last fits);
    a message smaller than every free file gets a new one.

    A file put here is offered only once the claim on it is let go (:meth:`release`):
    until then its old holder's lock would make a new writer's lock fail.  Several
    processes may share the directory: a name is taken by renaming it away, and a
    rename that finds it gone means another process took it first.
    """

    def __init__(self, path: Path, *, limit: int = RECYCLE_FILES,
                 max_bytes: int = RECYCLE_MAX_BYTES) -> None:
        path.mkdir(exist_ok=True, mode=0o700)
        self.dir = str(path)
        self.limit = limit
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._prefix = f"{os.getpid()}-{secrets.token_hex(3)}-"
        self._seq = 0
        self._pending = 0  # put but not released yet (they count against the limit)
        self._free: list[tuple[int, str]] = []  # (size, name), smallest first
        # Files left by earlier processes are taken over (any process may take them).
        for name in sorted(os.listdir(self.dir)):
            try:
                size = os.stat(f"{self.dir}/{name}").st_size
            except FileNotFoundError:
                continue
            if len(self._free) < limit and size <= max_bytes:
                bisect.insort(self._free, (size, name))
            else:
                _unlink(f"{self.dir}/{name}")
        self.reused = 0  # files written over (Spool._reuse; observability, tests)

    def put(self, path: str) -> tuple[int, str] | None:
        """Move the file at ``path`` here; what to give :meth:`release` when its
        claim is let go, or None when it is not kept (the pool is full, the file too
        large, or it is gone): then the caller unlinks it."""
        with self._lock:
            if len(self._free) + self._pending >= self.limit:
                return None
            self._seq += 1
            self._pending += 1
            name = f"{self._prefix}{self._seq}"
        try:
            size = os.stat(path).st_size  # with the stage records appended since
            if size <= self.max_bytes:
                os.rename(path, f"{self.dir}/{name}")
                return size, name
        except OSError:
            pass
        with self._lock:
            self._pending -= 1
        return None

    def release(self, entry: tuple[int, str]) -> None:
        with self._lock:
            self._pending -= 1
            bisect.insort(self._free, entry)

    def take(self, dest: str, size: int) -> bool:
        """Rename the largest free file of at most ``size`` + RECYCLE_PAD_BYTES bytes
        to ``dest``; False when there is none."""
        limit = size + RECYCLE_PAD_BYTES
        while True:
            with self._lock:
                i = bisect.bisect_right(self._free, (limit, "\uffff")) - 1
                if i < 0:
                    return False
                _size, name = self._free.pop(i)
            try:
                os.rename(f"{self.dir}/{name}", dest)
            except FileNotFoundError:
                continue  # another process sharing the spool took it
            except OSError:
                return False
            return True


# A free-space measurement (statfs) is reused for this many seconds, less the bytes
# this process spooled since, while it is at least FREE_SPACE_MARGIN above what a
# caller needs; nearer the reserve every check measures.  has_room() ran statfs at
# every MAIL FROM and again in every store().
FREE_SPACE_TTL = 1.0
FREE_SPACE_MARGIN = 256 * 1024 * 1024


class _FreeSpace:
    """The spool file system's free bytes, measured at most once per ``ttl`` seconds
    while far from what callers need (thread-safe enough: a race only measures twice)."""

    def __init__(self, path: Path, *, ttl: float = FREE_SPACE_TTL,
                 margin: int = FREE_SPACE_MARGIN,
                 measure: Callable[[Path], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.ttl = ttl
        self.margin = margin
        self.measure = measure or (lambda p: shutil.disk_usage(p).free)
        self.clock = clock
        self._free = 0
        self._at: float | None = None
        self.measurements = 0  # statfs calls (observability, tests)

    def has_room(self, size: int, reserve: int) -> bool:
        now = self.clock()
        if self._at is not None and now - self._at < self.ttl \
                and self._free - size >= reserve + self.margin:
            return True
        self._free = self.measure(self.path)
        self._at = now
        self.measurements += 1
        return self._free - size >= reserve

    def used(self, size: int) -> None:
        """``size`` bytes were just written: count them against the cached figure."""
        self._free -= size


# Messages up to this size are written to ``tmp/`` on the event loop (Spool.begin):
# page-cache writes of a few kB cost less than a thread hop; only the fsyncs,
# rename and directory fsync (Spool.commit) go to a thread, in one call.
INLINE_WRITE_BYTES = 256 * 1024


async def store_from_loop(
    spool: Spool, executor: Executor | None, envelope: Envelope, data: bytes,
    facts: dict[str, Any] | None = None, qid: str | None = None,
) -> str:
    """:meth:`Spool.store` from the event loop: one thread hop, for the blocking part."""
    if len(data) > INLINE_WRITE_BYTES:
        return await in_thread(executor, spool.store, envelope, data, facts, qid)
    pending = spool.begin(envelope, data, facts, qid)
    try:
        return await in_thread(executor, spool.commit, pending)
    except RuntimeError:  # not even submitted (the pool is shut down): nothing is queued
        spool.abort(pending)
        raise


class Spool:
    def __init__(self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = root
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.tmp_dir = root / "tmp"
        self.queue_dir = root / "queue"
        for d in (self.tmp_dir, self.queue_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._queue_dir_sync = _DirSync(self.queue_dir)
        self.recycler = _Recycler(root / "free")
        # Files of messages this process removed while holding their claim: offered
        # for reuse once the claim is let go (qid -> (size, name in free/)).
        self._released: dict[str, tuple[int, str]] = {}
        self.free_space = _FreeSpace(root)
        self._qdir = str(self.queue_dir)  # for the per-message paths: cheaper than Path /
        # Claims on messages just spooled here, waiting for this process's worker
        # (keep_claims).  Filled by commit (in a spool thread), emptied by
        # claimed_sized, remove, append_event and keep_claims(0): under the lock.
        self._handoffs: dict[str, _Handoff] = {}
        self._handoff_limit = 0
        self._handoff_lock = threading.Lock()
        self._fresh: dict[str, _Handoff] = {}  # claimed through a hand-off: for load
        # Claims this process keeps between two attempts (retain): qid -> a descriptor
        # sharing the claim's open file description, so its flock stays held.
        self._retained: dict[str, int] = {}

    # -- paths ---------------------------------------------------------------
    def _path(self, qid: str, suffix: str) -> str:
        return f"{self._qdir}/{qid}{suffix}"

    def msg_path(self, qid: str) -> Path:
        return self.queue_dir / f"{qid}.msg"

    def state_path(self, qid: str) -> Path:
        return self.queue_dir / f"{qid}.state"

    def data_path(self, qid: str) -> Path:
        return self.queue_dir / f"{qid}.data"

    # -- writing -------------------------------------------------------------
    def has_room(self, size: int = 0) -> bool:
        """Whether the spool's file system can take ``size`` more bytes above the reserve."""
        if not self.min_free_bytes:
            return True
        return self.free_space.has_room(size, self.min_free_bytes)

    def store(
        self, envelope: Envelope, data: bytes, facts: dict[str, Any] | None = None,
        qid: str | None = None,
    ) -> str:
        """Write a message durably and return its queue id.

        Raises SpoolFullError when the disk is (nearly) full and SpoolError for
        any other I/O failure; in both cases nothing is left in ``queue/``.
        """
        return self.commit(self.begin(envelope, data, facts, qid))

    def begin(
        self, envelope: Envelope, data: bytes, facts: dict[str, Any] | None = None,
        qid: str | None = None,
    ) -> PendingStore:
        """The first half of :meth:`store`: the message written under ``tmp/``, not yet
        durable nor queued.  Page-cache writes only: cheap enough for the event loop
        when the message is small, where a thread hop would cost more than the writes.
        Give the result to :meth:`commit` (which blocks on fsync); errors as store's.
        """
        qid = qid or new_queue_id(envelope.received_at or None)
        if not self.has_room(len(data)):
            raise SpoolFullError("spool file system is below its free-space reserve")
        header = header_text(qid, envelope.to_dict(), facts or {}, len(data)).encode() + b"\n"
        tmp = f"{self.tmp_dir}/{qid}.msg"
        keep = self._handoff_limit > 0
        fd = self._reuse(tmp, len(MAGIC) + len(header) + len(data), keep)
        reused = fd is not None
        if fd is None:
            try:
                # Readable and appending, like a claim's descriptor: commit may hand it
                # on as one (the writev at offset 0 of a new file is the same).
                fd = os.open(tmp, (os.O_RDWR | os.O_APPEND if keep else os.O_WRONLY)
                             | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise _store_error(exc) from exc
        try:
            if reused:
                _overwrite(fd, [MAGIC, header, data], keep)
            else:
                if keep:
                    # Locked before it has a name anyone else could open: a fresh
                    # inode, so this never waits (nor fails but on a broken system).
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                _write_all(fd, [MAGIC, header, data])
        except OSError as exc:
            os.close(fd)
            _unlink(tmp)
            raise _store_error(exc) from exc
        self.free_space.used(len(data) + len(header) - 1)
        handoff = _Handoff(fd, len(MAGIC) + len(header) + len(data), header, data) \
            if keep else None
        return PendingStore(qid, fd, tmp, handoff)

    def _reuse(self, tmp: str, size: int, keep: bool) -> int | None:
        """A finished message's file to hold ``size`` bytes (_Recycler.take) renamed
        to ``tmp`` and opened for writing over (locked if ``keep``), or None."""
        while self.recycler.take(tmp, size):
            try:
                fd = os.open(tmp, os.O_RDWR)
            except OSError:
                _unlink(tmp)
                return None
            if keep:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    # Someone who opened it under its old name holds its lock (and
                    # finds that name gone once they have it): not for reuse.
                    os.close(fd)
                    _unlink(tmp)
                    continue
            self.recycler.reused += 1
            return fd
        return None

    def commit(self, pending: PendingStore) -> str:
        """The second half of :meth:`store`: fsync, rename into ``queue/``, fsync the
        directory (shared with concurrent commits); the queue id.  Closes the file,
        unless the spool keeps claims: then the locked file is kept for the worker."""
        final = self._path(pending.qid, ".msg")
        kept = False
        try:
            try:
                if self.fsync:
                    os.fsync(pending.fd)
                os.rename(pending.tmp, final)
                if self.fsync:
                    self._queue_dir_sync.sync(self._queue_dir_sync.renamed())
                if pending.keep is not None:
                    kept = self._keep(pending.qid, pending.keep)
            finally:
                # Closed after the rename (a kept claim is closed by whoever takes it):
                # a lock taken in begin must last until the file has its final name.
                if not kept:
                    os.close(pending.fd)
        except OSError as exc:
            _unlink(pending.tmp)
            _unlink(final)
            raise _store_error(exc) from exc
        return pending.qid

    # -- claims handed from the store to this process's worker -------------------
    def keep_claims(self, limit: int) -> None:
        """Keep up to ``limit`` claims on messages spooled through :meth:`begin` /
        :meth:`commit` (the event loop's path) for this process's worker: its
        :meth:`claimed_sized` then takes the open, locked file over, and :meth:`load`
        knows the message without reading it (see :class:`_Handoff`).  The oldest
        is let go beyond ``limit``.  ``0``: stop, letting every kept claim go (the
        worker stops: nothing else would take them)."""
        with self._handoff_lock:
            self._handoff_limit = limit
            gone = self._trim()
            retained = list(self._retained.values()) if not limit else []
            if not limit:
                self._retained.clear()
        for h in gone:
            os.close(h.fd)
        for fd in retained:
            os.close(fd)

    def retain(self, qid: str, fd: int) -> None:
        """Go on holding the claim of ``fd`` (a claimed message's descriptor) after the
        :meth:`claimed` block ends, until this process claims the message again: its
        worker still has to write delivery results the disk refused, and no other
        process may try the message before that.  Let go by ``keep_claims(0)``."""
        dup = os.dup(fd)  # the flock belongs to the open file description both share
        with self._handoff_lock:
            old = self._retained.pop(qid, None)
            self._retained[qid] = dup
        if old is not None:
            os.close(old)

    def _trim(self) -> list[_Handoff]:
        gone: list[_Handoff] = []
        while len(self._handoffs) > self._handoff_limit:
            gone.append(self._handoffs.pop(next(iter(self._handoffs))))
        return gone

    def _keep(self, qid: str, handoff: _Handoff) -> bool:
        """Keep a just-committed claim; False if claims are no longer kept."""
        with self._handoff_lock:
            if not self._handoff_limit:
                return False
            self._handoffs[qid] = handoff
            gone = self._trim()
        for h in gone:
            os.close(h.fd)
        return True

    def _let_go(self, qid: str) -> None:
        """Release a kept claim that its worker will not take (held, removed)."""
        if not self._handoffs:
            return
        with self._handoff_lock:
            h = self._handoffs.pop(qid, None)
        if h is not None:
            os.close(h.fd)

    def abort(self, pending: PendingStore) -> None:
        """Forget a :meth:`begin` that will not be committed (closes and removes it)."""
        os.close(pending.fd)
        _unlink(pending.tmp)

    def append_event(self, qid: str, event: dict[str, Any], *, sync: bool = True) -> None:
        """Append one event to a message's state log (fsynced unless sync=False)."""
        self._mark_state(qid)
        self._append(self._path(qid, ".state"), os.O_CREAT, event, sync, "state write")
        # E.g. held before the queue: the worker is not told about it, so a kept
        # claim would only keep an operator's ``delete`` waiting.
        self._let_go(qid)

    def _mark_state(self, qid: str) -> None:
        """Set the message file's STATE_MARK before its state log is written: a holder
        that does not see the mark has read the log before anything was in it."""
        path = self._path(qid, ".msg")
        try:
            mode = os.stat(path).st_mode
            if not mode & STATE_MARK:
                os.chmod(path, stat.S_IMODE(mode) | STATE_MARK)
        except FileNotFoundError:
            pass  # removed meanwhile: the log is an orphan, as before (clean_tmp)
        except OSError as exc:
            raise SpoolError(f"state write failed: {exc}") from exc

    def append_stage(self, qid: str, event: dict[str, Any], *, sync: bool = True,
                     fd: int | None = None) -> None:
        """Record an after-queue stage's completion (a ``stage`` event) at the end of
        the message's ``.msg`` file (fsynced unless sync=False; see the module doc).
        ``fd``: the claim's descriptor (:meth:`claimed`, open for appending), written
        through instead of opening the file again."""
        if event.get("ev") != "stage":
            raise ValueError("only stage events go to the message file")
        self._append(self._path(qid, ".msg"), 0, event, sync, "stage record", fd)

    def _append(self, path: str, create: int, event: dict[str, Any], sync: bool,
                what: str, fd: int | None = None) -> None:
        event.setdefault("at", time.time())
        line = _EVENT_JSON.encode(event).encode() + b"\n"
        try:
            if fd is not None:
                os.write(fd, line)
                if sync and self.fsync:
                    os.fsync(fd)
                return
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | create, 0o600)
            try:
                os.write(fd, line)
                if sync and self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"{what} failed: {exc}") from exc
            raise SpoolError(f"{what} failed: {exc}") from exc

    def sync_stages(self, qid: str) -> None:
        """Make earlier ``append_stage(sync=False)`` calls durable (one fsync for many)."""
        if not self.fsync:
            return
        try:
            fd = os.open(self._path(qid, ".msg"), os.O_RDONLY)
        except OSError as exc:
            raise SpoolError(f"stage sync failed: {exc}") from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise SpoolError(f"stage sync failed: {exc}") from exc
        finally:
            os.close(fd)

    def sync_file(self, fd: int) -> None:
        """fsync an open spool file (read-only will do: fsync is per file, not per
        descriptor), e.g. the claim's descriptor after ``append_stage(sync=False)``."""
        if not self.fsync:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            raise SpoolError(f"stage sync failed: {exc}") from exc

    def append_events(self, qid: str, events: list[dict[str, Any]]) -> None:
        """Append several events with a single fsync."""
        if not events:
            return
        self._mark_state(qid)
        path = self._path(qid, ".state")
        for ev in events[:-1]:
            self._append(path, os.O_CREAT, ev, False, "state write")
        self._append(path, os.O_CREAT, events[-1], True, "state write")
        self._let_go(qid)

    def save_data(self, qid: str, data: bytes) -> None:
        """Durably keep the transformed bytes of a message (the caller holds its claim).

        A ``once`` stage that changed the message (signed, encrypted) is not run
        again on a retry, so its output must survive a restart: it is written
        beside the original (tmp, fsync, rename, fsync dir) and :meth:`load`
        returns it instead of the received bytes.
        """
        tmp = self.tmp_dir / f"{qid}.data"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=False) as fh:
                    fh.write(data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.data_path(qid))
            self.sync_queue_dir()
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(f"spool write failed: {exc}") from exc
            raise SpoolError(f"spool write failed: {exc}") from exc

    # -- reading -------------------------------------------------------------
    def exists(self, qid: str) -> bool:
        return self.msg_path(qid).exists()

    def queue_ids(self) -> list[str]:
        """Every queued message id, oldest first."""
        return sorted(p.name[:-4] for p in self.queue_dir.glob("*.msg"))

    def read_header(self, qid: str) -> tuple[Envelope, dict[str, Any], int]:
        with open(self.msg_path(qid), "rb") as fh:
            header = self._parse_header(qid, fh.read(len(MAGIC)), fh.readline())
            if not _named(self._path(qid, ".msg"), os.fstat(fh.fileno())):
                raise FileNotFoundError(errno.ENOENT, "finished meanwhile", str(fh.name))
            return header

    def _parse_header(
        self, qid: str, magic: bytes, line: bytes
    ) -> tuple[Envelope, dict[str, Any], int]:
        if magic != MAGIC:
            raise SpoolError(f"{qid}: not a spool file")
        try:
            hdr = json.loads(line)
            named = hdr.get("qid", qid)
            parsed = Envelope.from_dict(hdr["envelope"]), hdr.get("facts", {}), int(hdr["size"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SpoolError(f"{qid}: corrupt spool header: {exc}") from exc
        if named != qid:  # never another message's file taken for this one (_Recycler)
            raise SpoolError(f"{qid}: spool file holds message {named}")
        return parsed

    def events(self, qid: str) -> list[dict[str, Any]]:
        """Every event of a message: its stage records, then its ``.state`` log."""
        tail = b""
        # A missing or damaged message file has no stage records (the worker holds a
        # damaged one when it loads it).
        with contextlib.suppress(FileNotFoundError, SpoolError), \
                open(self.msg_path(qid), "rb") as fh:
            _env, _facts, size = self._parse_header(qid, fh.read(len(MAGIC)), fh.readline())
            fh.seek(size, os.SEEK_CUR)
            tail = fh.read()
            if not _named(self._path(qid, ".msg"), os.fstat(fh.fileno())):
                tail = b""  # finished meanwhile: what was read may be another message's
        return parse_events(tail) + self._state_events(qid)

    def _state_events(self, qid: str) -> list[dict[str, Any]]:
        raw = _read_optional(self._path(qid, ".state"))
        return [] if raw is None else parse_events(raw)

    def read_state(self, qid: str, recipients: list[str]) -> QueueState:
        return fold(recipients, self.events(qid))

    def load(self, qid: str, fd: int | None = None, size: int | None = None) -> SpooledMessage:
        """The message, its envelope and its state.  ``fd``: the message file, open
        (the claim's descriptor, :meth:`claimed`), read from instead of opening it;
        ``size``: its size, if known (:meth:`claimed_sized`)."""
        fresh = self._fresh.get(qid) if fd is not None else None
        if fresh is not None and fresh.fd == fd:
            # Spooled by this process and locked ever since (see _Handoff): no .data,
            # no stage records; only the state log can be new.
            env, facts, size = self._parse_header(qid, MAGIC, fresh.header)
            events = self._state_events(qid) if os.fstat(fd).st_mode & STATE_MARK else []
            return SpooledMessage(qid, env, facts, fresh.data, fold(env.rcpt_to, events))
        if fd is None:
            raw = _read_named(self._path(qid, ".msg"))
            if raw is None:
                raise SpoolError(f"{qid}: no such queued message")
        else:
            raw = _read_fd(fd, os.fstat(fd).st_size if size is None else size)
        start = len(MAGIC)
        eol = raw.find(b"\n", start)
        end = len(raw) if eol < 0 else eol + 1
        env, facts, size = self._parse_header(qid, raw[:start], raw[start:end])
        data = raw[end:end + size]
        if len(data) != size:
            raise SpoolError(f"{qid}: spool file truncated ({len(data)} of {size} bytes)")
        tail = raw[end + size:]  # the stage records appended after the message
        received: bytes | None = None
        changed = _read_optional(self._path(qid, ".data"))
        if changed is not None:
            # A once-stage's output; the received bytes stay for the archive
            # (issue 3: an outbound message is kept as received and as sent).
            data, received = changed, data
        state = fold(env.rcpt_to, parse_events(tail) + self._state_events(qid))
        return SpooledMessage(qid, env, facts, data, state, received,
                              has_data=changed is not None)

    # -- ownership and removal ----------------------------------------------
    @contextmanager
    def claim(self, qid: str, *, wait: bool = False, kept: bool = True) -> Iterator[bool]:
        """Hold the message's lock; yields False if another process holds it.

        ``kept=False``: a claim this process keeps for its own worker (a hand-off from
        :meth:`commit`, or one :meth:`retain` holds for results not yet written) counts
        as held by someone else instead of being taken over, as the worker's own
        :meth:`claimed_sized` does: for the service's other threads, which must never
        take a message from under the worker (gateway.service)."""
        with self.claimed_sized(qid, wait=wait, kept=kept) as got:
            yield got is not None

    @contextmanager
    def claimed(self, qid: str, *, wait: bool = False) -> Iterator[int | None]:
        """:meth:`claim`, yielding the open message file or None.  It is open for
        reading and appending (O_APPEND): the holder appends its stage records
        through it (:meth:`append_stage`) without opening the file again."""
        with self.claimed_sized(qid, wait=wait) as got:
            yield None if got is None else got[0]

    @contextmanager
    def claimed_sized(self, qid: str, *, wait: bool = False,
                      kept: bool = True) -> Iterator[tuple[int, int] | None]:
        """:meth:`claimed`, yielding the descriptor and the file's size when claimed
        (from the fstat the claim makes anyway: for :meth:`load`).  ``kept``: see
        :meth:`claim` (when False, a kept claim's flock refuses the new one)."""
        h = None
        if kept and self._handoffs:
            with self._handoff_lock:
                h = self._handoffs.pop(qid, None)
        if h is not None:
            # Locked since before it was queued: it has not been removed meanwhile.
            self._fresh[qid] = h
            try:
                yield h.fd, h.size
            finally:
                del self._fresh[qid]
                os.close(h.fd)
                self._release(qid)
            return
        retained = None
        if kept and self._retained:
            with self._handoff_lock:
                retained = self._retained.pop(qid, None)
        if retained is not None:
            try:
                st = os.fstat(retained)
                yield (retained, st.st_size) if _named(self._path(qid, ".msg"), st) else None
            finally:
                os.close(retained)
                self._release(qid)
            return
        try:
            fd = os.open(self._path(qid, ".msg"), os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            # Not ours to let go: a file the holder removed stays kept until its own
            # claim ends (it may be a thread of this process: _release).
            os.close(fd)
            yield None
            return
        except BaseException:
            os.close(fd)
            raise
        try:
            # The file may have been removed between open and lock (by the process
            # that held the lock), and even written over for another message since:
            # then the name no longer leads to it.
            st = os.fstat(fd)
            yield (fd, st.st_size) if _named(self._path(qid, ".msg"), st) else None
        finally:
            os.close(fd)  # closing releases the flock
            self._release(qid)

    def _release(self, qid: str) -> None:
        """The claim on ``qid`` is let go: a file :meth:`remove` kept may be reused."""
        if self._released:
            name = self._released.pop(qid, None)
            if name is not None:
                self.recycler.release(name)

    def remove(self, qid: str, *, sync: bool = True, data: bool = True,
               recycle: bool = False) -> None:
        """Forget a finished (or deleted) message.  The caller holds its claim.

        ``recycle``: the caller holds it through :meth:`claimed_sized` (whose end
        lets the file be reused) and the message was not deleted by an operator
        (whose delete must not leave its bytes in ``free/``): the file is kept for
        the next message instead of unlinked.

        ``data=False``: the caller knows there is no ``.data`` file (it loaded the
        message without one and saved none since; only a claim holder writes one),
        so no unlink is tried for it.

        With ``sync=False`` the directory is not fsynced: the removal is visible
        at once (a kill -9 cannot undo it) and the caller makes it durable
        against power loss later with :meth:`sync_queue_dir`, one fsync for many
        removals (group commit).
        """
        # The .msg goes first: a crash before the state log is gone leaves an orphan
        # log (cleaned at start-up), never a message without its delivery record,
        # which would be delivered again to every recipient.
        path = self._path(qid, ".msg")
        kept = self.recycler.put(path) if recycle else None
        if kept is None:
            _unlink(path)
        else:
            self._released[qid] = kept
        if data:
            _unlink(self._path(qid, ".data"))
        fresh = self._fresh.get(qid)
        # Looked at after the .msg is gone: a mark set before that is seen, and a log
        # begun after it is an orphan whichever way (clean_tmp), as before.
        if fresh is None or os.fstat(fresh.fd).st_mode & STATE_MARK:
            _unlink(self._path(qid, ".state"))
        self._let_go(qid)  # removed by the store's caller (a failed split), not its worker
        if sync:
            self.sync_queue_dir()

    def sync_queue_dir(self) -> None:
        """Make earlier ``remove(sync=False)`` calls durable."""
        if self.fsync:
            # Shares the fsync with concurrent store()s: any one that starts now covers both.
            self._queue_dir_sync.sync(self._queue_dir_sync.renamed())

    def clean_tmp(self, older_than: float = 600.0) -> int:
        """Remove half-written files left by a crash (never acknowledged).

        Only files older than ``older_than`` seconds go: another process sharing
        the spool may be writing a fresh one right now.  Age is the later of the
        modification and the change time: a finished message's file taken from
        ``free/`` (_Recycler.take) keeps its old mtime until it is written over, but
        the rename into ``tmp/`` set its ctime (Linux updates it on rename).
        """
        n = 0
        limit = time.time() - older_than
        for p in self.tmp_dir.iterdir():
            try:
                st = p.stat()
                if max(st.st_mtime, st.st_ctime) < limit:
                    p.unlink(missing_ok=True)
                    n += 1
            except FileNotFoundError:
                continue
        # A state log without its message can only be left by a crash in remove().
        for pattern in ("*.state", "*.data"):
            for p in self.queue_dir.glob(pattern):
                if not p.with_suffix(".msg").exists():
                    p.unlink(missing_ok=True)
        return n
