"""`coffer queue` during an incident: summary, selectors and bulk actions on a real spool.

The spool is filled by the real queue worker delivering to a loopback next hop that
defers some domains (tests/deliver/nexthop.py), with ages set through the envelope's
received_at and the worker's clock at the real time, so what ``list`` and ``summary``
see is what a running gateway leaves behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import load
from gateway.deliver.deliverer import Deliverer
from gateway.envelope import Envelope
from gateway.queue.spool import Spool
from gateway.queue.worker import QueueWorker

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS / "deliver"))
sys.path.insert(0, str(TESTS / "queue"))

from nexthop import NextHop  # noqa: E402
from queuekit import FakeClock  # noqa: E402

REPO = TESTS.parent
STORE_DOWN = "451 4.3.0 Mail store unavailable"
PARTNER_BUSY = "421 4.7.0 Try again later"
MSG = b"From: x@src.test\r\nSubject: s\r\nMessage-ID: <m@src.test>\r\n\r\nbody\r\n"


@dataclass
class Incident:
    cfg_path: Path
    spool: Spool
    worker: QueueWorker
    hop: NextHop
    q: dict[str, str]  # name -> queue id

    def cli(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main(["queue", *args, "--config", str(self.cfg_path)])
        out, err = capsys.readouterr()
        return rc, out, err

    def listed(self, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
        rc, out, _err = self.cli(capsys, "list", "--json", *args)
        assert rc == 0
        rows = [json.loads(line) for line in out.splitlines()]
        # age_s is measured at each listing (the wall clock moves between two of them).
        return {r["qid"]: {k: v for k, v in r.items() if k != "age_s"} for r in rows}

    def names(self, qids: Any) -> set[str]:
        by_qid = {v: k for k, v in self.q.items()}
        return {by_qid[q] for q in qids}


@pytest.fixture
async def incident(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> AsyncIterator[Incident]:
    """The mail store (store.test) is down, a partner (partner.test) is busy, one message
    was quarantined by the policy and one is held by an operator."""
    hop = NextHop()
    await hop.start()
    cfg_path = tmp_path / "coffer.yaml"
    cfg_path.write_text(
        "listeners:\n  - name: in\n    tls: none\nqueue:\n  fsync: false\n"
        f"delivery:\n  routes:\n    '*': smtp://127.0.0.1:{hop.port}?tls=off\n"
        "metrics:\n  address: null\n")
    cfg = load(cfg_path)
    spool = Spool(cfg.spool_dir, fsync=False)
    now = time.time()
    worker = QueueWorker(cfg, Spool(spool.root, fsync=False), [], Deliverer(cfg),
                         clock=FakeClock(now), rand=lambda: 0.5)
    for rcpt in ("a@store.test", "b@store.test", "c@store.test", "d@Store.Test"):
        hop.rules[rcpt.lower()] = STORE_DOWN
    hop.rules["p@partner.test"] = PARTNER_BUSY

    def store(sender: str, *rcpts: str, age_min: float, facts: dict[str, Any] | None = None
              ) -> str:
        env = Envelope(mail_from=sender, rcpt_to=list(rcpts), client_ip="127.0.0.1",
                       received_at=now - age_min * 60)
        return spool.store(env, MSG, facts)

    q = {
        "store_fresh": store("alice@src.test", "a@store.test", age_min=3),
        "store_old": store("bob@src.test", "b@store.test", age_min=50),
        # One recipient delivered: only the mail store's is pending.
        "mixed": store("alice@src.test", "ok@fine.test", "d@Store.Test", age_min=12),
        "partner": store("carol@src.test", "p@partner.test", age_min=12),
        "spam1": store("Spammer@Bulk.test", "c@store.test", age_min=1),
        "spam2": store("spammer@bulk.test", "p@partner.test", age_min=1),
        "quarantined": store("eve@bulk.test", "q@quiet.test", age_min=200, facts={
            "runner": {"action": "quarantine"},
            "trace": [{"stage": "decide", "action": "quarantine", "reason": "rule spam"}]}),
    }
    await worker.run_due()
    inc = Incident(cfg_path, spool, worker, hop, q)
    q["held"] = store("dave@src.test", "h@partner.test", age_min=30)
    assert inc.cli(capsys, "hold", q["held"], "--reason", "legal")[0] == 0
    assert hop.delivered_to("ok@fine.test") == 1
    try:
        yield inc
    finally:
        await worker.stop(0)
        await hop.stop()


def test_summary_shows_the_stuck_domains_by_age_and_state(
    incident: Incident, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _err = incident.cli(capsys, "summary")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["RECIPIENT", "DOMAIN", "total", "<5m"]
    # TOTAL then rows by size: store.test (4: a, b, d, spam1), partner.test (3), quiet.test.
    cells = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert [line.split()[0] for line in lines[1:]] == [
        "TOTAL", "store.test", "partner.test", "quiet.test"]
    #               total <5m 5-10 10-20 20-40 40-80 80-160 160+ active deferred held quar
    assert cells["TOTAL"] == ["8", "3", "0", "2", "1", "1", "0", "1", "0", "6", "1", "1"]
    assert cells["store.test"] == ["4", "2", "0", "1", "0", "1", "0", "0", "0", "4", "0", "0"]
    assert cells["partner.test"][:1] + cells["partner.test"][-4:] == ["3", "0", "2", "1", "0"]

    rc, out, _err = incident.cli(capsys, "summary", "--json", "--top", "1")
    obj = json.loads(out)
    assert [(r["key"], r["total"]) for r in obj["rows"]] == [("store.test", 4)]
    assert obj["rows"][0]["ages"]["40-80m"] == 1
    assert obj["total"]["states"] == {"active": 0, "deferred": 6, "held": 1, "quarantined": 1}
    assert obj["more_rows"] == 2


def test_summary_by_reason_and_by_sender_and_with_a_selector(
    incident: Incident, capsys: pytest.CaptureFixture[str]
) -> None:
    obj = json.loads(incident.cli(capsys, "summary", "--json", "--by", "reason")[1])
    assert {r["key"]: r["total"] for r in obj["rows"]} == {
        "4.3.0 Mail store unavailable": 4, "4.7.0 Try again later": 2,
        "held at operator": 1, "quarantined": 1}
    obj = json.loads(incident.cli(capsys, "summary", "--json", "--by", "sender")[1])
    assert {r["key"]: r["total"] for r in obj["rows"]} == {"src.test": 5, "bulk.test": 3}
    obj = json.loads(incident.cli(capsys, "summary", "--json", "--state", "deferred",
                                  "--to-domain", "partner.test")[1])
    assert obj["total"]["total"] == 2


def test_summary_counts_no_unreadable_spool_file_but_says_how_many(
    incident: Incident, capsys: pytest.CaptureFixture[str]
) -> None:
    (incident.spool.queue_dir / "00000000000000BAD000.msg").write_bytes(b"not a spool file\n")
    rc, out, _err = incident.cli(capsys, "summary")
    assert rc == 0
    assert out.splitlines()[1].split()[:2] == ["TOTAL", "8"]
    assert out.splitlines()[-1] == "1 unreadable spool file(s) not counted: see coffer queue list"
    obj = json.loads(incident.cli(capsys, "summary", "--json")[1])
    assert (obj["total"]["total"], obj["corrupt"]) == (8, 1)


@pytest.mark.parametrize(("selector", "expected"), [
    (["--to-domain", "STORE.test"], {"store_fresh", "store_old", "mixed", "spam1"}),
    (["--to-domain", "store.test", "--to-domain", "quiet.test"],
     {"store_fresh", "store_old", "mixed", "spam1", "quarantined"}),
    (["--to-domain", "fine.test"], set()),  # delivered there: nothing pending
    (["--from", "spammer@bulk.test"], {"spam1", "spam2"}),
    (["--from", "@BULK.test"], {"spam1", "spam2", "quarantined"}),
    (["--older-than", "40m"], {"store_old", "quarantined"}),
    (["--younger-than", "5m"], {"store_fresh", "spam1", "spam2"}),
    (["--older-than", "10m", "--younger-than", "1h"], {"store_old", "mixed", "partner", "held"}),
    (["--error", "4.7.0"], {"partner", "spam2"}),
    (["--state", "held"], {"held"}),
    (["--state", "quarantined"], {"quarantined"}),
    (["--to-domain", "partner.test", "--state", "deferred", "--younger-than", "5m"], {"spam2"}),
])
def test_list_selectors_are_combined_with_and(
    incident: Incident, capsys: pytest.CaptureFixture[str], selector: list[str],
    expected: set[str]
) -> None:
    assert incident.names(incident.listed(capsys, *selector)) == expected


def test_bulk_delete_refuses_without_yes_and_reports_the_count(
    incident: Incident, capsys: pytest.CaptureFixture[str]
) -> None:
    before = set(incident.spool.queue_ids())
    rc, _out, err = incident.cli(capsys, "delete", "--to-domain", "store.test")
    assert rc == 2
    assert "4 message(s) match (to-domain store.test): refusing to delete them without --yes" \
        in err
    assert set(incident.spool.queue_ids()) == before


def test_dry_run_lists_what_would_be_done_and_changes_nothing(
    incident: Incident, capsys: pytest.CaptureFixture[str]
) -> None:
    before = incident.listed(capsys)
    rc, out, _err = incident.cli(capsys, "delete", "--from", "@bulk.test", "--dry-run", "--json")
    assert rc == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert {r["action"] for r in rows} == {"delete"} and all(r["dry_run"] for r in rows)
    assert incident.names(r["qid"] for r in rows) == {"spam1", "spam2", "quarantined"}
    rc, out, _err = incident.cli(capsys, "hold", "--to-domain", "partner.test", "--dry-run")
    assert rc == 0
    assert f"{incident.q['partner']}: would hold" in out
    assert incident.listed(capsys) == before


def test_bulk_delete_logs_each_message_and_a_summary(
    incident: Incident, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _out, err = incident.cli(capsys, "delete", "--from", "spammer@bulk.test", "--yes",
                                "--reason", "spam run")
    assert rc == 0
    gone = {incident.q["spam1"], incident.q["spam2"]}
    assert not gone & set(incident.spool.queue_ids())
    assert len(incident.spool.queue_ids()) == 6
    logged = [json.loads(line) for line in err.splitlines()]
    assert {(e["event"], e["qid"], e["reason"]) for e in logged[:-1]} == {
        ("queue_delete", q, "spam run") for q in gone}
    assert logged[-1]["event"] == "queue_bulk"
    assert (logged[-1]["action"], logged[-1]["done"], logged[-1]["failed"]) == ("delete", 2, [])
    assert logged[-1]["selector"] == "from spammer@bulk.test"
    assert logged[-1]["reason"] == "spam run" and logged[-1]["by"]


def test_bulk_delete_reports_a_message_a_worker_holds_and_leaves_it(
    incident: Incident, capsys: pytest.CaptureFixture[str]
) -> None:
    busy = incident.q["store_old"]
    # A delivering worker holds the flock on the .msg file (another open file description
    # conflicts even inside one process).
    fd = os.open(incident.spool.msg_path(busy), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        rc, out, err = incident.cli(capsys, "delete", "--to-domain", "store.test", "--yes",
                                    "--wait", "0.2", "--json")
    finally:
        os.close(fd)
    assert rc == 1
    assert f"{busy}: a delivery attempt still holds it" in err
    deleted = {json.loads(line)["qid"] for line in out.splitlines()}
    assert incident.names(deleted) == {"store_fresh", "mixed", "spam1"}
    assert incident.spool.exists(busy)
    assert json.loads(err.splitlines()[-1])["failed"] == [busy]


async def test_retry_to_domain_makes_only_that_domains_deferred_messages_due(
    incident: Incident, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _err = incident.cli(capsys, "retry", "--to-domain", "partner.test", "--yes",
                                "--json")
    assert rc == 0
    # The held message for partner.test stays held: a selection retries deferred mail.
    assert incident.names(json.loads(line)["qid"] for line in out.splitlines()) == {
        "partner", "spam2"}
    rows = incident.listed(capsys, "--state", "deferred")
    due = {q for q, r in rows.items() if r["next_attempt_at"] is None}
    assert incident.names(due) == {"partner", "spam2"}
    assert incident.names(incident.listed(capsys, "--state", "held")) == {"held"}

    # The partner is back; the mail store is not.  The worker's clock has not moved, so
    # only what the retry made due is attempted.
    incident.hop.rules.pop("p@partner.test")
    delivered_before = len(incident.hop.received)
    await incident.worker.run_due()
    assert len(incident.hop.received) == delivered_before + 2
    assert incident.hop.delivered_to("p@partner.test") == 2
    assert incident.names(incident.spool.queue_ids()) == {
        "store_fresh", "store_old", "mixed", "spam1", "quarantined", "held"}


def test_retry_all_narrowed_by_a_selector_logs_what_was_selected(
    incident: Incident, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = incident.cli(capsys, "retry", "--all", "--older-than", "10m", "--yes")
    assert rc == 0
    assert out.count("scheduled for delivery now") == 3  # store_old, mixed, partner
    bulk = json.loads(err.splitlines()[-1])
    assert (bulk["event"], bulk["selector"], bulk["done"]) == (
        "queue_bulk", "--all, older than 600s", 3)


def test_hold_from_a_sender_then_release_leaves_the_quarantine_alone(
    incident: Incident, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = incident.cli(capsys, "hold", "--from", "@bulk.test", "--yes",
                                "--reason", "spam run")
    assert rc == 0
    # The quarantined one was held already: its record stays.
    assert out.count(": held") == 2
    assert [json.loads(line)["event"] for line in err.splitlines()] == [
        "queue_hold", "queue_hold", "queue_bulk"]
    rows = incident.listed(capsys, "--state", "held")
    assert incident.names(rows) == {"spam1", "spam2", "held"}
    assert "spam run" in rows[incident.q["spam1"]]["held_error"]
    assert incident.listed(capsys, "--state", "quarantined")[incident.q["quarantined"]][
        "held_stage"] == "decide"

    rc, out, _err = incident.cli(capsys, "release", "--from", "@bulk.test", "--yes")
    assert rc == 0
    assert out.count(": released") == 2
    assert incident.names(incident.listed(capsys, "--state", "held")) == {"held"}
    assert incident.names(incident.listed(capsys, "--state", "quarantined")) == {"quarantined"}
    # Naming the state releases a quarantine too.
    rc, out, _err = incident.cli(capsys, "release", "--state", "quarantined", "--yes")
    assert (rc, out) == (0, f"{incident.q['quarantined']}: released\n")
    assert incident.listed(capsys, "--state", "quarantined") == {}


@pytest.mark.parametrize("args", [
    ["hold"],  # neither QIDs nor selectors
    ["release", "0000DEADBEEF", "--from", "@bulk.test"],  # both
    ["retry", "--all", "0000DEADBEEF"],
    ["list", "--older-than", "soon"],
])
def test_usage_errors_exit_2_and_change_nothing(
    incident: Incident, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    before = incident.listed(capsys)
    try:
        code: int | str | None = incident.cli(capsys, *args)[0]
    except SystemExit as exc:  # argparse's own errors (a bad duration) exit 2 this way
        code = exc.code
    assert code == 2
    assert incident.listed(capsys) == before


def test_a_selection_that_matches_nothing_says_so(
    incident: Incident, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _err = incident.cli(capsys, "delete", "--to-domain", "nowhere.test")
    assert rc == 0
    assert out == "no message to delete matches (to-domain nowhere.test)\n"


def _coffer(incident: Incident, *args: str, stdin: int = subprocess.DEVNULL
            ) -> subprocess.Popen[str]:
    """The real ``coffer`` console script, running this checkout's code."""
    script = Path(sys.executable).parent / "coffer"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([str(script), "queue", *args, "--config", str(incident.cfg_path)],
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


def test_the_coffer_console_script_summarises_and_refuses_a_bulk_delete(
    incident: Incident
) -> None:
    with _coffer(incident, "summary", "--json") as proc:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["rows"][0]["key"] == "store.test"
    with _coffer(incident, "delete", "--to-domain", "store.test", "--older-than", "10m") as proc:
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "2 message(s) match" in err
    assert len(incident.spool.queue_ids()) == 8


@pytest.mark.parametrize(("answer", "code", "left"), [("n", 2, 8), ("y", 0, 6)])
def test_at_a_terminal_a_bulk_delete_asks_before_acting(
    incident: Incident, answer: str, code: int, left: int
) -> None:
    control, terminal = pty.openpty()
    try:
        with _coffer(incident, "delete", "--from", "spammer@bulk.test", stdin=terminal) as proc:
            os.write(control, f"{answer}\n".encode())  # the line waits in the terminal
            _out, err = proc.communicate(timeout=60)
    finally:
        os.close(control)
        os.close(terminal)
    assert "2 message(s) match (from spammer@bulk.test). Delete them? [y/N]" in err
    assert proc.returncode == code
    assert len(incident.spool.queue_ids()) == left
