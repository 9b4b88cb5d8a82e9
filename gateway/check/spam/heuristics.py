"""Header and structure heuristics: pure functions of a parsed message and the facts.

Each rule adds a named symbol to a :class:`Scan` (weights in symbols.SYMBOLS).
No rule decides alone: structure oddities are common in legitimate mail too
(mailing lists set Reply-To, old clients send HTML only), so their weights are
small and only combinations, or the classifier, make a message spam.

The Date checks compare the Date field with the time the message was received,
read from the newest Received field (RFC 5321 §4.4: each hop prepends one with
its date), falling back to ``now``: a message re-scored a year later (or an old
corpus message) is judged by when it arrived, as SpamAssassin's DATE_IN_PAST
rules are.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from email.utils import mktime_tz, parsedate_tz
from typing import Any
from urllib.parse import urlsplit

from gateway.check import headers
from gateway.check.dmarc import org_domain
from gateway.check.spam.message import ParsedMessage
from gateway.check.spam.symbols import Scan

FUTURE_SLACK = 12 * 3600.0
PAST_SLACK = 4 * 86400.0
MANY_RCPTS = 15

# The Generic Test for Unsolicited Bulk Email: every filter must call it spam.
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

SHORTENERS = frozenset({
    "bit.ly", "bitly.com", "tinyurl.com", "goo.gl", "t.co", "ow.ly", "is.gd", "buff.ly",
    "rebrand.ly", "cutt.ly", "shorturl.at", "tiny.cc", "rb.gy", "bl.ink", "t.ly", "v.gd",
    "s.id", "soo.gd", "clck.ru", "qrco.de", "lnkd.in", "shorte.st", "adf.ly", "tr.im",
    "snipurl.com", "x.co", "u.to", "bit.do", "mcaf.ee", "su.pr", "cli.gs", "tiny.pl",
})
# Windows and script types that run when opened (what mail-borne malware uses)
EXECUTABLE_EXT = frozenset({
    "exe", "scr", "pif", "com", "bat", "cmd", "vbs", "vbe", "js", "jse", "wsf", "wsh",
    "hta", "msi", "msp", "lnk", "jar", "ps1", "psm1", "cpl", "reg", "inf", "application",
    "gadget", "msc", "scf", "sct", "dll", "appx", "appref-ms", "iso", "img", "vhd", "xll",
})
DOCUMENT_EXT = frozenset({
    "pdf", "doc", "docx", "xls", "xlsx", "ppt", "pptx", "rtf", "txt", "jpg", "jpeg",
    "png", "gif", "zip", "rar", "htm", "html", "csv", "odt", "mp3", "mp4", "avi",
})
ARCHIVE_EXT = frozenset({"zip", "rar", "7z", "gz", "tgz", "ace", "arj", "cab", "z", "xz"})

_MSGID = re.compile(r"^<[^<>@\s]+@[^<>@\s]+>$")
_ADDR_IN_NAME = re.compile(r"[\w.+-]+@([\w-]+(?:\.[\w-]+)+)")
_DOMAINISH = re.compile(
    r"^(?:https?://)?(?:[\w-]+@)?((?:[a-z0-9-]+\.)+[a-z]{2,})(?::\d+)?(?:[/?#]\S*)?$",
    re.IGNORECASE,
)
_RECEIVED_DATE = re.compile(r";\s*([^;]+)$")
_SUBJ_PUNCT = re.compile(r"!!!|\$\$\$|\?\?\?|!\?!")


@functools.lru_cache(maxsize=4096)
def _org(domain: str) -> str:
    return org_domain(domain)


@functools.lru_cache(maxsize=1024)
def _date(value: str) -> float | None:
    # Cached: the newest Received field is our own hop's, whose date many messages
    # received in the same second share (parsedate_tz costs about 8 us).
    parsed = parsedate_tz(value)
    if parsed is None or parsed[0] < 1970:
        return None
    try:
        return float(mktime_tz(parsed))
    except (OverflowError, ValueError):
        return None


def received_time(pm: ParsedMessage) -> float | None:
    """The date of the newest Received field (RFC 5321 §4.4: after the last ';')."""
    return _received_time(pm.get_all("received"))


def _received_time(received: list[str]) -> float | None:
    for value in received:
        m = _RECEIVED_DATE.search(value)
        if m:
            when = _date(m.group(1).strip())
            if when is not None:
                return when
    return None


# url_host and is_ip_literal are pure functions of a string, asked of every link
# twice (url_rules reads the <a href> links, then every URL, hrefs among them) and
# of the same links across messages (a newsletter's, a signature's): their answers
# are kept for strings up to this long (longer ones, rare, are computed each time,
# so that the cache's memory stays bounded).
_CACHED_LEN = 512


def url_host(url: str) -> tuple[str, bool, int | None]:
    """(lower-case host, had userinfo, port) of a link; ("", ...) if it has none."""
    return _url_host_cached(url) if len(url) <= _CACHED_LEN else _url_host(url)


def _url_host(url: str) -> tuple[str, bool, int | None]:
    u = url.strip()
    if u.lower().startswith("www."):
        u = "http://" + u
    if not re.match(r"^[a-z][a-z0-9+.-]*://", u, re.IGNORECASE):
        return "", False, None
    try:
        parts = urlsplit(u)
        port = parts.port
    except ValueError:
        return "", False, None
    host = (parts.hostname or "").rstrip(".").lower()
    return host, "@" in parts.netloc, port


_url_host_cached = functools.lru_cache(maxsize=4096)(_url_host)


def is_ip_literal(host: str) -> bool:
    return _is_ip_literal_cached(host) if len(host) <= _CACHED_LEN else _is_ip_literal(host)


def _is_ip_literal(host: str) -> bool:
    h = host.strip("[]")
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        # RFC 3986 §7.4: hosts like 0x7f.1 or a bare decimal number are IP addresses
        # to most resolvers, and a way to hide one.
        return bool(re.fullmatch(r"(0x[0-9a-f]+|\d+)(\.(0x[0-9a-f]+|\d+)){0,3}", h))


_is_ip_literal_cached = functools.lru_cache(maxsize=4096)(_is_ip_literal)


def link_domains(pm: ParsedMessage, limit: int = 100) -> list[str]:
    """The distinct hosts of the message's links, in order of appearance."""
    seen: dict[str, None] = {}
    for url in pm.urls:
        host, _, _ = url_host(url)
        if host and host not in seen:
            seen[host] = None
            if len(seen) >= limit:
                break
    return list(seen)


