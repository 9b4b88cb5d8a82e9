"""IndexedMessage answers every header question as the stdlib's Message does.

The trees gateway.mailparse hands out are IndexedMessage nodes (a field index by
lower-case name, parameters kept per value).  Checked node for node on the MIME
corpus, with compat32 and with the archive's policy, and again after each kind of
header mutation the stdlib offers, after direct edits of ``_headers`` and on a
shallow copy sharing its header list with the original.
"""

from __future__ import annotations

import copy
import email.parser
from collections.abc import Callable, Iterator
from email.header import Header
from email.message import Message
from typing import Any

import pytest
from mailparsekit import corpus_messages, nodes, stdlib

from archive.extract import _PARSE
from gateway import mailparse
from gateway.mailparse import IndexedMessage


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    mailparse.clear()
    yield
    mailparse.clear()


def _same(value: Any) -> Any:
    """A value comparable across two trees: a Header (compat32's 8-bit fields) by
    its type and text, a list or tuple item by item."""
    if isinstance(value, list | tuple):
        return type(value), [_same(v) for v in value]
    if isinstance(value, Header):
        return Header, str(value)
    return value


def _try(fn: Callable[[], Any]) -> Any:
    try:
        return "ok", _same(fn())
    except Exception as exc:  # the same exception is the same answer
        return "raised", type(exc)


def answers(msg: Message) -> list[Any]:
    """Everything a stage asks a node about its header fields."""
    names = sorted({k for k, _ in msg.raw_items()}
                   | {k.lower() for k, _ in msg.raw_items()}
                   | {k.upper() for k, _ in msg.raw_items()}
                   | {"Content-Type", "content-disposition", "X-Absent", "charset", ""})
    out: list[Any] = []
    for name in names:
        out += [_try(lambda n=name: msg.get(n)), _try(lambda n=name: msg.get(n, "dflt")),
                _try(lambda n=name: msg.get_all(n)), _try(lambda n=name: msg.get_all(n, [])),
                _try(lambda n=name: n in msg), _try(lambda n=name: msg[n]),
                [str(v) for k, v in msg.raw_items() if k.lower() == name.lower()]]
    for header in ("content-type", "content-disposition", "x-absent"):
        out += [_try(lambda h=header: msg.get_params(header=h)),
                _try(lambda h=header: msg.get_params(None, h, False)),
                _try(lambda h=header: msg.get_params("fail", h))]
        for param in ("charset", "boundary", "name", "filename", "protocol", "CHARSET"):
            out.append(_try(lambda h=header, p=param: msg.get_param(p, None, h)))
            out.append(_try(lambda h=header, p=param: msg.get_param(p, "x", h, False)))
    out += [_try(msg.get_content_type), _try(msg.get_content_maintype),
            _try(msg.get_content_subtype), _try(msg.get_filename), _try(msg.get_boundary),
            _try(msg.get_content_charset), _try(msg.get_charsets),
            _try(msg.get_content_disposition), _try(msg.keys), _try(msg.values),
            _try(lambda: len(msg))]
    return out


def assert_answers_equal(indexed: Message, plain: Message) -> None:
    ours, theirs = list(nodes(indexed)), list(nodes(plain))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert type(a) is IndexedMessage
        assert answers(a) == answers(b)
        if isinstance(a, IndexedMessage):
            for name in {k for k, _ in b.raw_items()} | {"x-absent"}:
                assert [str(v) for v in a.raw_values(name)] == [
                    str(v) for k, v in b.raw_items() if k.lower() == name.lower()]


def test_parse_answers_as_the_stdlib_tree_on_the_corpus() -> None:
    for data in corpus_messages():
        assert_answers_equal(mailparse.parse(data), stdlib(data))
        assert_answers_equal(mailparse.parse(data), stdlib(data))  # a copy of the cached
        assert_answers_equal(mailparse.parse_as(data, _PARSE), stdlib(data, _PARSE))


def test_the_stdlib_fallback_builds_indexed_trees_too() -> None:
    data = b"Subject: s\r\nContent-Type: message/delivery-status\r\n\r\nA: b\r\n\r\nC: d\r\n"
    assert_answers_equal(mailparse.parse(data), stdlib(data))
    parsed = email.parser.BytesParser(IndexedMessage).parsebytes(data)
    assert_answers_equal(parsed, stdlib(data))


# -- mutations: each one applied to both trees, then every answer compared ----------

Mutation = Callable[[Message], object]


