"""Golden-file policy cases, in the spirit of Postfix's smtpd_check.ref.

Each file in tests/policies/cases/ holds a policy (inline, or ``policy_file:``
naming a shipped rule set), the local domains, and a list of cases: a message
written inline, its envelope and facts, and the expected decision, actions,
retention, holds and the trace of every rule ("HIT  name: why" /
"miss name: why").  A key left out of ``expect`` is not checked.

To write a new case, put ``trace: TODO`` under its ``expect`` and run
``.venv/bin/python tests/policies/test_policy_cases.py CASEFILE``: it fills in
the engine's trace for every TODO; review the diff before committing, since the
golden trace is only as good as that review.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.envelope import Envelope, TlsInfo
from policies.engine import Decision, evaluate
from policies.loader import load_policy
from policies.schema import Policy

CASES = Path(__file__).parent / "cases"
REPO = Path(__file__).resolve().parents[2]


def _files() -> list[Path]:
    return sorted(CASES.glob("*.yaml"))


def _load_cases() -> list[Any]:
    params = []
    for file in _files():
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
        for i, case in enumerate(doc["cases"]):
            params.append(pytest.param(file, i, id=f"{file.stem}:{case['name']}"))
    return params


_policies: dict[tuple[Path, str], Policy] = {}


def _policy(file: Path, doc: dict[str, Any], tmp: Path) -> Policy:
    if "policy_file" in doc:
        return load_policy(REPO / doc["policy_file"])
    key = (file, doc["policy"])
    if key not in _policies:
        path = tmp / f"{file.stem}.yaml"
        path.write_text(doc["policy"], encoding="utf-8")
        for name, text in (doc.get("files") or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text, encoding="utf-8")
        _policies[key] = load_policy(path)
    return _policies[key]


def _envelope(spec: dict[str, Any], at: datetime) -> Envelope:
    to = spec.get("to", ["user@example.com"])
    return Envelope(
        mail_from=spec.get("from", "someone@outside.example"),
        rcpt_to=to if isinstance(to, list) else [to],
        client_ip=spec.get("ip", "203.0.113.10"),
        tls=TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384") if spec.get("tls") else None,
        auth_user=spec.get("auth_user"),
        received_at=at.timestamp(),
    )


def _trace(d: Decision) -> list[str]:
    return [f"{'HIT ' if r.matched else 'miss'} {r.name}: {r.summary}" for r in d.rules]


def _message(case: dict[str, Any]) -> bytes:
    text = str(case.get("message", "From: a@outside.example\nSubject: test\n\nhello\n"))
    return text.replace("\n", "\r\n").encode("utf-8")


def _run(policy: Policy, doc: dict[str, Any], case: dict[str, Any]) -> Decision:
    at = case.get("at", doc.get("at", datetime(2025, 3, 5, 10, 30, tzinfo=UTC)))
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    env = _envelope(case.get("envelope") or {}, at)
    return evaluate(
        policy, env, _message(case), case.get("facts") or {},
        local_domains=doc.get("local_domains", ["example.com"]),
        direction=case.get("direction"), now=at,
    )


@pytest.mark.parametrize(("file", "index"), _load_cases())
def test_policy_case(file: Path, index: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    doc = yaml.safe_load(file.read_text(encoding="utf-8"))
    case = doc["cases"][index]
    policy = _policy(file, doc, tmp_path_factory.mktemp("policy"))
    decision = _run(policy, doc, case)
    expect = case["expect"]
    got = decision.to_json()
    assert decision.errors == expect.get("errors", []), decision.errors
    assert got["decision"] == expect["decision"]
    for key in ("actions", "retention", "holds"):
        if key in expect:
            assert got[key] == expect[key], key
    if "reply" in expect:
        assert decision.reply is not None
        assert str(decision.reply) == expect["reply"]
    if "archive" in expect:
        assert decision.archive == expect["archive"]
    if "immutable" in expect:
        assert decision.retention is not None
        assert decision.retention.immutable == expect["immutable"]
    if "direction" in expect:
        assert decision.direction == expect["direction"]
    if "headers" in expect:
        assert [list(h) for h in decision.headers] == expect["headers"]
    if "trace" in expect:
        assert _trace(decision) == expect["trace"]


def test_every_case_file_has_cases_and_a_policy() -> None:
    files = _files()
    assert len(files) >= 7
    for file in files:
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
        assert ("policy" in doc) != ("policy_file" in doc), file
        assert doc["cases"], file


def _keys(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(str(k))
            _keys(v, out)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, str):
                out.add(v)  # bare-word actions such as quarantine
            _keys(v, out)


def test_the_cases_cover_every_condition_match_and_action() -> None:
    from policies.actions import ACTION_KINDS
    from policies.schema import ATTACHMENT_PROPERTIES, CONDITION_KEYS

    used: set[str] = set()
    for file in _files():
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
        text = doc["policy"] if "policy" in doc else (REPO / doc["policy_file"]).read_text()
        _keys(yaml.safe_load(text), used)
    wanted = {k for k in CONDITION_KEYS if "<" not in k} | set(ACTION_KINDS)
    wanted |= set(ATTACHMENT_PROPERTIES) | {"equals", "contains", "in", "glob", "regex",
                                            "keywords", "case_sensitive", "not"}
    dotted = {k for k in used if k.startswith(("header.", "attachment."))}
    assert dotted, "the header.<Name> and attachment.<property> shorthands are used"
    missing = sorted(wanted - used)
    assert missing == [], f"no golden case uses: {missing}"


def _fill_todo_traces(file: Path) -> int:
    """Replace each ``trace: TODO`` in ``file`` with the engine's trace; the count filled."""
    import json
    import re
    import tempfile

    doc = yaml.safe_load(file.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        policy = _policy(file, doc, Path(tmp))
        todo = [_trace(_run(policy, doc, case)) for case in doc["cases"]
                if case["expect"].get("trace") == "TODO"]
    filled = len(todo)

    def replace(m: re.Match[str]) -> str:
        indent, lines = m.group(1), todo.pop(0)
        return indent + "trace:\n" + "".join(
            f"{indent}  - {json.dumps(line, ensure_ascii=False)}\n" for line in lines)

    text = re.sub(r"^( *)trace: TODO\n", replace, file.read_text(encoding="utf-8"), flags=re.M)
    file.write_text(text, encoding="utf-8")
    return filled


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(REPO))
    for name in sys.argv[1:]:
        print(f"{name}: {_fill_todo_traces(Path(name))} traces filled")
