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
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.check.spam.stage import _OUR_FIELDS, strip_spam_fields


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


def _strip_before(data: bytes) -> tuple[bytes, int]:
    """strip_spam_fields as it was: the pattern over every header section."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    if end < 0:
        return data, 0
    head, n = _OUR_FIELDS.subn(b"", data[: end + 2])
    return (head + data[end + 2:], n) if n else (data, 0)


def test_spam_fields_are_stripped_from_corpus_messages_as_before(corpus: Path) -> None:
    tagged = 0
    for _, path in corpusverdicts.corpus_files(corpus):
        data = path.read_bytes()
        assert strip_spam_fields(data) == _strip_before(data), path
        tagged += strip_spam_fields(data)[1] > 0
    assert tagged >= 10  # some corpus messages carry X-Spam fields (SpamAssassin's)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.sampled_from([b"X-Spam-Status: Yes", b"x-spam-flag: YES",
                                        b"X-SPAM-Level: **", b"X-Spam-Other: 1",
                                        b"Subject: x-spam-status", b"\tfolded", b"To: a@b", b"",
                                        b"X-Spam-Score:"]), max_size=6),
       eol=st.sampled_from([b"\r\n", b"\n"]))
def test_spam_fields_are_stripped_as_before(lines: list[bytes], eol: bytes) -> None:
    data = eol.join(lines) + eol + eol + b"X-Spam-Flag: body" + eol
    assert strip_spam_fields(data) == _strip_before(data)
