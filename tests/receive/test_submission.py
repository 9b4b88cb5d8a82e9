"""Submission (RFC 6409): AUTH required, only under TLS; implicit TLS (RFC 8314)."""

from __future__ import annotations

import asyncio
import base64
import shutil
import smtplib
import subprocess
from pathlib import Path

import aiosmtplib
import pytest
from receive_helpers import (
    CHEAP_HASHER,
    PASSWORD,
    USER,
    Connect,
    Gateway,
    RawClient,
    StartGateway,
    TlsFiles,
    tls_session,
)

from gateway.errors import ConfigError
from gateway.receive.auth import PasswordFile, hash_password, parse_passwd

MSG = b"From: alice@local.example\r\nTo: x@ext.example\r\nSubject: sub\r\n\r\nhi\r\n"
SUBMISSION = {"name": "submission", "role": "submission", "address": "127.0.0.1:0",
              "tls": "starttls"}
IMPLICIT = {"name": "smtps", "role": "submission", "address": "127.0.0.1:0",
            "tls": "implicit"}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def _submission(start_gateway: StartGateway) -> Gateway:
    return await start_gateway(listeners=[SUBMISSION, IMPLICIT])


async def test_submission_mail_before_auth_is_530_5_7_0(start_gateway: StartGateway, raw: Connect,
                                                        tls_files: TlsFiles) -> None:
    gw = await _submission(start_gateway)
    c = await tls_session(gw, raw, tls_files)
    assert await c.cmd("MAIL FROM:<alice@local.example>") == "530 5.7.0 Authentication required"
    assert await c.cmd("RCPT TO:<x@ext.example>") == "530 5.7.0 Authentication required"


async def test_submission_auth_before_starttls_is_538_5_7_11(start_gateway: StartGateway,
                                                             raw: Connect) -> None:
    gw = await _submission(start_gateway)
    c: RawClient = await raw(gw.port("submission"))
    await c.line()
    await c.cmd("EHLO client.example")
    blob = _b64(f"\0{USER}\0{PASSWORD}")
    assert await c.cmd(f"AUTH PLAIN {blob}") == \
        "538 5.7.11 Encryption required for requested authentication mechanism"
    assert await c.cmd("MAIL FROM:<alice@local.example>") == "530 5.7.0 Authentication required"


async def test_submission_auth_plain_then_relay_with_esmtpsa(
    start_gateway: StartGateway, tls_files: TlsFiles
) -> None:
    gw = await _submission(start_gateway)

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", gw.port("submission"),
                          local_hostname="laptop.example") as s:
            s.starttls(context=tls_files.client_context())
            s.login(USER, PASSWORD)
            s.sendmail(USER, ["x@ext.example"], MSG)

    await asyncio.to_thread(send)
    [m] = gw.spooled()
    assert m.envelope.auth_user == USER
    assert m.envelope.role == "submission" and m.envelope.listener == "submission"
    assert m.envelope.rcpt_to == ["x@ext.example"]
    assert b" with ESMTPSA (TLSv1." in m.data


async def test_auth_login_with_challenges(start_gateway: StartGateway, raw: Connect,
                                          tls_files: TlsFiles) -> None:
    gw = await _submission(start_gateway)
    c = await tls_session(gw, raw, tls_files)
    assert await c.cmd("AUTH LOGIN") == f"334 {_b64('Username:')}"
    assert await c.cmd(_b64(USER)) == f"334 {_b64('Password:')}"
    assert await c.cmd(_b64(PASSWORD)) == "235 2.7.0 Authentication successful"
    assert await c.cmd("AUTH LOGIN") == "503 5.5.1 Already authenticated"
    assert await c.cmd("MAIL FROM:<alice@local.example>") == "250 2.1.0 Sender OK"


