"""The spam parser's fast paths give what the slow ones give.

_walk reads a part's MIME fields with one regular expression when they are plain
(the stdlib getters otherwise), takes an ASCII text part as its own decoded text,
and split_head looks for an LF-only separator only before the CRLF one.  Each is
held here to the stdlib (or to the previous code) on generated input; the corpus
differential test (test_spam_corpus_differential.py) holds the whole scorer to its
recorded verdicts.
"""

from __future__ import annotations

import itertools
import re
from email.message import Message
from pathlib import Path

import corpusverdicts
from hypothesis import given, settings
from hypothesis import strategies as st
from spamkit import message, multipart

from gateway import mailparse
from gateway.check.spam import message as spam_message
from gateway.check.spam.message import parse, split_head

# Pieces of Content-Type values: plain ones and the ones the fast path must refuse
_CT_PIECES = ["text/plain", "text/html", "TEXT/Plain", "multipart/mixed", "text", "/",
              "application/octet-stream", ";", " ", "\t", "\r\n ", "=", '"', "charset",
              "CharSet", "name", "NAME", "filename", "format", "flowed", "us-ascii",
              "UTF-8", "iso-8859-1", "charset*", "*0*", "'", "%41", "(comment)", "\\",
              "x\u00e9", "boundary", ",", "?"]
_CTE_PIECES = ["", "7bit", "8BIT", " base64", "base64", "quoted-printable", " ", "\t",
               "x-uue", "binary", "\u00e9"]
_CD_PIECES = [None, "inline", "attachment", 'attachment; filename="a.txt"']


def _getters(part: Message) -> tuple[str, str, str, str, str]:
    return (part.get_content_type().lower(), (part.get_content_charset() or "").lower(),
            str(part.get("content-transfer-encoding", "")).lower(),
            part.get_filename() or "", (part.get_content_disposition() or "").lower())


def _part(ct: str | None, cte: str | None, cd: str | None) -> Message:
    head = "From: a@example.com\r\n"
    for name, value in (("Content-Type", ct), ("Content-Transfer-Encoding", cte),
                        ("Content-Disposition", cd)):
        if value is not None:
            head += f"{name}: {value}\r\n"
    return mailparse.parse((head + "\r\nhello\r\n").encode("utf-8", "surrogateescape"))


@settings(max_examples=400, deadline=None)
@given(ct=st.one_of(st.none(), st.lists(st.sampled_from(_CT_PIECES), max_size=8).map("".join)),
       cte=st.one_of(st.none(), st.lists(st.sampled_from(_CTE_PIECES), max_size=3).map("".join)),
       cd=st.sampled_from(_CD_PIECES))
def test_plain_mime_fields_are_read_as_the_stdlib_getters_read_them(
        ct: str | None, cte: str | None, cd: str | None) -> None:
    part = _part(ct, cte, cd)
    if part.is_multipart():
        return
    fast = spam_message._mime_fields(part)
    if fast is not None:
        ctype, charset, cte_lower = fast
        assert (ctype, charset, cte_lower, "", "") == _getters(part)


_WS = st.sampled_from(["", " ", "\t", "\r\n ", "  "])
_PARAM = st.tuples(_WS, st.sampled_from(["charset", "CHARSET", "format", "name", "delsp",
                                         "charset*", "x"]),
                   _WS, _WS, st.sampled_from(["us-ascii", "UTF-8", "flowed", "a.txt", "yes",
                                              "a b", "x\"y", ""]),
                   st.booleans())


@settings(max_examples=400, deadline=None)
@given(ctype=st.sampled_from(["text/plain", "Text/HTML", "application/pdf", "text/x-foo"]),
       params=st.lists(_PARAM, max_size=4), tail=_WS)
def test_well_formed_content_types_are_read_as_the_stdlib_getters_read_them(
        ctype: str, params: list[tuple[str, str, str, str, str, bool]], tail: str) -> None:
    ct = ctype + "".join(f";{a}{name}{b}={c}" + (f'"{v}"' if quoted else v)
                         for a, name, b, c, v, quoted in params) + tail
    part = _part(ct, "7bit", None)
    fast = spam_message._mime_fields(part)
    if fast is not None:
        assert (*fast, "", "") == _getters(part)


def test_the_usual_text_part_takes_the_fast_path() -> None:
    part = _part("text/plain;\r\n charset=\"UTF-8\"; format=flowed", "7bit", None)
    assert spam_message._mime_fields(part) == ("text/plain", "utf-8", "7bit")
    assert spam_message._mime_fields(_part("text/plain; name=a.txt", None, None)) is None
    assert spam_message._mime_fields(_part("text/plain", None, "inline")) is None
    assert spam_message._mime_fields(_part("text/plain; charset*=utf-8''x", None, None)) is None


@settings(max_examples=200, deadline=None)
@given(body=st.text(alphabet=st.sampled_from("ab \r\n\u00e9=<>"), max_size=40),
       charset=st.sampled_from(["us-ascii", "utf-8", "iso-8859-1", "shift_jis", "utf-7",
                                "x-unknown", ""]),
       cte=st.sampled_from(["7bit", "8bit", "quoted-printable", "base64", " base64"]),
       ctype=st.sampled_from(["text/plain", "text/html"]))
