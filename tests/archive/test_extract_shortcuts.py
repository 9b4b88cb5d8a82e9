"""extract()'s shortcuts change no result: a differential test against the long way.

The shortcuts: field values read from the shared tree's index (gateway.mailparse
IndexedMessage) instead of a scan of every field; an ASCII Subject without
encoded-words taken as it is instead of through the default policy's parse; absent
address fields skipped before their lookups; the surrogate search skipped for ASCII
text.  The long way is a plain stdlib tree (no
index) with the Subject shortcut switched off.
"""

from __future__ import annotations

import email
import email.message
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from archive_db import corpus_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import archive.extract as ex
from gateway import mailparse


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    mailparse.clear()
    ex._parsed_header.cache_clear()
    yield
    mailparse.clear()


def _plain_tree(raw: bytes, policy: Any) -> email.message.Message:
    return email.message_from_bytes(raw, policy=policy)


def the_long_way(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> ex.Extracted:
    with monkeypatch.context() as m:
        m.setattr(ex, "_UNSTRUCTURED", frozenset())
        m.setattr(mailparse, "parse_as", _plain_tree)
        return ex.extract(raw)


def assert_same(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = the_long_way(raw, monkeypatch)
    got = ex.extract(raw)
    assert got == expected


def corpus() -> list[bytes]:
    root: Path = corpus_dir()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size < 1 << 20)
    spam = root.parent / "spam-ham" / "spamassassin-regression"
    files += sorted(p for p in spam.rglob("*") if p.is_file())
    return [p.read_bytes() for p in files]


def test_extract_equals_the_long_way_on_the_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    messages = corpus()
    assert len(messages) > 100
    for raw in messages:
        assert_same(raw, monkeypatch)


def test_the_long_way_is_what_it_says(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reference really takes the parse: a Subject parsed by the default policy.
    calls: list[str] = []
    real = ex._fetch

    def counting(name: str, value: str) -> object:
        calls.append(name)
        return real(name, value)

    monkeypatch.setattr(ex, "_fetch", counting)
    raw = b"Subject: plain words\r\n\r\nbody\r\n"
    the_long_way(raw, monkeypatch)
    assert "Subject" in calls
    calls.clear()
    assert ex.extract(raw).subject == "plain words"
    assert "Subject" not in calls


_SUBJECT = st.lists(st.sampled_from(
    [*" \t\x0b\x0c\x1f\x7fab=?Q_-:;<>\"()\\,.", "=?utf-8?q?caf=C3=A9?=", "\r\n ", "\xe9",
     "=?x?", "\x00"]),
    max_size=30).map("".join)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.function_scoped_fixture])
@given(subject=_SUBJECT, twice=st.booleans())
def test_subjects_equal_the_long_way(subject: str, twice: bool,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    head = "Subject: " + subject + "\r\n" + ("Subject: second\r\n" if twice else "")
    raw = (head + "From: a@b.example\r\n\r\nbody\r\n").encode("utf-8", "surrogateescape")
    assert_same(raw, monkeypatch)
    raw8 = (head + "\r\nbody\r\n").encode("latin-1", "replace")
    assert_same(raw8, monkeypatch)


_NAMES = st.sampled_from(["J\u00f6rg", "Plain", "=?utf-8?q?M=C3=BCller?=", "\u00e9t\u00e9 \"x\"",
                          ""])
_FIELDS = st.sampled_from(["From", "To", "cc", "REPLY-TO", "Sender", "bcc", "Subject"])


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.function_scoped_fixture])
@given(fields=st.lists(st.tuples(_FIELDS, _NAMES), min_size=1, max_size=6))
def test_repeated_address_fields_with_8bit_names_equal_the_long_way(
        fields: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    head = "".join(f"{f}: {n} <u{i}@b.example>\r\n" for i, (f, n) in enumerate(fields))
    assert_same((head + "\r\nbody\r\n").encode(), monkeypatch)
