"""Loading policies: every mistake is a located PolicyError, never a traceback or a
partial policy; includes and list files resolve beside the policy."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.envelope import Envelope
from gateway.errors import ConfigError
from policies.engine import evaluate
from policies.errors import (
    PolicyError,
    PolicyErrors,
    PolicyReferenceError,
    PolicySchemaError,
    PolicySyntaxError,
    UnreachableRuleError,
    UnsafeRegexError,
)
from policies.loader import catastrophic, check_policy, load_policy


def write(tmp: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def load_error(tmp: Path, text: str) -> PolicyError:
    path = write(tmp, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    err = info.value
    assert err.file == str(path)
    return err


def test_policy_error_is_a_config_error_with_location(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            then: [explode]
    """)
    assert isinstance(err, ConfigError)
    assert isinstance(err, PolicySchemaError)
    assert (err.line, err.column, err.key) == (4, 12, "rules.0.then.0")
    assert "unknown action 'explode'" in err.message
    assert str(err).startswith(f"{tmp_path / 'policy.yaml'}:4:12: [rules.0.then.0]")


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            then: [quarantine
    """)
    assert isinstance(err, PolicySyntaxError)
    assert err.line is not None and err.line >= 4
    assert "invalid YAML" in err.message


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            then: [quarantine]
            then: [discard]
    """)
    assert isinstance(err, PolicySyntaxError)
    assert "duplicate key 'then'" in err.message
    assert err.line == 5


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            when: {size: {gt: lots}}
            then: [quarantine]
    """)
    assert isinstance(err, PolicySchemaError)
    assert err.key == "rules.0.when.size.gt"
    assert "'lots' is not a size" in err.message
    assert err.line == 4


def test_stop_must_be_a_boolean(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            then: [quarantine]
            stop: "yes"
    """)
    assert err.key == "rules.0.stop"
    assert (err.line, err.column) == (5, 11)


def test_unknown_condition_and_unknown_rule_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            when: {sender.domian: x.example}
            then: [quarantine]
    """)
    assert "unknown condition 'sender.domian'" in err.message
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            actions: [quarantine]
    """)
    assert "did you mean then?" in err.message


def test_missing_version_and_unsupported_version(tmp_path: Path) -> None:
    assert "missing 'version: 1'" in load_error(tmp_path, "rules: []\n").message
    err = load_error(tmp_path, "version: 2\nrules: []\n")
    assert err.key == "version" and "unsupported policy version 2" in err.message


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(\w*\s?)*x", r"((ab)*c?)+", r"(x+x+)+y",
                                     r"(?:[a-z]+\.?)*@"])
def test_catastrophic_regex_is_refused_with_its_location(tmp_path: Path, pattern: str) -> None:
    err = load_error(tmp_path, f"""
        version: 1
        rules:
          - name: r
            when: {{subject: {{regex: '{pattern}'}}}}
            then: [quarantine]
    """)
    assert isinstance(err, UnsafeRegexError)
    assert err.key == "rules.0.when.subject.regex"
    assert "nested quantifiers" in err.message and "possessive" in err.message


@pytest.mark.parametrize("pattern", [r"^\d{3}-\d{2}$", r"(ab)+c", r"(?>a+)+b", r"(a++)+b",
                                     r"[a-z]+@[a-z]+\.com", r"(foo|bar){2,3}", r"\p{Lu}+"])
def test_ordinary_regexes_are_accepted(pattern: str) -> None:
    assert catastrophic(pattern) is None


def test_bad_regex_is_refused(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            when: {body: {regex: '(unclosed'}}
            then: [quarantine]
    """)
    assert isinstance(err, UnsafeRegexError)
    assert "bad regex" in err.message


def test_slow_regex_that_passes_vetting_is_stopped_by_the_timeout(tmp_path: Path) -> None:
    # Polynomial, not nested: vetting allows it, the match-time guard bounds it.
    path = write(tmp_path, r"""
        version: 1
        regex_timeout: 0.05
        rules:
          - name: slow
            when: {body: {regex: '\d+\d+\d+x$'}}
            then: [quarantine]
    """)
    policy = load_policy(path)
    body = b"Subject: t\r\n\r\n" + b"1" * 3000 + b"x!"
    d = evaluate(policy, Envelope("a@b.example", ["c@d.example"]), body)
    assert d.decision == "accept"
    assert d.rules[0].matched is False
    assert "timed out" in d.rules[0].why
    assert d.errors and "timed out" in d.errors[0]


def test_unknown_list_is_a_reference_error(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        lists:
          partners: [a.example]
        rules:
          - name: r
            when: {sender.domain: {in: partnres}}
            then: [quarantine]
    """)
    assert isinstance(err, PolicyReferenceError)
    assert "unknown list 'partnres' (known: partners)" in err.message
    assert err.key == "rules.0.when.sender.domain.in"