def test_a_text_part_is_taken_apart_as_the_getters_take_it(
        body: str, charset: str, cte: str, ctype: str) -> None:
    ct = f"{ctype}; charset={charset}" if charset else ctype
    data = message(body, content_type=ct, headers={"Content-Transfer-Encoding": cte})
    fast = parse(data)
    original = spam_message._mime_fields
    try:
        spam_message._mime_fields = lambda part: None  # type: ignore[assignment]
        slow = parse(data)
    finally:
        spam_message._mime_fields = original
    assert fast == slow


def test_multipart_parts_are_taken_apart_as_the_getters_take_them() -> None:
    data = multipart([("text/plain; charset=us-ascii", "", "plain words"),
                      ("text/html; charset=utf-8", "", "<p>html <a href='http://x.example'>x</a>"),
                      ("application/pdf; name=a.pdf", "Content-Transfer-Encoding: base64\r\n",
                       "JVBERi0="),
                      ("text/plain", "Content-Disposition: attachment; filename=b.txt\r\n",
                       "attached")])
    fast = parse(data)
    original = spam_message._mime_fields
    try:
        spam_message._mime_fields = lambda part: None  # type: ignore[assignment]
        slow = parse(data)
    finally:
        spam_message._mime_fields = original
    assert fast == slow
    assert [p.content_type for p in fast.parts] == ["text/plain", "text/html",
                                                    "application/pdf", "text/plain"]


def _split_head_before(data: bytes) -> tuple[bytes, bytes]:
    """split_head as it was: both separators searched through the whole message."""
    found = [(i, sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := data.find(sep)) >= 0]
    if not found:
        return data, b""
    i, sep = min(found)
    half = len(sep) // 2
    return data[:i + half], data[i + len(sep):]


def test_split_head_finds_the_first_separator_of_either_kind() -> None:
    for n in range(9):
        for t in itertools.product((b"\r", b"\n", b"a"), repeat=n):
            data = b"".join(t)
            assert split_head(data) == _split_head_before(data), data


@settings(max_examples=500, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(":/a "), max_size=120))
def test_has_scheme_sep_is_the_substring_test(text: str) -> None:
    assert spam_message.has_scheme_sep(text) == ("://" in text)


def test_has_scheme_sep_after_many_colons() -> None:
    many = "a: " * 40
    assert spam_message.has_scheme_sep(many + "http://x") is True
    assert spam_message.has_scheme_sep(many + "http:/x") is False
    assert spam_message.has_scheme_sep(":" * 33 + "//") is True


_FOLD_BEFORE = re.compile(r"\r?\n[ \t]+")  # the unfolding pattern as it was


@settings(max_examples=500, deadline=None)
@given(head=st.text(alphabet=st.sampled_from("\r\n \ta:\x0c"), max_size=60))
def test_unfolding_matches_as_before(head: str) -> None:
    assert spam_message._FOLD.sub(" ", head) == _FOLD_BEFORE.sub(" ", head)


def test_unfolding_corpus_headers_as_before(corpus: Path) -> None:
    for _, path in corpusverdicts.corpus_files(corpus):
        head = split_head(spam_message.strip_mbox_from(path.read_bytes()))[0].decode("latin-1")
        assert spam_message._FOLD.sub(" ", head) == _FOLD_BEFORE.sub(" ", head), path


@settings(max_examples=800, deadline=None)
@given(text=st.text(alphabet=st.sampled_from("w.Wa "), max_size=80))
def test_has_www_is_the_substring_test(text: str) -> None:
    assert spam_message.has_www(text) == ("www." in text)


def test_has_www_after_many_dots() -> None:
    for dots in range(8):
        assert spam_message.has_www("a." * dots + "www.x") is True
        assert spam_message.has_www("a." * dots + "ww.x") is False
        assert spam_message.has_www("." * dots + "www.") is True
    assert spam_message.has_www("www.") is True
    assert spam_message.has_www(".www") is False


def test_content_types_read_through_the_memo_as_without_it() -> None:
    values = [f"{t}; charset={c}" for t in ("text/plain", "TEXT/html", "application/pdf")
              for c in ("us-ascii", '"UTF-8"', "x")]
    values += ["text/plain; name=a.txt", "text/", "x" * 300]
    for ct in values * 2:  # the second round from the memo (but the long value)
        part = _part(ct, "7bit", None)
        fast = spam_message._mime_fields(part)
        spam_message._PLAIN_TYPES.clear()
        assert fast == spam_message._mime_fields(part), ct
        spam_message._PLAIN_TYPES.clear()
        spam_message._mime_fields(part)
    assert not spam_message._PLAIN_TYPES  # the long value is never kept
    spam_message._mime_fields(_part(values[0], None, None))
    assert values[0] in spam_message._PLAIN_TYPES
