"""`coffer quarantine release|delete` act under the message's claim, like `coffer queue`:
they wait ``--wait`` seconds for a delivery attempt in progress, and say so and exit 1
when it still holds the message."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from claimkit import claimed_by_another_process

from gateway.cli import build_parser, main
from gateway.config import load
from gateway.envelope import Envelope
from gateway.queue.spool import Spool


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    p = tmp_path / "coffer.yaml"
    p.write_text("listeners:\n  - name: in\n    tls: none\nqueue:\n  fsync: false\n"
                 "metrics:\n  address: null\n")
    return p


def _spool(cfg_path: Path) -> Spool:
    return Spool(load(cfg_path).spool_dir, fsync=False)


def _quarantined(spool: Spool) -> str:
    env = Envelope("spammer@example.net", ["bob@example.org"], client_ip="192.0.2.9",
                   received_at=time.time() - 60)
    qid = spool.store(env, b"Subject: casino\r\nFrom: spammer@example.net\r\n\r\nbonus\r\n")
    spool.append_event(qid, {"ev": "held", "stage": "decide", "error": "quarantine-spam",
                             "reason": "quarantine"})
    return qid


def _run(capsys: pytest.CaptureFixture[str], cfg_path: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["quarantine", *argv, "--config", str(cfg_path)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_wait_defaults_are_those_of_the_queue_commands() -> None:
    parse = build_parser(None).parse_args  # every command
    assert parse(["quarantine", "release", "Q"]).wait == 10.0
    assert parse(["quarantine", "delete", "Q"]).wait == 60.0
    assert parse(["queue", "release", "Q"]).wait == 10.0
    assert parse(["queue", "delete", "Q"]).wait == 60.0


@pytest.mark.parametrize("command", ["release", "delete"])
def test_a_quarantine_command_on_a_message_being_delivered_says_so_exits_1_and_changes_nothing(
    cfg_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    spool = _spool(cfg_path)
    qid = _quarantined(spool)
    before = spool.events(qid)
    with claimed_by_another_process(spool, qid):
        started = time.monotonic()
        rc, out, err = _run(capsys, cfg_path, command, qid, "--wait", "0.3")
        assert time.monotonic() - started >= 0.3
    assert rc == 1
    assert f"{qid}: a delivery attempt still holds it after 0.3s" in err
    assert "try again" in err and qid not in out
    assert spool.exists(qid) and spool.events(qid) == before
    # Once the attempt is over the same command goes through.
    rc, out, _ = _run(capsys, cfg_path, command, qid, "--wait", "0.3")
    assert rc == 0 and f"{qid}: {command}d" in out
    if command == "release":
        assert [e["ev"] for e in spool.events(qid)] == ["held", "released"]
        assert not spool.read_state(qid, []).held
    else:
        assert not spool.exists(qid) and not spool.state_path(qid).exists()


@pytest.mark.parametrize("command", ["release", "delete"])
def test_a_quarantine_command_waits_for_the_attempt_in_progress_then_acts(
    cfg_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    spool = _spool(cfg_path)
    qid = _quarantined(spool)
    with claimed_by_another_process(spool, qid) as worker:
        threading.Timer(0.3, worker.kill).start()  # the attempt ends (kill -9 releases too)
        started = time.monotonic()
        rc, out, err = _run(capsys, cfg_path, command, qid, "--wait", "10", "--json")
        assert 0.3 <= time.monotonic() - started < 10
    assert rc == 0, err
    assert f'"action": "{command}"' in out
    assert spool.exists(qid) == (command == "release")


def test_a_message_released_by_someone_else_while_waiting_is_not_released_twice(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whether it is still in quarantine is asked again under the claim."""
    spool = _spool(cfg_path)
    qid = _quarantined(spool)

    def released_meanwhile() -> None:
        spool.append_event(qid, {"ev": "released", "by": "another operator"})
        worker.kill()

    with claimed_by_another_process(spool, qid) as worker:
        threading.Timer(0.3, released_meanwhile).start()
        rc, out, err = _run(capsys, cfg_path, "release", qid, "--wait", "10")
    assert rc == 1 and qid not in out
    assert f"{qid}: no longer in quarantine" in err
    assert [e["ev"] for e in spool.events(qid)] == ["held", "released"]


def test_a_quarantined_message_removed_while_waiting_is_reported_gone(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    qid = _quarantined(spool)

    def removed_meanwhile() -> None:
        spool.remove(qid)  # the claim holder finished it (another operator's delete)
        worker.kill()

    with claimed_by_another_process(spool, qid) as worker:
        threading.Timer(0.3, removed_meanwhile).start()
        rc, _, err = _run(capsys, cfg_path, "delete", qid, "--wait", "10")
    assert rc == 1 and f"{qid}: delivered or removed meanwhile; not deleted" in err
