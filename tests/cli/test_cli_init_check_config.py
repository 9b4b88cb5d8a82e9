"""`coffer init` writes a configuration that `coffer check-config` accepts; mistakes exit 2
naming file, line and key."""

from __future__ import annotations

import json
import ssl
import stat
from pathlib import Path

import pytest
import yaml

from gateway import config
from gateway.cli import init as init_cmd
from gateway.cli import main


def _init(tmp_path: Path, *args: str) -> Path:
    d = tmp_path / "gw"
    assert main(["init", str(d), *args]) == 0
    return d


def test_init_writes_config_tls_pair_and_check_config_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _init(tmp_path, "--domain", "example.test", "--domain", "corp.test")
    key = d / "tls" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "tls" / "cert.pem", key)  # a matching pair

    cfg = config.load(d / "coffer.yaml")
    assert cfg.relay.local_domains == ["example.test", "corp.test"]
    assert cfg.delivery.routes == {
        "example.test": "maildir:mail", "corp.test": "maildir:mail", "*": "mx"
    }
    assert [(lst.name, lst.address, lst.tls, lst.auth_required) for lst in cfg.listeners] == [
        ("inbound", "127.0.0.1:2525", "starttls", False),
        ("submission", "127.0.0.1:5587", "starttls", True),
    ]
    assert cfg.data_dir == d.resolve()
    assert cfg.queue.workers == init_cmd.default_workers()

    capsys.readouterr()
    assert main(["check-config", "--config", str(d / "coffer.yaml")]) == 0
    out = capsys.readouterr().out
    assert ": OK" in out
    assert "example.test, corp.test" in out
    assert "submission (submission) on 127.0.0.1:5587, tls starttls, AUTH required" in out
    assert "recipients      every address of a local domain accepted" in out


def test_check_config_shows_how_recipients_are_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _init(tmp_path, "--domain", "example.test")
    (d / "recipients.txt").write_text("@example.test\n")
    conf = d / "coffer.yaml"
    conf.write_text(conf.read_text().replace(
        "  trusted_networks: []\n",
        "  trusted_networks: []\n  recipients: {file: recipients.txt, verify: true}\n"))
    capsys.readouterr()
    assert main(["check-config", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert (f"recipients      listed in {d.resolve() / 'recipients.txt'}, verified at the "
            "next hop (tempfail when no answer)") in out


def test_every_key_in_the_written_config_has_a_comment(tmp_path: Path) -> None:
    d = _init(tmp_path)
    lines = (d / "coffer.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "- ")) or ":" not in stripped:
            continue
        key = stripped.split(":", 1)[0]
        if key.startswith('"'):
            continue  # a domain -> route entry or a list item, not a setting
        before = [ln.strip() for ln in lines[max(0, i - 4) : i]]
        inline_or_above = any(b.startswith("#") for b in before) or "#" in line
        # Keys grouped under one comment are fine: look up to 4 lines above.
        assert inline_or_above, f"line {i + 1} ({key}) has no comment near it"


def test_init_uses_example_test_when_no_domain_given(tmp_path: Path) -> None:
    d = _init(tmp_path)
    assert config.load(d / "coffer.yaml").relay.local_domains == ["example.test"]


def test_init_refuses_to_overwrite_an_existing_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _init(tmp_path, "--domain", "a.test")
    before = (d / "coffer.yaml").read_bytes()
    assert main(["init", str(d), "--domain", "b.test"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (d / "coffer.yaml").read_bytes() == before


def test_init_rejects_a_domain_that_is_not_a_domain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", str(tmp_path / "gw"), "--domain", "bad domain/../x"]) == 2
    assert "is not a domain name" in capsys.readouterr().err
    assert not (tmp_path / "gw" / "coffer.yaml").exists()


def test_init_copies_the_sample_policy_when_one_is_shipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = tmp_path / "baseline.yaml"
    sample.write_text("# sample policy\nversion: 1\nrules: []\n")
    monkeypatch.setattr(init_cmd, "sample_policy_source", lambda: sample)
    d = _init(tmp_path)
    assert (d / "policy.yaml").read_text() == sample.read_text()
    cfg = config.load(d / "coffer.yaml")
    assert cfg.policy == Path("policy.yaml")
    assert main(["check-config", "--config", str(d / "coffer.yaml")]) == 0


def test_init_without_a_sample_policy_leaves_the_policy_key_commented_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(init_cmd, "sample_policy_source", lambda: None)
    d = _init(tmp_path)
    assert not (d / "policy.yaml").exists()
    assert "# policy: policy.yaml" in (d / "coffer.yaml").read_text()
    assert config.load(d / "coffer.yaml").policy is None


def test_coffer_config_environment_variable_stands_in_for_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    d = _init(tmp_path)
    monkeypatch.setenv("COFFER_CONFIG", str(d / "coffer.yaml"))
    capsys.readouterr()
    assert main(["check-config", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ok"] is True
    assert info["file"] == str(d / "coffer.yaml")


def _broken(tmp_path: Path, edit: dict[str, object]) -> Path:
    d = _init(tmp_path)
    p = d / "coffer.yaml"
    data = yaml.safe_load(p.read_text())
    for dotted, value in edit.items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _line_of(p: Path, needle: str) -> int:
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if needle in line:
            return n
    raise AssertionError(needle)


@pytest.mark.parametrize(
    ("edit", "key", "needle", "message"),
    [
        ({"limits.max_recipents": 5}, "limits.max_recipents", "max_recipents", "unknown key"),
        ({"queue.workers": 0}, "queue.workers", "workers:", "greater than or equal to 1"),
        ({"queue.max_age": "forever"}, "queue.max_age", "max_age:", "not a duration"),
        ({"tls.cert": "tls/missing.pem"}, "tls.cert", "missing.pem", "no such file"),
        ({"metrics.address": "0.0.0.0:9025"}, "metrics.address", "0.0.0.0:9025",
         "not a loopback address"),
        ({"delivery.routes": {"*": "ftp://x"}}, "delivery.routes.*", "ftp://x", "expected mx"),
    ],
)
def test_check_config_reports_a_mistake_with_file_line_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict[str, object], key: str,
    needle: str, message: str,
) -> None:
    p = _broken(tmp_path, edit)
    capsys.readouterr()
    assert main(["check-config", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{p}:{_line_of(p, needle)}:" in err
    assert f"[{key}]" in err
    assert message in err


def test_check_config_on_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_check_config_reports_a_policy_mistake_in_the_policy_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(init_cmd, "sample_policy_source", lambda: None)
    d = _init(tmp_path)
    policy = d / "rules.yaml"
    policy.write_text("version: 1\nrules:\n  - name: r1\n    when: {direction: inbound}\n"
                      "    then: deliver-anyway\n")
    cfg = d / "coffer.yaml"
    cfg.write_text(cfg.read_text().replace("# policy: policy.yaml", "policy: rules.yaml"))
    capsys.readouterr()
    assert main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{policy}:5:" in err
    assert "[rules.0.then]" in err and "unknown action" in err


def test_init_workers_option_sets_the_number_of_worker_processes(tmp_path: Path) -> None:
    d = _init(tmp_path, "--workers", "3")
    assert config.load(d / "coffer.yaml").queue.workers == 3
    assert main(["init", str(tmp_path / "other"), "--workers", "0"]) == 2
