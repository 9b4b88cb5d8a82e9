"""Relay benchmark: Coffer against a bare aiosmtpd sink, Postfix's smtp-sink and a real Postfix.

    .venv/bin/python bench/relay.py --messages 2000 --concurrency 20 --json

In ONE run, the same N messages (a fixed-seed size mix, 2 kB to 200 kB, median about 10 kB)
go over C concurrent SMTP connections to:

  (a) a bare aiosmtpd sink in its own process: the ceiling for a Python SMTP server;
  (b) Coffer (`coffer serve`, fsync on, a config from `coffer init` with one route
      '*' -> smtp://127.0.0.1:SINK), measured END TO END: from the first connection until
      Postfix's smtp-sink has counted every accepted message;
  (c) Postfix's smtp-sink, driven by Postfix's own smtp-source: the protocol's limit on this
      machine (and, separately, by this script's generator: the generator's own ceiling);
  (d) a real Postfix relay (../shared/peers/postfix-relay, queue fsync on) relaying to the
      same kind of sink, end to end.

Coffer's resolver is pointed at bench/dns_stub.py (NXDOMAIN at once, on loopback), so its
checks cost a loopback round trip per lookup and no query leaves the machine.  Prints one JSON
line (with --json) or a table.  Every server binds 127.0.0.1 only and is
stopped at the end, even on error or Ctrl-C.  This is a benchmark, not a test: figures depend
on the machine and on whatever else runs on it, so compare figures from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SENDER = "bench@src.example"
DOMAIN = "dst.example"  # the domain the Postfix peer relays (its default)
MIN_SIZE, MAX_SIZE, MEDIAN_SIZE = 2 * 1024, 200 * 1024, 10 * 1024
SIZE_SIGMA = 0.9  # log-normal spread: p90 about 32 kB, mean about 15 kB
OP_TIMEOUT = 120.0  # one SMTP command; a server slower than this has failed the run


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A target could not be measured (missing tool, server did not start, timeout)."""


# --------------------------------------------------------------------------- messages


def message_sizes(n: int, seed: int) -> list[int]:
    """A fixed-seed log-normal size mix clipped to 2 kB..200 kB, median about 10 kB."""
    rng = random.Random(seed)
    mu = math.log(MEDIAN_SIZE)
    return [
        int(min(MAX_SIZE, max(MIN_SIZE, rng.lognormvariate(mu, SIZE_SIGMA)))) for _ in range(n)
    ]


_WORDS = str.split(
    "the of and to in is that for it as with was on be by this are from at or an have not "
    "invoice contract quarterly report compliance archive retention please find attached "
    "regards meeting schedule agreement confidential review approved payment account team "
    "project update summary customer order shipment delivery signature policy audit"
)


def make_messages(sizes: list[int], seed: int) -> list[bytes]:
    """RFC 5322 messages of about the given sizes, CRLF, already dot-stuffed for DATA."""
    rng = random.Random(seed + 1)
    # A pool of text lines (under 78 characters, RFC 5322 §2.1.1), sliced per message.
    pool: list[bytes] = []
    for _ in range(4000):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < 60:
            words.append(rng.choice(_WORDS))
        pool.append(" ".join(words).encode() + b"\r\n")
    out = []
    for i, size in enumerate(sizes):
        head = (
            f"From: Bench Sender <{SENDER}>\r\n"
            f"To: <rcpt{i % 50}@{DOMAIN}>\r\n"
            f"Subject: benchmark message {i}\r\n"
            f"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <bench.{seed}.{i}@src.example>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n"
        ).encode()
        body = bytearray()
        start = rng.randrange(len(pool))
        j = start
        while len(head) + len(body) < size:
            body += pool[j % len(pool)]
            j += 1
        # RFC 5321 §4.5.2: a line starting with "." gets one more; the pool has none, but the
        # generator must stay correct if the pool changes.
        data = bytes(head + body).replace(b"\r\n.", b"\r\n..")
        out.append(data)
    return out


