"""FETCH data from raw bytes (pure): sizes, line counts, sections, nesting, envelope."""

from __future__ import annotations

from archive.imap.parser import Section
from archive.imap.render import (
    body_section,
    bodystructure,
    envelope,
    imap_string,
    parse_message,
    string_for_humans,
    to_crlf,
)

NESTED = (b"From: a@example.com\n"
          b"Subject: outer\n"
          b"Content-Type: multipart/mixed; boundary=\"B\"\n\n"
          b"preamble\n"
          b"--B\n"
          b"Content-Type: text/plain; charset=utf-8\n"
          b"Content-Disposition: inline; filename=\"a.txt\"\n"
          b"Content-Language: en, de\n"
          b"Content-Location: http://example.com/a\n\n"
          b"line one\nline two\n"
          b"--B\n"
          b"Content-Type: message/rfc822\n\n"
          b"From: \"Inner, Person\" <inner@example.org>\n"
          b"To: undisclosed-recipients:;\n"
          b"Subject: inner\n"
          b"Content-Type: multipart/alternative; boundary=C\n\n"
          b"--C\n\nplain\n--C\nContent-Type: text/html\n\n<p>x</p>\n--C--\n"
          b"--B--\n"
          b"epilogue\n")


def test_served_bytes_are_crlf_and_size_is_their_length() -> None:
    m = parse_message(NESTED)
    assert m.data == NESTED.replace(b"\n", b"\r\n")
    assert m.size == len(m.data)
    assert to_crlf(b"a\r\nb\nc\r") == b"a\r\nb\r\nc\r"  # CRLF kept, bare LF converted
    assert body_section(m, Section()) == m.data


def test_bodystructure_sizes_lines_and_extension_fields() -> None:
    m = parse_message(NESTED)
    bs = bodystructure(m)
    assert bs.startswith(
        # 18 octets, 1 line: Dovecot counts LFs, and the last LF belongs to the boundary
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 18 1 NIL '
        b'("inline" ("filename" "a.txt")) ("en" "de") "http://example.com/a")'
        b'("message" "rfc822" NIL NIL NIL "7bit" ')
    assert bs.endswith(b' "mixed" ("boundary" "B") NIL NIL NIL)')
    text = body_section(m, Section((1,)))
    assert text == b"line one\r\nline two"  # the CRLF before the boundary is not the part's
    inner = body_section(m, Section((2,)))
    # No epilogue after "--C--": its CRLF ends the boundary line, so it stays (Dovecot).
    assert inner is not None and inner.startswith(b"From: \"Inner") and \
        inner.endswith(b"--C--\r\n")
    assert b'"rfc822" NIL NIL NIL "7bit" %d ' % len(inner) in bs
    # BODY (non-extensible) has no extension data.
    assert b"inline" not in bodystructure(m, extended=False)


def test_sections_of_a_nested_message() -> None:
    m = parse_message(NESTED)
    assert body_section(m, Section((2,), "HEADER")) == (
        b'From: "Inner, Person" <inner@example.org>\r\nTo: undisclosed-recipients:;\r\n'
        b"Subject: inner\r\nContent-Type: multipart/alternative; boundary=C\r\n\r\n")
    assert body_section(m, Section((2, 1))) == b"plain"
    assert body_section(m, Section((2, 2, ), "MIME")) == b"Content-Type: text/html\r\n\r\n"
    assert body_section(m, Section((2, 2))) == b"<p>x</p>"
    assert body_section(m, Section((1,), "MIME")).startswith(b"Content-Type: text/plain")  # type: ignore[union-attr]
    assert body_section(m, Section((9,))) is None
    assert body_section(m, Section((1,), "HEADER")) is None  # not a message/rfc822 part
    assert body_section(m, Section((), "TEXT")).startswith(b"preamble\r\n--B")  # type: ignore[union-attr]


def test_header_fields_keep_message_order_and_raw_folding() -> None:
    raw = b"Subject: a\r\n folded\r\nFrom: x@y\r\nTo: z@w\r\nsubject: second\r\n\r\nbody"
    m = parse_message(raw)
    assert body_section(m, Section((), "HEADER.FIELDS", ("FROM", "Subject"))) == (
        b"Subject: a\r\n folded\r\nFrom: x@y\r\nsubject: second\r\n\r\n")
    assert body_section(m, Section((), "HEADER.FIELDS.NOT", ("subject",))) == (
        b"From: x@y\r\nTo: z@w\r\n\r\n")


def test_envelope_addresses_groups_and_defaults() -> None:
    m = parse_message(NESTED)
    inner = m.root.children[1].message
    assert inner is not None
    assert envelope(m) == (b'(NIL "outer" ((NIL NIL "a" "example.com")) ((NIL NIL "a" '
                           b'"example.com")) ((NIL NIL "a" "example.com")) NIL NIL NIL NIL NIL)')
    bs = bodystructure(m)
    assert (b'(NIL "inner" (("Inner, Person" NIL "inner" "example.org")) '
            b'(("Inner, Person" NIL "inner" "example.org")) '
            b'(("Inner, Person" NIL "inner" "example.org")) '
            b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) NIL NIL NIL NIL)') in bs


def test_strings_quote_escape_and_literal() -> None:
    assert imap_string(b'a "b" \\') == b'"a \\"b\\" \\\\"'
    assert imap_string("Jürgen".encode()) == b"{7}\r\nJ\xc3\xbcrgen"
    assert imap_string(None) == b"NIL"
    assert string_for_humans(b"plain subject") == b'"plain subject"'
    assert string_for_humans(b"  folded\r\n\tsubject ") == b"{14}\r\nfolded subject"
    assert string_for_humans(b'say "hi"') == b'{8}\r\nsay "hi"'


def test_malformed_structure_is_bounded_and_never_raises() -> None:
    deep = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i)
                    for i in range(500))
    m = parse_message(deep)
    assert bodystructure(m).count(b"(") < 2000
    for raw in (b"", b"\n", b"no header at all", b"Content-Type: multipart/mixed\n\n--x"):
        parse_message(raw)
        bodystructure(parse_message(raw))
