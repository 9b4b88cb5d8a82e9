"""``coffer users`` and ``coffer imap``: accounts with argon2 hashes, and the server
started as an operator starts it (a subprocess, stopped with SIGTERM)."""

from __future__ import annotations

import hashlib
import imaplib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from archive.extract import extract
from archive.facade import Archive
from archive.imap.accounts import Accounts
from archive.metadata import MessageRecord, Metadata
from gateway.cli import main


def coffer(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
           *argv: str, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_users_add_list_passwd_role_disable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    rc, _, err = coffer(monkeypatch, capsys, "users", "add", "alice", "--role", "user",
                        "--address", "Alice@Corp.Example", "--address", "a@corp.example",
                        "--password-stdin", "--data-dir", d, stdin="s3cret pass\n")
    assert rc == 0, err
    rc, out, _ = coffer(monkeypatch, capsys, "users", "list", "--json", "--data-dir", d)
    assert rc == 0
    assert json.loads(out) == {"name": "alice", "role": "user", "disabled": False,
                               "addresses": ["a@corp.example", "alice@corp.example"]}
    accounts = Accounts.for_data_dir(tmp_path)
    try:
        stored = (tmp_path / "archive" / "imap.db").read_bytes()
        assert b"s3cret" not in stored and b"$argon2id$" in stored
        p = accounts.authenticate("alice", "s3cret pass")
        assert p is not None and p.addresses == {"alice@corp.example", "a@corp.example"}
        assert accounts.authenticate("alice", "wrong") is None
        assert coffer(monkeypatch, capsys, "users", "passwd", "alice", "--password-stdin",
                      "--data-dir", d, stdin="new one\n")[0] == 0
        assert accounts.authenticate("alice", "new one") is not None
        assert coffer(monkeypatch, capsys, "users", "role", "alice", "officer",
                      "--data-dir", d)[0] == 0
        assert accounts.authenticate("alice", "new one").role == "officer"  # type: ignore[union-attr]
        assert coffer(monkeypatch, capsys, "users", "disable", "alice", "--data-dir", d)[0] == 0
        assert accounts.authenticate("alice", "new one") is None
        rc, out, _ = coffer(monkeypatch, capsys, "users", "list", "--data-dir", d)
        assert "(disabled)" in out
    finally:
        accounts.close()


def test_users_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    args = ("users", "add", "bob", "--role", "user", "--password-stdin", "--data-dir", d)
    assert coffer(monkeypatch, capsys, *args, stdin="pw\n")[0] == 0
    rc, _, err = coffer(monkeypatch, capsys, *args, stdin="pw\n")
    assert rc == 1 and err == "coffer: user 'bob' already exists\n"
    rc, _, err = coffer(monkeypatch, capsys, "users", "passwd", "nobody", "--password-stdin",
                        "--data-dir", d, stdin="x\n")
    assert rc == 1 and err == "coffer: no such user 'nobody'\n"
    rc, _, err = coffer(monkeypatch, capsys, "users", "add", "bad name", "--role", "user",
                        "--password-stdin", "--data-dir", d, stdin="x\n")
    assert rc == 1 and "invalid user name" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as info:
        coffer(monkeypatch, capsys, "users", "role", "bob", "root", "--data-dir", d)
    assert info.value.code == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_imap_serve_serves_the_archive_until_sigterm(tmp_path: Path) -> None:
    raw = b"From: x@corp.example\r\nTo: alice@corp.example\r\nSubject: hi\r\n\r\nhello\r\n"
    with Archive.open(tmp_path) as archive:
        archive.put(raw)
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    meta.add_message(MessageRecord(hashlib.sha256(raw).hexdigest(), extract(raw),
                                   datetime(2024, 7, 1, tzinfo=UTC),
                                   rcpt_to=["alice@corp.example"]))
    meta.close()
    accounts = Accounts.for_data_dir(tmp_path)
    accounts.add("alice", "user", "pw", ["alice@corp.example"])
    accounts.close()
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "imap", "serve", "--data-dir", str(tmp_path),
         "--listen", f"127.0.0.1:{port}", "--allow-plaintext-loopback"],
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "error"})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                c = imaplib.IMAP4("127.0.0.1", port)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with c:
            c.login("alice", "pw")
            c.select("INBOX", readonly=True)
            _, data = c.fetch("1", "(BODY.PEEK[])")
            assert data[0][1] == raw  # type: ignore[index]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert b"listening on 127.0.0.1" in err


def test_users_and_imap_commands_use_the_configured_account_database(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # imap.accounts_database of the configuration, by --config or $COFFER_CONFIG; the
    # default file under data_dir is not created.
    data = tmp_path / "data"
    url = f"sqlite:///{tmp_path / 'shared-accounts.db'}"
    cfg = tmp_path / "coffer.yaml"
    cfg.write_text(f"data_dir: {data}\ndns:\n  nameservers: ['127.0.0.1']\n"
                   "listeners:\n  - {name: inbound, address: '127.0.0.1:2525', tls: none}\n"
                   f"imap:\n  accounts_database: \"{url}\"\n")
    rc, _, err = coffer(monkeypatch, capsys, "users", "add", "zoe", "--role", "officer",
                        "--password-stdin", "--config", str(cfg), stdin="zoe-pw\n")
    assert rc == 0, err
    monkeypatch.setenv("COFFER_CONFIG", str(cfg))
    rc, out, _ = coffer(monkeypatch, capsys, "users", "list", "--json")
    assert rc == 0 and json.loads(out)["name"] == "zoe"
    assert coffer(monkeypatch, capsys, "imap", "search-save", "big", "from:carol@ext.example",
                  "--officer", "zoe")[0] == 0
    accounts = Accounts(url)
    try:
        assert accounts.authenticate("zoe", "zoe-pw") is not None
        assert accounts.saved_searches() == [("big", "from:carol@ext.example")]
    finally:
        accounts.close()
    assert not (data / "archive" / "imap.db").exists()
    # --database still wins over the configuration.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    rc, out, _ = coffer(monkeypatch, capsys, "users", "list", "--json", "--database", other)
    assert rc == 0 and out == ""