def _set_boundary(m: Message) -> object:
    return m.set_boundary("b-new") if "content-type" in m else None


def _replace_first(m: Message) -> object:
    keys = m.keys()
    return m.replace_header(keys[0], "replaced") if keys else None


def _direct_item(m: Message) -> object:
    headers = vars(m)["_headers"]
    if headers:
        headers[0] = ("Content-Type", "text/html; charset=koi8-r")
    return None


def _direct_pop_append(m: Message) -> object:
    headers = vars(m)["_headers"]
    if headers:
        headers.pop()
        headers.append(("Content-Disposition", 'attachment; filename="x.pdf"'))
    return None


def _to_header_object(m: Message) -> object:
    # A value that compares equal to the text it replaces but is another object.
    m["X-Equal"] = "same text"
    m.get("x-equal")  # indexed with the text
    m.replace_header("X-Equal", Header("same text"))
    return None


MUTATIONS: list[tuple[str, Mutation]] = [
    ("setitem", lambda m: m.__setitem__("X-New", "v")),
    ("setitem-ct", lambda m: m.__setitem__("Content-Type", "text/plain; charset=utf-8")),
    ("delitem", lambda m: m.__delitem__("content-type")),
    ("delitem-absent", lambda m: m.__delitem__("x-absent")),
    ("replace", _replace_first),
    ("add_header", lambda m: m.add_header("Content-Disposition", "attachment",
                                          filename="r\u00e9sum\u00e9.pdf")),
    ("set_param", lambda m: m.set_param("charset", "iso-8859-1")),
    ("set_param-new", lambda m: m.set_param("format", "flowed")),
    ("del_param", lambda m: m.del_param("charset")),
    ("set_type", lambda m: m.set_type("multipart/mixed")),
    ("set_boundary", _set_boundary),
    ("set_raw", lambda m: m.set_raw("Content-Type", "image/png; name=a.png")),
    ("set_charset", lambda m: m.set_charset("utf-8") if not m.is_multipart() else None),
    ("direct-item", _direct_item),
    ("direct-pop-append", _direct_pop_append),
    ("direct-clear", lambda m: vars(m)["_headers"].clear()),
    ("header-object", _to_header_object),
]


def _apply(fn: Mutation, msg: Message) -> Any:
    try:
        fn(msg)
    except Exception as exc:
        return type(exc)
    return None


@pytest.mark.parametrize("name, mutation", MUTATIONS, ids=[n for n, _ in MUTATIONS])
def test_answers_stay_equal_after_a_mutation(name: str, mutation: Mutation) -> None:
    messages = corpus_messages()[::7]
    for data in messages:
        ours, theirs = mailparse.parse(data), stdlib(data)
        for a, b in zip(list(nodes(ours)), list(nodes(theirs)), strict=True):
            answers(a)  # the index exists before the mutation
            assert _apply(mutation, a) == _apply(mutation, b)
            assert answers(a) == answers(b), name
        # The next copy of the cached tree never sees the change.
        assert_answers_equal(mailparse.parse(data), stdlib(data))


def test_every_mutation_in_a_row() -> None:
    for data in corpus_messages()[::11]:
        ours, theirs = mailparse.parse(data), stdlib(data)
        for _, mutation in MUTATIONS:
            assert _apply(mutation, ours) == _apply(mutation, theirs)
            assert answers(ours) == answers(theirs)


def test_a_shallow_copy_sharing_the_header_list_sees_the_original_change() -> None:
    data = b"Content-Type: text/plain; charset=us-ascii\r\nX-A: 1\r\n\r\nbody\r\n"
    ours, theirs = mailparse.parse(data), stdlib(data)
    ours_copy, theirs_copy = copy.copy(ours), copy.copy(theirs)
    assert answers(ours_copy) == answers(theirs_copy)
    for msg in (ours, theirs):
        msg.replace_header("Content-Type", "text/html; charset=utf-8")
        msg.set_param("format", "flowed")
    assert answers(ours_copy) == answers(theirs_copy)
    assert ours_copy.get_content_type() == "text/html"
    assert ours_copy.get_content_charset() == "utf-8"


def test_parameters_kept_per_value_are_a_fresh_list_each_time() -> None:
    msg = mailparse.parse(b"Content-Type: text/plain; charset=utf-8\r\n\r\nx\r\n")
    first = msg.get_params()
    assert first is not None
    first.append(("mutated", "yes"))
    assert msg.get_params() == [("text/plain", ""), ("charset", "utf-8")]
