"""``coffer policy check|test|diff`` through the real argument parser."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from gateway.cli import main
from policies import SHIPPED

POLICY = """
version: 1
lists:
  trusted-partners: [partner.example]
rules:
  - name: encrypt-to-partner
    when:
      recipient.domain: partner.example
    then:
      - encrypt: {method: pgp, require: true}
  - name: quarantine-dmarc-fail
    when: {dmarc: fail}
    unless: {sender.domain: {in: trusted-partners}}
    then: [quarantine]
    stop: true
  - name: keep-seven-years
    then:
      - retain: 7y
"""

MESSAGE = b"From: a@example.com\r\nTo: b@partner.example\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(POLICY), encoding="utf-8")
    msg = tmp_path / "m.eml"
    msg.write_bytes(MESSAGE)
    return {"policy": policy, "message": msg, "dir": tmp_path}


def test_check_ok(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(files["policy"])]) == 0
    assert "OK, 3 rules" in capsys.readouterr().out


def test_check_reports_every_problem_with_location(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: a\n    then: [explode]\n"
                   "  - name: b\n    when: {body: {regex: '(a+)+'}}\n    then: [quarantine]\n")
    assert main(["policy", "check", str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"{bad}:4:12: [rules.0.then.0] unknown action 'explode'")
    assert err[1].startswith(f"{bad}:6:26: [rules.1.when.body.regex] unsafe regex")
    assert err[2] == f"{bad}: 2 problems"
    assert "Traceback" not in "\n".join(err)


def test_check_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules: [{name: a, then: [{retain: 7 years}]}]\n")
    assert main(["policy", "check", "--json", str(bad)]) == 1
    obj = json.loads(capsys.readouterr().out)
    assert obj["ok"] is False and obj["line"] == 2 and obj["kind"] == "PolicySchemaError"


def test_check_malformed_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules: [\n")
    assert main(["policy", "check", str(bad)]) == 1
    assert "invalid YAML" in capsys.readouterr().err


def test_test_json_has_the_documented_shape(files: dict[str, Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    facts = files["dir"] / "facts.json"
    facts.write_text(json.dumps({"check": {"dmarc": {"result": "fail"}}}))
    rc = main(["policy", "test", str(files["message"]), "--from", "a@example.com",
               "--to", "b@partner.example", "--ip", "192.0.2.1", "--json",
               "--policy", str(files["policy"]), "--facts", str(facts)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "decision": "quarantine",
        "actions": [{"action": "encrypt", "method": "pgp", "require": True}],
        "retention": None,
        "holds": [],
        "rules": [
            {"name": "encrypt-to-partner", "matched": True,
             "why": "recipient.domain 'partner.example' equals 'partner.example'"},
            {"name": "quarantine-dmarc-fail", "matched": True,
             "why": "dmarc is fail; unless not met: sender.domain 'example.com' is not in "
                    "list trusted-partners"},
            {"name": "keep-seven-years", "matched": False,
             "why": "not evaluated: rule 'quarantine-dmarc-fail' stopped evaluation"},
        ],
    }


def test_test_text_output(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["policy", "test", str(files["message"]), "--from", "a@example.com",
               "--to", "b@partner.example", "c@partner.example", "--direction", "outbound",
               "--policy", str(files["policy"])])
    assert rc == 0
    out = capsys.readouterr().out
    assert "decision:  accept" in out and "direction: outbound" in out
    assert "retention: 7y (rule 'keep-seven-years')" in out
    assert "  miss quarantine-dmarc-fail: dmarc is none, not fail" in out


def test_test_finds_the_policy_through_the_config(files: dict[str, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = files["dir"] / "coffer.yaml"
    cfg.write_text("relay:\n  local_domains: [example.com]\npolicy: policy.yaml\n"
                   "listeners: [{name: in, tls: none}]\n")
    rc = main(["policy", "test", str(files["message"]), "--config", str(cfg),
               "--from", "a@example.com", "--to", "b@partner.example", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["decision"] == "accept"


def test_test_without_a_configured_policy_is_a_usage_error(
        files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = files["dir"] / "coffer.yaml"
    cfg.write_text("listeners: [{name: in, tls: none}]\n")
    rc = main(["policy", "test", str(files["message"]), "--config", str(cfg),
               "--from", "a@example.com", "--to", "b@example.com"])
    assert rc == 2
    assert "no policy configured" in capsys.readouterr().err


def test_test_with_a_broken_policy_is_one_line_not_a_traceback(
        files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    files["policy"].write_text("version: 1\nrules:\n  - name: x\n    then: [nope]\n")
    rc = main(["policy", "test", str(files["message"]), "--policy", str(files["policy"]),
               "--from", "a@example.com", "--to", "b@example.com"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unknown action 'nope'" in err


def test_diff_lists_messages_whose_outcome_changes(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.yaml"
    old.write_text("version: 1\nrules:\n  - name: keep\n    then: [{retain: 1y}]\n")
    new = tmp_path / "new.yaml"
    new.write_text("version: 1\nrules:\n  - name: q\n    when: {subject: {contains: win}}\n"
                   "    then: [quarantine]\n  - name: keep\n    then: [{retain: 1y}]\n")
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.eml").write_bytes(b"From: x@o.example\r\nSubject: you win\r\n\r\nx\r\n")
    (corpus / "sub" / "b.eml").write_bytes(b"From: x@o.example\r\nSubject: hello\r\n\r\nx\r\n")
    assert main(["policy", "diff", str(old), str(new), "--corpus", str(corpus)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "a.eml: decision accept -> quarantine\n"
    assert "2 messages, 1 changed" in captured.err
    assert main(["policy", "diff", str(old), str(old), "--corpus", str(corpus), "--json"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["policy", "diff", str(old), str(new), "--corpus", str(corpus), "--json"]) == 1
    line = json.loads(capsys.readouterr().out)
    assert line["message"] == "a.eml" and line["changed"] == ["decision"]


def test_shipped_policies_pass_check(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("baseline", "sec17a4-finra", "hipaa", "gdpr"):
        assert main(["policy", "check", str(SHIPPED / f"{name}.yaml")]) == 0
    assert capsys.readouterr().out.count("OK") == 4


def test_test_reads_the_message_from_standard_input(files: dict[str, Path]) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "test", "-", "--from", "a@example.com",
         "--to", "b@partner.example", "--policy", str(files["policy"]), "--json"],
        input=MESSAGE, capture_output=True, check=False, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["actions"][0]["action"] == "encrypt"
