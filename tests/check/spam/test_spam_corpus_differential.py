"""The scorer gives every corpus message the verdict recorded before its speed-ups.

The reference (cases/corpus-verdicts.json.gz, see corpusverdicts.py) was recorded
with the implementation before the single-pass header index, the fast MIME header
reads and the other CPU savings: same parse, same symbols and weights, same details,
same classifier probability, on 5,468 real messages (ham, spam, odd and broken MIME).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import corpusverdicts
import pytest


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    scorer = corpusverdicts.trained_scorer(corpus, tmp_path_factory.mktemp("bayes") / "b.sqlite")
    yield scorer
    scorer.close()


def test_every_corpus_message_gets_its_recorded_verdict(corpus: Path, trained: Any) -> None:
    expected = corpusverdicts.load()
    got = {name: corpusverdicts.verdict_of(trained, path.read_bytes())
           for name, path in corpusverdicts.corpus_files(corpus)}
    assert got.keys() == expected.keys()
    differ = [name for name in expected if got[name] != expected[name]]
    assert not differ, (f"{len(differ)} differ, e.g. {differ[0]}: "
                        f"{got[differ[0]]} != {expected[differ[0]]}")
