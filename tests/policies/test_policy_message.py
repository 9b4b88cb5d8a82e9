"""The parsed message view: built once, robust to anything, never raises."""

from __future__ import annotations

import base64
import io
import os
import zipfile
from pathlib import Path

import pytest

from gateway.htmltext import visible_text
from policies.message import MAX_DEPTH, MessageView

REPO = Path(__file__).resolve().parents[2]


def corpus_dir() -> Path:
    root = Path(os.environ.get("COFFER_CORPUS") or REPO.parent / "shared" / "corpus")
    mime = root / "mime"
    if not mime.is_dir():
        pytest.skip(f"MIME corpus not found at {mime} (set COFFER_CORPUS)")
    return mime


def test_every_corpus_message_parses_without_raising() -> None:
    files = [p for p in corpus_dir().rglob("*") if p.is_file()]
    assert files
    with_body = 0
    for path in files:
        view = MessageView.from_bytes(path.read_bytes())
        assert view.size == path.stat().st_size
        with_body += bool(view.body_text or view.attachments)
    assert with_body > len(files) // 2


def test_headers_are_decoded_and_unfolded() -> None:
    raw = (b"Subject: =?iso-8859-1?q?R=E9sum=E9?=\r\n =?utf-8?b?w6A=?= folded\r\n"
           b"X-Raw: caf\xc3\xa9\r\n\r\nbody\r\n")
    view = MessageView.from_bytes(raw)
    # RFC 2047 §6.2: white space between adjacent encoded-words is not displayed.
    assert view.subject == "Résuméà folded"
    assert view.header_values("x-raw") == ["café"]


def test_html_text_skips_script_and_style() -> None:
    text = visible_text("<style>p{}</style><p>Hello&amp;bye</p><script>evil()</script>")
    assert text == "Hello&bye"


def test_body_uses_the_declared_charset_and_survives_an_unknown_one() -> None:
    raw = (b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\ncaf\xe9\r\n")
    assert "café" in MessageView.from_bytes(raw).body_text
    raw = b"Content-Type: text/plain; charset=x-unknown-42\r\n\r\nhello\r\n"
    assert "hello" in MessageView.from_bytes(raw).body_text


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return bio.getvalue()


def _with_attachment(name: str, data: bytes) -> bytes:
    b64 = base64.encodebytes(data)
    return (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
            b"--B\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
            b"--B\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Disposition: attachment; filename=\"" + name.encode() + b"\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + b"--B--\r\n")


def test_archive_nesting_beyond_the_limit_is_unscannable_not_unbounded() -> None:
    data = b"innermost"
    for i in range(MAX_DEPTH + 3):
        data = _zip([(f"level{i}.zip" if i else "x.txt", data)])
    view = MessageView.from_bytes(_with_attachment("deep.zip", data))
    assert any(a.unscannable and "nested deeper" in a.reason for a in view.attachments)
    assert max(a.depth for a in view.attachments) <= MAX_DEPTH + 1


def test_zip_bomb_member_is_not_inflated() -> None:
    # 17 MiB of one letter compresses to ~17 KiB; past the limit only its head is read.
    bomb = _zip([("zeros.txt", b"a" * (17 * 1024 * 1024))])
    view = MessageView.from_bytes(_with_attachment("bomb.zip", bomb))
    member = next(a for a in view.attachments if a.name == "zeros.txt")
    assert member.size == 17 * 1024 * 1024
    assert member.text == ""
    assert member.unscannable and "too large" in member.reason


def test_text_attachment_is_extracted_for_dlp() -> None:
    view = MessageView.from_bytes(_with_attachment("notes.txt", b"EMP-123456"))
    assert "EMP-123456" in view.attachment_text
    assert "EMP-123456" not in view.body_text


@pytest.mark.parametrize("raw", [
    b"", b"\x00\xff\xfe", b"Content-Type: multipart/mixed\r\n\r\nno boundary",
    b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n--x\r\n",
    b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!",
    b"Content-Type: message/rfc822\r\n\r\n",
    b"Subject: =?bogus?x?zzz?=\r\n\r\n",
    b":\r\n: :\r\n\r\n",
])
def test_malformed_messages_never_raise(raw: bytes) -> None:
    view = MessageView.from_bytes(raw)
    assert view.size == len(raw)


def test_pgp_mime_and_smime_enveloped_parts_are_encrypted() -> None:
    pgp = (b"Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; "
           b"boundary=E\r\n\r\n--E\r\nContent-Type: application/pgp-encrypted\r\n\r\n"
           b"Version: 1\r\n--E\r\nContent-Type: application/octet-stream\r\n\r\n"
           b"-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA5lE\r\n-----END PGP MESSAGE-----\r\n"
           b"--E--\r\n")
    view = MessageView.from_bytes(pgp)
    enc = [a for a in view.attachments if a.encrypted]
    assert [a.detected_type for a in enc] == ["application/pgp-encrypted"]
    smime = (b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; "
             b"name=smime.p7m\r\nContent-Transfer-Encoding: base64\r\n\r\nMIAGCSqGSIb3DQEHA6CA\r\n")
    view = MessageView.from_bytes(smime)
    assert [(a.declared_type, a.encrypted, a.unscannable) for a in view.attachments] == [
        ("application/pkcs7-mime", True, True)]
    signed = smime.replace(b"enveloped-data", b"signed-data")
    assert [a.encrypted for a in MessageView.from_bytes(signed).attachments] == [False]
