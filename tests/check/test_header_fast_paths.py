"""The check stage's shortcuts give exactly what the long way gives.

Each shortcut (look only at the header, skip dkimpy when no field of interest is
there, remember parsed address lists) is compared with the code it replaced,
kept here as the reference: on every message of the shared corpus and on
generated messages built to hit the edges (bare LF and CR, a continuation
first, a body that names the fields, no empty line at all).
"""

from __future__ import annotations

import re
from email.utils import getaddresses
from pathlib import Path

import dkim
import pytest
from authcorpus import corpus_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.check import arc, authresults, dkim_verify, headers
from gateway.check.dkim_verify import LIBRARY_ERRORS

# --- the references: the code before the shortcuts -----------------------------------

_LINE = re.compile(rb"[^\n]*\n|[^\n]+")


def split_reference(data: bytes) -> tuple[list[headers.Field], bytes]:
    fields: list[headers.Field] = []
    pos = 0
    for m in _LINE.finditer(data):
        line = m.group()
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = headers.Field(last.name, last.raw + line)
        else:
            name, colon, _ = line.partition(b":")
            ok = colon and name and not re.search(rb"[\s]", name.rstrip(b" \t"))
            fields.append(headers.Field(
                name.strip().lower().decode("ascii", "replace") if ok else "", line))
        pos = m.end()
    return fields, data[pos:]


def value_reference(raw: bytes) -> str:
    """Field.value before the one-line shortcut: every fold removed by the pattern."""
    return re.sub(rb"\r?\n(?=[ \t])", b"", raw.partition(b":")[2]).strip().decode(
        "utf-8", "replace")


def signature_count_reference(data: bytes) -> int:
    if re.search(rb"dkim-signature", data, re.IGNORECASE) is None:
        return 0
    try:
        d = dkim.DKIM(data, logger=dkim_verify._Log())
    except LIBRARY_ERRORS:
        head = re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0]
        return sum(1 for line in re.split(rb"\r?\n", head)
                   if re.match(rb"^dkim-signature\s*:", line, re.IGNORECASE))
    return sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")


def arc_none_reference(data: bytes) -> tuple[str, str] | None:
    """verify_sync's (result, reason) for a message with no ARC set; None if it has one."""
    if arc._ARC_FIELD_ANYWHERE.search(data) is None:
        return "none", arc.NOT_ARC_SIGNED
    try:
        chain = dkim.ARC(data, logger=dkim_verify._Log())
        cv, _, comment = chain.verify(dnsfunc=_no_dns)
    except LIBRARY_ERRORS as exc:
        if not re.search(rb"(?im)^arc-seal\s*:", re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0]):
            return "none", "no ARC set (message not parsable by dkimpy)"
        return "fail", f"chain not parsable: {exc!r}"
    if comment != arc.NOT_ARC_SIGNED:
        return None  # a chain was there: verified for real, not a shortcut's business
    return {b"pass": "pass", b"none": "none"}.get(cv, "fail"), str(comment)


def _no_dns(name: bytes, timeout: float = 5) -> bytes | None:
    raise AssertionError("no DNS lookup is needed to find that there is no ARC set")


def strip_reference(data: bytes, authserv_id: str) -> tuple[bytes, int]:
    fields, rest = split_reference(data)
    ours = authserv_id.lower().rstrip(".")
    kept = [f for f in fields if not (f.name == "authentication-results"
                                      and authresults.authserv_id_of(f.value) == ours)]
    removed = len(fields) - len(kept)
    return (headers.join(kept, rest) if removed else data), removed


# --- one comparison, for the corpus and for generated messages ------------------------

def assert_same(data: bytes) -> None:
    fields, rest = headers.split(data)
    ref_fields, ref_rest = split_reference(data)
    assert (fields, rest) == (ref_fields, ref_rest)
    assert [f.value for f in fields] == [value_reference(f.raw) for f in ref_fields]
    for name in ("from", "authentication-results", "dkim-signature", "to", "FROM"):
        assert headers.values(data, name) == [value_reference(f.raw) for f in ref_fields
                                              if f.name == name.lower()]
    assert headers.header_block(data) + rest == data
    assert dkim_verify.signature_count(data) == signature_count_reference(data)
    assert authresults.strip_forged(data, "mx.coffer.test") == \
        strip_reference(data, "mx.coffer.test")
    if arc._no_arc_field(data):
        assert arc_none_reference(data) == ("none", arc.NOT_ARC_SIGNED)
    try:
        dkim_headers = dkim.rfc822_parse(data)[0]
    except LIBRARY_ERRORS:
        return
    # dkimpy reads as its header exactly the lines of header_block
    assert dkim.rfc822_parse(headers.header_block(data))[0] == dkim_headers


