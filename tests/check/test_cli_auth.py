"""``coffer auth check`` and ``coffer dkim keygen``.

The check runs against the loopback DNS server through ``--dns``; the JSON object
has the shape of issue 4 (plus ``unsigned_bytes`` per DKIM signature).  A few
tests run ``python -m gateway`` as a real subprocess; the rest call
``gateway.cli.main`` in-process (the same code, without paying the interpreter
start-up for each case).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from authdns import DnsTestServer, Zone

from gateway.cli import main
from gateway.transform.dkim_sign import generate_key, public_record, sign

MSG = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
       b"Subject: invoice\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
       b"Message-ID: <inv1@example.com>\r\n\r\nPlease find the invoice.\r\n")


def coffer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COFFER_CONFIG"}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def signed(zone: Zone, tmp_path: Path) -> Path:
    key = generate_key("ed25519-sha256")
    zone.txt("s1._domainkey.example.com", public_record(key))
    zone.txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject")
    path = tmp_path / "m.eml"
    path.write_bytes(sign(MSG, "example.com", "s1", key))
    return path


def in_process(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
               cwd: Path, *args: str) -> tuple[int, str, str]:
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("COFFER_CONFIG", raising=False)
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def check_args(path: Path, dns: DnsTestServer, *extra: str, ip: str = "192.0.2.10",
               mail_from: str = "alice@example.com", helo: str = "mx.example.com") -> list[str]:
    return ["auth", "check", str(path), "--ip", ip, "--helo", helo, "--mail-from", mail_from,
            "--dns", dns.hostport, "--json", *extra]


def one_object(stdout: str) -> Any:
    lines = stdout.splitlines()
    assert len(lines) == 1  # one object, one line
    return json.loads(lines[0])


@pytest.fixture
def check_json(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
               dns_server: DnsTestServer) -> Any:
    def run(path: Path, *extra: str, **kw: str) -> Any:
        rc, out, err = in_process(capsys, monkeypatch, path.parent,
                                  *check_args(path, dns_server, *extra, **kw))
        assert rc == 0, err
        return one_object(out)
    return run


def test_json_has_the_issue_shape(signed: Path, dns_server: DnsTestServer) -> None:
    proc = coffer(*check_args(signed, dns_server), cwd=signed.parent)  # a real process
    assert proc.returncode == 0, proc.stderr
    out = one_object(proc.stdout)
    assert set(out) == {"spf", "dkim", "dmarc", "arc", "authentication_results"}
    assert out["spf"] == {"result": "pass", "domain": "example.com",
                          "reason": out["spf"]["reason"]}
    assert out["dkim"] == [{"result": "pass", "domain": "example.com", "selector": "s1",
                            "reason": "signature verified", "unsigned_bytes": 0}]
    assert out["dmarc"] == {"result": "pass", "domain": "example.com", "policy": "reject",
                            "disposition": "none"}
    assert out["arc"] == {"result": "none"}
    ar = out["authentication_results"]
    assert ar.startswith("localhost;")  # authserv-id: the default hostname
    assert "spf=pass" in ar and "dkim=pass" in ar and "dmarc=pass" in ar and "arc=none" in ar
    assert "\n" not in ar


def test_unauthorized_ip_fails_spf_and_dmarc_reject(signed: Path, check_json: Any) -> None:
    unsigned = signed.parent / "unsigned.eml"
    unsigned.write_bytes(MSG)
    out = check_json(unsigned, ip="198.51.100.9")
    assert out["spf"]["result"] == "fail"
    assert out["dkim"] == []
    assert out["dmarc"] == {"result": "fail", "domain": "example.com", "policy": "reject",
                            "disposition": "reject"}
    assert "dkim=none" in out["authentication_results"]


def test_null_sender_checks_helo(signed: Path, zone: Zone, check_json: Any) -> None:
    zone.txt("mx.example.com", "v=spf1 ip4:192.0.2.10 -all")
    out = check_json(signed, mail_from="")
    assert out["spf"]["result"] == "pass" and out["spf"]["domain"] == "mx.example.com"
    assert "smtp.helo=mx.example.com" in out["authentication_results"]


def test_dns_timeout_is_temperror(tmp_path: Path, zone: Zone, check_json: Any) -> None:
    zone.timeout("example.com").timeout("_dmarc.example.com")
    path = tmp_path / "m.eml"
    path.write_bytes(MSG)
    out = check_json(path, "--dns-timeout", "0.3")
    assert out["spf"]["result"] == "temperror"
    assert out["dmarc"]["result"] == "temperror"


def test_config_file_gives_the_authserv_id(signed: Path, check_json: Any) -> None:
    cfg = signed.parent / "coffer.yaml"
    cfg.write_text("hostname: mx.coffer.test\nlisteners:\n  - name: in\n    tls: none\n")
    out = check_json(signed, "--config", str(cfg))
    assert out["authentication_results"].startswith("mx.coffer.test;")


def test_human_output_lists_each_verdict(signed: Path, dns_server: DnsTestServer,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rc, out, err = in_process(capsys, monkeypatch, signed.parent, "auth", "check", str(signed),
                              "--ip", "192.0.2.10", "--helo", "mx.example.com", "--mail-from",
                              "alice@example.com", "--dns", dns_server.hostport)
    assert rc == 0, err
    assert re.search(r"^SPF +pass", out, re.M)
    assert re.search(r"^DKIM +pass +d=example.com s=s1 ed25519-sha256", out, re.M)
    assert re.search(r"^DMARC +pass", out, re.M)
    assert re.search(r"^Authentication-Results: localhost;", out, re.M)


def test_message_from_stdin(signed: Path, dns_server: DnsTestServer,
                            capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(signed.read_bytes())))
    rc, out, err = in_process(capsys, monkeypatch, signed.parent, "auth", "check", "-", "--ip",
                              "192.0.2.10", "--mail-from", "alice@example.com", "--dns",
                              dns_server.hostport, "--json")
    assert rc == 0, err
    assert one_object(out)["dkim"][0]["result"] == "pass"


def test_missing_message_is_a_usage_error(tmp_path: Path) -> None:
    proc = coffer("auth", "check", "nope.eml", "--ip", "192.0.2.1", "--mail-from", "a@b.c",
                  cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("coffer: cannot read nope.eml")
    assert "Traceback" not in proc.stderr


def test_bad_dns_option_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.eml").write_bytes(MSG)
    rc, _, err = in_process(capsys, monkeypatch, tmp_path, "auth", "check", "m.eml", "--ip",
                            "192.0.2.1", "--mail-from", "a@b.c", "--dns", "127.0.0.1:notaport")
    assert rc == 2 and "--dns" in err


@pytest.mark.parametrize("ed25519", [False, True])
def test_keygen_key_signs_and_its_record_verifies(tmp_path: Path, zone: Zone, check_json: Any,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  ed25519: bool) -> None:
    args = ["dkim", "keygen", "example.com", "k1", "--out", "keys", "--json"]
    rc, out, err = in_process(capsys, monkeypatch, tmp_path, *args,
                              *(["--ed25519"] if ed25519 else []))
    assert rc == 0, err
    info = one_object(out)
    key_file = tmp_path / info["key_file"]
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert info["dns_name"] == "k1._domainkey.example.com."
    zone.txt("k1._domainkey.example.com", info["txt"])
    (tmp_path / "m.eml").write_bytes(sign(MSG, "example.com", "k1", key_file.read_bytes()))
    assert check_json(tmp_path / "m.eml")["dkim"][0]["result"] == "pass"
    rc, _, err = in_process(capsys, monkeypatch, tmp_path, *args)
    assert rc == 2 and "not overwriting" in err


def test_keygen_prints_a_zone_file_record(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rc, out, err = in_process(capsys, monkeypatch, tmp_path, "dkim", "keygen", "example.com",
                              "k2")
    assert rc == 0, err
    line = out.strip()
    assert line.startswith('k2._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=')
    # RFC 1035 §3.3.14: no character-string over 255 octets
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', line))
    assert (tmp_path / "example.com.k2.key").exists()
