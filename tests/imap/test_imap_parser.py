"""The IMAP command parser (pure): grammar, literals, sections, SEARCH keys, bounds."""

from __future__ import annotations

from datetime import date

import pytest

from archive.imap.errors import ParseError
from archive.imap.parser import (
    FetchAtt,
    SearchKey,
    Section,
    SeqSet,
    decode_mutf7,
    encode_mutf7,
    parse_command,
    parse_seqset,
)


def test_login_with_quoted_string_and_literals() -> None:
    cmd = parse_command(b'a1 LOGIN "al\\"ice" {3}\r\np w\r\n')
    assert (cmd.tag, cmd.name, cmd.args) == ("a1", "LOGIN", [b'al"ice', b"p w"])
    cmd = parse_command(b"a2 login {5+}\r\nalice {2+}\r\npw")
    assert cmd.args == [b"alice", b"pw"]


def test_uid_fetch_with_sections_partial_and_peek() -> None:
    cmd = parse_command(b"t UID FETCH 1:*,7 (UID BODY.PEEK[1.2.HEADER.FIELDS (From x-Y)]<0.100>"
                        b" BODY[2.MIME] BODY[TEXT] BODY[] RFC822.SIZE BODYSTRUCTURE)")
    assert cmd.uid and cmd.name == "FETCH"
    assert cmd.seqset == SeqSet(((1, None), (7, 7)))
    assert cmd.fetch == [
        FetchAtt("UID"),
        FetchAtt("BODY[]", Section((1, 2), "HEADER.FIELDS", ("From", "x-Y")), True, (0, 100)),
        FetchAtt("BODY[]", Section((2,), "MIME")),
        FetchAtt("BODY[]", Section((), "TEXT")),
        FetchAtt("BODY[]", Section()),
        FetchAtt("RFC822.SIZE"), FetchAtt("BODYSTRUCTURE"),
    ]
    assert cmd.fetch[1].section is not None
    assert cmd.fetch[1].section.spec() == "1.2.HEADER.FIELDS (From x-Y)"


def test_fetch_macros_expand() -> None:
    assert [a.name for a in parse_command(b"t FETCH 1 FAST").fetch] == [
        "FLAGS", "INTERNALDATE", "RFC822.SIZE"]
    assert [a.name for a in parse_command(b"t FETCH 1 full").fetch][-1] == "BODY"


def test_repeated_fetch_attribute_lists_parse_alike_and_independently() -> None:
    # mbsync sends the same attribute list once per message: a parsed list is reused.
    first = parse_command(b"1 UID FETCH 7 (BODY.PEEK[] FLAGS)\r\n")
    first.fetch.insert(0, FetchAtt("UID"))  # the server adds UID to its own copy
    again = parse_command(b"2 UID FETCH 8 (BODY.PEEK[] FLAGS)\r\n")
    assert again.fetch == [FetchAtt("BODY[]", section=Section(), peek=True),
                           FetchAtt("FLAGS")]
    assert (again.tag, again.seqset) == ("2", SeqSet(((8, 8),)))
    with pytest.raises(ParseError, match="unexpected characters"):
        parse_command(b"3 UID FETCH 9 (BODY.PEEK[] FLAGS) x\r\n")
    with pytest.raises(ParseError, match="number too large"):
        parse_command(b"4 UID FETCH 12345678901 (BODY.PEEK[] FLAGS)\r\n")


@pytest.mark.parametrize("line", [
    b"a UID FETCH 5:3 (BODY.PEEK[] FLAGS)\r\n",
    b"b uid fetch 1 FLAGS\r\n",
    b"c FETCH 7 FAST",
    b"d UID FETCH 01 (UID)\r\n",
    b"e UID FETCH 4294967295 (UID)\r\n",
    b"f.2 UID FETCH 123456789:2 (BODY.PEEK[HEADER.FIELDS (From)]<0.10>)\r\n",
])
def test_a_fetch_parsed_again_from_known_attributes_is_the_same_command(line: bytes) -> None:
    # The second parse reuses the first one's attribute list (the fast path).
    assert parse_command(line) == parse_command(line)


