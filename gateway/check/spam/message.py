"""One message taken apart once for every spam rule: headers, text, links, attachments.

Parsing is the costly part of scoring, so the heuristics and the classifier share
one :class:`ParsedMessage`.  It is built from the stdlib parser's tree in its fast
``compat32`` mode (one parse shared with the decide stage, :mod:`gateway.mailparse`),
bounded (at most :data:`MAX_PARTS` parts, text cut at :data:`MAX_TEXT` characters)
so that a hostile message costs no more than a big one.
HTML is reduced to its text, its ``<a href>`` links and its image count by
:func:`gateway.htmltext.html_to_text` (one linear pass, no DOM): the rules only
need the words and the links.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from email.message import Message

from gateway import mailparse
from gateway.htmltext import html_to_text

MAX_PARTS = 100
MAX_TEXT = 200_000  # characters of decoded text kept per message

# RFC 5322 §2.2.3 folding: a line end and the white space after it.  Written as two
# alternatives that open with a literal (rather than "\r?\n[ \t]+") so that the
# regular expression engine looks for their first characters, [\r\n], instead of
# trying a match at every position: same matches, 40 % less time.
_FOLD = re.compile(r"\r\n[ \t]+|\n[ \t]+")
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)


@dataclass(slots=True)
class Part:
    content_type: str  # lower case, e.g. "text/plain"
    charset: str  # lower case; "" if not declared
    cte: str  # Content-Transfer-Encoding, lower case
    filename: str
    disposition: str
    size: int  # decoded bytes
    charset_ok: bool = True  # the declared charset decoded the text without errors
    head: bytes = b""  # the first decoded bytes (file type sniffing)


@dataclass(slots=True)
class ParsedMessage:
    raw_head: str
    headers: list[tuple[str, str]]  # (lower-case name, unfolded value), in order
    parts: list[Part] = field(default_factory=list)
    text: str = ""  # text/plain parts, decoded
    html_text: str = ""  # text/html parts, tags stripped
    html_raw_len: int = 0
    html_images: int = 0
    links: list[tuple[str, str]] = field(default_factory=list)  # (href, anchor text)
    urls: list[str] = field(default_factory=list)  # every URL seen, text and HTML
    multipart_defects: int = 0
    truncated: bool = False

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), or None."""
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    @property
    def attachments(self) -> list[Part]:
        return [p for p in self.parts if p.filename or p.disposition == "attachment"]


def strip_mbox_from(data: bytes) -> bytes:
    """Drop an mbox ``From `` separator line opening the file (corpus files have one)."""
    if data.startswith(b"From "):
        nl = data.find(b"\n")
        return data[nl + 1:] if nl >= 0 else b""
    return data


def split_head(data: bytes) -> tuple[bytes, bytes]:
    """The header section and the body (RFC 5322 §2.1: separated by an empty line)."""
    # The first of either separator; the LF-only one is looked for only before the
    # CRLF one (not through the whole body of a CRLF message, where it never is).
    i = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n", 0, len(data) if i < 0 else i + 1)
    if lf >= 0:
        return data[:lf + 1], data[lf + 2:]
    if i < 0:
        return data, b""
    return data[:i + 2], data[i + 4:]  # the last header line keeps its end of line


def has_scheme_sep(text: str) -> bool:
    """``"://" in text``, faster on text with few colons (most mail text): the
    substring search of a short needle reads every character in Python's search
    loop (11 us for 15 kB), a search for ":" is a memchr."""
    i = text.find(":")
    for _ in range(32):
        if i < 0:
            return False
        if text.startswith("//", i + 1):
            return True
        i = text.find(":", i + 1)
    return i >= 0 and "://" in text[i:]  # many colons: the plain search for the rest


def has_www(text: str) -> bool:
    """``"www." in text``, faster on text with few dots: a search for the 4-character
    needle reads every character in Python's search loop (about 0.5 µs per kB), a
    search for "." is a memchr.  After a few dots, the plain search for the rest."""
    i = text.find(".")
    for _ in range(4):
        if i < 0:
            return False
        if i >= 3 and text.startswith("www", i - 3):
            return True
        i = text.find(".", i + 1)
    return i >= 0 and text.find("www.", max(i - 3, 0)) >= 0


