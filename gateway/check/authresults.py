"""The Authentication-Results header field (RFC 8601).

:func:`build` writes Coffer's verdicts under its authserv-id.  Before it is
added, :func:`strip_forged` removes every Authentication-Results field that
already claims that authserv-id: RFC 8601 §5 requires it, since a downstream
reader trusts fields bearing our name (CVE-2020-12272 was OpenDMARC trusting a
forged one).
"""

from __future__ import annotations

import re

from gateway.check import headers
from gateway.check.verdicts import Verdicts

FIELD = "Authentication-Results"
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`{|}~@]+$")  # RFC 2045 token chars, and "@"
_FOLD = ";\r\n\t"


def _ascii(text: str) -> str:
    """The field stays 7-bit (the message may not be SMTPUTF8, RFC 6532): a domain
    becomes its A-label form (RFC 5891), anything else is escaped."""
    if text.isascii():
        return text
    local, at, domain = text.rpartition("@")
    try:
        return local.encode("ascii", "backslashreplace").decode() + at + domain.encode(
            "idna").decode("ascii")
    except UnicodeError:
        return text.encode("ascii", "backslashreplace").decode()


def _value(text: str) -> str:
    """A property value: as is when it is a token (RFC 2045), else a quoted-string."""
    text = _ascii(text)
    if text and _TOKEN.match(text) and not text.startswith("@"):
        return text
    return _quoted(text)  # already ASCII: nothing more is escaped but \\ and "


def _quoted(text: str) -> str:
    text = re.sub(r"[\r\n\t]+", " ", text)[:200].encode("ascii", "backslashreplace").decode()
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build(authserv_id: str, v: Verdicts, *, checks: frozenset[str] | None = None) -> str:
    """The field value: ``authserv-id; method=result reason=... ptype.prop=...; ...``.

    ``checks`` names the methods that ran (all four by default); with none, the
    value is ``authserv-id; none`` (RFC 8601 §2.2).
    """
    ran = checks if checks is not None else frozenset({"spf", "dkim", "dmarc", "arc"})
    parts: list[str] = []
    if "spf" in ran:
        s = v.spf
        # RFC 8601 §2.7.2: smtp.mailfrom, or smtp.helo for the HELO identity
        prop = (f"smtp.helo={_value(s.domain)}" if s.identity == "helo"
                else f"smtp.mailfrom={_value(s.address or s.domain)}")
        reason = f" reason={_quoted(s.reason)}" if s.reason and s.result != "pass" else ""
        parts.append(f"spf={s.result}{reason} {prop}")
    if "dkim" in ran:
        if not v.dkim:
            parts.append("dkim=none")
        for d in v.dkim:
            reason = f" reason={_quoted(d.reason)}" if d.reason and (
                d.result != "pass" or d.unsigned_bytes) else ""
            props = f" header.d={_value(d.domain)}" if d.domain else ""
            props += f" header.s={_value(d.selector)}" if d.selector else ""
            # RFC 6008: the first characters of b= tell two signatures apart
            props += f" header.b={_value(d.header_b)}" if d.header_b else ""
            props += f" header.a={_value(d.algorithm)}" if d.algorithm else ""
            parts.append(f"dkim={d.result}{reason}{props}")
    if "dmarc" in ran:
        m = v.dmarc
        reason = f" reason={_quoted(m.reason)}" if m.reason and m.result != "pass" else ""
        policy = f" policy.dmarc={m.policy}" if m.policy else ""
        frm = f" header.from={_value(m.domain)}" if m.domain else ""
        parts.append(f"dmarc={m.result}{reason}{policy}{frm}")
    if "arc" in ran:
        a = v.arc
        reason = f" reason={_quoted(a.reason)}" if a.reason and a.result == "fail" else ""
        parts.append(f"arc={a.result}{reason}")
    if not parts:
        parts.append("none")
    return _FOLD.join([_value(authserv_id), *parts])


def authserv_id_of(value: str) -> str | None:
    """The authserv-id an Authentication-Results value claims (RFC 8601 §2.2)."""
    text = value
    # drop CFWS comments (nesting allowed, RFC 5322 §3.2.2) before the id
    while True:
        stripped = re.sub(r"\((?:[^()\\]|\\.)*\)", " ", text)
        if stripped == text:
            break
        text = stripped
    text = text.strip()
    if text.startswith('"'):
        m = re.match(r'"((?:[^"\\]|\\.)*)"', text)
        return re.sub(r"\\(.)", r"\1", m.group(1)).lower() if m else None
    m = re.match(r"[^\s;]+", text)
    return m.group().lower().rstrip(".") if m else None


def strip_forged(data: bytes, authserv_id: str) -> tuple[bytes, int]:
    """Remove every Authentication-Results field claiming ``authserv_id``
    (RFC 8601 §5); -> (message, how many were removed).  Other bytes are kept."""
    if b"authentication-results" not in headers.lower_header_block(data):
        return data, 0  # no such field at all: most mail (no need to split the header)
    fields, rest = headers.split(data)
    ours = authserv_id.lower().rstrip(".")
    kept = [f for f in fields
            if not (f.name == "authentication-results" and authserv_id_of(f.value) == ours)]
    removed = len(fields) - len(kept)
    return (headers.join(kept, rest) if removed else data), removed
