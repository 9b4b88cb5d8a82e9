"""The scorer never raises on real-world malformed mail, and learns 8-bit headers."""

from __future__ import annotations

from pathlib import Path

import pytest
from spamkit import message

from gateway.check.spam.bayes import TokenStore
from gateway.check.spam.message import parse
from gateway.check.spam.scorer import Scorer


def test_every_corpus_message_is_scored_without_an_exception(corpus: Path) -> None:
    files = [p for p in sorted((corpus / "mime").rglob("*")) if p.is_file()]
    if not files:
        pytest.skip("mime corpus not found")
    scorer = Scorer()
    for path in files:
        v = scorer.score(path.read_bytes())
        assert v.verdict in ("spam", "ham"), path


def test_mime_nested_beyond_the_parsers_recursion_is_scored_as_a_defect() -> None:
    depth = 2000
    opening = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'
                      for i in range(depth))
    data = ("From: a@example.com\r\nSubject: deep\r\nMIME-Version: 1.0\r\n" + opening
            + "Content-Type: text/plain\r\n\r\nbuy cheap pills\r\n").encode()
    pm = parse(data)
    assert pm.multipart_defects >= 1 and "cheap pills" in pm.text


def test_raw_8bit_header_bytes_are_learned_and_scored(tmp_path: Path) -> None:
    data = message(headers={"Subject": "Gr\xfc\xdfe"}).replace(
        "Gr\xfc\xdfe".encode(), b"Gr\xfc\xdfe")  # latin-1 bytes, not RFC 2047
    scorer = Scorer(store=TokenStore(tmp_path / "b.sqlite"))
    assert scorer.learn([(data, True)]) == 1
    assert "RAW_8BIT_HEADER" in scorer.score(data).symbols
    scorer.close()