def _addresses(values: list[str]) -> list[tuple[str, str]]:
    try:
        # bounded: the stdlib address parser recurses into nested comments
        return [(n, a) for n, a in headers.addresses([_bounded(v) for v in values]) if n or a]
    except (ValueError, IndexError, TypeError, RecursionError):
        return []


def _bounded(value: str, limit: int = 4096) -> str:
    """``value`` cut to at most ``limit`` characters, at the last comma before it when
    there is one: an address cut in half would make the whole list unreadable."""
    if len(value) <= limit:
        return value
    comma = value.rfind(",", 0, limit)
    return value[:comma] if comma > 0 else value[:limit]


def _domain(addr: str) -> str:
    return addr.rpartition("@")[2].strip().strip(">").lower() if "@" in addr else ""


_RULE_FIELDS = frozenset({"from", "to", "cc", "subject", "message-id", "date", "received",
                          "reply-to"})


def _fields(pm: ParsedMessage) -> dict[str, list[str]]:
    """The values of each field the header rules read, in order (one pass)."""
    out: dict[str, list[str]] = {}
    for name, value in pm.headers:
        if name in _RULE_FIELDS:
            values = out.get(name)
            if values is None:
                out[name] = [value]
            else:
                values.append(value)
    return out


def header_rules(pm: ParsedMessage, scan: Scan, now: float) -> None:
    fields = _fields(pm)

    def first(name: str) -> str | None:
        values = fields.get(name)
        return values[0] if values else None

    if first("from") is None:
        scan.add("MISSING_FROM")
    if first("to") is None and first("cc") is None:
        scan.add("MISSING_TO")
    if first("subject") is None:
        scan.add("MISSING_SUBJECT")
    mid = first("message-id")
    if mid is None:
        scan.add("MISSING_MID")
    elif not _MSGID.match(mid.strip()):
        scan.add("INVALID_MSGID", mid)

    date = first("date")
    if date is None:
        scan.add("MISSING_DATE")
    else:
        when = _date(date)
        if when is None:
            scan.add("INVALID_DATE", date)
        else:
            ref = _received_time(fields.get("received", [])) or now
            if when > ref + FUTURE_SLACK:
                scan.add("DATE_IN_FUTURE", f"{(when - ref) / 3600:.0f} hours ahead")
            elif when < ref - PAST_SLACK:
                scan.add("DATE_IN_PAST", f"{(ref - when) / 86400:.0f} days before")

    froms = fields.get("from", [])
    from_addrs = _addresses(froms)
    if len(froms) > 1 or len(from_addrs) > 1:
        scan.add("MULTIPLE_FROM")
    from_domain = ""
    if froms:
        if not from_addrs or "@" not in from_addrs[0][1]:
            scan.add("FROM_NO_ADDRESS", froms[0])
        else:
            name, addr = from_addrs[0]
            from_domain = _domain(addr)
            m = _ADDR_IN_NAME.search(name)
            if m and from_domain and _org(m.group(1).lower()) != _org(from_domain):
                scan.add("FROM_DISPLAY_ADDR_MISMATCH", f"{name} <{addr}>")
    reply_to = first("reply-to")
    if reply_to and from_domain:
        rt = _addresses([reply_to])
        rt_domain = _domain(rt[0][1]) if rt else ""
        if rt_domain and _org(rt_domain) != _org(from_domain):
            scan.add("REPLYTO_DIFF_DOMAIN", f"{rt_domain} vs {from_domain}")

    to_values = fields.get("to", [])
    rcpts = _addresses(to_values + fields.get("cc", []))
    if to_values and from_addrs and len(rcpts) == 1 and \
            rcpts[0][1].lower() == from_addrs[0][1].lower():
        scan.add("TO_EQ_FROM")
    if any("undisclosed" in v.lower() for v in to_values):
        scan.add("TO_UNDISCLOSED")
    if len(rcpts) > MANY_RCPTS:
        scan.add("MANY_RCPTS_VISIBLE", f"{len(rcpts)} recipients")

    subject = first("subject") or ""
    if _all_caps(subject):
        scan.add("SUBJ_ALL_CAPS")
    if _SUBJ_PUNCT.search(subject):
        scan.add("SUBJ_EXCESS_PUNCT")
    if not pm.raw_head.isascii():
        scan.add("RAW_8BIT_HEADER")


