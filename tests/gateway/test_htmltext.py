"""The one HTML-to-text converter (gateway.htmltext): what is text, what is hidden,
links and images, and linear cost on hostile markup.  Pure logic, no I/O."""

from __future__ import annotations

import gc
import html.parser
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway import htmltext
from gateway.htmltext import MAX_LINKS, HtmlText, html_to_text, visible_text

# -- what is hidden -------------------------------------------------------------------


@pytest.mark.parametrize("element", ["script", "style", "title", "template"])
def test_the_content_of_hidden_elements_is_not_text(element: str) -> None:
    markup = f"<p>before</p><{element} id=x>secret <b>words</b></{element}><p>after</p>"
    assert visible_text(markup) == "before\n\nafter"
    assert "secret" not in html_to_text(markup).text


def test_script_and_style_are_raw_text_up_to_their_own_end_tag() -> None:
    # "</a>", "-->" or "</style>" inside a script do not end it; "</SCRIPT >" does.
    markup = ('<script>if (a</b) document.write("<a href=x>--></style>");</SCRIPT >shown'
              "<style>p:after{content:'</p>'}</style>also")
    result = html_to_text(markup)
    assert result.text.split() == ["shown", "also"] and result.links == []


def test_an_unclosed_script_hides_the_rest_of_the_document() -> None:
    assert html_to_text("text<script>var x = '<p>not text</p>';").text == "text"


def test_nested_templates_are_hidden_until_the_outer_one_closes() -> None:
    markup = "a<template>b<template>c</template>d<a href=x>e</a><img></template>f"
    result = html_to_text(markup)
    assert result.text.split() == ["a", "f"]  # the words on either side stay apart
    assert (result.links, result.images) == ([], 0)


def test_noscript_content_is_shown_as_a_mail_reader_shows_it() -> None:
    # Mail readers run no scripts: what noscript holds is what the reader sees.
    result = html_to_text('<noscript><a href="http://ad.example/">ad</a><img></noscript>')
    assert result.links == [("http://ad.example/", "ad")] and result.images == 1


def test_head_hides_its_title_and_style_but_not_the_body_of_an_unclosed_head() -> None:
    # An unclosed <head> used to hide the whole body from the index and the policies.
    assert visible_text("<html><head><title>T</title><style>p{}</style>"
                        "<body><p>Hello</p></body></html>") == "Hello"
    assert visible_text("<head><meta charset=utf-8><p>body text") == "body text"


def test_comments_of_every_form_are_hidden() -> None:
    markup = ("a<!-- one -->b<!---->c<!-->d<!--->e<!-- two --!>f<!-- <p>x</p> -- -->g"
              "<!DOCTYPE html>h<![CDATA[ cdata ]]>i<?xml version='1.0'?>j</ bogus>k</>l")
    assert html_to_text(markup).text == "abcdefghijkl"


def test_an_unclosed_comment_hides_the_rest() -> None:
    assert html_to_text("shown<!-- <p>hidden</p>").text == "shown"


def test_a_tag_left_open_at_the_end_hides_the_rest() -> None:
    # eof-in-tag (HTML §13.2.5): the unfinished tag is dropped, as a browser drops it.
    assert html_to_text("shown<a href=x").text == "shown"
    assert html_to_text('shown<a title="x>still the title<p>and this').text == "shown"


# -- text -----------------------------------------------------------------------------


def test_block_tags_break_lines_and_other_tags_separate_words() -> None:
    result = html_to_text("<div>one<b>two</b>three</div><p>four<br>five</p>")
    assert result.text == "\none two three\n\nfour\nfive\n"
    assert visible_text("<div>one<b>two</b>three</div><p>four<br>five</p>") == (
        "one two three\n\nfour\nfive")


def test_entities_are_decoded_in_text_anchor_text_and_href() -> None:
    result = html_to_text('&lt;b&gt; &amp;&nbsp;&#233;&#x263A; &copy<a href="/a?x=1&amp;y=2">'
                          "Fish &amp; Chips</a>")
    assert result.text.startswith("<b> &\xa0\u00e9\u263a \u00a9")
    assert result.links == [("/a?x=1&y=2", "Fish & Chips")]


def test_a_less_than_sign_that_opens_no_tag_is_text() -> None:
    # HTML §13.2.5.6: "<" not before a letter, "/", "!" or "?" is a character.
    assert visible_text("a < b and 3<4, OPPO<>RTUNITY, x< y>z") == (
        "a < b and 3<4, OPPO<>RTUNITY, x< y>z")
    assert html_to_text("<" * 1000).text == "<" * 1000


def test_a_greater_than_sign_inside_a_quoted_attribute_does_not_end_the_tag() -> None:
    result = html_to_text("""<img alt="a > b" src=x><a title='>' href="h">go</a>""")
    assert result.text.split() == ["go"] and result.images == 1
    assert result.links == [("h", "go")]