def _corpus_files() -> list[Path]:
    base = corpus_dir()
    if base is None:
        return []
    return sorted(p for p in base.rglob("*") if p.is_file() and p.suffix != ".md")


def test_every_corpus_message(corpus: Path) -> None:
    files = _corpus_files()
    assert len(files) > 1000
    shortcut = 0
    for path in files:
        data = path.read_bytes()
        try:
            assert_same(data)
            assert_same(data.replace(b"\r\n", b"\n"))
            assert_same(data.replace(b"\n", b"\r\n"))
        except AssertionError as exc:
            raise AssertionError(f"{path}: {exc}") from exc
        shortcut += arc._no_arc_field(data)
    # the corpus has signed and sealed mail too: both ways were taken
    assert 0 < shortcut < len(files)


_NAMES = [b"From", b"from \t", b"FROM\x0b", b"To", b"Subject", b"DKIM-Signature",
          b"dkim-signature ", b"ARC-Seal",
          b"arc-message-signature", b"ARC-Authentication-Results", b"Authentication-Results",
          b"X-Arc-Seal-Not", b"Bad Name", b"", b"From ", b"\xc3\xa9t\xc3\xa9"]
_VALUES = [b" mx.coffer.test; spf=pass", b" other.example; dkim=pass", b" i=1; a=rsa-sha256",
           b" Alice <alice@example.com>", b"", b" x\r", b" a\rb"]
_ENDS = [b"\r\n", b"\n", b"\r", b""]

_line = st.one_of(
    st.builds(lambda n, v, e: n + b":" + v + e, st.sampled_from(_NAMES),
              st.sampled_from(_VALUES), st.sampled_from(_ENDS)),
    st.builds(lambda w, v, e: w + v + e, st.sampled_from([b" ", b"\t"]),
              st.sampled_from([*_VALUES, b"arc-seal: i=1"]), st.sampled_from(_ENDS)),
    st.builds(lambda n, e: n + e, st.sampled_from([*_NAMES, b"From x", b"no colon"]),
              st.sampled_from(_ENDS)),
    st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n", b"\n\r\n"]),
    st.binary(max_size=12),
)


@settings(max_examples=600, deadline=None)
@given(st.lists(_line, max_size=12))
def test_generated_messages(lines: list[bytes]) -> None:
    assert_same(b"".join(lines))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.text(alphabet=st.sampled_from(list('ab@.<>"(),:;\\ ')), max_size=30),
    st.sampled_from(["Bench Sender <bench@src.example>", "<rcpt1@dst.example>",
                     '"a, b" <c@d>', "(x) y@z", "a@b, c@d", 'x (a (b)) <y@z>'])),
    max_size=3))
def test_remembered_address_lists_are_the_parse(values: list[str]) -> None:
    for _ in range(2):  # the second answer comes from the cache
        try:
            expected = headers._parse(tuple(values))
        except Exception as exc:
            try:
                headers.addresses(values)
            except type(exc):
                continue
            raise AssertionError(f"{values!r} should raise {exc!r}") from None
        got = headers.addresses(values)
        assert got == expected
        got.append(("mutated", "by caller"))  # a caller's change never reaches the cache


def test_long_address_lists_are_not_remembered() -> None:
    value = ", ".join(f"user{i}@example.com" for i in range(60))
    assert len(value) > headers.MAX_CACHED_VALUE
    before = headers._remembered.cache_info().currsize
    assert headers.addresses([value]) == getaddresses([value])
    assert headers._remembered.cache_info().currsize == before


@pytest.mark.parametrize("name", [b"ARC-Seal", b"arc-message-signature",
                                  b"Arc-Authentication-Results", b"DKIM-Signature",
                                  b"authentication-RESULTS"])
def test_each_field_name_alone_is_seen_in_any_case(name: bytes) -> None:
    # the lowered-header searches (``in``) against the case-insensitive patterns they
    # replaced, one field name at a time
    data = b"From: a@b.example\r\n" + name + b": i=1; x=y\r\nSubject: s\r\n\r\nbody\r\n"
    arc_pattern = re.compile(rb"arc-(?:seal|message-signature|authentication-results)",
                             re.IGNORECASE)
    assert arc._no_arc_field(data) == (arc_pattern.search(data) is None)
    assert (dkim_verify.signature_count(data) > 0) == (name.lower() == b"dkim-signature")
    forged = data.replace(b"i=1; x=y", b"mx.coffer.test; spf=pass")
    assert authresults.strip_forged(forged, "mx.coffer.test") == \
        strip_reference(forged, "mx.coffer.test")
    assert authresults.strip_forged(forged, "mx.coffer.test")[1] == (
        name.lower() == b"authentication-results")