# In ASCII the letters (str.isalpha) are A-Z and a-z, the upper-case ones
# (str.isupper) A-Z: bytes.translate counts them without a Python call per character.
_NOT_LETTER = bytes(c for c in range(256) if not chr(c).isascii() or not chr(c).isalpha())
_NOT_UPPER = bytes(c for c in range(256) if not chr(c).isascii() or not chr(c).isupper())


def _all_caps(subject: str) -> bool:
    """At least 10 letters, 90 % of them upper case."""
    if subject.isascii():
        raw = subject.encode("ascii")
        letters = len(raw.translate(None, _NOT_LETTER))
        upper = len(raw.translate(None, _NOT_UPPER))
    else:
        alpha = "".join(filter(str.isalpha, subject))
        letters, upper = len(alpha), sum(map(str.isupper, alpha))
    return letters >= 10 and upper >= 0.9 * letters


def structure_rules(pm: ParsedMessage, scan: Scan) -> None:
    ctypes = {p.content_type for p in pm.parts}
    has_plain = "text/plain" in ctypes
    if "text/html" in ctypes and not has_plain:
        scan.add("HTML_ONLY")
        words = len(pm.html_text.split())
        if pm.html_images and words < 40:
            scan.add("HTML_SHORT_WITH_IMAGE", f"{pm.html_images} images, {words} words")
    if _blank(pm.text) and _blank(pm.html_text) and not pm.attachments:
        scan.add("EMPTY_BODY")
    if GTUBE in pm.text or GTUBE in pm.html_text:
        scan.add("GTUBE")
    if pm.get("mime-version") is None and (
        any(t.startswith("multipart/") for t in _declared_types(pm))
        or pm.get("content-transfer-encoding") is not None
    ):
        scan.add("MISSING_MIME_VERSION")
    if pm.multipart_defects:
        scan.add("MIME_BAD_BOUNDARY")
    for p in pm.parts:
        if p.content_type == "text/plain" and p.cte == "base64" and not p.filename \
                and p.head.isascii() and p.charset in ("", "us-ascii", "iso-8859-1"):
            scan.add("BODY_ALL_BASE64_TEXT")
        if not p.charset_ok and p.charset:
            scan.add("CHARSET_MISMATCH", p.charset)


