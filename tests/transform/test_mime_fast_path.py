"""encryption_of / signature_of / signed_entity answer a message whose header block
names no crypto media type without parsing it, and always as the full answer does.

The full answers (``_encryption_of`` ...) parse the top-level Content-Type; the
fast path only looks for the media type names in the lowered header block.  Both
are compared on every file of the MIME and S/MIME-PGP corpora (as stored, CRLF
and bare LF) and on generated header sections with folding, 8-bit bytes, odd
case and look-alike types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptokit import corpus_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import mailparse
from gateway.transform import mime

PAIRS: list[tuple[Callable[[bytes], Any], Callable[[bytes], Any]]] = [
    (mime.encryption_of, mime._encryption_of),
    (mime.signature_of, mime._signature_of),
    (mime.signed_entity, mime._signed_entity),
]


def _try(fn: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return "ok", fn(data)
    except Exception as exc:
        return "raised", type(exc)


def assert_fast_equals_full(data: bytes) -> None:
    for fast, full in PAIRS:
        assert _try(fast, data) == _try(full, data), (fast.__name__, data[:200])


def corpus() -> Iterator[bytes]:
    root = corpus_dir()
    if root is None or not (root / "mime").is_dir():
        pytest.skip("corpus not found")
    for sub in ("mime", "smime-pgp", "spam-ham/spamassassin-regression"):
        for p in sorted((root / sub).rglob("*")):
            if p.is_file() and p.stat().st_size < 2 * 1024 * 1024:
                yield p.read_bytes()


def test_fast_path_answers_as_the_full_parse_on_the_corpus() -> None:
    seen = 0
    for data in corpus():
        for variant in (data, mime.crlf(data), data.replace(b"\r\n", b"\n")):
            assert_fast_equals_full(variant)
        seen += 1
    assert seen > 100


def test_the_corpus_has_crypto_messages_the_fast_path_lets_through() -> None:
    found = {mime.encryption_of(mime.crlf(d)) for d in corpus()} | {
        mime.signature_of(mime.crlf(d)) for d in corpus()}
    assert {"pgp", "smime"} <= found


def test_a_plain_message_is_answered_without_a_parse() -> None:
    mailparse.clear()
    data = (b"From: a@b.example\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            b"-----BEGIN PGP MESSAGE-----\r\nmultipart/encrypted\r\n")
    assert mime.encryption_of(data) is None
    assert mime.signature_of(data) is None
    assert mime.signed_entity(data) is None
    assert mailparse.stats()["misses"] == 0


_TYPES = st.sampled_from([
    "multipart/encrypted", "Multipart/Encrypted", "MULTIPART/SIGNED", "multipart/signed",
    "application/pkcs7-mime", "application/x-pkcs7-mime", "Application/PKCS7-MIME",
    "multipart/mixed", "text/plain", "multipart/encrypted/x", "multipart /signed",
    "multipart/\r\n encrypted", "multipart/enc\xffrypted", "\xffmultipart/signed",
    "=?utf-8?q?multipart/signed?=", "", "multipart/signed(c)",
])
_PARAMS = st.sampled_from([
    "", '; protocol="application/pgp-encrypted"', "; protocol=application/pgp-signature",
    '; protocol="application/pkcs7-signature"; micalg=sha-256; boundary="b"',
    "; smime-type=enveloped-data", "; smime-type=signed-data", "; smime-type=\"Signed-Data\"",
    "; boundary=b", ";\r\n\tprotocol=\"application/pgp-encrypted\"", "; protocol*=utf-8''x",
])
_OTHER = st.sampled_from([
    "Subject: multipart/encrypted", "X-Note: pkcs7-mime", "From: a@b", " folded line",
    "Content-type: text/html", "content-TYPE: multipart/signed; protocol=x",
    "From x y", "no colon", "MIME-Version: 1.0",
])
_ENDS = st.sampled_from(["\r\n", "\n", "\r"])
_BODIES = st.sampled_from([
    "", "body\r\n", "--b\r\nContent-Type: multipart/signed; protocol=\"application/pgp-signature\""
    "\r\n\r\nx\r\n--b--\r\n", "Content-Type: multipart/encrypted\r\n",
])


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_OTHER, st.tuples(_TYPES, _PARAMS).map(
           lambda t: "Content-Type: " + t[0] + t[1])), max_size=5),
       st.lists(_ENDS, min_size=6, max_size=6), st.booleans(), _BODIES)
def test_fast_path_answers_as_the_full_parse_on_generated_headers(
        lines: list[str], ends: list[str], blank: bool, body: str) -> None:
    text = "".join(line + ends[i] for i, line in enumerate(lines))
    if blank:
        text += ends[-1]
    data = (text + body).encode("latin-1")
    assert_fast_equals_full(data)

