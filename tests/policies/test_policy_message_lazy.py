"""The lazy message view equals the eager one it replaced, field by field and in the
decisions, trace and errors of every policy, whatever order conditions read it in.

The reference is the eager view as it was (policy_reference_message.py, frozen);
the corpus is the shared MIME corpus plus generated messages aimed at the walk's
edges (odd charsets, nesting, archives, failures).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path

import policy_reference_message as reference
import pytest

from gateway import mailparse
from gateway.envelope import Envelope
from policies import SHIPPED
from policies.engine import evaluate
from policies.loader import load_policy
from policies.message import MessageView
from policies.schema import Policy

REPO = Path(__file__).resolve().parents[2]
PREFIX = b"X-Spam-Status: No, score=0.1 required=5.0\r\n"  # what decide sees after spam

# Every condition the language has that reads the message, one rule each so each is
# evaluated; ATTACHMENTS_FIRST makes the attachment rules meet an unwalked view.
CONTENT_RULES = [
    "{from.address: {contains: '@'}}",
    "{from.domain: {glob: '*.com'}}",
    "{header: {name: Received, regex: 'from'}}",
    "{header.List-Unsubscribe: {exists: true}}",
    "{header.Content-Type: {contains: multipart}}",
    "{header.X-Nope: {exists: false}}",
    "{subject: {contains: re}}",
    "{subject: {regex: '[A-Z]'}}",
    "{body: {contains: the}}",
    "{body: {keywords: words}}",
    "{size: {gt: 5000}}",
    "{dlp: {detector: credit_card}}",
    "{dlp: {detector: iban, scope: all}}",
    "{dlp: {detector: us_ssn, scope: attachments}}",
    "{dlp: {detector: keywords, list: words, scope: body}}",
    "{dlp: {detector: regex, pattern: '\\d{3}', min_count: 2, scope: subject}}",
]
ATTACHMENT_RULES = [
    "{attachment.extension: [exe, zip, pdf, txt]}",
    "{attachment: {detected_type: {glob: 'application/*'}, size: {gt: 100}}}",
    "{attachment: {declared_type: {glob: 'text/*'}, depth: {ge: 1}}}",
    "{attachment.name: {regex: '\\.'}}",
    "{attachment.encrypted: true}",
    "{attachment.unscannable: true}",
    "{attachments.count: {ge: 2}}",
    "{attachments.depth: {ge: 1}}",
]


def _policy_text(conditions: list[str]) -> str:
    lines = ["version: 1", "lists:", "  words: [the, secret, invoice, 'please find']",
             "rules:"]
    for i, cond in enumerate(conditions):
        lines += [f"  - name: r{i}", f"    when: {cond}", f"    then: [{{retain: {i + 1}d}}]"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> list[Policy]:
    out = [load_policy(path) for path in sorted(SHIPPED.glob("*.yaml"))]
    directory = tmp_path_factory.mktemp("lazy")
    for name, conds in (("attachments-first", ATTACHMENT_RULES + CONTENT_RULES),
                        ("content-first", CONTENT_RULES + ATTACHMENT_RULES)):
        path = directory / f"{name}.yaml"
        path.write_text(_policy_text(conds))
        out.append(load_policy(path))
    return out


def corpus() -> list[bytes]:
    root = Path(os.environ.get("COFFER_CORPUS") or REPO.parent / "shared" / "corpus")
    if not (root / "mime").is_dir():
        pytest.skip(f"MIME corpus not found under {root} (set COFFER_CORPUS)")
    dirs = ["mime", "smime-pgp", "dkim-arc", "spam-ham/spamassassin-regression"]
    files = sorted(p for d in dirs if (root / d).is_dir() for p in (root / d).rglob("*")
                   if p.is_file())
    ham_spam = sorted(p for p in (root / "spam-ham" / "test").rglob("*") if p.is_file())
    files += random.Random(7).sample(ham_spam, min(150, len(ham_spam)))
    return [p.read_bytes() for p in files]


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _mixed(*parts: bytes, boundary: str = "b1") -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    return (b"From: a@b.example\r\nSubject: mixed 123 456\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=" + boundary.encode() + b"\r\n\r\n"
            + body + b"--" + boundary.encode() + b"--\r\n")


def _attachment(name: str, data: bytes, ctype: str = "application/octet-stream") -> bytes:
    return (f"Content-Type: {ctype}; name={name}\r\n"
            f"Content-Disposition: attachment; filename={name}\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n").encode() + base64.encodebytes(data)


def _text(charset: str, body: bytes, ctype: str = "text/plain") -> bytes:
    return f"Content-Type: {ctype}; charset={charset}\r\n\r\n".encode() + body


def _nested(levels: int, inner: bytes) -> bytes:
    for _ in range(levels):
        inner = (b"Subject: wrapped\r\nContent-Type: message/rfc822\r\n\r\n" + inner)
    return inner


def generated() -> list[bytes]:
    """Messages at the walk's edges: the charsets that fail a decode, archives, nesting."""
    zipped = _zip({"a.exe": b"MZ" + b"\0" * 64, "notes.txt": b"the secret 4111 1111 1111 1111",
                   "inner.zip": _zip({"deep.txt": b"EMP-1 secret"})})
    out = [
        _mixed(_text("idna", b"the body"), _attachment("x.exe", b"MZ\0\0")),
        _mixed(_attachment("x.txt", b"the text", "text/plain; charset=idna"),
               _attachment("y.exe", b"MZ")),
        _mixed(_text("undefined", b"x"), _attachment("z.pdf", b"%PDF-1 /Encrypt")),
        _mixed(_text("utf-8\x00", b"x"), _attachment("z.zip", zipped)),
        _mixed(_text("x-unknown", b"caf\xe9 the"), _text("iso-8859-1", b"caf\xe9")),
        _mixed(_text("us-ascii", b"<p>the <b>secret</b></p>", "text/html"),
               _attachment("page.html", b"<html>the secret</html>", "text/html")),
        _mixed(_attachment("a.zip", zipped), _attachment("b.zip", b"PK\x03\x04broken")),
        _mixed(_nested(3, _mixed(_attachment("n.exe", b"MZ"), boundary="b2"))),
        _nested(12, b"Subject: deep\r\n\r\nthe bottom"),
        b"Subject: =?utf-8?b?w6k=?= the\r\nFrom: =?utf-8?q?A?= <a@x.com>\r\n"
        b"X-Raw: caf\xc3\xa9\r\n\r\nbody the",
        b"Content-Type: multipart/mixed\r\n\r\nno boundary",
        b"Content-Type: text/plain; charset=\"=?utf-8?q?x?=\"\r\n\r\nbody",
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=s.p7m\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\nMIIB\r\n",
        b"",
        b"no header at all",
    ]
    many = _mixed(*[_attachment(f"f{i}.txt", b"the", "text/plain") for i in range(1100)])
    out.append(many)
    return out