def parse_headers(head: str) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) for each field (RFC 5322 §2.2.3 unfolding)."""
    out: list[tuple[str, str]] = []
    for line in _FOLD.sub(" ", head).splitlines():
        name, sep, value = line.partition(":")
        if sep and name and " " not in name.strip():
            out.append((name.strip().lower(), value.strip()))
    return out


def _decode_text(payload: bytes, charset: str) -> tuple[str, bool]:
    cs = charset or "us-ascii"
    try:
        return payload.decode(cs), True
    except LookupError:  # an unknown charset name
        return payload.decode("latin-1"), False
    except UnicodeDecodeError:
        if cs in ("us-ascii", "ascii"):
            # 8-bit text declared ASCII (or undeclared): common, mostly latin-1 or UTF-8
            try:
                return payload.decode("utf-8"), False
            except UnicodeDecodeError:
                return payload.decode("latin-1"), False
        return payload.decode(cs, "replace"), False


def _payload(part: Message) -> bytes:
    try:
        raw = part.get_payload(decode=True)
    except (binascii.Error, ValueError, AssertionError):
        return b""
    return raw if isinstance(raw, bytes) else b""


# What _walk reads of a leaf part: content type, charset, transfer encoding,
# filename and disposition.  The stdlib getters parse Content-Type once per
# question, each with a scan of the header list (about 15 µs a part); a part with
# a plain Content-Type (a type and token parameters, no RFC 2231, no "name") and no
# Content-Disposition - most text parts - is read here with one scan and one
# regular expression, giving what the getters give (tests/check/spam hold the two
# to each other).  Anything else goes to the getters.
_TOKEN = r"[A-Za-z0-9!#$%&'+.^_`|~-]+"  # RFC 2045 §5.1 token, without "*" (RFC 2231)
_PLAIN_CT = re.compile(
    rf"({_TOKEN}/{_TOKEN})[ \t\r\n]*"
    rf"((?:;[ \t\r\n]*{_TOKEN}[ \t\r\n]*=[ \t\r\n]*(?:{_TOKEN}|\"{_TOKEN}\")[ \t\r\n]*)*)"
)
_PLAIN_PARAM = re.compile(rf";[ \t\r\n]*({_TOKEN})[ \t\r\n]*=[ \t\r\n]*\"?({_TOKEN})")
# _plain_type of each Content-Type value: the same few values recur from message to
# message ("text/plain; charset=us-ascii"), the two regular expressions cost more
# than the look-up.
_PLAIN_TYPES: mailparse.ValueMemo[str, tuple[str, str] | None] = mailparse.ValueMemo()
_UNSEEN = ("", "")  # a sentinel: no value of _plain_type is this very object
_MIME_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})
# get_payload(decode=True) decodes these; any other value leaves the payload as it is
_DECODED_CTE = frozenset({"quoted-printable", "base64", "x-uuencode", "uuencode", "uue",
                          "x-uue"})
# Charsets that decode ASCII bytes to the same characters (an ASCII-only text in
# one of them is its own decoded text)
_ASCII_SAFE = frozenset({"", "us-ascii", "ascii", "utf-8", "utf8", "latin-1", "latin1",
                         *(f"iso-8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15,
                                                     16)),
                         *(f"windows-125{n}" for n in range(9))})


def _mime_fields(part: Message) -> tuple[str, str, str] | None:
    """(content type, charset, transfer encoding as stored, lower case) of a part with
    a plain Content-Type and no Content-Disposition, or None: use the getters."""
    fields: dict[str, object] = {}
    for name, value in part.raw_items():
        lname = name.lower()
        if lname in _MIME_FIELDS and lname not in fields:
            fields[lname] = value  # the first one is what Message.get returns
    if "content-disposition" in fields:
        return None
    cte = fields.get("content-transfer-encoding", "")
    ct = fields.get("content-type")
    if not isinstance(cte, str) or not cte.isascii():
        return None  # a Header object or raw 8-bit bytes
    if ct is None:
        return part.get_default_type().lower(), "", cte.lower()
    if not isinstance(ct, str) or not ct.isascii():
        return None
    plain = _PLAIN_TYPES.get(ct, _UNSEEN)
    if plain is _UNSEEN:
        plain = _plain_type(ct)
        if len(ct) <= 256:  # a hostile long value is not kept
            _PLAIN_TYPES.keep(ct, plain)
    return None if plain is None else (*plain, cte.lower())


def _plain_type(ct: str) -> tuple[str, str] | None:
    """(content type, charset), lower case, of a plain Content-Type value, or None."""
    m = _PLAIN_CT.fullmatch(ct.strip())
    if m is None:
        return None
    charset = ""
    for pm in _PLAIN_PARAM.finditer(m.group(2)):
        pname = pm.group(1).lower()
        if pname == "name":
            return None  # a filename: the getters' rules
        if pname == "charset" and not charset:
            charset = pm.group(2).lower()
    return m.group(1).lower(), charset


def _text_payload(part: Message, charset: str, cte: str) -> str | None:
    """A text part's decoded text when it is its own payload (ASCII, no transfer
    encoding to undo, an ASCII-compatible charset), else None."""
    if cte in _DECODED_CTE or charset not in _ASCII_SAFE:
        return None
    # Without decode, get_payload returns the stored text; one holding raw 8-bit bytes
    # (surrogate escapes) comes back decoded with the part's charset, which for the
    # charsets above gives a non-ASCII character for each such byte: an ASCII result
    # is the stored text, ASCII throughout.
    payload = part.get_payload()
    return payload if isinstance(payload, str) and payload.isascii() else None


def _walk(msg: Message, pm: ParsedMessage, texts: list[str], htmls: list[str]) -> None:
    # A single-part message is its own only part (what walk() yields, without the
    # generator).
    for n, part in enumerate(msg.walk() if msg.is_multipart() else (msg,)):
        if n >= MAX_PARTS:
            break
        if part.defects:
            pm.multipart_defects += sum(
                1 for d in part.defects if "Boundary" in type(d).__name__
            )
        if part.is_multipart():
            continue
        fast = _mime_fields(part)
        if fast is not None:
            ctype, charset, stored_cte = fast
            if ctype == "message/rfc822":
                continue
            cte, filename, disposition = stored_cte.strip(), "", ""
        else:
            ctype = part.get_content_type().lower()
            if ctype == "message/rfc822":
                continue
            charset = (part.get_content_charset() or "").lower()
            cte = str(part.get("content-transfer-encoding", "")).strip().lower()
            try:
                filename = part.get_filename() or ""
            except (TypeError, ValueError):
                filename = ""
            disposition = (part.get_content_disposition() or "").lower()
        text: str | None = None
        if fast is not None and ctype.startswith("text/"):
            text = _text_payload(part, charset, fast[2])
        if text is not None:
            p = Part(ctype, charset, cte, "", "", len(text), head=text[:64].encode("ascii"))
            pm.parts.append(p)
        else:
            payload = _payload(part)
            p = Part(ctype, charset, cte, str(filename), disposition, len(payload),
                     head=payload[:64])
            pm.parts.append(p)
            if not ctype.startswith("text/") or filename or disposition == "attachment":
                continue
            text, p.charset_ok = _decode_text(payload, charset)
        if ctype == "text/html":
            pm.html_raw_len += len(text)
            stripped, links, images = html_to_text(text)
            htmls.append(stripped)
            pm.links.extend(links)
            pm.html_images += images
        elif ctype in ("text/plain", "text/enriched", "text/richtext"):
            texts.append(text)


def parse(data: bytes, max_bytes: int = 1024 * 1024) -> ParsedMessage:
    """Take one message apart (an mbox ``From `` line is skipped)."""
    data = strip_mbox_from(data)
    truncated = len(data) > max_bytes
    if truncated:
        data = data[:max_bytes]
    head_b, _ = split_head(data)
    try:
        raw_head = head_b.decode("utf-8")  # RFC 6532: UTF-8 header fields
    except UnicodeDecodeError:
        raw_head = head_b.decode("latin-1")  # raw 8-bit of some other charset
    pm = ParsedMessage(raw_head=raw_head, headers=parse_headers(raw_head), truncated=truncated)
    texts: list[str] = []
    htmls: list[str] = []
    try:
        # The compat32 tree, shared with the decide stage (gateway.mailparse).
        _walk(mailparse.parse(data), pm, texts, htmls)
    except RecursionError:
        # MIME nested deeper than the stdlib parser recurses (a known way to hide
        # content): score what was taken apart, and the raw body as text.
        pm.multipart_defects += 1
        texts.append(split_head(data)[1][:MAX_TEXT].decode("latin-1"))
    pm.text = "\n".join(texts)[:MAX_TEXT]
    pm.html_text = "\n".join(htmls)[:MAX_TEXT]
    urls = [href for href, _ in pm.links if href]
    for text in (pm.text, pm.html_text):
        if has_scheme_sep(text) or has_www(text):  # most text has neither
            urls.extend(_URL.findall(text))
    pm.urls = urls[:500]
    return pm
