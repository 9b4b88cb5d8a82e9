"""Verdict.header keeps folded X-Spam-Status values by (first line, test names); it
gives what folding each time gave (the code as it was, below)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.check.spam import scorer
from gateway.check.spam.scorer import Verdict
from gateway.check.spam.symbols import SYMBOLS, Thresholds


def _header_before(v: Verdict, thresholds: Thresholds) -> str:
    yes = "Yes" if v.verdict == "spam" else "No"
    line = f"{yes}, score={v.score:.1f} required={thresholds.quarantine:.1f} tests="
    lines, names = [line], sorted(v.symbols) or ["none"]
    for i, name in enumerate(names):
        piece = name + ("," if i < len(names) - 1 else "")
        if len(lines[-1]) + len(piece) > 72 and not lines[-1].endswith("="):
            lines.append("\t" + piece)
        else:
            lines[-1] += piece
    return "\r\n".join(lines)


_NAMES = [*SYMBOLS, "DNSBL_" + "X" * 70, "A"]


@settings(max_examples=400, deadline=None)
@given(names=st.lists(st.sampled_from(_NAMES), max_size=12, unique=True),
       score=st.floats(-1000, 1000), spam=st.booleans(),
       quarantine=st.sampled_from([6.0, 5.0, 100.25]))
def test_header_is_folded_as_before(names: list[str], score: float, spam: bool,
                                    quarantine: float) -> None:
    v = Verdict(score, "spam" if spam else "ham", "quarantine" if spam else "no action",
                dict.fromkeys(names, 1.0), {}, None)
    thresholds = Thresholds(quarantine, 15.0)
    for _ in range(2):  # folded, then from the memo
        assert v.header(thresholds) == _header_before(v, thresholds)


def test_the_memo_is_bounded() -> None:
    scorer._HEADERS.clear()
    for i in range(scorer._HEADERS.limit + 10):
        Verdict(i / 10, "ham", "no action", {}, {}, None).header(Thresholds())
    assert len(scorer._HEADERS) <= scorer._HEADERS.limit
