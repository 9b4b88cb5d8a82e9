"""Property test: any YAML document loads as a policy or fails with a located PolicyError."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.errors import PolicyError
from policies.loader import load_policy

WORDS = ["version", "rules", "name", "when", "then", "unless", "stop", "mode", "lists",
         "retention_classes", "include", "sender", "recipient.domain", "header", "subject",
         "attachment", "dlp", "detector", "min_count", "time", "between", "days", "retain",
         "hold", "reject", "code", "quarantine", "encrypt", "method", "in", "regex", "glob",
         "any", "all", "not", "size", "gt", "spf", "dkim", "dmarc", "client_ip", "period",
         "active_from", "active_until", "archive", "file", "x", "1", "audit", "enforce"]

scalars = (st.none() | st.booleans() | st.integers(-5, 1000) | st.floats(allow_nan=False)
           | st.sampled_from(WORDS) | st.text(max_size=10))
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(WORDS) | st.integers(0, 3), inner, max_size=4),
    max_leaves=25,
)


def _as_policy(doc: Any) -> Any:
    # Bias towards the right outline so the fuzzing reaches rules and conditions.
    if isinstance(doc, dict):
        return {"version": 1, "rules": [doc, {"name": "r", "then": [doc]}]}
    return doc


@settings(max_examples=200, deadline=None)
@given(doc=documents, wrap=st.booleans())
def test_any_document_is_a_policy_or_a_located_error(doc: Any, wrap: bool) -> None:
    text = yaml.safe_dump(_as_policy(doc) if wrap else doc, allow_unicode=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_policy(path)
        except PolicyError as exc:
            assert exc.file == str(path) or (exc.file or "").startswith(tmp)
            assert exc.message


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_is_a_policy_or_a_located_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_policy(path)
        except PolicyError as exc:
            assert exc.message
