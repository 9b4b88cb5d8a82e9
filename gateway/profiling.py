"""Opt-in profiling of a serving process, for bench/relay.py runs only.

``COFFER_PROFILE=DIR coffer serve ...`` makes each gateway process sample the
Python stacks of all its threads every few milliseconds and, when it stops,
write ``DIR/profile-<pid>.txt``: the CPU time of each thread group (from
``/proc/self/task``: user and system time, so fsync and C code count too) and
the stacks weighted by the CPU their thread used between samples.  py-spy cannot attach on
every machine (ptrace); this needs nothing.  Off unless the variable is set.
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType

ENV = "COFFER_PROFILE"
ENV_CPROFILE = "COFFER_PROFILE_CPROFILE"  # also cProfile the event-loop thread
INTERVAL = 0.004  # seconds between samples
DEPTH = 14  # frames kept per stack (innermost)

def _describe(frame: FrameType | None) -> list[str]:
    out: list[str] = []
    while frame is not None and len(out) < DEPTH:
        code = frame.f_code
        out.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
        frame = frame.f_back
    return out


class Sampler:
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.stacks: Counter[str] = Counter()
        self.leaves: Counter[str] = Counter()
        self.funcs: Counter[str] = Counter()  # inclusive: every frame on a busy stack
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="profiler", daemon=True)
        self.started = time.monotonic()
        self._cprofile: cProfile.Profile | None = None

    def start(self) -> None:
        self._thread.start()
        if os.environ.get(ENV_CPROFILE):
            # The event-loop thread's exact CPU per function (thread_time: waiting in a
            # syscall costs nothing), at the price of cProfile's overhead.
            self._cprofile = cProfile.Profile(time.thread_time)
            self._cprofile.enable()

    def _run(self) -> None:
        me = threading.get_ident()
        names: dict[int, str] = {}
        clocks: dict[int, int] = {}
        last: dict[int, float] = {}
        while not self._stop.wait(INTERVAL):
            frames = sys._current_frames()
            for t in threading.enumerate():
                if t.ident is not None and t.ident not in names:
                    names[t.ident] = re.sub(r"[_-]?\d+(_\d+)?$", "", t.name)
                    with contextlib.suppress(OSError):
                        clocks[t.ident] = time.pthread_getcpuclockid(t.ident)
            self.samples += 1
            for ident, frame in frames.items():
                if ident == me or ident not in clocks:
                    continue
                # Weight each stack by the CPU its thread used since the last sample
                # (microseconds): where the CPU goes, not where threads wait.
                try:
                    now = time.clock_gettime(clocks[ident])
                except OSError:
                    continue
                used = int((now - last.get(ident, now)) * 1e6)
                last[ident] = now
                if used <= 0:
                    continue
                stack = _describe(frame)
                group = names.get(ident, "?")
                self.leaves[f"{group} {stack[0] if stack else '?'}"] += used
                for f in set(stack):
                    self.funcs[f"{group} {f}"] += used
                self.stacks[f"{group} " + ";".join(reversed(stack))] += used

    def stop(self) -> None:
        if self._cprofile is not None:
            self._cprofile.disable()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._cprofile.dump_stats(self.out_dir / f"main-{os.getpid()}.pstats")
        self._stop.set()
        self._thread.join(1.0)
        lines = [f"pid {os.getpid()} seconds {time.monotonic() - self.started:.1f} "
                 f"samples {self.samples} interval {INTERVAL}", "", "# CPU by thread group"]
        lines += [f"{cpu:8.2f} s  {name} (system {sys_cpu:.2f} s)"
                  for name, cpu, sys_cpu in _thread_cpu()]
        for title, counter, n in (("leaf frames, CPU us", self.leaves, 60),
                                  ("inclusive frames, CPU us", self.funcs, 120),
                                  ("stacks, CPU us", self.stacks, 80)):
            lines += ["", f"# {title}"]
            lines += [f"{c:7d}  {k}" for k, c in counter.most_common(n)]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"profile-{os.getpid()}.txt").write_text("\n".join(lines) + "\n")


def _thread_cpu() -> list[tuple[str, float, float]]:
    """(thread group, user+system CPU, system CPU) of every thread of this process."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    # After fork() Python 3.11 keeps the parent's native id for the main thread:
    # this runs on the event-loop (main) thread, so ask the kernel.
    names[threading.get_native_id()] = threading.current_thread().name
    by_name: dict[str, float] = {}
    system: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = names.get(int(task.name)) or (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        group = re.sub(r"[_-]?\d+(_\d+)?$", "", name)
        by_name[group] = by_name.get(group, 0.0) + (int(fields[11]) + int(fields[12])) / tick
        system[group] = system.get(group, 0.0) + int(fields[12]) / tick
    return sorted(((name, cpu, system[name]) for name, cpu in by_name.items()),
                  key=lambda row: -row[1])


def start_if_requested() -> Sampler | None:
    out = os.environ.get(ENV)
    if not out:
        return None
    sampler = Sampler(Path(out))
    sampler.start()
    return sampler