@pytest.mark.parametrize("line, reason", [
    (b"t UID FETCH 1 (BODY.PEEK[] FLAGS)\n", "unexpected characters"),
    (b"t UID FETCH 0 (BODY.PEEK[] FLAGS)\r\n", "zero"),
    (b"t UID  FETCH 1 (BODY.PEEK[] FLAGS)\r\n", "expected"),
    (b"t FETCH 1 (BODY[MIME])", "MIME needs a part number"),
    (b"t FETCH 0 FLAGS", "zero"),
    (b"t FETCH 1 (BODY[1.HEADER.FIELDS])", "expected a space"),
    (b"t FETCH 1 (BODY[HEADER.FIELDS ()])", "empty header field list"),
    (b"t FETCH 1 (BODY[]<5>)", "expected . in partial"),
    (b"t FETCH 1 (FROB)", "unknown FETCH attribute FROB"),
    (b"t SEARCH FROM", "expected a space"),
    (b"t SEARCH BEFORE 31-Feb-2024", "invalid date"),
    (b"t SEARCH (((((((((((((((((((((((((((((((((((ALL)))))))))))))))))))))))))))))))))))",
     "nested too deeply"),
    (b"t LOGIN {10}\r\nshort", "literal shorter than announced"),
    (b't LOGIN "a\r\nb" c', "CR, LF or NUL"),
    (b"t STATUS INBOX (BOGUS)", "unknown STATUS item BOGUS"),
    (b"t BLURB", "unknown command BLURB"),
    (b"t UID FROB 1", "unknown UID command FROB"),
    (b"t NOOP extra", "unexpected characters"),
])
def test_malformed_commands_raise_with_the_reason_and_tag(line: bytes, reason: str) -> None:
    with pytest.raises(ParseError, match=reason) as info:
        parse_command(line)
    assert info.value.tag == "t"


def test_missing_tag_is_reported_without_one() -> None:
    with pytest.raises(ParseError) as info:
        parse_command(b"")
    assert info.value.tag is None


def test_search_keys_with_charset_and_nesting() -> None:
    cmd = parse_command(b't SEARCH CHARSET UTF-8 OR FROM "J\xc3\xbcrgen" (SINCE 1-Jul-2024 '
                        b"NOT SEEN) HEADER X-Spam yes UID 3:5 2,4:* LARGER 100")
    assert cmd.charset == "UTF-8"
    assert cmd.search == SearchKey("AND", (
        SearchKey("OR", (SearchKey("FROM", ("Jürgen",)), SearchKey("AND", (
            SearchKey("SINCE", (date(2024, 7, 1),)),
            SearchKey("NOT", (SearchKey("SEEN"),)))))),
        SearchKey("HEADER", ("X-Spam", "yes")),
        SearchKey("UID", (SeqSet(((3, 5),)),)),
        SearchKey("SEQ", (SeqSet(((2, 2), (4, None))),)),
        SearchKey("LARGER", (100,)),
    ))


def test_seqset_semantics_of_star_and_reversed_ranges() -> None:
    s = parse_seqset("5:*")
    assert s.contains(3, star=3)  # RFC 3501 §6.4.8: n:* includes the last message
    assert not s.contains(2, star=3)
    assert parse_seqset("9:7").contains(8, star=100)
    assert str(parse_seqset("1,3:*")) == "1,3:*"


def test_mailbox_names_inbox_case_and_modified_utf7() -> None:
    assert parse_command(b"t SELECT inbox").mailbox == "INBOX"
    assert parse_command(b't SELECT "Entw&APw-rfe"').mailbox == "Entwürfe"
    assert encode_mutf7("Entwürfe & Co") == "Entw&APw-rfe &- Co"
    assert decode_mutf7(encode_mutf7("日本語/メール")) == "日本語/メール"


def test_store_flags_and_authenticate_initial_response() -> None:
    cmd = parse_command(b"t UID STORE 1:3 -FLAGS.SILENT (\\Seen \\Flagged)")
    assert (cmd.store_mode, cmd.store_silent, cmd.flags) == ("-", True, ["\\Seen", "\\Flagged"])
    assert parse_command(b"t AUTHENTICATE plain AGFsaWNlAHB3").args == ["PLAIN", b"AGFsaWNlAHB3"]
    assert parse_command(b"t AUTHENTICATE PLAIN =").args == ["PLAIN", b"="]
