"""docs/policy.md documents every condition and action the loader accepts."""

from __future__ import annotations

from pathlib import Path

from policies.actions import ACTION_KINDS
from policies.conditions import DETECTORS, DIRECTIONS, SCOPES
from policies.schema import ATTACHMENT_PROPERTIES, CONDITION_KEYS, RULE_KEYS, TOP_KEYS

DOC = Path(__file__).resolve().parents[2] / "docs" / "policy.md"


def test_every_condition_action_and_key_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    names = [*CONDITION_KEYS, *ACTION_KINDS, *RULE_KEYS, *TOP_KEYS, *DETECTORS, *DIRECTIONS,
             *SCOPES, *ATTACHMENT_PROPERTIES]
    missing = [n for n in names if f"`{n}`" not in text]
    assert missing == [], f"not documented in docs/policy.md: {missing}"
