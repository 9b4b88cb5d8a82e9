"""`coffer serve` runs the archive's IMAP server: a relayed message is readable over IMAP."""

from __future__ import annotations

import contextlib
import imaplib
import json
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from svcproc import REPO, Gateway, Sink, free_port, port_open, wait_for, write_config

from gateway.cli.init import write_self_signed

OFFICER, PASSWORD = "olivia", "correct horse battery staple"


def _coffer(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, input=stdin,
                          capture_output=True, check=False, timeout=60)


def _close(imap: imaplib.IMAP4) -> None:
    with contextlib.suppress(OSError):
        imap.shutdown()


def _setup(tmp_path: Path, procs: list[Gateway | Sink], *, workers: int = 1
           ) -> tuple[Gateway, Sink, int]:
    (tmp_path / "tls").mkdir()
    write_self_signed(tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem",
                      "localhost", ["gw.test"])
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    port, imap_port = free_port(), free_port()
    cfg = write_config(
        tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"], workers=workers,
        routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"}, trusted=["127.0.0.1/32"],
        extra='tls: {cert: "tls/cert.pem", key: "tls/key.pem"}\n'
              f'imap:\n  address: "127.0.0.1:{imap_port}"\n  allow_plaintext_loopback: true\n',
    )
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    wait_for(lambda: port_open(imap_port), what="the IMAP port")
    return gw, sink, imap_port


def _relay(port: int, sink: Sink) -> tuple[str, bytes]:
    token = uuid.uuid4().hex
    body = (f"From: alice@src.test\r\nTo: bob@remote.test\r\nSubject: imap {token}\r\n"
            f"Message-ID: <{token}@src.test>\r\nX-Token: {token}\r\n\r\n"
            f"Read me over IMAP, {token}.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("alice@src.test", ["bob@remote.test"], body)
    # Delivery happens only after archiving: once the sink has it, the archive has it.
    wait_for(lambda: any(r["token"] == token for r in sink.records()), what="delivery")
    return token, body


def test_relayed_message_is_fetched_byte_exact_over_imap_and_sigterm_stops_both(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    gw, sink, imap_port = _setup(tmp_path, procs)
    token, body = _relay(gw.port, sink)
    added = _coffer("users", "add", OFFICER, "--role", "officer", "--password-stdin",
                    "--config", str(gw.config), stdin=PASSWORD.encode() + b"\n")
    assert added.returncode == 0, added.stderr


    def archived_ids() -> list[int]:
        out = _coffer("search", "--config", str(gw.config), "--json", f"subject:{token}")
        assert out.returncode == 0, out.stderr
        return [json.loads(line)["id"] for line in out.stdout.splitlines() if line.strip()]

    wait_for(lambda: len(archived_ids()) == 1, what="the message to be indexed")
    [archived_id] = archived_ids()
    shown = _coffer("show", "--config", str(gw.config), "--raw", str(archived_id))
    assert shown.returncode == 0, shown.stderr

    imap = imaplib.IMAP4("127.0.0.1", imap_port, timeout=10)
    try:
        # Loopback and allow_plaintext_loopback: LOGIN works without TLS; STARTTLS offered.
        assert "STARTTLS" in imap.capabilities and "AUTH=PLAIN" in imap.capabilities
        imap.login(OFFICER, PASSWORD)
        typ, _ = imap.select('"All Mail"', readonly=True)
        assert typ == "OK"
        typ, data = imap.uid("SEARCH", "HEADER", "Message-ID", f"<{token}@src.test>")
        assert typ == "OK"
        [uid] = data[0].split()
        typ, fetched = imap.uid("FETCH", uid, "(BODY.PEEK[] RFC822.SIZE)")
        assert typ == "OK"
        meta, raw = fetched[0]
        # The archived bytes: what was received, behind the gateway's trace headers.
        assert raw.endswith(body)
        rest = b"".join(x for x in fetched[1:] if isinstance(x, bytes))
        size = re.search(rb"RFC822\.SIZE (\d+)", meta + rest)
        assert size is not None and int(size.group(1)) == len(raw)
        assert raw == shown.stdout  # byte for byte what `coffer show --raw` gives
        assert int(uid) == archived_id  # All Mail's UIDs are the archive ids

        # The same account over STARTTLS, verifying the gateway's certificate.
        ctx = ssl.create_default_context(cafile=str(tmp_path / "tls" / "cert.pem"))
        tls = imaplib.IMAP4("localhost", imap_port, timeout=10)
        try:
            tls.starttls(ctx)
            assert tls.login(OFFICER, PASSWORD)[0] == "OK"
        finally:
            tls.logout()

        assert gw.wait_event("imap_listening")["address"] == f"127.0.0.1:{imap_port}"
        gw.signal(signal.SIGTERM)
        assert gw.wait_exit() == 0
        # Draining closed the IMAP server and its open session with it.
        assert not port_open(imap_port)
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            imap.noop()
    finally:
        _close(imap)


def test_sighup_with_changed_imap_settings_logs_that_a_restart_is_needed(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    gw, _sink, imap_port = _setup(tmp_path, procs)
    other = free_port()
    gw.config.write_text(gw.config.read_text().replace(str(imap_port), str(other)))
    gw.signal(signal.SIGHUP)
    event = gw.wait_event("config_restart_required")
    assert "imap" in event["keys"]
    gw.wait_event("config_reloaded")
    assert port_open(imap_port) and not port_open(other)  # the running value is kept


def test_with_two_workers_only_worker_0_serves_imap(
    tmp_path: Path, procs: list[Gateway | Sink]
) -> None:
    gw, sink, imap_port = _setup(tmp_path, procs, workers=2)
    gw.wait_event("started", count=2)
    listening = gw.events("imap_listening")
    assert len(listening) == 1
    assert not gw.events("worker_exited")  # the other worker did not fail to bind it
    token, _body = _relay(gw.port, sink)
    added = _coffer("users", "add", OFFICER, "--role", "officer", "--password-stdin",
                    "--config", str(gw.config), stdin=PASSWORD.encode() + b"\n")
    assert added.returncode == 0, added.stderr
    imap = imaplib.IMAP4("127.0.0.1", imap_port, timeout=10)
    try:
        imap.login(OFFICER, PASSWORD)
        imap.select('"All Mail"', readonly=True)
        typ, data = imap.uid("SEARCH", "HEADER", "Message-ID", f"<{token}@src.test>")
        assert typ == "OK" and len(data[0].split()) == 1
    finally:
        _close(imap)
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit() == 0


def test_an_imap_port_in_use_stops_serve_with_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        imap_port = busy.getsockname()[1]
        cfg = write_config(
            tmp_path / "coffer.yaml", port=free_port(), local_domains=["gw.test"],
            routes={"*": "maildir:mail"},
            extra=f'imap:\n  address: "127.0.0.1:{imap_port}"\n',
        )
        proc = _coffer("serve", "--config", str(cfg))
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert "coffer serve: cannot start:" in err and "Traceback" not in err
    # Besides the JSON log lines (standard error is the log here): one line for a human.
    plain = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("{")]
    assert len(plain) == 1 and str(imap_port) in plain[0]
