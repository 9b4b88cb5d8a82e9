"""The heuristics' fast paths give what the plain code gives.

url_host and is_ip_literal keep their answers per string, and the all-caps subject
rule counts ASCII letters with bytes.translate.  Each is held here to the plain
computation on generated input and on every link and subject of the corpus; the
corpus differential test (test_spam_corpus_differential.py) holds the whole scorer
to its recorded verdicts.
"""

from __future__ import annotations

from pathlib import Path

import corpusverdicts
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.check.spam import heuristics
from gateway.check.spam.message import parse


def _all_caps_before(subject: str) -> bool:
    """The SUBJ_ALL_CAPS test as it was."""
    letters = "".join(filter(str.isalpha, subject))
    return len(letters) >= 10 and sum(map(str.isupper, letters)) >= 0.9 * len(letters)


@settings(max_examples=1000, deadline=None)
@given(subject=st.text(alphabet=st.sampled_from("AZaz09 !-@[`{~\t\x7f\u00c9\u00e9\u2167\u01c5"),
                       max_size=30))
def test_all_caps_is_the_letter_count_as_before(subject: str) -> None:
    assert heuristics._all_caps(subject) == _all_caps_before(subject)


def test_all_caps_on_every_ascii_character() -> None:
    for c in map(chr, range(128)):
        for subject in (c * 12, "ABCDEFGHIJ" + c, "ABCDEFGHIJ" + c * 2, "ABCDEFGHI" + c,
                        "ABCDEFGHI" + c * 2, "abcdefghij" + c, "ABCDEFGHIJKLMNOPQRs" + c):
            assert heuristics._all_caps(subject) == _all_caps_before(subject), repr(subject)


@settings(max_examples=500, deadline=None)
@given(url=st.text(alphabet=st.sampled_from("hHtps:/w.@[]0x7f1:8a-"), max_size=40))
def test_cached_url_facts_are_the_computed_ones(url: str) -> None:
    assert heuristics.url_host(url) == heuristics._url_host(url)
    assert heuristics.url_host(url) == heuristics._url_host(url)  # a second time: cached
    host = heuristics._url_host(url)[0]
    assert heuristics.is_ip_literal(host) == heuristics._is_ip_literal(host)
    assert heuristics.is_ip_literal(url) == heuristics._is_ip_literal(url)


def test_cached_url_facts_of_corpus_links_are_the_computed_ones(corpus: Path) -> None:
    heuristics._url_host_cached.cache_clear()
    heuristics._is_ip_literal_cached.cache_clear()
    seen = 0
    for _, path in list(corpusverdicts.corpus_files(corpus))[::3]:
        pm = parse(path.read_bytes())
        subject = pm.get("subject") or ""
        assert heuristics._all_caps(subject) == _all_caps_before(subject), path
        for url in [href for href, _ in pm.links] + pm.urls:
            for _ in range(2):  # computed, then from the cache
                got = heuristics.url_host(url)
                assert got == heuristics._url_host(url), url
                assert heuristics.is_ip_literal(got[0]) == heuristics._is_ip_literal(got[0])
            seen += 1
    assert seen > 1000
    assert heuristics._url_host_cached.cache_info().hits > 0


def test_long_strings_are_not_kept() -> None:
    heuristics._url_host_cached.cache_clear()
    url = "http://example.com/" + "a" * heuristics._CACHED_LEN
    assert heuristics.url_host(url) == ("example.com", False, None)
    assert heuristics._url_host_cached.cache_info().currsize == 0
