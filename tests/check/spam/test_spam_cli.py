"""`coffer spam score|train|learn|stats` and `coffer quarantine list|show|release|delete`."""

from __future__ import annotations

import json
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from spamkit import message

from gateway.check.spam.bayes import TokenStore
from gateway.check.spam.heuristics import GTUBE
from gateway.cli import main
from gateway.config import load
from gateway.deliver.deliverer import Deliverer
from gateway.envelope import Envelope
from gateway.queue.spool import Spool
from gateway.queue.worker import QueueWorker

SPAMMY = "Cheap replica watches, casino bonus, viagra pills {i}\n"
HAMMY = "Minutes of the architecture meeting {i}: the spool and the ledger\n"


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    p = tmp_path / "coffer.yaml"
    p.write_text("listeners:\n  - name: in\n    tls: none\nqueue:\n  fsync: false\n"
                 "metrics:\n  address: null\n"
                 f"delivery:\n  routes:\n    '*': 'maildir:{tmp_path / 'mail'}'\n")
    return p


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def write_corpus(root: Path, n: int = 6) -> tuple[Path, Path]:
    ham, spam = root / "ham", root / "spam"
    ham.mkdir(parents=True)
    spam.mkdir(parents=True)
    for i in range(n):
        (ham / f"h{i}").write_bytes(message(HAMMY.format(i=i),
                                            headers={"Subject": f"minutes {i}"}))
        (spam / f"s{i}").write_bytes(message(SPAMMY.format(i=i),
                                             headers={"Subject": f"casino {i}"}))
    return ham, spam


def test_score_json_one_object_per_file_with_an_mbox_from_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cfg_path: Path
) -> None:
    mbox = tmp_path / "gtube.mbox"
    mbox.write_bytes(b"From spammer@example.net  Thu Aug 22 13:17:22 2002\n"
                     + message(f"{GTUBE}\n"))
    clean = tmp_path / "clean.eml"
    clean.write_bytes(message(headers={"Date": formatdate()}))  # scored against the clock
    rc, out, _ = run(capsys, "spam", "score", "--json", "--config", str(cfg_path),
                     str(mbox), str(clean))
    assert rc == 0
    first, second = lines(out)
    assert first["file"] == str(mbox) and first["verdict"] == "spam"
    assert first["score"] >= 1000 and "GTUBE" in first["symbols"]
    assert second == {"file": str(clean), "score": 0.0, "verdict": "ham",
                      "action": "no action", "symbols": {}}
    rc, out, _ = run(capsys, "spam", "score", "--config", str(cfg_path), str(mbox))
    assert rc == 0 and "spam score=" in out and "GTUBE" in out


def test_score_of_a_missing_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cfg_path: Path
) -> None:
    rc, _, err = run(capsys, "spam", "score", "--config", str(cfg_path),
                     str(tmp_path / "nope.eml"))
    assert rc == 2 and "cannot read" in err and "Traceback" not in err


def test_train_then_score_uses_the_classifier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cfg_path: Path
) -> None:
    ham, spam = write_corpus(tmp_path / "corpus", 60)
    db = tmp_path / "bayes.sqlite"
    rc, out, err = run(capsys, "spam", "train", "--ham", str(ham), "--spam", str(spam),
                       "--db", str(db), "--config", str(cfg_path), "--json", "--progress")
    assert rc == 0, err
    assert lines(out) == [{"files": 120, "learned": 120, "unreadable": 0, "spam": 60,
                           "ham": 60, "tokens": lines(out)[0]["tokens"]}]
    assert "learned 120/120" in err  # progress on stderr
    probe = tmp_path / "probe.eml"
    probe.write_bytes(message("casino bonus, replica watches and viagra pills\n",
                              headers={"Subject": "casino"}))
    rc, out, _ = run(capsys, "spam", "score", "--json", "--db", str(db),
                     "--config", str(cfg_path), str(probe))
    (obj,) = lines(out)
    assert obj["symbols"]["BAYES_SPAM"] > 0 and obj["bayes"] > 0.8
    # training again learns nothing new
    rc, out, _ = run(capsys, "spam", "train", "--ham", str(ham), "--db", str(db),
                     "--config", str(cfg_path), "--json")
    assert lines(out)[0]["learned"] == 0