def messages() -> list[bytes]:
    msgs = corpus() + generated()
    return msgs + [PREFIX + m for m in msgs[::3]]


@pytest.fixture(autouse=True)
def _fresh_parse_cache() -> Iterator[None]:
    mailparse.clear()
    yield
    mailparse.clear()


def _stripped(attachments: list[reference.Attachment]) -> list[tuple[object, ...]]:
    return [dataclasses.astuple(a)[:-1] for a in attachments]  # all but the text


def _eager(ref: reference.MessageView) -> MessageView:
    return MessageView(ref.size, ref.headers, ref.subject, ref.body_text,
                       [_copy_attachment(a) for a in ref.attachments], ref.defects)


def _copy_attachment(a: reference.Attachment) -> object:
    from policies.message import Attachment
    return Attachment(*dataclasses.astuple(a))


def test_every_field_equals_the_eager_view_in_any_order_of_reading() -> None:
    for raw in messages():
        ref = reference.MessageView.from_bytes(raw)
        names = {n.lower() for n, _ in ref.headers} | {"subject", "from", "x-nope"}

        # Attachments (without text) before anything else, then header by header.
        view = MessageView.from_bytes(raw)
        assert _stripped(view.attachment_meta) == _stripped(ref.attachments), raw[:200]
        assert view.max_depth == ref.max_depth
        for name in sorted(names):
            assert view.header_values(name) == ref.header_values(name)
        assert view.subject == ref.subject
        assert view.body_text == ref.body_text
        assert view.attachments == [_copy_attachment(a) for a in ref.attachments]
        assert view.attachment_text == ref.attachment_text
        assert view.defects == ref.defects
        assert view.headers == ref.headers

        # The text first: the attachment conditions then read the full list.
        other = MessageView.from_bytes(raw)
        assert other.attachment_text == ref.attachment_text
        assert other.attachment_meta == other.attachments
        assert other.headers == ref.headers
        assert other == _eager(ref)


def _envelopes() -> list[Envelope]:
    return [
        Envelope(mail_from="a@outside.example", rcpt_to=["b@local.example"]),
        Envelope(mail_from="a@local.example", rcpt_to=["b@outside.example"], auth_user="a"),
    ]


def test_every_policy_decides_the_same_on_the_lazy_view(policies: list[Policy]) -> None:
    facts = {"check": {"spf": {"result": "pass"}, "dmarc": {"result": "none"}},
             "spam": {"score": 1.0, "verdict": "ham"}}
    for raw in messages():
        ref = reference.MessageView.from_bytes(raw)
        for policy in policies:
            for env in _envelopes():
                want = evaluate(policy, env, _eager(ref), facts,
                                local_domains=["local.example"]).to_facts()
                got = evaluate(policy, env, raw, facts,
                               local_domains=["local.example"]).to_facts()
                assert got == want, (policy.digest, raw[:200])


def test_a_policy_without_content_rules_never_walks_the_message() -> None:
    view = MessageView.from_bytes(_mixed(_text("utf-8", b"x"), _attachment("a.exe", b"MZ")))
    assert view.subject == "mixed 123 456"
    assert view._attachments is None and view._meta is None  # nothing walked yet
    assert view.header_values("from") == ["a@b.example"]
    assert view._headers is None  # only From was decoded


def test_listing_attachments_extracts_no_text() -> None:
    raw = _mixed(_text("utf-8", b"the body"), _attachment("n.txt", b"the text", "text/plain"))
    view = MessageView.from_bytes(raw)
    assert [(a.name, a.text) for a in view.attachment_meta] == [("n.txt", "")]
    assert [(a.name, a.text) for a in view.attachments] == [("n.txt", "the text")]
    assert view.body_text == "the body"


def test_a_decode_that_fails_the_walk_fails_the_attachment_listing_at_the_same_part() -> None:
    raw = _mixed(_text("idna", b"the body"), _attachment("x.exe", b"MZ"))
    view = MessageView.from_bytes(raw)
    assert view.attachment_meta == []
    assert view.defects[-1].startswith("message walk failed: UnicodeError")
    assert reference.MessageView.from_bytes(raw).attachments == []


def test_long_field_values_are_not_memoised() -> None:
    from policies import message
    name = "a" * 600 + ".exe"
    raw = _mixed(_attachment(name, b"MZ"))
    message._leaf_memo.clear()
    view = MessageView.from_bytes(raw)
    assert [a.name for a in view.attachment_meta] == [name]
    assert all(len(str(k)) < 1400 for k in message._leaf_memo)
    assert not any(name in str(k) for k in message._leaf_memo)
