"""`coffer queue` lists, shows, holds, releases, retries and deletes spooled messages."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from claimkit import claimed_by_another_process

from gateway.cli import main
from gateway.cli.queue import poke_service
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


def _store(spool: Spool, *rcpts: str, subject: str = "hello") -> str:
    env = Envelope(mail_from="alice@src.test", rcpt_to=list(rcpts), client_ip="127.0.0.1",
                   helo="client.test", received_at=time.time() - 125)
    data = (f"Message-ID: <{subject}@src.test>\r\nSubject: {subject}\r\n"
            "From: alice@src.test\r\n\r\nbody\r\n").encode()
    return spool.store(env, data)


def _json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _list(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    capsys.readouterr()
    assert main(["queue", "list", "--json", "--config", str(cfg_path)]) == 0
    return {row["qid"]: row for row in _json_lines(capsys.readouterr().out)}


def test_list_shows_status_recipients_and_last_error(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    fresh = _store(spool, "bob@dst.test")
    deferred = _store(spool, "a@dst.test", "b@dst.test", "c@dst.test")
    spool.append_events(deferred, [
        {"ev": "rcpt", "rcpt": "a@dst.test", "status": "delivered", "reply": "250 ok"},
        {"ev": "rcpt", "rcpt": "b@dst.test", "status": "deferred", "reply": "451 4.3.0 later"},
        {"ev": "attempt", "attempts": 1, "next_at": time.time() + 600,
         "error": "451 4.3.0 later"},
    ])
    held = _store(spool, "eve@dst.test")
    spool.append_event(held, {"ev": "held", "stage": "archive", "error": "OSError: disk"})

    rows = _list(cfg_path, capsys)
    assert rows[fresh]["status"] == "active"
    assert (rows[fresh]["pending"], rows[fresh]["total"]) == (1, 1)
    assert rows[fresh]["sender"] == "alice@src.test"
    assert rows[fresh]["age_s"] >= 120
    assert rows[deferred]["status"] == "deferred"
    assert (rows[deferred]["pending"], rows[deferred]["total"]) == (2, 3)
    assert rows[deferred]["last_error"] == "451 4.3.0 later"
    assert rows[deferred]["next_attempt_at"] > time.time()
    assert rows[held]["status"] == "held"
    assert (rows[held]["held_stage"], rows[held]["held_error"]) == ("archive", "OSError: disk")

    assert main(["queue", "list", "--config", str(cfg_path)]) == 0
    table = capsys.readouterr().out
    assert "held at stage archive: OSError: disk" in table
    assert f"{deferred}" in table and "2/3" in table

    assert main(["queue", "list", "--json", "--status", "held", "--config", str(cfg_path)]) == 0
    assert [r["qid"] for r in _json_lines(capsys.readouterr().out)] == [held]


def test_show_prints_envelope_per_recipient_state_and_headers(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    qid = _store(spool, "a@dst.test", "b@dst.test", subject="quarterly")
    spool.append_event(qid, {"ev": "rcpt", "rcpt": "a@dst.test", "status": "delivered",
                             "reply": "250 2.0.0 ok"})
    capsys.readouterr()
    assert main(["queue", "show", qid, "--json", "--config", str(cfg_path)]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["envelope"]["mail_from"] == "alice@src.test"
    assert obj["envelope"]["helo"] == "client.test"
    assert obj["headers"]["Message-ID"] == "<quarterly@src.test>"
    assert [(r["address"], r["status"]) for r in obj["state"]["recipients"]] == [
        ("a@dst.test", "delivered"), ("b@dst.test", "pending")
    ]
    assert obj["events"][0]["rcpt"] == "a@dst.test"

    assert main(["queue", "show", qid, "--config", str(cfg_path)]) == 0
    text = capsys.readouterr().out
    assert "<a@dst.test> delivered  250 2.0.0 ok" in text
    assert "Subject:     quarterly" in text


def test_show_prints_the_dsn_parameters_of_the_sender_and_each_recipient(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    env = Envelope(mail_from="alice@src.test", rcpt_to=["a@dst.test", "b@dst.test"],
                   received_at=time.time(), mail_options=["RET=HDRS", "ENVID=Q+2B1"],
                   rcpt_options=[["NOTIFY=NEVER"], []])
    qid = spool.store(env, b"Subject: s\r\n\r\nbody\r\n")
    capsys.readouterr()
    assert main(["queue", "show", qid, "--config", str(cfg_path)]) == 0
    text = capsys.readouterr().out
    assert "from         <alice@src.test>  RET=HDRS ENVID=Q+2B1\n" in text
    assert "to           <a@dst.test> pending  [NOTIFY=NEVER]\n" in text
    assert "to           <b@dst.test> pending\n" in text


def test_show_of_an_unknown_queue_id_exits_1(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["queue", "show", "0000DEADBEEF", "--config", str(cfg_path)]) == 1
    assert "no such queued message" in capsys.readouterr().err


def test_hold_then_release_round_trip(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    qid = _store(spool, "bob@dst.test")
    assert main(["queue", "hold", qid, "--reason", "legal asked", "--json",
                 "--config", str(cfg_path)]) == 0
    assert _json_lines(capsys.readouterr().out) == [{"qid": qid, "action": "hold"}]
    row = _list(cfg_path, capsys)[qid]
    assert row["status"] == "held"
    assert row["held_stage"] == "operator"
    assert "legal asked" in row["held_error"]

    assert main(["queue", "release", qid, "--config", str(cfg_path)]) == 0
    assert _list(cfg_path, capsys)[qid]["status"] == "active"


def test_retry_all_makes_deferred_messages_due_and_leaves_held_ones_held(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    deferred = _store(spool, "a@dst.test")
    spool.append_event(deferred, {"ev": "attempt", "attempts": 2,
                                  "next_at": time.time() + 3600, "error": "421 busy"})
    held = _store(spool, "b@dst.test")
    spool.append_event(held, {"ev": "held", "stage": "operator", "error": "x"})
    capsys.readouterr()
    assert main(["queue", "retry", "--all", "--json", "--config", str(cfg_path)]) == 0
    assert _json_lines(capsys.readouterr().out) == [{"qid": deferred, "action": "retry"}]
    rows = _list(cfg_path, capsys)
    assert rows[deferred]["next_attempt_at"] is None  # due now
    assert rows[held]["status"] == "held"

    # An explicit retry of a held message releases it.
    assert main(["queue", "retry", held, "--config", str(cfg_path)]) == 0
    assert _list(cfg_path, capsys)[held]["status"] == "active"


def test_retry_held_reruns_messages_held_by_a_stage_failure_only(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    failed = _store(spool, "a@dst.test")
    spool.append_event(failed, {"ev": "held", "stage": "archive", "reason": "error",
                                "error": "OSError: disk unplugged"})
    quarantined = _store(spool, "b@dst.test")
    spool.append_event(quarantined, {"ev": "held", "stage": "decide", "reason": "quarantine",
                                     "error": "spam"})
    capsys.readouterr()
    assert main(["queue", "hold", _store(spool, "c@dst.test"), "--config", str(cfg_path)]) == 0
    capsys.readouterr()
    assert main(["queue", "retry", "--held", "--json", "--config", str(cfg_path)]) == 0
    assert _json_lines(capsys.readouterr().out) == [{"qid": failed, "action": "retry"}]
    rows = _list(cfg_path, capsys)
    assert rows[failed]["status"] == "active"
    assert rows[quarantined]["status"] == "held"
    assert [r["status"] for q, r in rows.items() if q not in (failed, quarantined)] == ["held"]


def test_retry_needs_queue_ids_or_all(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["queue", "retry", "--config", str(cfg_path)]) == 2
    assert "--all" in capsys.readouterr().err


def test_delete_removes_the_message_and_logs_who_and_why(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    qid = _store(spool, "a@dst.test", "b@dst.test")
    keep = _store(spool, "c@dst.test")
    capsys.readouterr()
    assert main(["queue", "delete", qid, "--reason", "spam run", "--json",
                 "--config", str(cfg_path)]) == 0
    out, err = capsys.readouterr()
    assert _json_lines(out) == [
        {"qid": qid, "action": "delete", "undelivered": ["a@dst.test", "b@dst.test"]}
    ]
    logged = json.loads(err.strip().splitlines()[-1])
    assert logged["event"] == "queue_delete"
    assert (logged["qid"], logged["reason"]) == (qid, "spam run")
    assert logged["by"]
    assert not spool.msg_path(qid).exists()
    assert not spool.state_path(qid).exists()
    assert spool.queue_ids() == [keep]


def test_delete_waits_for_the_claim_of_an_in_flight_delivery(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    qid = _store(spool, "a@dst.test")
    # A delivering worker holds the flock on the .msg file (another open file description
    # conflicts even inside one process).
    fd = os.open(spool.msg_path(qid), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert main(["queue", "delete", qid, "--wait", "0.3", "--config", str(cfg_path)]) == 1
        assert "still holds it" in capsys.readouterr().err
        assert spool.exists(qid)
    finally:
        os.close(fd)
    assert main(["queue", "delete", qid, "--wait", "0.3", "--config", str(cfg_path)]) == 0
    assert not spool.exists(qid)


def _held_message(spool: Spool) -> str:
    qid = _store(spool, "bob@dst.test")
    spool.append_event(qid, {"ev": "held", "stage": "operator", "error": "x",
                             "reason": "operator"})
    return qid


@pytest.mark.parametrize("command", ["release", "retry"])
def test_a_command_on_a_message_being_delivered_says_so_exits_1_and_changes_nothing(
    cfg_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    spool = _spool(cfg_path)
    qid = _held_message(spool) if command == "release" else _store(spool, "bob@dst.test")
    before = spool.events(qid)
    capsys.readouterr()
    with claimed_by_another_process(spool, qid):
        started = time.monotonic()
        assert main(["queue", command, qid, "--wait", "0.3", "--config", str(cfg_path)]) == 1
        assert time.monotonic() - started >= 0.3
    out, err = capsys.readouterr()
    assert f"{qid}: a delivery attempt still holds it after 0.3s" in err
    assert "try again" in err and qid not in out
    assert spool.events(qid) == before
    # Once the attempt is over the same command goes through.
    assert main(["queue", command, qid, "--wait", "0.3", "--config", str(cfg_path)]) == 0
    assert len(spool.events(qid)) == len(before) + 1


def test_a_hold_of_a_message_being_delivered_is_written_and_says_it_may_come_too_late(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Written at once (a claim may be one a gateway keeps for a message not begun,
    whose worker then reads it), but not reported done while an attempt may deliver."""
    spool = _spool(cfg_path)
    qid = _store(spool, "bob@dst.test")
    capsys.readouterr()
    with claimed_by_another_process(spool, qid):
        assert main(["queue", "hold", qid, "--wait", "0.3", "--config", str(cfg_path)]) == 1
    out, err = capsys.readouterr()
    assert f"{qid}: a delivery attempt still holds it after 0.3s" in err
    assert "takes effect only if that attempt leaves the message queued" in err
    assert qid not in out
    assert [e["ev"] for e in spool.events(qid)] == ["held"]