def test_unreachable_rule_after_unconditional_stop(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: catch-all
            then: [quarantine]
            stop: true
          - name: never
            then: [discard]
    """)
    assert isinstance(err, UnreachableRuleError)
    assert "rule 'never' is unreachable" in err.message
    assert err.line == 6


def test_conditional_or_audit_stop_leaves_later_rules_reachable(tmp_path: Path) -> None:
    path = write(tmp_path, """
        version: 1
        rules:
          - name: audit-stop
            mode: audit
            then: [quarantine]
            stop: true
          - name: conditional-stop
            when: {spf: fail}
            then: [quarantine]
            stop: true
          - name: last
            then: [{retain: 1y}]
    """)
    assert [r.name for r in load_policy(path).rules] == ["audit-stop", "conditional-stop", "last"]


def test_archive_exemption_needs_the_policy_flag(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            then: [{archive: false}]
    """)
    assert "allow_archive_exemption: true" in err.message


def test_reply_codes_are_validated(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            then: [{reject: {code: 450}}]
    """)
    assert err.key == "rules.0.then.0.reject.code" and "5xx" in err.message
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            then: [{tempfail: {enhanced: 5.7.1}}]
    """)
    assert "4.7.1" in err.message


def test_unknown_retention_class_and_bad_period(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        retention_classes: {records: 10y}
        rules:
          - name: r
            then: [{retain: recrods}]
    """)
    assert "unknown retention class 'recrods' (known: records)" in err.message
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            then: [{retain: {period: 7 years}}]
    """)
    assert "is not a retention period" in err.message


def test_duplicate_rule_names(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            then: [quarantine]
          - name: r
            then: [discard]
    """)
    assert "duplicate rule name 'r'" in err.message and err.line == 5


def test_check_policy_reports_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, """
        version: 1
        rules:
          - name: a
            then: [explode]
          - name: b
            when: {subject: {regex: '(a*)*'}}
            then: [quarantine]
          - name: c
            when: {sender: {in: nowhere}}
            then: [quarantine]
    """)
    problems = check_policy(path)
    assert [type(p) for p in problems] == [PolicySchemaError, UnsafeRegexError,
                                           PolicyReferenceError]
    assert [p.line for p in problems] == [4, 6, 9]
    with pytest.raises(PolicyErrors) as info:
        load_policy(path)
    assert len(info.value.errors) == 3 and "(and 2 more errors)" in info.value.message


def test_includes_and_list_files_resolve_beside_the_policy(tmp_path: Path) -> None:
    write(tmp_path, "# partner domains\npartner.example\n*.partner.example  # subsidiaries\n",
          "lists/partners.txt")
    write(tmp_path, "- secret\n- top secret\n", "lists/words.yaml")
    write(tmp_path, """
        version: 1
        lists:
          words: {file: ../lists/words.yaml}
        rules:
          - name: included-rule
            when: {body: {keywords: words}}
            then: [{add_header: {name: X-Secret, value: "yes"}}]
    """, "rules/secrets.yaml")
    path = write(tmp_path, """
        version: 1
        lists:
          partners: {file: lists/partners.txt}
        rules:
          - name: first
            when: {recipient.domain: {in: partners}}
            then: [{encrypt: {method: pgp}}]
          - include: rules/secrets.yaml
          - name: last
            then: [{retain: 1y}]
    """)
    policy = load_policy(path)
    assert [r.name for r in policy.rules] == ["first", "included-rule", "last"]
    assert policy.lists["partners"] == ("partner.example", "*.partner.example")
    assert len(policy.files) == 4 and len(policy.digest) == 64
    raw = b"Subject: x\r\n\r\nthis is TOP  secret\r\n"
    d = evaluate(policy, Envelope("a@example.com", ["b@eu.partner.example"]), raw)
    assert [a["action"] for a in d.actions] == ["encrypt", "add_header"]
    # The included rule's location is its own file.
    assert policy.rules[1].file.endswith("secrets.yaml") and policy.rules[1].line == 5


def test_include_errors_point_into_the_included_file(tmp_path: Path) -> None:
    inc = write(tmp_path, "version: 1\nrules:\n  - name: x\n    then: [nope]\n", "inc.yaml")
    path = write(tmp_path, "version: 1\nrules:\n  - include: inc.yaml\n")
    with pytest.raises(PolicySchemaError) as info:
        load_policy(path)
    assert info.value.file == str(inc) and info.value.line == 4


def test_include_cycle_and_escape_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "version: 1\nrules:\n  - include: policy.yaml\n", "b.yaml")
    path = write(tmp_path, "version: 1\nrules:\n  - include: b.yaml\n")
    cycle = r"include cycle: policy\.yaml -> b\.yaml -> policy\.yaml"
    with pytest.raises(PolicyReferenceError, match=cycle):
        load_policy(path)
    path = write(tmp_path, "version: 1\nrules:\n  - include: ../../etc/passwd\n")
    with pytest.raises(PolicyReferenceError, match="outside the policy's directory"):
        load_policy(path)
    path = write(tmp_path, "version: 1\nlists:\n  x: {file: missing.txt}\nrules: []\n")
    with pytest.raises(PolicyReferenceError, match="not found"):
        load_policy(path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyReferenceError, match="file not found"):
        load_policy(tmp_path / "absent.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"version: 1\nrules: []\n\xff\xfe")
    with pytest.raises(PolicySyntaxError, match="not UTF-8"):
        load_policy(tmp_path / "bin.yaml")


def test_a_policy_that_is_not_a_mapping(tmp_path: Path) -> None:
    err = load_error(tmp_path, "- just\n- a list\n")
    assert "must be a mapping" in err.message


def test_active_until_before_active_from(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            active_from: 2025-02-01
            active_until: 2025-01-01
            then: [quarantine]
    """)
    assert err.key == "rules.0.active_until"


