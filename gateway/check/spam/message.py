"""One message taken apart once for every spam rule: headers, text, links, attachments.

Parsing is the costly part of scoring, so the heuristics and the classifier share
one :class:`ParsedMessage`.  It is built from the stdlib parser's tree in its fast
``compat32`` mode (one parse shared with the decide stage, :mod:`gateway.mailparse`),
bounded (at most :data:`MAX_PARTS` parts, text cut at :data:`MAX_TEXT` characters)
so that a hostile message costs no more than a big one.
HTML is reduced to its text and its links with regular expressions: the rules
only need the words and the ``<a href>`` pairs, not a DOM.
"""

from __future__ import annotations

import binascii
import html
import re
from dataclasses import dataclass, field
from email.message import Message

from gateway import mailparse

MAX_PARTS = 100
MAX_TEXT = 200_000  # characters of decoded text kept per message

_FOLD = re.compile(r"\r?\n[ \t]+")
_TAG_NAME = re.compile(r"\s*(/?)\s*([a-zA-Z][a-zA-Z0-9]{0,15})\b")
_HREF = re.compile(r"\bhref\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s>]+))", re.IGNORECASE)
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)
_BREAK_TAGS = frozenset({"br", "p", "div", "tr", "td", "li", "h1", "h2", "h3", "h4", "h5",
                         "h6", "table", "blockquote"})


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
    found = [(i, sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := data.find(sep)) >= 0]
    if not found:
        return data, b""
    i, sep = min(found)
    half = len(sep) // 2  # keep the last header line's end of line
    return data[:i + half], data[i + len(sep):]


def parse_headers(head: str) -> list[tuple[str, str]]:
    """(lower-case name, unfolded value) for each field (RFC 5322 §2.2.3 unfolding)."""
    out: list[tuple[str, str]] = []
    for line in _FOLD.sub(" ", head).splitlines():
        name, sep, value = line.partition(":")
        if sep and name and " " not in name.strip():
            out.append((name.strip().lower(), value.strip()))
    return out


def html_to_text(markup: str) -> tuple[str, list[tuple[str, str]], int]:
    """HTML -> (its text, its (href, anchor text) links, how many <img>).

    One forward pass over the tags (no backtracking regular expression over the
    whole document): hostile HTML - thousands of unclosed ``<a>`` or comments -
    costs time linear in its length.
    """
    out: list[str] = []
    links: list[tuple[str, str]] = []
    images = 0
    anchor: tuple[str, list[str]] | None = None
    skipping = ""  # inside <script> or <style>
    pos, n = 0, len(markup)
    while pos < n:
        lt = markup.find("<", pos)
        chunk = markup[pos:] if lt < 0 else markup[pos:lt]
        if chunk and not skipping:
            out.append(chunk)
            if anchor is not None and sum(map(len, anchor[1])) < 300:
                anchor[1].append(chunk)
        if lt < 0:
            break
        if markup.startswith("<!--", lt):
            end = markup.find("-->", lt + 4)
            pos = n if end < 0 else end + 3
            continue
        gt = markup.find(">", lt + 1)
        if gt < 0:
            break  # an unclosed tag: no '>' follows any later '<' either
        pos = gt + 1
        m = _TAG_NAME.match(markup, lt + 1, gt)
        if m is None:
            continue
        closing, name = m.group(1), m.group(2).lower()
        if skipping:
            if closing and name == skipping:
                skipping = ""
            continue
        if name in ("script", "style") and not closing:
            skipping = name
        elif name == "a":
            if anchor is not None:
                links.append((anchor[0], _anchor_text(anchor[1])))
                anchor = None
            if not closing and len(links) < 200:
                h = _HREF.search(markup, lt, gt)
                if h:
                    anchor = (html.unescape(h.group(1) or h.group(2) or h.group(3) or "").strip(),
                              [])
        elif name == "img" and not closing:
            images += 1
        out.append("\n" if name in _BREAK_TAGS else " ")
    if anchor is not None:
        links.append((anchor[0], _anchor_text(anchor[1])))
    return html.unescape("".join(out)), links, images


def _anchor_text(parts: list[str]) -> str:
    return " ".join(html.unescape("".join(parts)).split())


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


def _walk(msg: Message, pm: ParsedMessage, texts: list[str], htmls: list[str]) -> None:
    for n, part in enumerate(msg.walk()):
        if n >= MAX_PARTS:
            break
        if part.defects:
            pm.multipart_defects += sum(
                1 for d in part.defects if "Boundary" in type(d).__name__
            )
        if part.is_multipart():
            continue
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
        payload = _payload(part)
        p = Part(ctype, charset, cte, str(filename), disposition, len(payload),
                 head=payload[:64])
        pm.parts.append(p)
        if ctype.startswith("text/") and not filename and disposition != "attachment":
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
        if "://" in text or "www." in text:  # the search is costly; most text has none
            urls.extend(_URL.findall(text))
    pm.urls = urls[:500]
    return pm
