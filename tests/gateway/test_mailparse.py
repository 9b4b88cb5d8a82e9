"""The shared parse (gateway.mailparse) is the stdlib parse, exactly: differential tests.

Every tree the cache hands out, whether parsed, found or derived from the tree of a
message's tail, must equal ``email.message_from_bytes(data, policy=compat32)`` node
for node: headers, payloads, preamble, epilogue, unix-from, default type and the
defects (type and text).  Checked on every message of the MIME corpus and on
generated messages.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Iterator
from email.message import Message

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mailparsekit import PREFIXES, corpus_messages, nodes, shape, stdlib

from archive.extract import _PARSE
from gateway import mailparse


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    mailparse.clear()
    yield
    mailparse.clear()


# -- header_block --------------------------------------------------------------


def assert_same_header_parse(data: bytes) -> None:
    block = mailparse.header_block(data)
    assert data.startswith(block)
    whole = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
    cut = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(block)
    assert vars(cut)["_headers"] == vars(whole)["_headers"]
    assert cut.get_unixfrom() == whole.get_unixfrom()
    assert [(type(d), str(d)) for d in cut.defects] == [
        (type(d), str(d)) for d in whole.defects]


@pytest.mark.parametrize("data, block", [
    (b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore", b"A: 1\r\nB: 2\r\n\r\n"),
    (b"A: 1\nB: 2\n\nbody\n\nmore", b"A: 1\nB: 2\n\n"),
    (b"A: 1\rB: 2\r\rbody", b"A: 1\rB: 2\r\r"),
    (b"A: 1\r\n\nbody", b"A: 1\r\n\n"),
    (b"A: 1\n\r\nbody", b"A: 1\n\r\n"),
    (b"A: 1\n\rbody", b"A: 1\n\r"),
    (b"\r\nbody\r\n\r\n", b"\r\n"),
    (b"\nbody", b"\n"),
    (b"A: 1\r\nno separator at all", b"A: 1\r\nno separator at all"),
    (b"", b""),
    (b"A: 1\r\n\r", b"A: 1\r\n\r"),
])
def test_header_block_ends_at_the_first_empty_line(data: bytes, block: bytes) -> None:
    assert mailparse.header_block(data) == block
    assert_same_header_parse(data)


def test_header_block_gives_the_same_fields_and_defects_on_the_corpus() -> None:
    for data in corpus_messages():
        assert_same_header_parse(data)
        assert_same_header_parse(data.replace(b"\r\n", b"\n"))


_LINES = st.sampled_from([
    "A: 1", "Content-Type: text/plain", " folded", "\tfolded", "From x", "From: y",
    ":no name", "no colon", "", "X : spaced", "caf\xe9: v", "B:2",
])
_ENDS = st.sampled_from(["\r\n", "\n", "\r"])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_LINES, _ENDS), max_size=12), st.booleans())
def test_header_block_generated(lines: list[tuple[str, str]], end_open: bool) -> None:
    text = "".join(line + end for line, end in lines)
    if end_open:
        text += "tail"
    assert_same_header_parse(text.encode("latin-1"))


# -- parse: found, missed and derived trees equal the stdlib's --------------------


def test_parse_equals_stdlib_on_every_corpus_message_cold_and_cached() -> None:
    messages = corpus_messages()
    for data in messages:
        expected = shape(stdlib(data))
        assert shape(mailparse.parse(data)) == expected  # parsed
        assert shape(mailparse.parse(data)) == expected  # found
        assert shape(mailparse.parse(bytes(bytearray(data)))) == expected  # equal bytes
    assert mailparse.stats()["hits"] >= len(messages)




def test_parse_of_a_prefixed_message_equals_stdlib() -> None:
    for data in corpus_messages():
        mailparse.clear()
        mailparse.parse(data)
        for prefix in PREFIXES:
            assert shape(mailparse.parse(prefix + data)) == shape(stdlib(prefix + data))


def test_a_stage_header_prefix_is_derived_not_parsed() -> None:
    data = b"From: a@b.example\r\nSubject: s\r\n\r\n" + b"line of text\r\n" * 1000
    mailparse.parse(data)
    prefixed = PREFIXES[0] + data
    assert shape(mailparse.parse(prefixed)) == shape(stdlib(prefixed))
    assert mailparse.stats()["derived"] == 1
    assert mailparse.stats()["misses"] == 1
    # The derived tree is cached for the bytes as spooled (the archive's worker).
    assert shape(mailparse.parse(bytes(bytearray(prefixed)))) == shape(stdlib(prefixed))
    assert mailparse.stats()["hits"] == 1


# The prefixes the stages add in turn, as pipeline.apply writes them (CRLF, a value
# may be folded) and as a spool written with LF ends would hold them.
_STAGE_PREFIXES = [
    (b"Authentication-Results: mx.example; spf=pass smtp.mailfrom=a@b.example;\r\n"
     b"\tdkim=none\r\n",
     b"X-Spam-Flag: NO\r\nX-Spam-Status: No, score=-0.1 required=5.0\r\n tests=NONE\r\n",
     b"X-Coffer-Policy: accept\r\n"),
    (b"Authentication-Results: mx.example;\n spf=none\n",
     b"X-Spam-Status: No, score=0.0\n",
     b"X-Coffer-Policy: accept\n"),
]


def test_each_stage_s_prefix_is_derived_and_equals_stdlib_on_the_corpus() -> None:
    # The receive-time stages and the archive stage behind the queue, in order: the
    # check stage's tree parsed, every later one derived from the one before.
    for received in corpus_messages():
        for stages in _STAGE_PREFIXES:
            mailparse.clear()
            mailparse.parse(received)
            data = received
            for prefix in stages:
                data = prefix + data
                assert shape(mailparse.parse(data)) == shape(stdlib(data))
            assert shape(mailparse.parse_as(data, _PARSE)) == shape(stdlib(data, _PARSE))
            assert mailparse.parse(data).as_bytes() == stdlib(data).as_bytes()
            # Parsed once; twice when the message does not open with a field of its
            # own (an mbox "From " line, body text): then the first prefixed one is
            # parsed too.  (Too large: never cached; tiny: shorter than the tails the
            # cache files its keys by.)
            if len(received) >= mailparse._TAIL and len(data) <= mailparse.MAX_ENTRY_BYTES:
                opens_with_field = mailparse._FIELD_LINE_B.match(received) is not None
                assert mailparse.stats()["misses"] == (1 if opens_with_field else 2)


def test_a_derived_tree_outlives_the_tree_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    # Three entries per message (check, decide, archive): a full cache keeps the
    # newest tree of each of MAX_ENTRIES messages, not every tree of the last one.
    monkeypatch.setattr(mailparse, "MAX_ENTRIES", 3)
    spooled = []
    for i in range(3):
        data = b"Subject: %d\r\n\r\n" % i + b"line of text\r\n" * 10
        mailparse.parse(data)
        for prefix in _STAGE_PREFIXES[0][:2]:
            data = prefix + data
            mailparse.parse(data)
        spooled.append(data)
    assert mailparse.stats()["derived"] == 6
    for data in spooled:
        assert mailparse.cached(data) is not None
    assert mailparse.stats()["hits"] == 3


def test_the_messages_the_worker_has_not_reached_are_evicted_last(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Received (check, then decide), then archived oldest first while more come in:
    # the archive's tree of a message it has done goes before any tree of a message
    # still waiting, however recently it was made.
    monkeypatch.setattr(mailparse, "MAX_ENTRIES", 4)
    check, decide, archive = _STAGE_PREFIXES[0]
    waiting = []

    def receive(i: int) -> None:
        data = b"Subject: %d\r\n\r\n" % i + b"line of text\r\n" * 10
        mailparse.parse(data)
        mailparse.parse(check + data)
        waiting.append(decide + check + data)

    for i in range(4):
        receive(i)
    for i in range(4, 10):
        assert shape(mailparse.parse(archive + waiting[0])) == shape(stdlib(archive + waiting[0]))
        waiting.pop(0)
        receive(i)
    assert mailparse.stats()["misses"] == 10  # each message's first parse only
    assert mailparse.stats()["entries"] == 4


@pytest.mark.parametrize("tail", [
    b" continuation first\r\nA: 1\r\n\r\nbody",
    b"From sender Fri\r\nA: 1\r\n\r\nbody",
    b"\r\nbody only",
    b"body text, no fields\r\n",
    b":empty name\r\nA: 1\r\n\r\nbody",
])
def test_a_tail_that_does_not_open_with_a_field_is_parsed_whole(tail: bytes) -> None:
    mailparse.parse(tail)
    for prefix in PREFIXES:
        assert shape(mailparse.parse(prefix + tail)) == shape(stdlib(prefix + tail))


_FIELDS = st.sampled_from([
    b"X-A: 1", b"X-B:2", b" folded", b"\tfolded", b"Content-Type: multipart/mixed; boundary=b",
    b"Content-Type: text/plain", b"Content-Transfer-Encoding: base64", b"From x", b"",
    b":x", b"no colon", b"X-C: \xe9",
])
_BODIES = st.sampled_from([
    b"", b"text\r\n", b"--b\r\nContent-Type: text/plain\r\n\r\none\r\n--b--\r\nepi\r\n",
    b"pre\r\n--b\r\n\r\nx\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nA: 1\r\n\r\nin\r\n",
    b"aGVsbG8=\r\n",
])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_FIELDS, _ENDS.map(str.encode)), max_size=4),
       st.lists(st.tuples(_FIELDS, _ENDS.map(str.encode)), max_size=6), _BODIES)
def test_generated_prefix_and_tail(prefix_lines: list[tuple[bytes, bytes]],
                                   tail_lines: list[tuple[bytes, bytes]], body: bytes) -> None:
    mailparse.clear()
    prefix = b"".join(a + b for a, b in prefix_lines)
    tail = b"".join(a + b for a, b in tail_lines) + b"\r\n" + body
    mailparse.parse(tail)
    assert shape(mailparse.parse(prefix + tail)) == shape(stdlib(prefix + tail))
    assert shape(mailparse.parse(tail)) == shape(stdlib(tail))


# -- each caller owns its copy -------------------------------------------------


def test_a_consumer_cannot_change_what_the_next_one_sees() -> None:
    data = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8\r\n--b--\r\n")
    expected = shape(stdlib(data))
    first = mailparse.parse(data)
    part = first.get_payload(0)
    assert part.get_payload(decode=True) == b"hello"  # records a padding defect
    assert part.defects
    first["X-Added"] = "1"
    first.get_payload().append(Message())
    del part["Content-Transfer-Encoding"]
    first.set_boundary("other")
    assert shape(mailparse.parse(data)) == expected
    assert shape(mailparse.cached(data) or Message()) == expected


def test_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mailparse, "MAX_ENTRIES", 3)
    monkeypatch.setattr(mailparse, "MAX_BYTES", 1000)
    monkeypatch.setattr(mailparse, "MAX_ENTRY_BYTES", 600)
    for i in range(10):
        mailparse.parse(b"A: %d\r\n\r\n" % i + b"x" * 100)
    assert mailparse.stats()["entries"] == 3
    mailparse.parse(b"A: big\r\n\r\n" + b"x" * 700)  # over MAX_ENTRY_BYTES: not kept
    assert mailparse.cached(b"A: big\r\n\r\n" + b"x" * 700) is None
    for i in range(3):
        mailparse.parse(b"A: %d\r\n\r\n" % i + b"x" * 400)
    assert mailparse.stats()["bytes"] <= 1000


def test_a_parser_error_propagates_and_is_not_cached() -> None:
    deep = b"Content-Type: message/rfc822\r\n\r\n" * 5000 + b"x"
    with pytest.raises(RecursionError):
        stdlib(deep)
    with pytest.raises(RecursionError):
        mailparse.parse(deep)
    assert mailparse.stats()["entries"] == 0


# -- parse_as: the archive's policy --------------------------------------------


def test_parse_as_equals_a_parse_with_that_policy_on_the_corpus() -> None:
    for data in corpus_messages():
        expected = shape(stdlib(data, _PARSE))
        assert shape(mailparse.parse_as(data, _PARSE)) == expected
        mailparse.parse(data)
        assert shape(mailparse.parse_as(data, _PARSE)) == expected


@pytest.mark.parametrize("data", [
    # A boundary folded inside its quotes: unfolded, the parts are found; folded
    # (compat32), they are not.  The shared tree must not be used.
    b'Content-Type: multipart/mixed; boundary="ab\r\n cd"\r\n\r\n'
    b"--ab cd\r\n\r\none\r\n--ab cd--\r\n",
    b"Content-Type: multipart/\r\n mixed; boundary=b\r\n\r\n--b\r\n\r\none\r\n--b--\r\n",
    b"Content-Type: multipart/mixed;\r\n boundary=b\r\n\r\n--b\r\n\r\none\r\n--b--\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\nContent-Transfer-Encoding:\r\n 7bit\r\n"
    b"\r\n--b\r\n\r\none\r\n--b--\r\n",
    b"Content-Type: multipart/mixed; boundary=\xe9b\r\n\r\n--\xe9b\r\n\r\none\r\n--\xe9b--\r\n",
    b"Content-Type: text/plain; charset=\xe9\r\n\r\ntext\r\n",
])
def test_parse_as_with_folded_or_8bit_content_fields(data: bytes) -> None:
    mailparse.parse(data)
    assert shape(mailparse.parse_as(data, _PARSE)) == shape(stdlib(data, _PARSE))
    for node in nodes(mailparse.parse_as(data, _PARSE)):
        assert node.policy is _PARSE


# -- the one-part fast path ------------------------------------------------------

_HEAD_LINES = st.sampled_from([
    b"Content-Type: text/plain", b"Content-Type: TEXT/HTML; charset=utf-8",
    b"Content-Type: message/rfc822", b"Content-Type: message/delivery-status",
    b"Content-Type: Multipart/Mixed; boundary=b", b"Content-Type: multipart/mixed",
    b"Content-Type: application/octet-stream", b"Content-Type: text", b"Content-Type:",
    b"Content-type: image/png;\r\n name=x", b" folded", b"From x", b"From: y", b":x",
    b"no colon", b"Subject: \xe9t\xe9", b"MIME-Version: 1.0", b"X : y",
])
_BODY_LINES = st.sampled_from([
    b"text", b"", b"--b", b"--b--", b"Content-Type: text/plain", b"A: 1", b"\xff\xfe",
    b"From me", b" x",
])


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_HEAD_LINES, _ENDS.map(str.encode)), max_size=6),
       st.lists(st.tuples(_BODY_LINES, _ENDS.map(str.encode)), max_size=8), st.booleans())
def test_fast_path_equals_stdlib_on_generated_messages(
        head: list[tuple[bytes, bytes]], body: list[tuple[bytes, bytes]], open_end: bool
) -> None:
    data = b"".join(a + b for a, b in head) + b"".join(a + b for a, b in body)
    if open_end:
        data += b"last line without end"
    assert shape(mailparse._parse(data)) == shape(stdlib(data))


@pytest.mark.parametrize("data", [
    b"Content-Type: Multipart/Mixed; boundary=b\r x\r\n--b\r x\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n x\r\n\r\n--b\r\n x\r\n--b\r\n x--\r\n",
    b"Content-Type: multipart/mixed; boundary=\"b\r\n\"\r\n\r\n--b\r\n\r\none\r\n--b\r\n--\r\n",
    b"Content-Type: multipart/mixed; boundary=\"b\n x\"\n\n--b\n x\n\none\n--b\n x--\n",
])
def test_a_boundary_with_a_line_end_in_it_is_matched_line_by_line(data: bytes) -> None:
    assert shape(mailparse._parse(data)) == shape(stdlib(data))


def test_scanner_leaves_only_rare_constructs_to_the_stdlib(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = mailparse._stdlib
    monkeypatch.setattr(mailparse, "_stdlib", lambda data: calls.append(data) or real(data))
    scanned = [
        b"Content-Type: text/plain\r\n\r\n" + b"line\r\n" * 100,
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
        b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nbody\r\n",
    ]
    for data in scanned:
        assert shape(mailparse._parse(data)) == shape(stdlib(data))
    assert calls == []
    left = [
        b"Content-Type: message/delivery-status\r\n\r\nA: 1\r\n\r\nB: 2\r\n",
        b"A: 1\r\nFrom x\r\n\r\nbody",  # an mbox line pushed back into the body
        b"Content-Type: message/rfc822\r\n\r\n" * 60 + b"x",  # deeper than 50
    ]
    for data in left:
        assert shape(mailparse._parse(data)) == shape(stdlib(data))
    assert calls == left


# Generated MIME: nested multiparts with delimiters that are almost right (blanks,
# suffixes, closing forms, outer ones inside inner parts), missing delimiters, mixed
# line ends, digests and message/rfc822 parts.
_BOUNDARIES = ["b", "b-", "b2", "x.y", "b--"]
_JUNK = st.sampled_from([
    "text", "", "--b", "--b--", "--b \t", "--bx", "--b2", "--b-", "--b---", " --b",
    "--x.y", "--x.y--", "--b--x", "A: 1", "Content-Type: text/plain", "From me",
])


def _mime(depth: int) -> st.SearchStrategy[list[str]]:
    leaf = st.lists(_JUNK, max_size=4).map(lambda body: ["Content-Type: text/plain", "", *body])
    if depth == 0:
        return leaf
    child = _mime(depth - 1)

    @st.composite
    def multipart(draw: st.DrawFn) -> list[str]:
        b = draw(st.sampled_from(_BOUNDARIES))
        sub = draw(st.sampled_from(["mixed", "digest", "alternative"]))
        cte = draw(st.sampled_from([[], ["Content-Transfer-Encoding: base64"]]))
        lines = [f'Content-Type: multipart/{sub}; boundary="{b}"', *cte, ""]
        lines += draw(st.lists(_JUNK, max_size=2))  # preamble
        for part in draw(st.lists(child, max_size=3)):
            lines += [draw(st.sampled_from([f"--{b}", f"--{b}  ", f"--{b}"]))]
            lines += part
        if draw(st.booleans()):
            lines += [f"--{b}--", *draw(st.lists(_JUNK, max_size=2))]
        return lines

    rfc822 = child.map(lambda inner: ["Content-Type: message/rfc822", "", *inner])
    return st.one_of(leaf, multipart(), rfc822)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(_mime(3), st.lists(_ENDS, min_size=1, max_size=3), st.booleans())
def test_scanner_equals_stdlib_on_generated_mime(lines: list[str], ends: list[str],
                                                 open_end: bool) -> None:
    text = "".join(line + ends[i % len(ends)] for i, line in enumerate(lines))
    if open_end:
        text = text.rstrip("\r\n")
    data = text.encode()
    assert shape(mailparse._parse(data)) == shape(stdlib(data))


def test_messages_sharing_their_last_bytes_each_get_their_own_tree() -> None:
    # The cache finds entries by their last bytes: the same body under other header
    # fields (a list's copies), of the same length or not, is never another's tree.
    body = b"\r\n" + b"the same body line\r\n" * 200
    heads = [b"Subject: %d\r\nFrom: a@b.example\r\n" % i for i in range(12)]
    heads += [b"Subject: 1\r\nFrom: x@y.example\r\n", b"Subject: 10\r\nFrom: a@b.example\r\n"]
    for _ in range(2):  # cold, then each a hit on equal bytes of another object
        for head in heads:
            data = bytes(bytearray(head + body))
            assert shape(mailparse.parse(data)) == shape(stdlib(data))
            assert mailparse.parse(data)["Subject"] == head.split(b"\r\n")[0][9:].decode()
    assert mailparse.stats()["misses"] == len(heads) - 1  # the last head is a duplicate
