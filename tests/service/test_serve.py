"""`coffer serve` end to end: real processes, real sockets, loopback only."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import yaml
from svcproc import (
    REPO,
    Gateway,
    Sink,
    free_port,
    port_open,
    wait_for,
    write_config,
)

from gateway.queue.spool import Spool


def _message(token: str, to: str = "bob@remote.test") -> bytes:
    return (
        f"From: alice@src.test\r\nTo: {to}\r\nSubject: test {token}\r\n"
        f"Message-ID: <{token}@src.test>\r\nX-Token: {token}\r\n\r\nHello {token}\r\n"
    ).encode()


def _send(port: int, to: str, token: str | None = None) -> str:
    token = token or uuid.uuid4().hex
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("alice@src.test", [to], _message(token, to))
    return token


def _spool_ids(data_dir: Path) -> list[str]:
    return sorted(p.stem for p in (data_dir / "spool" / "queue").glob("*.msg"))


def _relay_setup(tmp_path: Path, procs: list[Gateway | Sink], **kw: object) -> tuple[Gateway, Sink]:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    port = free_port()
    cfg = write_config(
        tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
        routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"}, trusted=["127.0.0.1/32"],
        **kw,  # type: ignore[arg-type]
    )
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    return gw, sink


def test_serve_relays_a_message_to_the_next_hop_and_forgets_it(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    gw, sink = _relay_setup(tmp_path, procs)
    pid_file = tmp_path / "coffer.pid"
    assert pid_file.read_text().strip() == str(gw.proc.pid if gw.proc else "")
    token = _send(gw.port, "bob@remote.test")
    wait_for(lambda: any(r["token"] == token for r in sink.records()), what="delivery")
    wait_for(lambda: _spool_ids(tmp_path) == [], what="the spool to empty")
    [rec] = sink.records()
    assert (rec["rcpt"], rec["mail_from"]) == ("bob@remote.test", "alice@src.test")
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0
    assert not pid_file.exists()
    assert gw.events("stopped")


def test_init_then_serve_delivers_local_mail_into_the_maildir(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    d = tmp_path / "gw"
    init = subprocess.run(
        [sys.executable, "-m", "gateway", "init", str(d), "--domain", "example.test"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert init.returncode == 0, init.stderr
    # Same file, other ports: tests must not collide with a gateway on 2525.
    port, sub_port, metrics_port = free_port(), free_port(), free_port()
    cfg = d / "coffer.yaml"
    text = cfg.read_text()
    for old, new_port in (("127.0.0.1:2525", port), ("127.0.0.1:5587", sub_port),
                          ("127.0.0.1:9025", metrics_port)):
        assert old in text
        text = text.replace(old, f"127.0.0.1:{new_port}")
    # Loopback only: the sender's SPF/DMARC lookups must not reach the system resolver.
    assert "nameservers: []" in text and "checks: [spf, dkim, dmarc, arc]" in text
    text = text.replace("nameservers: []", 'nameservers: ["127.0.0.1:9"]').replace(
        "checks: [spf, dkim, dmarc, arc]", "checks: []")
    cfg.write_text(text)
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())

    token = uuid.uuid4().hex
    if shutil.which("swaks"):
        sent = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{port}", "--to", "user@example.test",
             "--from", "alice@src.test", "--tls", "--header", f"X-Token: {token}"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
    else:  # pragma: no cover - the Debian setup installs swaks
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.starttls()
            smtp.sendmail("alice@src.test", ["user@example.test"],
                          _message(token, "user@example.test"))
    new = d / "mail" / "user@example.test" / "new"
    wait_for(lambda: new.is_dir() and any(new.iterdir()), what="the maildir delivery")
    [delivered] = list(new.iterdir())
    body = delivered.read_bytes()
    assert f"X-Token: {token}".encode() in body
    assert body.startswith(b"Return-Path: <alice@src.test>")
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0


def test_sigterm_finishes_a_transaction_in_progress_then_exits_0(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    gw, sink = _relay_setup(tmp_path, procs)
    token = uuid.uuid4().hex
    smtp = smtplib.SMTP("127.0.0.1", gw.port, timeout=20)
    try:
        smtp.ehlo("client.test")
        assert smtp.mail("alice@src.test")[0] == 250
        assert smtp.rcpt("bob@remote.test")[0] == 250
        assert smtp.docmd("DATA")[0] == 354
        smtp.send(_message(token).replace(b"Hello", b"Half of the body arrives, then"))
        gw.signal(signal.SIGTERM)
        # Draining: no new connections, but this transaction goes on.
        wait_for(lambda: not port_open(gw.port), what="the listener to close")
        time.sleep(0.3)
        smtp.send(b"the rest.\r\n.\r\n")
        code, reply = smtp.getreply()
        assert code == 250, reply
        # Then the draining server says goodbye on its own (RFC 5321 §3.8: 421).
        assert smtp.getreply()[0] == 421
    finally:
        smtp.close()
    assert gw.wait_exit() == 0
    delivered = any(r["token"] == token for r in sink.records())
    queued = len(_spool_ids(tmp_path)) == 1
    assert delivered != queued  # delivered during the drain, or left queued: never lost
    assert gw.events("draining") and gw.events("stopped")


def test_sighup_keeps_the_old_config_on_a_bad_file_and_applies_a_good_one(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    port = free_port()
    kw = {"port": port, "routes": {"*": f"smtp://127.0.0.1:{sink.port}?tls=off"}}
    cfg = write_config(tmp_path / "coffer.yaml", local_domains=["one.test"], **kw)  # type: ignore[arg-type]
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())

    def rcpt(addr: str) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("alice@src.test")
            return smtp.rcpt(addr)[0]

    assert rcpt("x@one.test") == 250
    assert rcpt("x@two.test") == 550  # not local, untrusted client: no relay

    good = cfg.read_text()
    cfg.write_text(good.replace("  level: INFO", "  level: INFO\n  colour: blue"))
    gw.signal(signal.SIGHUP)
    failed = gw.wait_event("config_reload_failed")
    assert failed["key"] == "log.colour"
    assert failed["line"] == good.splitlines().index("  level: INFO") + 2
    assert failed["file"] == str(cfg)
    assert rcpt("x@one.test") == 250  # still running, old config
    assert rcpt("x@two.test") == 550

    cfg.write_text(good.replace('["one.test"]', '["one.test", "two.test"]'))
    gw.signal(signal.SIGHUP)
    gw.wait_event("config_reloaded")
    assert rcpt("x@two.test") == 250

    # A listener address change is not applied live, and the log says so.
    cfg.write_text(cfg.read_text().replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
    gw.signal(signal.SIGHUP)
    assert gw.wait_event("config_restart_required")["keys"] == ["listeners"]
    assert rcpt("x@two.test") == 250  # still on the old port
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0


def test_metrics_endpoint_counts_accepted_and_delivered_messages(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    mport = free_port()
    gw, sink = _relay_setup(tmp_path, procs, metrics_port=mport)
    token = _send(gw.port, "bob@remote.test")
    wait_for(lambda: any(r["token"] == token for r in sink.records()), what="delivery")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    wait_for(lambda: 'coffer_recipients_delivered_total{route=' in scrape(),
             what="the delivered counter")
    text = scrape()
    assert 'coffer_messages_accepted_total{listener="inbound"} 1.0' in text
    assert "coffer_stage_seconds" in text or "coffer_queue_depth" in text
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0


def test_a_second_serve_on_the_same_data_dir_refuses_to_start(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    gw, _sink = _relay_setup(tmp_path, procs)
    second = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(gw.config)],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )
    assert second.returncode == 1
    assert "another coffer serve" in second.stderr
    assert gw.alive()


def test_serve_with_a_bad_config_exits_2_naming_file_line_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "coffer.yaml"
    cfg.write_text("listeners:\n  - name: in\n    tls: none\nqueue:\n  workers: many\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode == 2
    assert f"{cfg}:5:" in proc.stderr and "[queue.workers]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_coffer_config_environment_variable_stands_in_for_config(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "elsewhere.yaml", port=port, local_domains=["gw.test"],
                       routes={"*": "maildir:mail"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"], cwd=REPO,
        env={**os.environ, "COFFER_CONFIG": str(cfg)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: proc.poll() is None and port_open(port), what="serve via $COFFER_CONFIG")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_queue_retry_makes_a_running_gateway_deliver_a_deferred_message_now(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")  # not started: the next hop is down
    port = free_port()
    cfg = write_config(
        tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
        routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"}, trusted=["127.0.0.1/32"],
    )
    # Neither the retry timer nor the periodic scan would pick the message up within
    # the test: only `coffer queue retry` poking the gateway (SIGUSR1) can.
    cfg.write_text(cfg.read_text().replace("retry_initial: 1s", "retry_initial: 1h")
                   .replace("retry_max: 2s", "retry_max: 2h")
                   .replace("scan_interval: 0.5s", "scan_interval: 1h"))
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    token = _send(port, "bob@remote.test")

    def queue(*args: str) -> list[dict[str, object]]:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "queue", *args, "--json", "--config", str(cfg)],
            cwd=REPO, capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        return [yaml.safe_load(line) for line in out.splitlines()]

    spool = Spool(tmp_path / "spool", fsync=False)

    def deferred() -> bool:
        ids = spool.queue_ids()
        return len(ids) == 1 and spool.read_state(ids[0], []).attempts > 0

    wait_for(deferred, what="the message to be deferred")
    [row] = queue("list")
    assert row["status"] == "deferred"
    assert str(row["last_error"]).startswith("451 4.4.1 Connection to 127.0.0.1"), row
    procs.append(sink.start())
    assert queue("retry", "--all") == [{"qid": row["qid"], "action": "retry"}]
    wait_for(lambda: any(r["token"] == token for r in sink.records()), timeout=10,
             what="delivery after `coffer queue retry`")
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0


def test_several_workers_share_the_port_and_a_killed_worker_is_restarted(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    gw, sink = _relay_setup(tmp_path, procs, workers=2)
    gw.wait_event("worker_started", 2)
    tokens = [_send(gw.port, f"rcpt{i}@remote.test") for i in range(10)]
    wait_for(lambda: {r["token"] for r in sink.records()} >= set(tokens), what="delivery")
    victim = gw.events("worker_started")[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    restarted = gw.wait_event("worker_started", 3)
    assert restarted["worker"] == 0
    more = [_send(gw.port, f"again{i}@remote.test") for i in range(5)]
    wait_for(lambda: {r["token"] for r in sink.records()} >= set(more), what="delivery")
    assert len(sink.records()) == 15  # nothing delivered twice
    # Both workers write to one log: every line a worker writes names it.
    assert {e["worker"] for e in gw.events("delivery")} <= {0, 1}
    assert {e["worker"] for e in gw.events("accepted")} <= {0, 1}
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0


def test_sighup_to_the_supervisor_reloads_every_worker(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "coffer.yaml", port=port, local_domains=["one.test"],
                       routes={"*": "maildir:mail"}, workers=2)
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    gw.wait_event("started", 2)

    def rcpt(addr: str) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("alice@src.test")
            return smtp.rcpt(addr)[0]

    assert rcpt("x@two.test") == 550
    cfg.write_text(cfg.read_text().replace('["one.test"]', '["one.test", "two.test"]'))
    gw.signal(signal.SIGHUP)
    gw.wait_event("config_reloaded", 2)  # one per worker
    # New connections land on either worker (SO_REUSEPORT): every one sees the new domain.
    assert [rcpt("x@two.test") for _ in range(8)] == [250] * 8
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0


def test_workers_drain_and_exit_when_their_supervisor_is_killed(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "coffer.yaml", port=port, local_domains=["one.test"],
                       routes={"*": "maildir:mail"}, workers=2)
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    gw.wait_event("started", 2)
    pids = [e["pid"] for e in gw.events("worker_started")]
    assert gw.proc is not None
    gw.proc.kill()  # the supervisor alone, not its process group
    gw.wait_exit()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(lambda: all(gone(p) for p in pids), timeout=15, what="orphaned workers to exit")
    assert len(gw.events("supervisor_gone")) == 2
    assert not port_open(port)