@pytest.mark.parametrize(("condition", "fragment"), [
    ("{direction: sideways}", "direction must be one of"),
    ("{spf: passed}", "spf result must be one of"),
    ("{dkim: {result: pass, selector: x}}", "unknown key 'selector'"),
    ("{client_ip: 10.0.0.300/8}", "not an IP address or CIDR"),
    ("{time: {between: '9-5'}}", "HH:MM-HH:MM"),
    ("{time: {days: [funday]}}", "day must be one of"),
    ("{time: {between: '09:00-17:00', tz: Mars/Olympus}}", "unknown time zone"),
    ("{date: {from: yesterday}}", "must be a date"),
    ("{dlp: {detector: passport}}", "detector must be one of"),
    ("{dlp: {detector: credit_card, min_count: 0}}", "min_count"),
    ("{dlp: {detector: regex}}", "needs pattern"),
    ("{attachment: {colour: red}}", "unknown attachment property"),
    ("{header: {contains: x}}", "header takes"),
    ("{subject: {starts: x}}", "unknown match 'starts'"),
    ("{tls: maybe}", "tls must be true or false"),
    ("{any: []}", "non-empty list"),
    ("{spam.verdict: maybe}", "spam verdict must be one of"),
    ("[{spf: fail}, 3]", "a condition must be a mapping"),
])
def test_condition_mistakes_are_explained(tmp_path: Path, condition: str, fragment: str) -> None:
    err = load_error(tmp_path, f"""
        version: 1
        rules:
          - name: r
            when: {condition}
            then: [quarantine]
    """)
    assert fragment in err.message
    assert err.line == 4


@pytest.mark.parametrize(("action", "fragment"), [
    ("{encrypt: {method: rot13}}", "pgp, smime or auto"),
    ("{encrypt: {require: sometimes}}", "true or false"),
    ("{redirect: not-an-address}", "needs an email address"),
    ("{add_header: {name: 'Bad Name', value: x}}", "not a header field name"),
    ("{add_header: {name: X-A, value: \"two\\nlines\"}}", "one line"),
    ("{hold: {}}", "needs 'case'"),
    ("{retain: [7y]}", "retain takes a period"),
    ("{reject: {text: \"caf\\u00e9\"}}", "ASCII"),
    ("{quarantine: {why: x}}", "unknown key 'why'"),
    ("{accept: now}", "takes no arguments"),
    ("{archive: true}", "only takes false"),
    ("{a: 1, b: 2}", "one-key mapping"),
])
def test_action_mistakes_are_explained(tmp_path: Path, action: str, fragment: str) -> None:
    err = load_error(tmp_path, f"""
        version: 1
        rules:
          - name: r
            then: [{action}]
    """)
    assert fragment in err.message
    assert err.line == 4


def test_on_error_defer_turns_an_unevaluable_rule_into_a_tempfail(tmp_path: Path) -> None:
    path = write(tmp_path, r"""
        version: 1
        regex_timeout: 0.05
        rules:
          - name: allow
            when: {subject: {contains: ok}}
            then: [accept]
          - name: secrets
            on_error: defer
            when: {body: {regex: '\d+\d+\d+x$'}}
            then: [quarantine]
          - name: keep
            then: [{retain: 1y}]
    """)
    policy = load_policy(path)
    body = b"Subject: ok\r\n\r\n" + b"1" * 3000 + b"x!"
    d = evaluate(policy, Envelope("a@b.example", ["c@d.example"]), body)
    assert d.decision == "tempfail" and d.decided_by == "secrets"
    assert d.reply is not None and str(d.reply).startswith("451 4.7.0")
    assert "deferred (on_error: defer)" in d.rules[1].summary
    assert "overrides accept by 'allow'" in d.rules[1].summary
    assert d.retention is not None  # later rules still ran
    err = load_error(tmp_path, """
        version: 1
        rules:
          - name: r
            on_error: panic
            then: [quarantine]
    """)
    assert err.key == "rules.0.on_error"
