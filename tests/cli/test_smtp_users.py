"""`coffer smtp-users` edits auth.passwd_file atomically; `coffer serve` accepts what it writes."""

from __future__ import annotations

import io
import signal
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.cli.init import write_self_signed
from gateway.receive.auth import PasswordFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))

from svcproc import REPO, Gateway, Sink, free_port, wait_for


def _config(tmp_path: Path, extra: str = "auth:\n  passwd_file: passwd\n") -> Path:
    p = tmp_path / "coffer.yaml"
    p.write_text('data_dir: "."\nlisteners:\n  - {name: in, tls: none}\n' + extra)
    return p


def _run(monkeypatch: pytest.MonkeyPatch, *args: str, stdin: str = "") -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(["smtp-users", *args])


def test_add_passwd_remove_list_keep_comments_and_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    passwd = tmp_path / "passwd"
    c = ["--config", str(cfg)]
    assert _run(monkeypatch, "add", "alice@gw.test", "--password-stdin", *c, stdin="one\n") == 0
    assert (passwd.stat().st_mode & 0o777) == 0o600  # it holds password hashes
    passwd.write_text("# SMTP users\n" + passwd.read_text())
    assert _run(monkeypatch, "add", "bob", "--password-stdin", *c, stdin="two\n") == 0
    assert PasswordFile(passwd).verify("alice@gw.test", "one")
    assert PasswordFile(passwd).verify("bob", "two")

    inode = passwd.stat().st_ino
    assert _run(monkeypatch, "passwd", "alice@gw.test", "--password-stdin", *c,
                stdin="three\n") == 0
    assert passwd.stat().st_ino != inode  # renamed over, never rewritten in place
    pw = PasswordFile(passwd)
    assert pw.verify("alice@gw.test", "three") and not pw.verify("alice@gw.test", "one")
    assert pw.verify("bob", "two")
    assert passwd.read_text().startswith("# SMTP users\nalice@gw.test:$argon2id$")

    capsys.readouterr()
    assert _run(monkeypatch, "list", "--json", *c) == 0
    assert capsys.readouterr().out.splitlines() == ['{"user": "alice@gw.test"}',
                                                    '{"user": "bob"}']
    assert _run(monkeypatch, "remove", "bob", *c) == 0
    assert PasswordFile(passwd).users == {"alice@gw.test"}
    assert "# SMTP users" in passwd.read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".passwd")) == []


def test_mistakes_are_one_line_with_the_right_exit_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    c = ["--config", str(cfg)]
    assert _run(monkeypatch, "add", "alice", "--password-stdin", *c, stdin="pw\n") == 0
    capsys.readouterr()
    assert _run(monkeypatch, "add", "alice", "--password-stdin", *c, stdin="pw\n") == 1
    assert "user 'alice' exists" in capsys.readouterr().err
    assert _run(monkeypatch, "passwd", "nobody", "--password-stdin", *c, stdin="pw\n") == 1
    assert _run(monkeypatch, "remove", "nobody", *c) == 1
    assert "no user 'nobody'" in capsys.readouterr().err
    assert _run(monkeypatch, "add", "bad:name", "--password-stdin", *c, stdin="pw\n") == 2
    assert _run(monkeypatch, "add", "carol", "--password-stdin", *c, stdin="\n") == 2
    assert "password is empty" in capsys.readouterr().err

    (tmp_path / "other").mkdir()
    unset = _config(tmp_path / "other", extra="")
    assert _run(monkeypatch, "list", "--config", str(unset)) == 2
    err = capsys.readouterr().err
    assert "[auth.passwd_file]" in err and len(err.strip().splitlines()) == 1

    broken = tmp_path / "broken"
    broken.write_text("alice:plaintext\n")
    assert _run(monkeypatch, "add", "bob", "--password-stdin", "--file", str(broken),
                stdin="pw\n") == 2
    assert f"{broken}:1:" in capsys.readouterr().err
    assert broken.read_text() == "alice:plaintext\n"  # a broken file is not edited


def test_coffer_serve_accepts_auth_plain_over_starttls_with_the_written_password(
    tmp_path: Path,
) -> None:
    (tmp_path / "tls").mkdir()
    cert = tmp_path / "tls" / "cert.pem"
    write_self_signed(cert, tmp_path / "tls" / "key.pem", "localhost", ["gw.test"])

    def smtp_users(*args: str, stdin: str = "") -> None:
        proc = subprocess.run([sys.executable, "-m", "gateway", "smtp-users", *args,
                               "--config", str(cfg)], input=stdin, text=True, cwd=REPO,
                              capture_output=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr

    sink = Sink(free_port(), tmp_path / "sink.jsonl").start()
    sub_port = free_port()
    cfg = tmp_path / "coffer.yaml"
    cfg.write_text(
        'hostname: gw.test\ndata_dir: "."\n'
        "relay: {local_domains: [gw.test]}\n"
        "listeners:\n"
        f'  - {{name: submission, role: submission, address: "127.0.0.1:{sub_port}", '
        "tls: starttls}\n"
        'tls: {cert: "tls/cert.pem", key: "tls/key.pem"}\n'
        "auth: {passwd_file: passwd}\n"
        "queue: {min_free_space: 0, scan_interval: 0.5s}\n"
        f'delivery: {{routes: {{"*": "smtp://127.0.0.1:{sink.port}?tls=off"}}}}\n'
        'dns: {nameservers: ["127.0.0.1:9"], timeout: 1s}\n'
        "check: {checks: []}\nmetrics: {address: null}\nimap: {enabled: false}\n"
    )
    smtp_users("add", "alice@gw.test", "--password-stdin", stdin="first secret\n")
    gw = Gateway(cfg, sub_port, tmp_path / "coffer.log")
    gw.start()
    ctx = ssl.create_default_context(cafile=str(cert))
    try:
        def login(password: str) -> None:
            with smtplib.SMTP("localhost", sub_port, timeout=10) as smtp:
                smtp.starttls(context=ctx)
                smtp.ehlo()
                smtp.user, smtp.password = "alice@gw.test", password
                smtp.auth("PLAIN", smtp.auth_plain)  # RFC 4616, after STARTTLS
                smtp.sendmail("alice@gw.test", ["bob@remote.test"],
                              b"From: alice@gw.test\r\nX-Token: t1\r\n\r\nhi\r\n")

        login("first secret")
        wait_for(lambda: any(r["token"] == "t1" for r in sink.records()), what="delivery")
        # A new password applies without a restart: the file is re-read when it changes.
        smtp_users("passwd", "alice@gw.test", "--password-stdin", stdin="second secret\n")
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            login("first secret")
        assert exc.value.smtp_code == 535
        login("second secret")
        gw.signal(signal.SIGTERM)
        assert gw.wait_exit() == 0
    finally:
        if gw.proc is not None:
            gw.kill9()
        sink.stop()
