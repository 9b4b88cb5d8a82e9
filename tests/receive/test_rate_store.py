"""The SQLite counters file: atomic charges, shared by separate processes."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.receive.rate_limits import Charge
from gateway.receive.rate_store import RateStore

REPO = Path(__file__).resolve().parents[2]
HOUR = 3600.0
T0 = 1_000_000 * HOUR


def _msg(key: str = "alice", limit: int = 3, window: float = HOUR) -> Charge:
    return Charge("auth_user", "messages", "auth_user", key, limit, window)


def _rcpt(key: str = "alice", limit: int = 10) -> Charge:
    return Charge("auth_user", "recipients", "auth_user", key, limit, HOUR)


def test_charges_are_counted_until_the_limit_then_refused(tmp_path: Path) -> None:
    store = RateStore(tmp_path / "ratelimit.db")
    assert [store.take(T0 + i, [_msg()]) for i in range(3)] == [None, None, None]
    refused = store.take(T0 + 4, [_msg()])
    assert refused is not None and refused.charge.key == "alice" and refused.first_refusal
    again = store.take(T0 + 5, [_msg()])
    assert again is not None and not again.first_refusal
    assert store.take(T0 + 5, [_msg("bob")]) is None  # another key has its own count


def test_one_charge_over_its_limit_charges_none_of_the_others(tmp_path: Path) -> None:
    store = RateStore(tmp_path / "ratelimit.db")
    store.take(T0, [_msg(limit=1)])
    assert store.take(T0 + 1, [_rcpt(), _msg(limit=1)]) is not None
    [row] = [r for r in store.counters(T0 + 2) if r.kind == "messages"]
    assert row.count == 1
    assert [r for r in store.counters(T0 + 2) if r.kind == "recipients"] == []


def test_a_changed_window_starts_the_counter_afresh(tmp_path: Path) -> None:
    store = RateStore(tmp_path / "ratelimit.db")
    store.take(T0, [_msg(limit=1)])
    assert store.take(T0 + 1, [_msg(limit=1)]) is not None
    assert store.take(T0 + 2, [_msg(limit=1, window=60)]) is None


def test_reset_forgets_a_key(tmp_path: Path) -> None:
    store = RateStore(tmp_path / "ratelimit.db")
    store.take(T0, [_msg(limit=1), _rcpt()])
    store.take(T0, [_msg("bob", limit=1)])
    assert store.reset("alice") == 2
    assert store.take(T0 + 1, [_msg(limit=1)]) is None
    assert store.take(T0 + 1, [_msg("bob", limit=1)]) is not None
    assert store.reset("nobody") == 0


_CHILD = """
import sys
from gateway.receive.rate_limits import Charge
from gateway.receive.rate_store import RateStore
# The 2 s wait, not the loop's: what is proved here is the atomic charge; a charge let
# through when the lock stays held is test_shared_db.py's.
store = RateStore(__import__("pathlib").Path(sys.argv[1]), busy_timeout_ms=2000)
c = Charge("auth_user", "messages", "auth_user", "alice", 60, 3600.0)
sys.stdin.readline()  # start together
print(sum(store.take(3600.0 * 1_000_000 + 1, [c]) is None for _ in range(50)))
"""


def test_two_processes_together_take_exactly_the_limit(tmp_path: Path) -> None:
    db = tmp_path / "ratelimit.db"
    RateStore(db).counters(T0)  # create the file before the race
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(db)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate("go\n", timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    taken = [int(o) for o in outs]
    assert sum(taken) == 60, taken  # 100 attempts, one limit of 60 held across processes


def test_an_unusable_file_lets_mail_through_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ratelimit.db").mkdir()  # not a database: sqlite cannot open it
    caplog.set_level(logging.ERROR, logger="coffer")
    store = RateStore(tmp_path / "ratelimit.db")
    assert store.take(T0, [_msg(limit=1)]) is None
    assert store.take(T0, [_msg(limit=1)]) is None
    assert [r.getMessage() for r in caplog.records] == ["rate_limit_store_error"] * 2