def test_a_hold_waits_for_the_attempt_in_progress_then_holds(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    qid = _store(spool, "bob@dst.test")
    with claimed_by_another_process(spool, qid) as worker:
        threading.Timer(0.3, worker.kill).start()  # the attempt ends (kill -9 releases too)
        started = time.monotonic()
        assert main(["queue", "hold", qid, "--wait", "10", "--config", str(cfg_path)]) == 0
        assert 0.3 <= time.monotonic() - started < 10
    assert f"{qid}: held" in capsys.readouterr().out
    assert _list(cfg_path, capsys)[qid]["status"] == "held"


def test_a_selection_holds_the_messages_it_can_and_reports_the_busy_one(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    busy, free = _store(spool, "a@dst.test"), _store(spool, "b@dst.test")
    capsys.readouterr()
    with claimed_by_another_process(spool, busy):
        assert main(["queue", "hold", "--to-domain", "dst.test", "--yes", "--wait", "0.2",
                     "--json", "--config", str(cfg_path)]) == 1
    out, err = capsys.readouterr()
    assert _json_lines(out) == [{"qid": free, "action": "hold"}]
    assert f"{busy}: a delivery attempt still holds it" in err
    assert json.loads(err.strip().splitlines()[-1])["failed"] == [busy]
    rows = _list(cfg_path, capsys)
    # The busy one's hold is written (see above), though not reported done.
    assert (rows[busy]["status"], rows[free]["status"]) == ("held", "held")


def test_a_command_on_a_message_removed_while_it_waited_says_so_and_exits_1(
    cfg_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = _spool(cfg_path)
    qid = _store(spool, "bob@dst.test")

    def deliver_and_remove() -> None:
        spool.remove(qid)  # the claim holder finished the message
        worker.kill()

    with claimed_by_another_process(spool, qid) as worker:
        threading.Timer(0.3, deliver_and_remove).start()
        assert main(["queue", "hold", qid, "--wait", "10", "--config", str(cfg_path)]) == 1
    assert f"{qid}: delivered or removed meanwhile; not held" in capsys.readouterr().err
    assert not spool.state_path(qid).exists()  # no orphaned hold


_RECORDER = textwrap.dedent("""
    import fcntl, os, signal, sys, time
    pid_file, out, lock = sys.argv[1], sys.argv[2], sys.argv[3] == "lock"
    def on_usr1(signum, frame):
        with open(out, "a") as fh:
            fh.write("usr1\\n")
    signal.signal(signal.SIGUSR1, on_usr1)
    fd = os.open(pid_file, os.O_RDWR | os.O_CREAT, 0o644)
    if lock:
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\\n".encode())
    print("ready", flush=True)
    time.sleep(30)
""")


@pytest.mark.parametrize("locked", [True, False])
def test_poke_signals_only_a_gateway_that_holds_its_pid_file(
    cfg_path: Path, tmp_path: Path, locked: bool
) -> None:
    cfg = load(cfg_path)
    out = tmp_path / "signals.txt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _RECORDER, str(cfg.data_dir / "coffer.pid"), str(out),
         "lock" if locked else "stale"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert poke_service(cfg) is locked
        deadline = time.monotonic() + 5
        while locked and not out.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert out.exists() is locked
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
