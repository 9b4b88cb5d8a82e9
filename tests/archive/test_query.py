"""archive.query: the parser (pure) and its errors; SQL compilation is in test_search."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archive.query import (
    Address,
    And,
    DateRange,
    Direction,
    Has,
    Hold,
    MessageId,
    Not,
    Or,
    QueryError,
    Rule,
    Size,
    Term,
    Verdict,
    fulltext_terms,
    is_fulltext,
    parse,
    to_string,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(("query", "tree"), [
    ("from:Alice@Example.com", Address("from", "alice@example.com")),
    ("to:@example.org", Address("to", "@example.org")),
    ("cc:carol", Address("cc", "carol")),
    ("bcc:boss@corp.example", Address("bcc", "boss@corp.example")),
    ("participant:bob", Address("participant", "bob")),
    ("subject:invoice", Term("subject", "invoice")),
    ('body:"wire transfer"', Term("body", "wire transfer", phrase=True)),
    ("attachment:contract", Term("attachment", "contract")),
    ("filename:report.pdf", Term("filename", "report.pdf")),
    ("merg*", Term("text", "merg", prefix=True)),
    ('"exact phrase"', Term("text", "exact phrase", phrase=True)),
    ("has:attachment", Has("attachment")),
    ("message-id:<a@b>", MessageId("a@b")),
    ("size:>1M", Size(">", 1024 * 1024)),
    ("size:<=500k", Size("<=", 500 * 1024)),
    ("size:2048", Size(">=", 2048)),
    ("direction:outbound", Direction("outbound")),
    ("spf:fail", Verdict("spf", "fail")),
    ("dmarc:FAIL", Verdict("dmarc", "fail")),
    ("dkim:pass", Verdict("dkim", "pass")),
    ("rule:retain-7y", Rule("retain-7y")),
    ('hold:"Case 17"', Hold("Case 17")),
])
def test_each_field_parses_to_its_node(query: str, tree: object) -> None:
    assert parse(query) == tree


@pytest.mark.parametrize(("query", "start", "end"), [
    ("date:2024-01..2024-06", utc(2024, 1, 1), utc(2024, 7, 1)),
    ("date:2024", utc(2024, 1, 1), utc(2025, 1, 1)),
    ("date:2024-12", utc(2024, 12, 1), utc(2025, 1, 1)),
    ("date:2024-02-29", utc(2024, 2, 29), utc(2024, 3, 1)),
    ("date:2024-03..", utc(2024, 3, 1), None),
    ("date:..2023", None, utc(2024, 1, 1)),
    ("before:2024-05-02", None, utc(2024, 5, 2)),
    ("after:2024-05", utc(2024, 6, 1), None),
])
def test_dates_are_half_open_utc_ranges(query: str, start: datetime | None,
                                        end: datetime | None) -> None:
    node = parse(query)
    assert isinstance(node, DateRange)
    assert (node.start, node.end) == (start, end)


def test_implicit_and_binds_tighter_than_or_and_parentheses_override() -> None:
    a, b, c = Term("text", "a"), Term("text", "b"), Term("text", "c")
    assert parse("a b OR c") == Or((And((a, b)), c))
    assert parse("a AND b OR c") == Or((And((a, b)), c))
    assert parse("a (b OR c)") == And((a, Or((b, c))))
    assert parse("NOT a b") == And((Not(a), b))
    assert parse("-a -(b OR c)") == And((Not(a), Not(Or((b, c)))))
    assert parse("NOT NOT a") == Not(Not(a))


def test_lower_case_operators_are_words() -> None:
    assert parse("cats and dogs") == And((Term("text", "cats"), Term("text", "and"),
                                          Term("text", "dogs")))


def test_a_hyphen_inside_a_word_is_not_negation() -> None:
    assert parse("e-mail") == Term("text", "e-mail")


@pytest.mark.parametrize(("query", "column", "message"), [
    ("", 1, "empty query"),
    ("   ", 1, "empty query"),
    ("from:", 6, "from: needs a value"),
    ("subject:hi from: x", 17, "from: needs a value"),
    ("colour:red", 1, "unknown field 'colour'"),
    ("a OR", 5, "expected a search term"),
    ("(a OR b", 1, "'(' is never closed"),
    ("a b)", 4, "unbalanced ')'"),
    ("()", 2, "expected a search term before ')'"),
    ('subject:"unterminated', 9, "unterminated quoted phrase"),
    ("date:2024-13", 6, "is not a date"),
    ("date:2024-01..2024-0x", 15, "expected a date"),
    ("date:2024-06..2024-01", 6, "ends before it starts"),
    ("date:..", 6, "at least one end"),
    ("size:>1Q", 6, "expected a size"),
    ("has:pdf", 5, "has: knows only 'attachment'"),
    ("direction:sideways", 11, "direction: is one of"),
    ("a spf:maybe", 7, "spf: is one of"),
    ("a AND AND b", 7, "expected a search term, found AND"),
    ("!!!", 1, "nothing searchable"),
])
def test_errors_point_at_the_column_of_the_mistake(query: str, column: int,
                                                   message: str) -> None:
    with pytest.raises(QueryError) as info:
        parse(query)
    assert info.value.column == column
    assert message in info.value.message
    assert info.value.pointer().splitlines()[1] == " " * (column - 1) + "^"


def test_fulltext_classification_and_positive_terms() -> None:
    tree = parse('subject:a (body:b OR c) NOT body:d from:x')
    assert not is_fulltext(tree)
    assert is_fulltext(parse("subject:a OR (body:b c)"))
    assert [t.text for t in fulltext_terms(tree)] == ["a", "b", "c"]
    # An index can subtract from what it found, not list everything else.
    assert is_fulltext(parse("a -b NOT (c OR d)"))
    assert not is_fulltext(parse("NOT a")) and not is_fulltext(parse("-a -b"))
    assert not is_fulltext(parse("a OR NOT b"))


@pytest.mark.parametrize("query", [
    'from:a@b.example subject:"two words" OR (body:x* AND NOT spf:fail)',
    "date:2024-01..2024-06 size:<=10 has:attachment direction:inbound",
    'hold:"case \\"7\\"" rule:r1 -dmarc:fail message-id:x@y before:2020 after:2021-02-03',
    '"AND" OR "a (b)"',
])
def test_to_string_parses_back_to_the_same_tree(query: str) -> None:
    tree = parse(query)
    assert parse(to_string(tree)) == tree


_words = st.text(alphabet=st.sampled_from("abcXYZ09é-_@.:()\"*\\ "), min_size=0, max_size=30)


@settings(max_examples=300, deadline=None)
@given(_words)
def test_parser_either_parses_or_raises_query_error_with_a_column_inside_the_query(
        query: str) -> None:
    try:
        tree = parse(query)
    except QueryError as exc:
        assert 1 <= exc.column <= len(query) + 1
    else:
        assert parse(to_string(tree)) == tree
