"""archive.extract as it was before its fast paths, kept as the reference of the
differential tests (test_extract_fastpaths.py).

The functions below are the old code, verbatim except for names: the header fields
read through the default policy's parse (no plain-address shortcut, no Date cache),
every part's type, disposition and charset asked anew (no per-value memo), every
participant rebuilt by _cleaned, each charset looked up anew, the fields read one
lookup at a time.  :func:`installed` puts them in place of the new
ones, so ``archive.extract.extract`` (and ``body_text``) run the old way; the
helpers both versions share are imported from the module itself (and the HTML
converter, which both use, from gateway.htmltext).
"""

from __future__ import annotations

import codecs
import contextlib
import email.message
import email.utils
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest

import archive.extract as ex
from archive.extract import (
    _ADDRESS_HEADERS,
    _SURROGATES,
    _UNSTRUCTURED,
    Extracted,
    Participant,
    _charset,
    _content_type,
    _decode_words,
    _get,
    _get_all,
    _is_attachment,
    _parse_addresses,
    _part_bytes,
    _raw_values,
    clean_text,
)
from archive.imap.render import to_crlf
from gateway import mailparse
from gateway.htmltext import visible_text as html_to_text

_PARSE = ex._PARSE


def extract(raw: bytes, limits: ex.Limits | None = None) -> Extracted:
    limits = limits or ex.Limits()
    # Not in the old code: the IMAP size, measured as the IMAP server did before (the
    # CRLF copy built), so the differential tests compare crlf_size on the corpus too.
    out = Extracted(size=len(raw), crlf_size=len(to_crlf(raw)))
    try:
        ex._Extractor(limits).run(raw, out, depth=0)
    except RecursionError:
        out.flags.append("could not be scanned: structure nested too deeply")
    except Exception as exc:
        out.flags.append(f"could not be scanned: {type(exc).__name__}: {exc}"[:300])
    return ex._cleaned(out)


def _decode_bytes(data: bytes, charset: str | None) -> tuple[str, str | None]:
    flag = None
    name = (charset or "us-ascii").strip().strip('"').lower()
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        codec = None
        flag = f"unknown charset {name[:40]!r}"
    if codec is not None:
        with contextlib.suppress(UnicodeDecodeError):
            return data.decode(codec), flag
    with contextlib.suppress(UnicodeDecodeError):
        return data.decode("utf-8"), flag
    if codec is not None:
        flag = f"text not valid {codec}"
    return data.decode("cp1252", errors="replace"), flag


def _unfold(value: str) -> str:
    # RFC 5322 §2.2.3: unfolding removes the CRLF before folding white space.
    return re.sub(r"\r?\n(?=[ \t])", "", value).strip()


def _raw_header(msg: email.message.Message, name: str) -> str:
    raw = _raw_values(msg, name)
    return _unfold(_decode_words(raw[0])) if raw else ""


def _header_text(msg: email.message.Message, name: str, flags: list[str], *,
                 structured: bool = True) -> str:
    raw = _raw_values(msg, name)
    if raw and _SURROGATES.search(raw[0]):
        return _unfold(_decode_words(clean_text(raw[0])))
    if not structured:
        return _unfold(_decode_words(raw[0])) if raw and "=?" in raw[0] else (
            _unfold(raw[0]) if raw else "")
    if name.lower() in _UNSTRUCTURED:
        fetched = msg.get(name)
        plain = None if fetched is None else str(fetched)
        if plain is not None and plain.isascii() and "=?" not in plain:
            return _unfold(plain)
    try:
        value = _get(msg, name)
    except Exception as exc:
        flags.append(f"header {name}: unparsable ({type(exc).__name__})")
        return _raw_header(msg, name)
    if value is None:
        return ""
    text = str(value)
    if "=?" in text:
        text = _decode_words(text)
    return _unfold(text)


def _participants(msg: email.message.Message, flags: list[str]) -> list[Participant]:
    result: list[Participant] = []
    for role, name in _ADDRESS_HEADERS:
        raw = _raw_values(msg, name)
        if not raw:
            continue
        try:
            values = _get_all(msg, name)
        except Exception as exc:
            flags.append(f"header {name}: unparsable ({type(exc).__name__})")
            values = [_raw_header(msg, name)] if _raw_header(msg, name) else []
        for i, value in enumerate(values):
            if i < len(raw) and _SURROGATES.search(raw[i]):
                value = clean_text(raw[i])
            result.extend(_parse_addresses(role, value, flags))
    return result


