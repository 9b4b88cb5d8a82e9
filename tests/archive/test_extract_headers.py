"""extract() reads MIME structure without header objects and still decodes what people wrote.

The parser builds no header objects (archive.extract._FastPolicy); these are the cases
where plain compat32 would differ from what the default policy gave.
"""

from __future__ import annotations

from archive.extract import body_text, extract

FOLDED_BOUNDARY = (b"From: a@example.com\r\nSubject: folded\r\nMIME-Version: 1.0\r\n"
                   b'Content-Type: multipart/mixed; boundary="foo\r\n bar"\r\n\r\n'
                   b"prologue\r\n--foo bar\r\nContent-Type: text/plain\r\n\r\nthe body\r\n"
                   b"--foo bar\r\nContent-Type: text/plain\r\n"
                   b"Content-Disposition: attachment; filename=notes.txt\r\n\r\nattached\r\n"
                   b"--foo bar--\r\n")


def test_eight_bit_utf8_attachment_name_is_decoded_not_replaced() -> None:
    raw = ("From: a@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
           "Content-Type: text/plain\r\n\r\nhi\r\n--b\r\n"
           'Content-Type: application/octet-stream; name="Grüße_2024.zip"\r\n'
           'Content-Disposition: attachment; filename="Hasen und Frösche.txt"\r\n'
           "\r\nabc\r\n--b--\r\n").encode()
    [att] = extract(raw).attachments
    assert att.name == "Hasen und Frösche.txt"


def test_boundary_folded_across_lines_still_splits_the_parts() -> None:
    ex = extract(FOLDED_BOUNDARY)
    assert ex.body.strip() == "the body"
    assert [a.name for a in ex.attachments] == ["notes.txt"]
    assert not any("malformed" in f for f in ex.flags)


def test_snippet_text_is_the_indexed_body() -> None:
    assert body_text(FOLDED_BOUNDARY) == extract(FOLDED_BOUNDARY).body


def test_encoded_words_and_address_lists_are_still_decoded() -> None:
    raw = (b"From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <jm@example.com>\r\n"
           b"To: \"Doe, Jane\" <jane@example.org>, bob@example.org\r\n"
           b"Subject: =?iso-8859-1?q?Gr=FC=DFe?= aus\r\n Berlin\r\n\r\nhi\r\n")
    ex = extract(raw)
    assert ex.subject == "Grüße aus Berlin"
    assert [(p.role, p.address, p.name) for p in ex.participants] == [
        ("from", "jm@example.com", "Jürgen Müller"), ("to", "jane@example.org", "Doe, Jane"),
        ("to", "bob@example.org", "")]