def test_a_quote_inside_a_bare_attribute_value_is_a_character() -> None:
    assert html_to_text('<font color=red">word</font>').text.split() == ["word"]


def test_normalised_text_collapses_white_space_as_a_browser_does() -> None:
    markup = "\n  <p>  Hello\n\t world  </p>\n\n<p></p><p></p>\n<div> next&nbsp;&nbsp;line </div>  "
    assert visible_text(markup) == "Hello world\n\nnext line"


def test_text_keeps_its_own_white_space_unnormalised() -> None:
    assert html_to_text("<p>Hello\n  world</p>").text == "\nHello\n  world\n"


# -- links and images -----------------------------------------------------------------


def test_links_and_images_are_read_in_the_same_pass_as_the_text() -> None:
    result = html_to_text(
        '<p>Hi <a href="http://x.example/a?b=1&amp;c=2">click <b>here</b></a>'
        '<script>var s = "<a href=evil>";</script><!-- <a href=hidden> -->'
        "<img src=y>bye &amp; thanks<a href='http://unclosed.example/'>tail")
    assert result.links == [("http://x.example/a?b=1&c=2", "click here"),
                            ("http://unclosed.example/", "tail")]
    assert result.images == 1
    assert "bye & thanks" in result.text
    assert "var s" not in result.text and "hidden" not in result.text


def test_an_anchor_is_closed_by_the_next_anchor() -> None:
    result = html_to_text("<a href=one>first<a href=two>second</a>after")
    assert result.links == [("one", "first"), ("two", "second")]


def test_the_first_href_counts_and_other_attributes_ending_in_href_do_not() -> None:
    result = html_to_text('<a data-href="wrong" title="href=wrong" HREF = "right" href=x>t</a>')
    assert result.links == [("right", "t")]


def test_an_anchor_without_href_is_no_link_and_an_empty_href_is_one() -> None:
    assert html_to_text("<a name=top>x</a><a href>y</a>").links == [("", "y")]


def test_links_and_anchor_text_are_bounded() -> None:
    result = html_to_text("<a href=x>" + "word " * 1000 + "</a>" + "<a href=y>z</a>" * 500)
    assert len(result.links) == MAX_LINKS
    assert len(result.links[0][1]) == htmltext.MAX_ANCHOR - 1  # the last space split off


def test_images_are_counted_outside_hidden_elements_only() -> None:
    assert html_to_text("<img><IMG src=a /><img/><script><img></script></img>").images == 3


def test_the_result_is_a_named_tuple() -> None:
    text, links, images = html_to_text("x")
    assert html_to_text("x") == HtmlText("x", [], 0) and (text, links, images) == ("x", [], 0)


# -- hostile input: linear cost -------------------------------------------------------

HOSTILE = {
    "unclosed anchors": "<a href=x>",
    "unclosed comments": "<!--",
    "unclosed scripts": "<script>",
    "bare less-than signs": "<",
    "unclosed quotes": '<a title="',
    "end-tag openers": "</",
    "bogus comments": "<!x",
    "templates": "<template>",
    "entities": "&amp;&",
    "attributes": "<a b='c' d=\"e\" f=g ",
}


class _Scanned:
    """Characters read by the converter's searches: every ``str.find`` on the markup
    and every regular expression match or search on it, each counted from where it
    starts to where it stops (the end of the markup when it finds nothing)."""

    def __init__(self) -> None:
        self.chars = 0


class _CountingText(str):
    scanned: _Scanned

    def find(self, sub: str, start: Any = 0, end: Any = None) -> int:
        i = str.find(self, sub, start, len(self) if end is None else end)
        self.scanned.chars += (i + len(sub) if i >= 0 else len(self)) - start
        return i


class _CountingPattern:
    def __init__(self, pattern: re.Pattern[str], scanned: _Scanned) -> None:
        self.pattern, self.scanned = pattern, scanned

    def _count(self, how: Callable[[str, int], re.Match[str] | None], text: str,
               pos: int) -> re.Match[str] | None:
        m = how(text, pos)
        self.scanned.chars += (m.end() if m else len(text)) - pos
        return m

    def match(self, text: str, pos: int = 0) -> re.Match[str] | None:
        return self._count(self.pattern.match, text, pos)

    def search(self, text: str, pos: int = 0) -> re.Match[str] | None:
        return self._count(self.pattern.search, text, pos)


