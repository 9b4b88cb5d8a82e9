"""Data-file cases for the heuristics: cases/*.yaml (message in, symbols out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from spamkit import NOW, message

from gateway.check.spam import heuristics
from gateway.check.spam.message import parse
from gateway.check.spam.symbols import SYMBOLS, Scan

CASES = Path(__file__).parent / "cases"


def _cases() -> list[Any]:
    out = []
    for path in sorted(CASES.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text(encoding="utf-8")):
            out.append(pytest.param(case, id=f"{path.stem}: {case['name']}"))
    return out


@pytest.mark.parametrize("case", _cases())
def test_heuristic_case(case: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {"headers": case.get("headers") or {},
                              "drop": tuple(case.get("drop") or ())}
    if "body" in case:
        kwargs["body"] = case["body"]
    if "content_type" in case:
        kwargs["content_type"] = case["content_type"]
    scan = Scan()
    heuristics.evaluate(parse(message(**kwargs)), scan, now=NOW)
    for name in case.get("expect") or []:
        assert name in SYMBOLS, f"{name} is not a known symbol"
        assert name in scan.symbols, f"{name} did not fire: {scan.symbols}"
    for name in case.get("absent") or []:
        assert name not in scan.symbols, f"{name} fired: {scan.details.get(name)}"
    if case.get("absent_all"):
        assert scan.symbols == {}
    if "score_below" in case:
        assert scan.score < case["score_below"]
