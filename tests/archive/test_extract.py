"""archive.extract: decoded headers, body text, attachment text; never raises."""

from __future__ import annotations

import hashlib
import io
import zipfile
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP

from archive_db import corpus_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from archive.extract import Limits, clean_text, extract
from gateway.htmltext import visible_text


def make_pdf(text: str) -> bytes:
    """A minimal one-page PDF showing ``text`` in Helvetica (PDF 1.4, §7.5 layout)."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % i + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for off in offsets:
        out.write(b"%010d 00000 n \n" % off)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
              % (len(objects) + 1, xref))
    return out.getvalue()


def make_docx(paragraphs: list[str]) -> bytes:
    ns = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    body = "".join(f"<w:p><w:r><w:t>{p}</w:t></w:r></w:p>" for p in paragraphs)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        zf.writestr("word/document.xml",
                    f'<?xml version="1.0"?><w:document xmlns:w="{ns}"><w:body>{body}'
                    "</w:body></w:document>")
    return buf.getvalue()


def make_xlsx(strings: list[str], number: str) -> bytes:
    ns = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
    sst = "".join(f"<si><t>{s}</t></si>" for s in strings)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("xl/sharedStrings.xml", f'<sst xmlns="{ns}">{sst}</sst>')
        zf.writestr("xl/worksheets/sheet1.xml",
                    f'<worksheet xmlns="{ns}"><sheetData><row><c r="A1" t="s"><v>0</v></c>'
                    f'<c r="B1"><v>{number}</v></c></row></sheetData></worksheet>')
    return buf.getvalue()


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def base_message(**headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = headers.get("From", "Alice Example <alice@example.com>")
    msg["To"] = headers.get("To", "bob@example.org, Carol <carol@example.net>")
    msg["Subject"] = headers.get("Subject", "Quarterly report")
    msg["Date"] = headers.get("Date", "Mon, 15 Jan 2024 10:30:00 +0100")
    msg["Message-ID"] = headers.get("Message-ID", "<q1-2024@example.com>")
    return msg


def test_headers_are_decoded_including_rfc2047_words_and_the_date_becomes_utc() -> None:
    raw = (b"From: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <Juergen@Example.COM>\r\n"
           b"To: a@example.org\r\nCc: =?iso-8859-1?q?Ren=E9?= <rene@example.net>\r\n"
           b"Subject: =?utf-8?b?w5xiZXJ3ZWlzdW5n?= pending\r\n"
           b"Date: Mon, 15 Jan 2024 10:30:00 +0100\r\nMessage-ID: <abc@host.example>\r\n"
           b"\r\nhello\r\n")
    ex = extract(raw)
    assert ex.subject == "Überweisung pending"
    assert ex.message_id == "abc@host.example"
    assert ex.date == datetime(2024, 1, 15, 9, 30, tzinfo=UTC)
    frm = ex.addresses("from")[0]
    assert (frm.name, frm.address) == ("Jürgen Müller", "juergen@example.com")
    assert ex.addresses("cc")[0].name == "René"
    assert ex.body.strip() == "hello"
    assert ex.flags == []


def test_body_charset_is_decoded_and_html_alternative_is_not_indexed_twice() -> None:
    msg = base_message()
    msg.set_content("Grüße aus Köln", charset="iso-8859-1", cte="quoted-printable")
    msg.add_alternative("<p>Grüße <b>aus</b> Köln</p>", subtype="html")
    ex = extract(msg.as_bytes(policy=SMTP))
    assert ex.body.strip() == "Grüße aus Köln"


def test_html_only_body_is_converted_to_visible_text() -> None:
    msg = base_message()
    msg.set_content("<html><head><style>p{color:red}</style><title>t</title></head><body>"
                    "<script>var secret=1;</script><p>Dear&nbsp;Bob,</p><div>Pay &amp; "
                    "go</div></body></html>", subtype="html")
    ex = extract(msg.as_bytes(policy=SMTP))
    assert ex.body == "Dear Bob,\n\nPay & go"  # a no-break space is a space to search
    assert "secret" not in ex.body and "color" not in ex.body


def test_attachments_are_described_and_their_text_extracted() -> None:
    pdf = make_pdf("Invoice number 4711")
    docx = make_docx(["Merger plan", "Project Falcon"])
    xlsx = make_xlsx(["Revenue forecast"], "1234567")
    msg = base_message()
    msg.set_content("see attached")
    msg.add_attachment(b"plain attachment words", maintype="text", subtype="plain",
                       filename="notes.txt")
    msg.add_attachment(b"<h1>Board</h1><p>minutes</p>", maintype="text", subtype="html",
                       filename="minutes.html")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="invoice.pdf")
    msg.add_attachment(docx, maintype="application", subtype="octet-stream",
                       filename="plan.docx")
    msg.add_attachment(xlsx, maintype="application", subtype=(
        "vnd.openxmlformats-officedocument.spreadsheetml.sheet"), filename="forecast.xlsx")
    ex = extract(msg.as_bytes(policy=SMTP))
    by_name = {a.name: a for a in ex.attachments}
    assert set(by_name) == {"notes.txt", "minutes.html", "invoice.pdf", "plan.docx",
                            "forecast.xlsx"}
    pdf_att = by_name["invoice.pdf"]
    assert pdf_att.content_type == "application/pdf"
    assert pdf_att.size == len(pdf)
    assert pdf_att.sha256 == hashlib.sha256(pdf).hexdigest()
    assert "Invoice number 4711" in pdf_att.text
    assert by_name["notes.txt"].text == "plain attachment words"
    assert "Board" in by_name["minutes.html"].text and "<h1>" not in by_name["minutes.html"].text
    assert by_name["plan.docx"].text == "Merger plan\nProject Falcon"
    assert "Revenue forecast" in by_name["forecast.xlsx"].text
    assert "1234567" in by_name["forecast.xlsx"].text
    assert all(a.scanned for a in ex.attachments)
    assert ex.body.strip() == "see attached"


def test_nested_message_and_zip_members_are_scanned_within_the_depth_limit() -> None:
    inner = base_message(Subject="Inner secret", From="mallory@evil.example")
    inner.set_content("the inner body")
    inner.add_attachment(make_zip({"deep/readme.txt": b"zipped words"}),
                         maintype="application", subtype="zip", filename="bundle.zip")
    outer = base_message(Subject="Fwd")
    outer.set_content("forwarding")
    outer.add_attachment(inner)
    raw = outer.as_bytes(policy=SMTP)

    ex = extract(raw)
    names = [a.name for a in ex.attachments]
    assert "bundle.zip" in names and "deep/readme.txt" in names
    nested = next(a for a in ex.attachments if a.content_type == "message/rfc822")
    assert "Inner secret" in nested.text and "the inner body" in nested.text
    assert "mallory@evil.example" in nested.text
    member = next(a for a in ex.attachments if a.name == "deep/readme.txt")
    assert member.text == "zipped words" and member.depth == 2

    shallow = extract(raw, Limits(max_depth=1))
    zipped = next(a for a in shallow.attachments if a.name == "bundle.zip")
    assert zipped.flags == ["could not be scanned: archive nested too deeply"]
    assert "deep/readme.txt" not in [a.name for a in shallow.attachments]


def test_zip_member_over_the_size_limit_is_flagged_not_read() -> None:
    msg = base_message()
    msg.set_content("x")
    msg.add_attachment(make_zip({"big.txt": b"A" * 5000, "small.txt": b"tiny"}),
                       maintype="application", subtype="zip", filename="a.zip")
    ex = extract(msg.as_bytes(policy=SMTP), Limits(max_part_bytes=4096))
    big = next(a for a in ex.attachments if a.name == "big.txt")
    small = next(a for a in ex.attachments if a.name == "small.txt")
    assert big.flags == ["could not be scanned: over the size limit"] and big.text == ""
    assert small.text == "tiny"


def test_damaged_pdf_and_xml_bomb_are_flagged_as_could_not_be_scanned() -> None:
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w") as zf:
        zf.writestr("word/document.xml", '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">'
                    '<!ENTITY b "&a;&a;&a;&a;">]><x>&b;</x>')
    msg = base_message()
    msg.set_content("x")
    msg.add_attachment(b"%PDF-1.4 this is not really a pdf", maintype="application",
                       subtype="pdf", filename="broken.pdf")
    msg.add_attachment(bomb.getvalue(), maintype="application", subtype=(
        "vnd.openxmlformats-officedocument.wordprocessingml.document"), filename="bomb.docx")
    ex = extract(msg.as_bytes(policy=SMTP))
    for name in ("broken.pdf", "bomb.docx"):
        att = next(a for a in ex.attachments if a.name == name)
        assert not att.scanned
        assert att.flags[0].startswith("could not be scanned")


def test_unknown_charset_and_8bit_headers_degrade_to_text_with_a_flag() -> None:
    raw = (b"From: \xc3\x9cser <u@example.com>\r\nSubject: caf\xe9 \xff\r\n"
           b"Content-Type: text/plain; charset=x-klingon\r\n\r\nbody \xc3\xa9t\xc3\xa9\r\n")
    ex = extract(raw)
    assert ex.body.strip() == "body été"
    assert "body: unknown charset 'x-klingon'" in ex.flags
    assert ex.subject.startswith("caf")
    assert ex.addresses("from")[0].name == "Üser"
    assert not any("\ud800" <= c <= "\udfff" for c in ex.subject + ex.addresses("from")[0].name)


def test_clean_text_removes_nul_and_decodes_surrogate_escapes() -> None:
    raw = "a\x00b " + b"\xc3\xa9".decode("ascii", "surrogateescape")
    assert clean_text(raw) == "ab é"
    assert clean_text("x " + b"\xe9".decode("ascii", "surrogateescape")) == "x é"  # cp1252


def test_html_to_text_survives_broken_markup() -> None:
    assert visible_text("<p>unclosed <b>bold <i>and <<<>> stuff") == "unclosed bold and <<<>> stuff"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_extract_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    ex = extract(raw)
    assert ex.size == len(raw)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"--b\r\n", b"--b--\r\n",
    b"Content-Type: message/rfc822\r\n", b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Type: application/zip; name=a.zip\r\n", b"UEsDBBQ=\r\n", b"\r\n",
    b"Content-Disposition: attachment; filename*=utf-8''%E2%82%AC.pdf\r\n",
    b"Subject: =?utf-8?b?broken\r\n", b"From: <<<@>>>\r\n", b"%PDF-1.4\r\n",
    b"Content-Type: text/html; charset=\"\"\r\n", b"<p>x</p>\r\n", b"Date: yesterday\r\n",
]), max_size=40))
def test_extract_never_raises_on_mime_shaped_garbage(lines: list[bytes]) -> None:
    extract(b"".join(lines))


def test_every_corpus_message_extracts_without_raising() -> None:
    root = corpus_dir()
    seen = 0
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.startswith(("LICENSE", "COPYING")):
            ex = extract(path.read_bytes())
            assert ex.size == path.stat().st_size
            seen += 1
    assert seen > 300


def test_header_fields_shared_between_messages_decode_per_message() -> None:
    # Header objects are parsed once per distinct field and shared: two messages
    # with the same Content-Type and different encoded subjects and senders must
    # still each get their own, in any order.
    def msg(subject: str, sender: str, name: str) -> bytes:
        return (f"From: {sender}\r\nTo: b@example.org\r\nSubject: {subject}\r\n"
                "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
                "--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n"
                f"--XX\r\nContent-Type: text/plain; name=\"{name}\"\r\n"
                "Content-Disposition: attachment\r\n\r\nfile\r\n--XX--\r\n").encode()

    one = msg("=?utf-8?q?caf=C3=A9?=", "Ann <ann@example.com>", "a.txt")
    two = msg("=?utf-8?b?w7xiZXI=?=", "Bob <bob@example.net>", "b.txt")
    for _ in range(2):
        for raw, subject, sender, name in ((one, "café", "ann@example.com", "a.txt"),
                                           (two, "über", "bob@example.net", "b.txt")):
            out = extract(raw)
            assert out.subject == subject
            assert [p.address for p in out.participants if p.role == "from"] == [sender]
            assert [a.name for a in out.attachments] == [name]