def _scanned(markup: str, monkeypatch: pytest.MonkeyPatch) -> int:
    scanned = _Scanned()
    monkeypatch.setattr(htmltext, "_MARKUP_OPEN",
                        _CountingPattern(htmltext._MARKUP_OPEN, scanned))
    monkeypatch.setattr(htmltext, "_TAG", _CountingPattern(htmltext._TAG, scanned))
    monkeypatch.setattr(htmltext, "_COMMENT_END",
                        _CountingPattern(htmltext._COMMENT_END, scanned))
    monkeypatch.setattr(htmltext, "_RAW_END", {
        name: _CountingPattern(p, scanned) for name, p in htmltext._RAW_END.items()})
    text = _CountingText(markup)
    text.scanned = scanned
    html_to_text(text)
    html_to_text(text, normalise=True)
    return scanned.chars


@pytest.mark.parametrize("piece", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_markup_is_read_a_bounded_number_of_times(
        piece: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Deterministic: the characters the searches read, both modes together, stay
    # within a few times the length (a quadratic pass reads ~n²/2 of them).
    for repeat in (1000, 50_000):
        markup = piece * repeat
        assert _scanned(markup, monkeypatch) <= 6 * len(markup) + 100


def _cpu_seconds(markup: str) -> float:
    """The least CPU time of a few runs (the collector off: its passes come at
    times that have nothing to do with the input's size)."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(5):
            start = time.process_time()
            html_to_text(markup)
            best = min(best, time.process_time() - start)
    finally:
        gc.enable()
    return best


@pytest.mark.parametrize("piece", HOSTILE.values(), ids=HOSTILE.keys())
def test_four_times_the_hostile_markup_takes_about_four_times_the_time(piece: str) -> None:
    # The searches aside, the Python loop itself: 4x the input, about 4x the CPU time
    # (8x allowed for noise on a shared machine; a quadratic loop takes 16x).  The
    # floor keeps a run that takes a few timer ticks from deciding.
    small = _cpu_seconds(piece * 12_500)
    large = _cpu_seconds(piece * 50_000)
    assert large <= 8 * max(small, 0.002)


def test_hostile_markup_gives_no_text_and_bounded_links() -> None:
    for markup in ("<a href=x>" * 20000, "<script>" * 20000, "<!--" * 30000):
        result = html_to_text(markup)
        assert result.text.strip() == "" and len(result.links) <= MAX_LINKS


# -- properties -----------------------------------------------------------------------

_FRAGMENTS = st.sampled_from([
    "word", "other words", " ", "\n", "\t", "&amp;", "&lt;script&gt;", "&", "&#", "<", ">",
    "'", '"', "=", "<p>", "</p>", "<br/>", "<div class='a'>", "</div>", "<b>", "</b>",
    '<a href="http://x.example/">', "<a href=y>", "</a>", "<img src=z>", "<!-- c -->",
    "<!DOCTYPE html>", "<title>t</title>", "<style>s{}</style>", "<head>", "</head>",
    "<template>", "</template>", "<noscript>", "</noscript>", "</script>", "<!---->",
    "<?pi?>", "</ x>", "<td>", "<li>", "\xa0", "é",
])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_any_text_converts_without_raising(markup: str) -> None:
    for normalise in (False, True):
        result = html_to_text(markup, normalise=normalise)
        assert isinstance(result.text, str) and result.images >= 0
        assert len(result.links) <= MAX_LINKS


class _StartTags(html.parser.HTMLParser):
    """The start tags the standard library's parser sees (a second opinion)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)


def _sees_script(markup: str) -> bool:
    parser = _StartTags()
    parser.feed(markup)
    parser.close()
    return "script" in parser.tags


@settings(max_examples=300, deadline=None)
@given(before=st.lists(_FRAGMENTS, max_size=20), after=st.lists(_FRAGMENTS, max_size=20),
       attributes=st.sampled_from(["", " type=text/javascript", " src='a.js'"]),
       end=st.sampled_from(["</script>", "</SCRIPT >", "</script/>", ""]))
def test_script_content_is_never_text(
        before: list[str], after: list[str], attributes: str, end: str) -> None:
    markup = ("".join(before) + f"<script{attributes}>SECRET <p>SECRET</p> '<!--' SECRET"
              + end + "".join(after))
    # Only where it is a script element: after "<" "word" the tag name is "word<script"
    # (HTML tokenizer, as browsers and the standard library's parser read it), and a
    # browser shows what follows.
    assume(_sees_script(markup))
    for normalise in (False, True):
        result = html_to_text(markup, normalise=normalise)
        assert "SECRET" not in result.text
        assert all("SECRET" not in anchor for _, anchor in result.links)


@settings(max_examples=300, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=40))
def test_normalising_changes_only_the_white_space(fragments: list[str]) -> None:
    markup = "".join(fragments)
    plain, laid_out = html_to_text(markup), html_to_text(markup, normalise=True)
    assert plain.text.split() == laid_out.text.split()
    assert (plain.links, plain.images) == (laid_out.links, laid_out.images)
    text = laid_out.text
    assert text == text.strip() and "\n\n\n" not in text and "  " not in text
    assert not any(line != line.strip() for line in text.split("\n"))
