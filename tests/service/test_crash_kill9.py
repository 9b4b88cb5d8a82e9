"""Issue 2 item 4: kill -9 at any moment loses no acknowledged message and delivers none twice.

The next hop is a separate sink process that records every (message, recipient)
it accepts, with the message's unique X-Token.  The scenario:

1. Per-recipient state.  Messages to two recipients go out while the sink accepts
   ``now-*`` and answers 450 to ``later-*``: each message stays queued with one
   recipient delivered and one deferred.  The sink then goes down.
2. The burst.  A few hundred single-recipient messages over several concurrent
   connections; the gateway cannot deliver them (the sink is down), so they pile
   up in the spool.  Halfway through, the gateway gets SIGKILL.
3. Restart.  The gateway comes back, the sink comes back accepting everyone, and
   the queue drains.

Then: every burst message that got 250 was delivered exactly once; every token
delivered was at least submitted (a message whose 250 was lost in the kill may
legitimately arrive); and every ``now-*`` recipient got its message exactly once
although its message was retried after the restart (the persisted per-recipient
state), while every ``later-*`` recipient got it once too.

The sink is down while the gateway is killed, so no delivery can be between the
next hop's 250 and the gateway's record of it (RFC 1047's unavoidable duplicate
window); a duplicate here is a real bug.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest
from svcproc import REPO, Gateway, Sink, free_port, wait_for, write_config

from gateway.queue.spool import Spool

PHASE1 = 40
BURST = 300
CONNECTIONS = 8
KILL_AFTER_ACKS = BURST // 3


def _msg(token: str, to: list[str]) -> bytes:
    return (
        f"From: alice@src.test\r\nTo: {', '.join(to)}\r\nSubject: crash {token}\r\n"
        f"Message-ID: <{token}@src.test>\r\nX-Token: {token}\r\n\r\n"
        + "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n" * 40
    ).encode()


class Burst:
    """CONNECTIONS client threads; each keeps one session and sends until it fails."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.submitted: set[str] = set()
        self.acked: set[str] = set()
        self.lock = threading.Lock()
        self.tokens = iter([f"burst-{i}-{uuid.uuid4().hex[:8]}" for i in range(BURST)])
        self.threads = [threading.Thread(target=self._client) for _ in range(CONNECTIONS)]

    def _next(self) -> str | None:
        with self.lock:
            return next(self.tokens, None)

    def _client(self) -> None:
        try:
            smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=20)
        except OSError:
            return
        try:
            while (token := self._next()) is not None:
                rcpt = f"{token}@remote.test"
                with self.lock:
                    self.submitted.add(token)
                smtp.sendmail("alice@src.test", [rcpt], _msg(token, [rcpt]))
                with self.lock:
                    self.acked.add(token)
        except (smtplib.SMTPException, OSError):
            return  # the gateway died under us
        finally:
            smtp.close()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_kill9_mid_burst_loses_no_acknowledged_message_and_delivers_none_twice(
    tmp_path: Path, procs: list[Gateway | Sink], workers: int
) -> None:
    accept_later = tmp_path / "accept-later"
    sink_port = free_port()
    sink_args = ["--defer-prefix", "later-", "--accept-file", str(accept_later)]
    sink = Sink(sink_port, tmp_path / "sink.jsonl", sink_args)
    procs.append(sink.start())
    port = free_port()
    cfg = write_config(
        tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
        routes={"*": f"smtp://127.0.0.1:{sink_port}?tls=off"}, trusted=["127.0.0.1/32"],
        workers=workers,
    )
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    spool = Spool(tmp_path / "spool", fsync=False)

    # 1. Half-delivered messages: now-i delivered, later-i deferred, state on disk.
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        for i in range(PHASE1):
            rcpts = [f"now-{i}@remote.test", f"later-{i}@remote.test"]
            smtp.sendmail("alice@src.test", rcpts, _msg(f"phase1-{i}", rcpts))

    def half_delivered() -> bool:
        ids = spool.queue_ids()
        if len(ids) != PHASE1:
            return False
        for qid in ids:
            env, _f, _s = spool.read_header(qid)
            if spool.read_state(qid, env.rcpt_to).pending != [env.rcpt_to[1]]:
                return False
        return True

    wait_for(half_delivered, timeout=30, what="each phase-1 message to be half delivered")
    sink.stop()  # the next hop is down from here on

    # 2. The burst, and kill -9 in the middle of it.
    burst = Burst(port)
    burst.start()
    wait_for(lambda: len(burst.acked) >= KILL_AFTER_ACKS, timeout=40, what="acknowledgements")
    gw.kill9()
    burst.join()
    assert KILL_AFTER_ACKS <= len(burst.acked) < BURST, "the kill did not land mid-burst"

    # 3. Restart; the next hop comes back and now accepts later-* too.
    accept_later.touch()
    gw2 = Gateway(cfg, port, tmp_path / "coffer-2.log")
    procs.append(gw2.start())
    procs.append(sink.start())
    wait_for(lambda: gw2.alive() and not spool.queue_ids(), timeout=40,
             what="the queue to drain after the restart")
    # A duplicate would arrive in the same drain; the queue is empty, so nothing is left
    # that could still be delivered.

    records = sink.records()
    burst_counts = Counter(r["token"] for r in records if r["token"].startswith("burst-"))
    lost = burst.acked - set(burst_counts)
    assert not lost, f"{len(lost)} acknowledged messages were never delivered"
    twice = {t: n for t, n in burst_counts.items() if n != 1}
    assert not twice, f"delivered more than once: {twice}"
    assert set(burst_counts) <= burst.submitted, "delivered a message nobody submitted"

    per_rcpt = Counter(r["rcpt"] for r in records if r["token"].startswith("phase1-"))
    for i in range(PHASE1):
        assert per_rcpt[f"now-{i}@remote.test"] == 1, "a delivered recipient got it again"
        assert per_rcpt[f"later-{i}@remote.test"] == 1, "a deferred recipient was lost"

    # The archive came through the kill too: store and ledger intact, and the database
    # in agreement with the ledger (a batch cut off mid-write is finished or re-run,
    # never half there).
    for command in ("verify", "audit-db"):
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "archive", command, "--config", str(cfg)],
            cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    gw2.signal(signal.SIGTERM)
    assert gw2.wait_exit() == 0
    assert not os.path.exists(tmp_path / "coffer.pid")
    if workers > 1:
        # The supervisor ran both workers on the shared spool; the claims kept them
        # from delivering the same message twice (asserted above).
        assert len(gw2.events("worker_started")) == workers
