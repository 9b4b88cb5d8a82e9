"""An archive backend outage is a tempfail, never a loss: `coffer serve` on a PostgreSQL
of the test's own, stopped for real mid-traffic and started again."""

from __future__ import annotations

import smtplib
import uuid
from pathlib import Path

from private_pg import *  # noqa: F403 - fixture: private_pg
from private_pg import PrivatePostgres
from svcproc import Gateway, Sink, free_port, wait_for, write_config

from archive.metadata import Metadata

ARCHIVE_451 = "451 4.3.0 Archive temporarily unavailable, try again later"


def message(token: str) -> bytes:
    return (f"From: alice@src.test\r\nTo: bob@remote.test\r\nSubject: outage {token}\r\n"
            f"Message-ID: <{token}@src.test>\r\nX-Token: {token}\r\n\r\n"
            f"Body of {token}.\r\n").encode()


def send(port: int, token: str) -> int:
    """The SMTP code the gateway answered for this message (250, or the 4xx refusal)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
            smtp.sendmail("alice@src.test", ["bob@remote.test"], message(token))
    except smtplib.SMTPSenderRefused as exc:
        return exc.smtp_code
    except smtplib.SMTPDataError as exc:
        return exc.smtp_code
    return 250


def archived(url: str, token: str) -> int:
    with Metadata(url) as meta:
        return len(meta.find_message_id(f"{token}@src.test"))


def node_config(path: Path, port: int, sink: Sink, extra: str) -> Path:
    return write_config(
        path, port=port, local_domains=["gw.test"], trusted=["127.0.0.1/32"],
        routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"},
        extra="archive:\n  health_probe: 0.3s\n" + extra)


def test_postgresql_outage_defers_and_refuses_then_everything_is_archived_and_delivered_once(
    tmp_path: Path, procs: list[Gateway | Sink], private_pg: PrivatePostgres,
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    port = free_port()
    cfg = node_config(tmp_path / "coffer.yaml", port, sink,
                      f"  database: {private_pg.url}\n")
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())

    before = [uuid.uuid4().hex for _ in range(3)]
    assert [send(port, t) for t in before] == [250] * 3
    wait_for(lambda: len(sink.records()) == 3, what="delivery before the outage")

    private_pg.stop()
    accepted: list[str] = []
    refused: list[str] = []
    # The first message after the stop is taken (250: it is safe in the spool) and
    # its archive write fails; from then on new transactions are refused at MAIL FROM.
    wait_for(lambda: (lambda t: (accepted if send(port, t) == 250 else refused).append(t)
                      or bool(refused))(uuid.uuid4().hex), timeout=30,
             what="a 451 while PostgreSQL is down")
    down = gw.wait_event("archive_backend_down")
    assert "password" not in str(down)
    assert send(port, uuid.uuid4().hex) == 451  # still down: still refused
    # Nothing accepted during the outage was delivered (it could not be archived) and
    # nothing was held for an operator: it is deferred, waiting for the backend.
    delivered = {r["token"] for r in sink.records()}
    assert delivered == set(before)
    assert gw.events("held") == []
    deferred = [e for e in gw.events("delivery") if e.get("result") == "deferred"]
    assert deferred and all(e["reply"] == ARCHIVE_451 for e in deferred)

    private_pg.start()
    gw.wait_event("archive_backend_up", timeout=30)
    after = [uuid.uuid4().hex for _ in range(2)]
    assert [send(port, t) for t in after] == [250, 250]
    everything = before + accepted + after
    wait_for(lambda: {r["token"] for r in sink.records()} == set(everything), timeout=30,
             what="every accepted message delivered after the outage")
    tokens = [r["token"] for r in sink.records()]
    assert sorted(tokens) == sorted(everything)  # once each; the refused never
    for token in everything:
        assert archived(private_pg.url, token) == 1, token
    for token in refused:
        assert archived(private_pg.url, token) == 0
    assert gw.events("held") == []
