"""A keyword list's scan that tries only where a keyword's first word occurs
(conditions.KeywordPattern) finds what the scan of every position (SafePattern, as
before) finds: the same matches in the same order, the same yes or no, on texts built
to hit its edges (keywords that are prefixes of others, overlaps, case, word
boundaries, punctuation, runs of white space, non-ASCII text and lists, crowded text).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from policies import conditions as c
from policies.schema import ParseContext, _keyword_pattern

LISTS: list[list[str]] = [
    ["medical record", "medical record number", "record", "patient", "PHI", "date of birth",
     "lab results", "HIV"],
    ["the", "secret", "invoice", "please find", "the secret"],
    ["C++", ".net", "e-mail", "a", "ab", "abc", "b c", "_x_", "x"],
    ["Größe", "straße", "café au lait", "ﬁle", "KELVIN"],  # non-ASCII: the full scan
    ["Kelvin", "stop", "K"],  # ASCII list meeting U+212A and U+017F in the text
    ["\u00b2x", "\u00e9t\u00e9", "\u0301a"],  # \b before a non-\w alphanumeric, a mark
]
PIECES = ["medical", "Medical", "MEDICAL", "record", "Record", "number", "records", "patient",
          "patients", "PHI", "phi", "graphic", "date", "of", "birth", "update", "lab", "results",
          "the", "The", "then", "secret", "invoice", "please", "find", "C++", "c++", ".net",
          "dotnet", "e-mail", "email", "a", "ab", "abc", "b", "c", "_x_", "x", "Größe", "GRÖSSE",
          "strasse", "straße", "café", "au", "lait", "ﬁle", "file", "\u212aelvin", "Kelvin",
          "\u017ftop", "stop", "K", "1", "HIV", "hiv2", "x_", "\u00b2x", "a\u00b2x",
          "\u00e9t\u00e9", "d\u00e9t\u00e9", "\u0301a", "e\u0301a", "up", "update"]
SEPARATORS = [" ", "  ", "\n", "\r\n ", "\t", "-", ".", ",", "", "/", "_", "\u00a0", "\x1c"]


def _ctx() -> ParseContext:
    return ParseContext(loc=None, lists={}, retention_classes={},  # type: ignore[arg-type]
                        allow_archive_exemption=False, compile_regex=None,  # type: ignore[arg-type]
                        regex_timeout=5.0)


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) + rng.choice(SEPARATORS) for _ in range(n))


def _full(p: c.SafePattern) -> c.SafePattern:
    return c.SafePattern(p.source, p.compiled, p.timeout)


@pytest.mark.parametrize("case_sensitive", [False, True])
@pytest.mark.parametrize("words", LISTS)
def test_the_keyword_scan_finds_what_the_full_scan_finds(words: Sequence[str],
                                                         case_sensitive: bool) -> None:
    pattern = _keyword_pattern(words, _ctx(), case_sensitive)
    assert isinstance(pattern, c.KeywordPattern)
    full = _full(pattern)
    rng = random.Random(hash((tuple(words), case_sensitive)) & 0xFFFF)
    texts = [_text(rng, rng.randrange(0, 40)) for _ in range(400)]
    texts += [_text(rng, 3000), "", "a" * 5000, "ab " * 2000]  # crowded: the fallback
    hits = 0
    for text in texts:
        want = full.matches(text)
        assert pattern.matches(text) == want, text
        assert pattern.search(text) == bool(want), text
        hits += bool(want)
    assert hits > 50  # not a comparison of empty results


def test_an_ascii_list_is_matched_case_insensitively_only_through_the_fast_path() -> None:
    pattern = _keyword_pattern(["Medical Record"], _ctx(), False)
    assert isinstance(pattern, c.KeywordPattern)
    assert pattern.firsts == ("medical",)
    assert pattern._starts("see MEDICAL  record") == [4]
    assert pattern._starts("see M\u00e9dical record") is None  # non-ASCII text: full scan
    assert _keyword_pattern(["Größe"], _ctx(), False).firsts == ()  # type: ignore[union-attr]