def _blank(text: str) -> bool:
    """``not text.strip()`` without copying the text (the same whitespace)."""
    return not text or text.isspace()


def _declared_types(pm: ParsedMessage) -> list[str]:
    ct = pm.get("content-type") or ""
    return [ct.split(";", 1)[0].strip().lower()]


def url_rules(pm: ParsedMessage, scan: Scan) -> None:
    for href, anchor in pm.links:
        host, _, _ = url_host(href)
        if not host:
            continue
        shown = _DOMAINISH.match(anchor.strip()) if anchor else None
        if shown:
            shown_host = shown.group(1).lower()
            # an IP literal behind a shown name, or another registered domain
            if is_ip_literal(host) or _org(shown_host) != _org(host):
                scan.add("URL_TEXT_MISMATCH", f"shows {shown_host}, goes to {host}")
    for url in pm.urls:
        host, userinfo, port = url_host(url)
        if not host:
            continue
        if is_ip_literal(host):
            scan.add("URL_IP_LITERAL", host)
        if host in SHORTENERS or _org(host) in SHORTENERS:
            scan.add("URL_SHORTENER", host)
        if userinfo:
            scan.add("URL_USERINFO", url[:100])
        if port is not None and port not in (80, 443):
            scan.add("URL_NONSTANDARD_PORT", f"{host}:{port}")


def attachment_rules(pm: ParsedMessage, scan: Scan) -> None:
    for p in pm.attachments:
        name = p.filename.strip().lower().rstrip(". ")
        exts = name.split(".")[1:]
        last = exts[-1] if exts else ""
        if len(exts) >= 2 and last in EXECUTABLE_EXT and exts[-2] in DOCUMENT_EXT:
            scan.add("ATT_DOUBLE_EXT", p.filename)
        elif re.search(r"\s{5,}\.\w+$", p.filename):
            scan.add("ATT_DOUBLE_EXT", p.filename)  # spaces pushing the real extension out
        if last in EXECUTABLE_EXT or p.head.startswith(b"MZ") or p.head.startswith(b"\x7fELF"):
            scan.add("ATT_EXECUTABLE", p.filename or p.content_type)
        if last in ARCHIVE_EXT and len(exts) >= 2 and exts[-2] in DOCUMENT_EXT:
            scan.add("ATT_ARCHIVE_EXEC_NAME", p.filename)


def auth_rules(check: Mapping[str, Any], scan: Scan) -> None:
    """The check stage's verdicts (facts["check"]) as symbols, named as rspamd names them."""
    spf = (check.get("spf") or {}).get("result")
    if spf == "fail":
        scan.add("SPF_FAIL", str((check.get("spf") or {}).get("domain", "")))
    elif spf == "softfail":
        scan.add("SPF_SOFTFAIL")
    elif spf == "pass":
        scan.add("SPF_PASS")
    dkims = [d for d in check.get("dkim") or [] if isinstance(d, Mapping)]
    if any(d.get("result") == "pass" and not d.get("unsigned_bytes") for d in dkims):
        scan.add("DKIM_ALLOW")
    elif any(d.get("result") == "fail" for d in dkims):
        scan.add("DKIM_REJECT")
    dmarc = check.get("dmarc") or {}
    if dmarc.get("result") == "pass":
        scan.add("DMARC_POLICY_ALLOW")
    elif dmarc.get("result") == "fail":
        disposition = dmarc.get("disposition", "none")
        name = {"reject": "DMARC_POLICY_REJECT",
                "quarantine": "DMARC_POLICY_QUARANTINE"}.get(disposition,
                                                             "DMARC_POLICY_SOFTFAIL")
        scan.add(name, str(dmarc.get("domain", "")))
    arc = (check.get("arc") or {}).get("result")
    if arc == "pass":
        scan.add("ARC_ALLOW")
    elif arc == "fail":
        scan.add("ARC_REJECT")


def evaluate(pm: ParsedMessage, scan: Scan, *, check: Mapping[str, Any] | None = None,
             now: float) -> None:
    """Every heuristic on one message."""
    header_rules(pm, scan, now)
    structure_rules(pm, scan)
    url_rules(pm, scan)
    attachment_rules(pm, scan)
    if check:
        auth_rules(check, scan)