async def test_auth_plain_with_empty_challenge_and_cancel(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await _submission(start_gateway)
    c = await tls_session(gw, raw, tls_files)
    assert await c.cmd("AUTH PLAIN") == "334 "
    assert (await c.cmd("*")).startswith("501 ")  # RFC 4954 §4: the client cancels
    assert await c.cmd("AUTH PLAIN") == "334 "
    assert await c.cmd(_b64(f"\0{USER}\0{PASSWORD}")) == "235 2.7.0 Authentication successful"


async def test_wrong_password_and_unknown_user_get_the_same_535(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await _submission(start_gateway)
    c = await tls_session(gw, raw, tls_files)
    wrong = await c.cmd(f"AUTH PLAIN {_b64(chr(0) + USER + chr(0) + 'nope')}")
    unknown = await c.cmd(f"AUTH PLAIN {_b64(chr(0) + 'mallory@x' + chr(0) + PASSWORD)}")
    assert wrong == unknown == "535 5.7.8 Authentication credentials invalid"


async def test_too_many_auth_failures_get_421_and_close(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await _submission(start_gateway)
    c = await tls_session(gw, raw, tls_files)
    bad = f"AUTH PLAIN {_b64(chr(0) + USER + chr(0) + 'guess')}"
    assert (await c.cmd(bad)).startswith("535 ")
    assert (await c.cmd(bad)).startswith("535 ")
    c.send(bad.encode() + b"\r\n")  # max_auth_failures = 3
    assert await c.rest() == ["421 4.7.0 Too many authentication failures"]


async def test_authzid_other_than_the_user_is_refused(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await _submission(start_gateway)
    c = await tls_session(gw, raw, tls_files)
    blob = _b64(f"bob@local.example\0{USER}\0{PASSWORD}")
    assert (await c.cmd(f"AUTH PLAIN {blob}")).startswith("501 5.5.2 ")


async def test_implicit_tls_listener_offers_auth_and_not_starttls(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles
) -> None:
    gw = await _submission(start_gateway)
    c: RawClient = await raw(gw.port("smtps"), tls=tls_files.client_context())
    assert await c.line() == "220 mx.coffer.test ESMTP Coffer"
    c.send(b"EHLO client.example\r\n")
    keys = [x[4:] for x in await c.reply()]
    assert "AUTH PLAIN LOGIN" in keys and "STARTTLS" not in keys
    assert await c.cmd("STARTTLS") == "503 5.5.1 TLS already active"


async def test_implicit_tls_submission_with_aiosmtplib(
    start_gateway: StartGateway, tls_files: TlsFiles
) -> None:
    gw = await _submission(start_gateway)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port("smtps"), use_tls=True,
                               tls_context=tls_files.client_context()) as client:
        await client.login(USER, PASSWORD)
        errors, text = await client.sendmail(USER, ["x@ext.example"], MSG)
        assert errors == {} and text.startswith("2.0.0 OK: queued as ")
    [m] = gw.spooled()
    assert m.envelope.tls is not None and m.envelope.auth_user == USER


async def test_auth_login_with_aiosmtplib_over_starttls(
    start_gateway: StartGateway, tls_files: TlsFiles
) -> None:
    gw = await _submission(start_gateway)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.port("submission"),
                               start_tls=True, tls_context=tls_files.client_context()) as c:
        await c.ehlo()  # RFC 3207 §4.2: EHLO again after STARTTLS
        response = await c.auth_login(USER, PASSWORD)
        assert response.code == 235


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (apt swaks)")
@pytest.mark.parametrize("tls_flag", ["--tls", "--tlsc"])
async def test_swaks_authenticated_submission(start_gateway: StartGateway,
                                              tls_flag: str) -> None:
    gw = await _submission(start_gateway)
    port = gw.port("submission" if tls_flag == "--tls" else "smtps")
    proc = await asyncio.to_thread(
        subprocess.run,
        ["swaks", "--server", "127.0.0.1", "--port", str(port), tls_flag,
         "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
         "--from", USER, "--to", "x@ext.example", "--ehlo", "swaks.example"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [m] = gw.spooled()
    assert m.envelope.auth_user == USER and m.envelope.rcpt_to == ["x@ext.example"]


async def test_passwd_file_change_is_picked_up_without_restart(
    start_gateway: StartGateway, raw: Connect, tls_files: TlsFiles, tmp_path: Path
) -> None:
    gw = await _submission(start_gateway)
    passwd = tmp_path / "passwd"
    carol = f"carol@local.example:{hash_password('pw2', CHEAP_HASHER)}\n"
    passwd.write_text(passwd.read_text() + carol)
    c = await tls_session(gw, raw, tls_files)
    blob = _b64("\0carol@local.example\0pw2")
    assert await c.cmd(f"AUTH PLAIN {blob}") == "235 2.7.0 Authentication successful"


def test_passwd_parse_errors_name_file_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_passwd("# users\nalice:$argon2id$v=19$x\nbob:plaintext\n", "/etc/coffer/passwd")
    assert str(info.value).startswith("/etc/coffer/passwd:3:")
    assert "bob" in str(info.value)
    with pytest.raises(ConfigError, match=":1:"):
        parse_passwd("no-colon-here\n", "f")
    with pytest.raises(ConfigError, match="twice"):
        parse_passwd("a:$argon2id$1\na:$argon2id$2\n", "f")


def test_hash_password_verifies_and_rejects(tmp_path: Path) -> None:
    f = tmp_path / "passwd"
    f.write_text(f"u@x:{hash_password('s3cret', CHEAP_HASHER)}\n")
    pw = PasswordFile(f)
    assert pw.verify("u@x", "s3cret")
    assert not pw.verify("u@x", "S3cret")
    assert not pw.verify("nobody@x", "s3cret")


def test_hash_password_default_is_argon2id_with_library_costs() -> None:
    hashed = hash_password("s3cret")
    assert hashed.startswith("$argon2id$v=19$m=65536,t=3,p=4$")


def test_missing_passwd_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        PasswordFile(tmp_path / "absent")