def _message_id(msg: email.message.Message, flags: list[str]) -> str:
    text = _header_text(msg, "Message-ID", flags, structured=False)
    text = text.strip().split()[0] if text.strip() else ""
    return text.removeprefix("<").removesuffix(">")


def _date(msg: email.message.Message, flags: list[str]) -> datetime | None:
    text = _header_text(msg, "Date", flags, structured=False)
    if not text:
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except Exception:
        flags.append("header Date: unparsable")
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)
    except (OverflowError, ValueError):
        flags.append("header Date: out of range")
        return None


def _cleaned(out: Extracted) -> Extracted:
    try:
        out.message_id = clean_text(out.message_id)
        out.subject = clean_text(out.subject)
        out.body = clean_text(out.body)
        out.participants = [Participant(p.role, clean_text(p.address), clean_text(p.name))
                            for p in out.participants]
        out.flags = [clean_text(f) for f in out.flags]
        for a in out.attachments:
            a.name = clean_text(a.name)
            a.content_type = clean_text(a.content_type)
            a.text = clean_text(a.text)
            a.flags = [clean_text(f) for f in a.flags]
    except Exception as exc:  # pragma: no cover
        out.flags.append(f"could not be scanned: {type(exc).__name__}")
    return out


def _best_alternative(children: list[email.message.Message]) -> email.message.Message | None:
    candidates = [c for c in children if not _is_attachment(c)]
    for wanted in ("text/plain", "text/html"):
        for child in candidates:
            if _content_type(child) == wanted:
                return child
    return candidates[-1] if candidates else None


def run(self: ex._Extractor, raw: bytes, out: Extracted, depth: int) -> None:
    msg = (mailparse.parse_as(raw, _PARSE) if depth == 0
           else email.message_from_bytes(raw, policy=_PARSE))
    for defect in getattr(msg, "defects", [])[:5]:
        out.flags.append(f"defect: {type(defect).__name__}")
    out.message_id = _message_id(msg, out.flags)
    out.subject = _header_text(msg, "Subject", out.flags)
    out.date = _date(msg, out.flags)
    out.participants = _participants(msg, out.flags)
    bodies: list[str] = []
    self._walk(msg, out, bodies, depth)
    out.body = "\n\n".join(b for b in bodies if b)[: self.limits.max_text_chars]


def walk(self: ex._Extractor, part: email.message.Message, out: Extracted, bodies: list[str],
         depth: int) -> None:
    self.parts += 1
    if self.parts > self.limits.max_parts:
        if "could not be scanned: too many parts" not in out.flags:
            out.flags.append("could not be scanned: too many parts")
        return
    ctype = _content_type(part)
    if ctype in ("message/rfc822", "message/global"):
        self._nested_message(part, out, depth)
        return
    if part.is_multipart():
        payload = part.get_payload()
        if not isinstance(payload, list):
            return
        children = [c for c in payload if isinstance(c, email.message.Message)]
        if ctype == "multipart/alternative":
            chosen = _best_alternative(children)
            for child in children:
                if child is chosen or _is_attachment(child):
                    self._walk(child, out, bodies, depth)
            return
        for child in children:
            self._walk(child, out, bodies, depth)
        return
    if not _is_attachment(part) and ctype in ("text/plain", "text/html", "text/enriched"):
        data = _part_bytes(part, out.flags)
        text, flag = _decode_bytes(data, _charset(part))
        if flag:
            out.flags.append(f"body: {flag}")
        bodies.append(html_to_text(text) if ctype == "text/html" else text)
        return
    if ctype.startswith("multipart/"):
        out.flags.append(f"malformed {ctype[:40]}: indexed as plain text")
        text, _ = _decode_bytes(_part_bytes(part, out.flags), _charset(part))
        bodies.append(text)
        return
    self._attachment(part, ctype, out, depth)


@contextmanager
def installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """archive.extract runs the old code inside this block."""
    with monkeypatch.context() as m:
        m.setattr(ex._Extractor, "run", run)
        m.setattr(ex._Extractor, "_walk", walk)
        m.setattr(ex, "_cleaned", _cleaned)
        m.setattr(ex, "_decode_bytes", _decode_bytes)  # also for attachments (_scan)
        m.setattr(ex, "extract", extract)
        yield