def test_learn_moves_a_message_and_stats_report_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cfg_path: Path
) -> None:
    db = tmp_path / "b.sqlite"
    msg = tmp_path / "m.eml"
    msg.write_bytes(message(SPAMMY.format(i=1)))
    base = ["--db", str(db), "--config", str(cfg_path), "--json"]
    assert lines(run(capsys, "spam", "learn", "spam", str(msg), *base)[1]) == [
        {"learned": 1, "given": 1, "spam": 1, "ham": 0}]
    assert lines(run(capsys, "spam", "learn", "ham", str(msg), *base)[1]) == [
        {"learned": 1, "given": 1, "spam": 0, "ham": 1}]
    rc, out, _ = run(capsys, "spam", "stats", *base)
    (stats,) = lines(out)
    assert rc == 0 and stats["ham"] == 1 and stats["spam"] == 0 and not stats["ready"]


def test_train_requires_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cfg_path: Path
) -> None:
    rc, _, err = run(capsys, "spam", "train", "--config", str(cfg_path))
    assert rc == 2 and "--ham" in err
    rc, _, err = run(capsys, "spam", "train", "--ham", str(tmp_path / "missing"),
                     "--config", str(cfg_path))
    assert rc == 2 and "missing" in err


# -- quarantine ------------------------------------------------------------------


def _quarantine_one(spool: Spool, subject: str) -> str:
    env = Envelope("spammer@example.net", ["bob@example.org"], client_ip="192.0.2.9",
                   received_at=1_780_000_000.0)
    facts = {"runner": {"action": "quarantine"},
             "trace": [{"stage": "decide", "action": "quarantine", "reason": "quarantine-spam"}],
             "spam": {"score": 9.5, "verdict": "spam", "action": "quarantine",
                      "symbols": {"BAYES_SPAM": 8.0, "HTML_ONLY": 1.5}}}
    return spool.store(env, message(SPAMMY.format(i=0), headers={"Subject": subject}), facts)


async def test_quarantine_list_show_release_with_learning_then_delivery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cfg_path: Path
) -> None:
    cfg = load(cfg_path)
    spool = Spool(cfg.spool_dir, fsync=False)
    qid = _quarantine_one(spool, "not spam after all")
    other = _quarantine_one(spool, "really spam")
    plain_held = spool.store(Envelope("a@example.com", ["b@example.org"]), message())
    spool.append_event(plain_held, {"ev": "held", "stage": "archive", "error": "disk",
                                    "reason": "error"})
    worker = QueueWorker(cfg, spool, [], Deliverer(cfg))
    await worker.run_due()  # the worker carries out the quarantine: held, not delivered
    assert not (tmp_path / "mail").exists()

    rc, out, _ = run(capsys, "quarantine", "list", "--json", "--config", str(cfg_path))
    rows = {r["qid"]: r for r in lines(out)}
    assert rc == 0 and set(rows) == {qid, other}  # the error-held one is not quarantined
    assert rows[qid]["score"] == 9.5 and rows[qid]["subject"] == "not spam after all"
    assert "quarantine-spam" in rows[qid]["reason"]

    rc, out, _ = run(capsys, "quarantine", "show", qid, "--json", "--config", str(cfg_path))
    (shown,) = lines(out)
    assert shown["spam"]["symbols"]["BAYES_SPAM"] == 8.0
    assert shown["headers"]["subject"] == "not spam after all"

    db = tmp_path / "b.sqlite"
    rc, out, _ = run(capsys, "quarantine", "release", qid, "--learn", "--db", str(db),
                     "--config", str(cfg_path))
    assert rc == 0 and "released and learned as ham" in out
    assert TokenStore(db).counts()[:2] == (0, 1)

    await worker.run_due()  # delivered through the normal path
    await worker.stop(0)
    delivered = list((tmp_path / "mail").rglob("new/*"))
    assert len(delivered) == 1 and b"not spam after all" in delivered[0].read_bytes()
    assert not spool.exists(qid) and spool.exists(other)

    rc, out, _ = run(capsys, "quarantine", "delete", other, "--reason", "spam",
                     "--config", str(cfg_path))
    assert rc == 0 and not spool.exists(other)
    rc, out, _ = run(capsys, "quarantine", "list", "--config", str(cfg_path))
    assert "no quarantined messages" in out


def test_quarantine_commands_refuse_messages_not_in_quarantine(
    capsys: pytest.CaptureFixture[str], cfg_path: Path
) -> None:
    spool = Spool(load(cfg_path).spool_dir, fsync=False)
    active = spool.store(Envelope("a@example.com", ["b@example.org"]), message())
    for cmd in (["release", active], ["delete", active], ["show", active]):
        rc, _, err = run(capsys, "quarantine", *cmd, "--config", str(cfg_path))
        assert rc == 1 and "no such quarantined message" in err
    assert spool.exists(active)