def size_summary(sizes: list[int]) -> dict[str, Any]:
    s = sorted(sizes)
    return {
        "distribution": f"log-normal, median {MEDIAN_SIZE // 1024} kB, sigma {SIZE_SIGMA}, "
        f"clipped to {MIN_SIZE // 1024}-{MAX_SIZE // 1024} kB",
        "min": s[0],
        "p50": s[len(s) // 2],
        "mean": round(statistics.fmean(s)),
        "p90": s[int(len(s) * 0.9)],
        "max": s[-1],
        "total_bytes": sum(s),
    }


# --------------------------------------------------------------------------- load generator


@dataclass
class LoadResult:
    sent: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # end of DATA -> final reply
    started: float = 0.0
    finished: float = 0.0
    cpu_s: float = 0.0  # this process's CPU while generating

    @property
    def elapsed(self) -> float:
        return self.finished - self.started

    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        s = sorted(self.latencies)
        return round(s[min(len(s) - 1, int(q * len(s)))] * 1000, 2)


class SmtpFailure(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """One SMTP reply, multi-line replies joined (RFC 5321 §4.2.1)."""
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), OP_TIMEOUT)
        if not line:
            raise SmtpFailure("connection closed by server")
        lines.append(line.decode("latin-1").rstrip("\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            break
    try:
        code = int(lines[-1][:3])
    except ValueError:
        raise SmtpFailure(f"bad reply {lines[-1]!r}") from None
    return code, "\n".join(lines)


async def _connection(
    port: int, next_index: Callable[[], int | None], messages: list[bytes], res: LoadResult
) -> None:
    """One client connection sending messages back to back until none are left."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), OP_TIMEOUT)
    try:
        code, _ = await _reply(reader)
        if code != 220:
            raise SmtpFailure(f"banner {code}")
        writer.write(b"EHLO bench.src.example\r\n")
        code, text = await _reply(reader)
        if code != 250:
            raise SmtpFailure(f"EHLO {code}")
        # RFC 2920: with PIPELINING, MAIL, RCPT and DATA go in one write (DATA last).
        pipelining = "PIPELINING" in text.upper()
        while (i := next_index()) is not None:
            rcpt = f"rcpt{i % 50}@{DOMAIN}"
            cmds = [f"MAIL FROM:<{SENDER}>\r\n", f"RCPT TO:<{rcpt}>\r\n", "DATA\r\n"]
            codes = []
            if pipelining:
                writer.write("".join(cmds).encode())
                for _ in cmds:
                    codes.append((await _reply(reader))[0])
            else:
                for cmd in cmds:
                    writer.write(cmd.encode())
                    code, _ = await _reply(reader)
                    codes.append(code)
                    if code >= 400:
                        break
            res.sent += 1
            if codes[-1] != 354:
                res.rejected[str(codes[-1])] = res.rejected.get(str(codes[-1]), 0) + 1
                writer.write(b"RSET\r\n")
                await _reply(reader)
                continue
            writer.write(messages[i])
            writer.write(b".\r\n")
            t0 = time.perf_counter()
            code, _ = await _reply(reader)
            res.latencies.append(time.perf_counter() - t0)
            if code == 250:
                res.accepted += 1
            else:
                res.rejected[str(code)] = res.rejected.get(str(code), 0) + 1
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(SmtpFailure, TimeoutError, ConnectionError):
            await _reply(reader)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def send_load(port: int, messages: list[bytes], concurrency: int) -> LoadResult:
    """Send every message over `concurrency` connections; a dropped connection reconnects."""
    res = LoadResult()
    it = iter(range(len(messages)))

    def next_index() -> int | None:
        return next(it, None)

    async def worker() -> None:
        failures = 0
        while True:
            try:
                await _connection(port, next_index, messages, res)
                return
            except (SmtpFailure, ConnectionError, OSError, TimeoutError) as exc:
                failures += 1
                key = f"error: {exc}"[:80]
                res.rejected[key] = res.rejected.get(key, 0) + 1
                if failures > 5:
                    return

    cpu0 = _self_cpu()
    res.started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.finished = time.perf_counter()
    res.cpu_s = _self_cpu() - cpu0
    return res


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(
    port: int, timeout: float, proc: asyncio.subprocess.Process | None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.returncode is not None:
            raise BenchError(f"process exited with {proc.returncode} before listening")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()
        return
    raise BenchError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f}s")


async def wait_started(
    log_file: Path, workers: int, timeout: float, proc: asyncio.subprocess.Process
) -> None:
    """Wait until `workers` gateway processes have logged that they are serving."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise BenchError(f"coffer serve exited with {proc.returncode} while starting")
        with contextlib.suppress(FileNotFoundError):
            if log_file.read_bytes().count(b'"event": "started"') >= workers:
                return
        await asyncio.sleep(0.1)
    raise BenchError(f"fewer than {workers} coffer workers started within {timeout:.0f}s")


def tree_cpu_s(root_pid: int) -> float:
    """CPU seconds (user+system, incl. reaped children) of a process and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry)
        parents[pid] = int(fields[1])
        cpu[pid] = sum(int(x) for x in fields[11:15]) / tick
    total = 0.0
    for pid in cpu:
        p = pid
        while p and p != root_pid:
            p = parents.get(p, 0)
        if p == root_pid:
            total += cpu[pid]
    return total


async def stop_process(proc: asyncio.subprocess.Process, name: str, grace: float = 20.0) -> None:
    """SIGTERM our own child (and its process group), then SIGKILL after `grace` seconds."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        log(f"{name} did not stop within {grace:.0f}s; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1, counting messages from its `-c` counters."""

    _MESG = re.compile(rb"mesg=(\d+)")

    def __init__(self, port: int) -> None:
        self.port = port
        self.count = 0
        self.changed_at = time.perf_counter()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        exe = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        if not os.path.exists(exe):
            raise BenchError("Postfix's smtp-sink is not installed (apt-get install postfix)")
        args = [exe, "-c"]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        args += [f"127.0.0.1:{self.port}", "1024"]
        self._proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read())
        await wait_listening(self.port, 10, self._proc)
        # wait_listening's probe connection ends a session, not a message: mesg stays 0.

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        tail = b""
        while chunk := await self._proc.stdout.read(65536):
            tail = (tail + chunk)[-64:]
            # Only whole records ("sess=.. quit=.. mesg=N\r"): a chunk may end inside a number.
            found = self._MESG.findall(tail[: tail.rfind(b"\r") + 1])
            if found and int(found[-1]) != self.count:
                self.count = int(found[-1])
                self.changed_at = time.perf_counter()
                self._changed.set()

    async def wait_for(self, n: int, timeout: float) -> float:
        """perf_counter() when the sink had counted n messages."""
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()  # before the check, so no update is missed
            if self.count >= n:
                return self.changed_at
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"the sink counted {self.count} of {n} messages in {timeout:.0f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    async def stop(self) -> None:
        if self._proc is not None:
            await stop_process(self._proc, "smtp-sink", 5)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


@contextlib.asynccontextmanager
async def smtp_sink() -> AsyncIterator[SmtpSink]:
    sink = SmtpSink(free_port())
    try:
        await sink.start()
        yield sink
    finally:
        await sink.stop()


@contextlib.asynccontextmanager
async def dns_stub() -> AsyncIterator[int]:
    """bench/dns_stub.py in its own process: NXDOMAIN at once for every name."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "bench" / "dns_stub.py"), str(port),
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise BenchError("the DNS stub did not start")
        yield port
    finally:
        await stop_process(proc, "DNS stub", 5)


# --------------------------------------------------------------------------- targets


@dataclass
class Figures:
    values: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def _load_figures(prefix: str, res: LoadResult, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        f"{prefix}_accept_msgs_per_s": round(res.rate(), 1),
        f"{prefix}_accepted": res.accepted,
        f"{prefix}_generator_cpu_s": round(res.cpu_s, 2),
    }
    if res.rejected:
        out[f"{prefix}_rejected"] = res.rejected
    if res.accepted < n:
        log(f"{prefix}: only {res.accepted} of {n} accepted: {res.rejected}")
    return out


async def bench_aiosmtpd(messages: list[bytes], c: int) -> dict[str, Any]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "bench" / "aiosmtpd_sink.py"), str(port),
        stdout=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await wait_listening(port, 30, proc)
        res = await send_load(port, messages, c)
        cpu = tree_cpu_s(proc.pid)
    finally:
        await stop_process(proc, "aiosmtpd sink", 5)
    out = _load_figures("sink", res, len(messages))
    out["sink_msgs_per_s"] = round(res.rate(), 1)
    out["sink_p50_ms"] = res.percentile_ms(0.5)
    out["sink_p99_ms"] = res.percentile_ms(0.99)
    out["sink_server_cpu_s"] = round(cpu, 2)
    return out


async def bench_smtp_sink(messages: list[bytes], c: int, mean_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n = len(messages)
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.path.exists(source):
        raise BenchError("Postfix's smtp-source is not installed (apt-get install postfix)")
    # (c) Postfix's own client into Postfix's own sink: the protocol's limit here.  smtp-source
    # sends one fixed size, so it sends the mix's mean size (same bytes in total).
    async with smtp_sink() as sink:
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            source, "-c", "-s", str(c), "-m", str(n), "-l", str(mean_size),
            "-f", SENDER, "-t", f"rcpt@{DOMAIN}", f"127.0.0.1:{sink.port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 600)
        finally:
            await stop_process(proc, "smtp-source", 2)
        if proc.returncode != 0:
            raise BenchError(f"smtp-source failed: {err.decode(errors='replace')[-300:]}")
        t1 = await sink.wait_for(n, 30)
        out["smtp_sink_msgs_per_s"] = round(n / (t1 - t0), 1)
        out["smtp_sink_message_bytes"] = mean_size
    # The same sink driven by this script's generator: the generator's own ceiling.
    async with smtp_sink() as sink:
        res = await send_load(sink.port, messages, c)
        await sink.wait_for(res.accepted, 30)
        out["generator_msgs_per_s"] = round(res.rate(), 1)
        out["generator_cpu_s"] = round(res.cpu_s, 2)
    return out


def coffer_env() -> dict[str, str]:
    """The environment for `coffer`: this checkout's code first, even when the venv's
    editable install points at another checkout (a git worktree sharing the venv)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def coffer_config(
    tmp: Path, port: int, sink_port: int, dns_port: int, c: int, workers: int | None,
    overrides: Sequence[str] = (),
) -> tuple[Path, int]:
    """A configuration from `coffer init`, pointed at the sink: what a new user runs."""
    data = tmp / "coffer"
    init = subprocess.run(
        [sys.executable, "-m", "gateway", "init", str(data), "--domain", DOMAIN],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
        env=coffer_env(),
    )
    if init.returncode != 0:
        raise BenchError(f"coffer init failed: {init.stderr.strip()[-300:]}")
    cfg_file = data / "coffer.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) or {}
    cfg["listeners"] = [
        {"name": "inbound", "role": "inbound", "address": f"127.0.0.1:{port}", "tls": "none"}
    ]
    # Like the Postfix peer's mynetworks = 127.0.0.0/8: the load comes from a trusted relay.
    cfg.setdefault("relay", {})["trusted_networks"] = ["127.0.0.0/8"]
    cfg.setdefault("limits", {})["max_connections_per_ip"] = max(c + 10, 20)
    queue = cfg.setdefault("queue", {})
    queue["fsync"] = True
    if workers is not None:
        queue["workers"] = workers
    cfg.setdefault("delivery", {})["routes"] = {"*": f"smtp://127.0.0.1:{sink_port}?tls=off"}
    # Every DNS lookup (SPF, DKIM, DMARC, PTR) goes to the loopback stub, never off the machine.
    cfg["dns"] = {**(cfg.get("dns") or {}), "nameservers": [f"127.0.0.1:{dns_port}"]}
    cfg["metrics"] = {"address": None}
    cfg.setdefault("log", {})["file"] = "coffer.log"
    _rebind_loopback({k: v for k, v in cfg.items() if k != "listeners"})  # SMTP is set above
    for item in overrides:  # --set spam.enabled=false: measure what one stage costs
        key, _, value = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg_file, int(queue.get("workers", 1))


def _rebind_loopback(node: Any) -> None:
    """Every other server Coffer starts (IMAP, ...) on 127.0.0.1 and a free port, so a run never
    collides with a gateway already running here, nor listens beyond loopback."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "address" and isinstance(value, str) and re.search(r":\d+$", value):
                node[key] = f"127.0.0.1:{free_port()}"
            else:
                _rebind_loopback(value)
    elif isinstance(node, list):
        for item in node:
            _rebind_loopback(item)


async def bench_coffer(
    messages: list[bytes], c: int, tmp: Path, workers: int | None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    n = len(messages)
    async with smtp_sink() as sink, dns_stub() as dns_port:
        port = free_port()
        cfg_file, n_workers = coffer_config(tmp, port, sink.port, dns_port, c, workers,
                                            overrides)
        errlog = (tmp / "coffer.stderr").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(cfg_file),
            stdout=errlog, stderr=errlog, stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True, cwd=str(cfg_file.parent), env=coffer_env(),
        )
        try:
            try:
                await wait_listening(port, 60, proc)
            except BenchError as exc:
                raise BenchError(f"coffer serve: {exc}; see {tmp / 'coffer.stderr'}") from None
            # Every worker process must be listening before the load starts: connections
            # made while only the first one is bound all land on it (SO_REUSEPORT spreads
            # connections only over the sockets bound at the time), and the generator's
            # connections are long-lived, so one worker would carry the whole run.
            await wait_started(cfg_file.parent / "coffer.log", n_workers, 60, proc)
            # CPU per message counts the run only, not start-up (imports, opening the
            # archive, loading the public suffix list): the same for Postfix below.
            cpu_before = tree_cpu_s(proc.pid)
            res = await send_load(port, messages, c)
            t_end = await sink.wait_for(res.accepted, 600)
            cpu = tree_cpu_s(proc.pid) - cpu_before
        finally:
            await stop_process(proc, "coffer serve", 30)
            errlog.close()
            profile_dir = os.environ.get("COFFER_PROFILE")  # gateway/profiling.py
            if profile_dir:
                for name in ("coffer.stderr", "coffer/coffer.log"):
                    if (tmp / name).exists():
                        shutil.copy(tmp / name, Path(profile_dir) / Path(name).name)
    out = _load_figures("coffer", res, n)
    out["coffer_workers"] = n_workers
    e2e = res.accepted / (t_end - res.started)
    out["coffer_msgs_per_s"] = round(e2e, 1)
    out["p50_ms"] = res.percentile_ms(0.5)
    out["p99_ms"] = res.percentile_ms(0.99)
    out["coffer_server_cpu_s"] = round(cpu, 2)
    out["coffer_cpu_ms_per_msg"] = round(cpu * 1000 / max(1, res.accepted), 2)
    return out


def peers_dir() -> Path | None:
    for cand in (os.environ.get("COFFER_PEERS"), REPO.parent / "shared" / "peers",
                 Path("/work/shared/peers")):
        if cand and (Path(cand) / "postfix-relay").exists():
            return Path(cand)
    return None


async def bench_postfix(messages: list[bytes], c: int, tmp: Path) -> dict[str, Any]:
    peers = peers_dir()
    if peers is None:
        raise BenchError("../shared/peers/postfix-relay not found (set COFFER_PEERS)")
    if shutil.which("postfix") is None and not os.path.exists("/usr/sbin/postfix"):
        raise BenchError("postfix is not installed (apt-get install postfix)")
    n = len(messages)
    script = str(peers / "postfix-relay")
    pdir = tmp / "postfix"
    async with smtp_sink() as sink:
        port = free_port()
        start = await asyncio.create_subprocess_exec(
            script, "start", str(pdir), str(port), str(sink.port), DOMAIN,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            so, _ = await asyncio.wait_for(start.communicate(), 60)
            if start.returncode != 0:
                raise BenchError(f"postfix-relay start: {so.decode(errors='replace')[-300:]}")
            await wait_listening(port, 10, None)
            master = pdir / "queue" / "pid" / "master.pid"
            master_pid = int(master.read_text().split()[0]) if master.exists() else None
            cpu_before = tree_cpu_s(master_pid) if master_pid else 0.0
            res = await send_load(port, messages, c)
            t_end = await sink.wait_for(res.accepted, 600)
            cpu = tree_cpu_s(master_pid) - cpu_before if master_pid else None
        finally:
            stop = await asyncio.create_subprocess_exec(
                script, "stop", str(pdir), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
            )
            await asyncio.wait_for(stop.wait(), 60)
    out = _load_figures("postfix", res, n)
    out["postfix_msgs_per_s"] = round(res.accepted / (t_end - res.started), 1)
    out["postfix_p50_ms"] = res.percentile_ms(0.5)
    out["postfix_p99_ms"] = res.percentile_ms(0.99)
    if cpu is not None:
        out["postfix_server_cpu_s"] = round(cpu, 2)
        out["postfix_cpu_ms_per_msg"] = round(cpu * 1000 / max(1, res.accepted), 2)
    return out


# --------------------------------------------------------------------------- main


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """The commit measured (with -dirty for uncommitted changes), if this is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


TARGETS = ("sink", "smtp-sink", "coffer", "postfix")


async def _bench_one(
    target: str, messages: list[bytes], args: argparse.Namespace, tmp: Path, mean_size: int
) -> dict[str, Any]:
    if target == "sink":
        return await bench_aiosmtpd(messages, args.concurrency)
    if target == "smtp-sink":
        return await bench_smtp_sink(messages, args.concurrency, mean_size)
    if target == "coffer":
        return await bench_coffer(messages, args.concurrency, tmp, args.workers, args.set)
    return await bench_postfix(messages, args.concurrency, tmp)


def _combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every number over the rounds (the last value of anything else)."""
    if not rounds:
        return {}
    out: dict[str, Any] = {}
    for key in rounds[-1]:
        values = [r.get(key) for r in rounds]
        numbers = [float(v) for v in values if isinstance(v, int | float)]
        if len(numbers) == len(values):
            med = statistics.median(numbers)
            out[key] = int(med) if all(isinstance(v, int) for v in values) else round(med, 2)
        else:
            out[key] = values[-1]
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = message_sizes(args.messages, args.seed)
    messages = make_messages(sizes, args.seed)
    mix = size_summary([len(m) for m in messages])
    result: dict[str, Any] = {
        "messages": args.messages,
        "concurrency": args.concurrency,
        "size_mix": mix,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": git_commit(),
    }
    # SIGTERM stops the run like Ctrl-C: the finally blocks stop every server we started.
    main_task = asyncio.current_task()
    if main_task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    errors: dict[str, str] = {}
    targets = [t for t in TARGETS if t in args.targets]
    per_target: dict[str, list[dict[str, Any]]] = {t: [] for t in targets}
    with tempfile.TemporaryDirectory(prefix="coffer-bench-") as tmpname:
        # Postfix's daemons run as the postfix user and must reach their queue under tmp.
        Path(tmpname).chmod(0o755)
        for rnd in range(args.rounds):
            tmp = Path(tmpname) / f"round{rnd}"
            tmp.mkdir(mode=0o755)
            for target in targets:
                if target in errors:
                    continue
                log(f"{target}: {args.messages} messages over {args.concurrency} connections"
                    + (f" (round {rnd + 1} of {args.rounds})" if args.rounds > 1 else ""))
                try:
                    figures = await _bench_one(target, messages, args, tmp, mix["mean"])
                except BenchError as exc:
                    log(f"{target}: FAILED: {exc}")
                    errors[target] = str(exc)
                    if args.keep_on_error and target == "coffer":
                        kept = Path(tempfile.mkdtemp(prefix="coffer-bench-kept-"))
                        shutil.copytree(tmp, kept, dirs_exist_ok=True)
                        log(f"kept the work directory in {kept}")
                    continue
                per_target[target].append(figures)
                log(f"{target}: " + ", ".join(f"{k}={v}" for k, v in figures.items()
                                               if k.endswith("per_s") or k.endswith("_ms")))
    result["rounds"] = args.rounds
    result["coffer_overrides"] = list(args.set)
    for rounds in per_target.values():
        result.update(_combine(rounds))
        if len(rounds) > 1:
            result.setdefault("per_round", {}).update(
                {k: [r[k] for r in rounds] for k in rounds[0] if k.endswith("msgs_per_s")}
            )
    sink = result.get("sink_msgs_per_s")
    coffer = result.get("coffer_msgs_per_s")
    postfix = result.get("postfix_msgs_per_s")
    result["ratio"] = round(coffer / sink, 3) if coffer and sink else None
    result["vs_postfix"] = round(coffer / postfix, 3) if coffer and postfix else None
    for key in ("sink_msgs_per_s", "coffer_msgs_per_s", "p50_ms", "p99_ms",
                "smtp_sink_msgs_per_s", "postfix_msgs_per_s"):
        result.setdefault(key, None)
    if errors:
        result["errors"] = errors
    return result


def _table(result: dict[str, Any]) -> Iterator[str]:
    yield f"{result['messages']} messages, {result['concurrency']} connections, " \
          f"{result['cpu_count']} x {result['cpu_model']}"
    rows = [
        ("aiosmtpd sink (Python ceiling)", "sink_msgs_per_s"),
        ("Coffer, end to end", "coffer_msgs_per_s"),
        ("Coffer, accepted (250)", "coffer_accept_msgs_per_s"),
        ("smtp-source -> smtp-sink", "smtp_sink_msgs_per_s"),
        ("this generator -> smtp-sink", "generator_msgs_per_s"),
        ("Postfix relay, end to end", "postfix_msgs_per_s"),
        ("Postfix relay, accepted (250)", "postfix_accept_msgs_per_s"),
    ]
    for label, key in rows:
        yield f"  {label:<34} {result.get(key)!s:>10} msg/s"
    yield f"  Coffer DATA->250 p50/p99          {result.get('p50_ms')} / {result.get('p99_ms')} ms"
    yield f"  ratio (Coffer / aiosmtpd sink)    {result.get('ratio')}"
    yield f"  vs_postfix (Coffer / Postfix)     {result.get('vs_postfix')}"
    for target, err in result.get("errors", {}).items():
        yield f"  {target}: FAILED: {err}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Relay benchmark: Coffer vs aiosmtpd sink, smtp-sink and Postfix "
        "(one run, loopback only)."
    )
    parser.add_argument("--messages", "-n", type=int, default=2000, help="messages (2000)")
    parser.add_argument("--concurrency", "-c", type=int, default=20, help="connections (20)")
    parser.add_argument("--seed", type=int, default=1, help="size-mix seed (1)")
    parser.add_argument("--workers", type=int, default=None,
                        help="Coffer queue.workers (default: what coffer init writes)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated subset of {','.join(TARGETS)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every target R times and report medians (1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                        help="override a key of Coffer's configuration, e.g. "
                        "--set spam.enabled=false --set check.checks=[] (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON line on stdout")
    parser.add_argument("--keep-on-error", action="store_true",
                        help="keep Coffer's work directory (config, log) when it fails")
    args = parser.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or min(args.messages, args.concurrency, args.rounds) < 1:
        parser.error(f"bad --targets {sorted(unknown)}" if unknown else "N, C, R must be >= 1")
    try:
        result = asyncio.run(run(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; every server started was stopped")
        return 130
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        for line in _table(result):
            print(line)
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
