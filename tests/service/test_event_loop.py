"""`coffer serve` runs on the loop the ``event_loop`` key (or COFFER_EVENT_LOOP) names."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import sys
from pathlib import Path

import pytest
from svcproc import Gateway, Sink, free_port, wait_for, write_config

from gateway.service import _loop_factory

uvloop = pytest.importorskip("uvloop")


def _runs_uvloop(pid: int) -> bool:
    """Whether the process has uvloop's extension module mapped: only its loop loads it."""
    return "uvloop/loop." in Path(f"/proc/{pid}/maps").read_text()


def _worker_pids(gw: Gateway, workers: int) -> list[int]:
    if workers == 1:
        assert gw.proc is not None
        return [gw.proc.pid]
    gw.wait_event("worker_started", workers)
    return [int(e["pid"]) for e in gw.events("worker_started")[:workers]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
@pytest.mark.parametrize(
    ("key", "env", "workers", "expect_uvloop"),
    [
        (None, "", 1, True),  # the default
        ("uvloop", "", 2, True),
        ("asyncio", "", 1, False),
        ("asyncio", "", 2, False),
        ("asyncio", "uvloop", 1, True),  # the environment overrides the key
        ("uvloop", "asyncio", 1, False),
    ],
)
def test_served_processes_run_the_configured_loop_and_relay(
    tmp_path: Path, procs: list[Gateway | Sink], key: str | None, env: str, workers: int,
    expect_uvloop: bool,
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    port = free_port()
    cfg = write_config(
        tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
        routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"}, trusted=["127.0.0.1/32"],
        workers=workers, extra=f"event_loop: {key}\n" if key else "",
    )
    gw = Gateway(cfg, port, tmp_path / "coffer.log", env={"COFFER_EVENT_LOOP": env})
    procs.append(gw.start())

    pids = _worker_pids(gw, workers)
    assert [_runs_uvloop(pid) for pid in pids] == [expect_uvloop] * workers

    # Relaying works on either loop: the message reaches the next hop.
    with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as s:
        s.sendmail("a@example.org", ["b@example.net"],
                   b"Subject: loop\r\n\r\nhello over " + env.encode() + b"\r\n")
    wait_for(lambda: len(sink.records()) == 1, what="the message at the sink")


def test_without_uvloop_the_standard_loop_runs_and_one_line_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("COFFER_EVENT_LOOP", raising=False)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    with caplog.at_level(logging.WARNING):
        factory = _loop_factory("uvloop")
    assert factory is asyncio.new_event_loop
    fallbacks = [r for r in caplog.records if r.getMessage() == "event_loop_fallback"]
    assert len(fallbacks) == 1


def test_the_key_selects_the_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COFFER_EVENT_LOOP", raising=False)
    assert _loop_factory("uvloop") is uvloop.new_event_loop
    assert _loop_factory("asyncio") is asyncio.new_event_loop
    monkeypatch.setenv("COFFER_EVENT_LOOP", "asyncio")
    assert _loop_factory("uvloop") is asyncio.new_event_loop
