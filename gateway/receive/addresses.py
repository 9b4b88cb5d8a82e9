"""Strict syntax of the MAIL FROM / RCPT TO arguments (pure: no I/O).

RFC 5321 §4.1.2 grammar, extended by RFC 6531 §3.3 (SMTPUTF8) so that local
parts and domains may hold UTF-8; whether UTF-8 is *allowed* in a transaction is
decided by the caller (553 5.6.7 without the SMTPUTF8 parameter)::

    Path           = "<" [ A-d-l ":" ] Mailbox ">"
    A-d-l          = At-domain *( "," At-domain )        ; source route
    Mailbox        = Local-part "@" ( Domain / address-literal )
    Local-part     = Dot-string / Quoted-string
    Domain         = sub-domain *("." sub-domain)        ; no trailing dot

Anything outside the grammar is an :class:`AddressError` (553).  In particular
a trailing dot, a second unquoted ``@``, a backslash outside quotes and a
general address literal are refused here, before relay control sees them.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass


class AddressError(ValueError):
    """The text is not a valid RFC 5321 path."""


# RFC 5321 §4.1.2 atext (RFC 5322 §3.2.3) plus RFC 6531 §3.3 UTF8-non-ascii
# (C1 controls U+0080..U+009F excluded).
_U = "\u00a0-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~{_U}]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
# qtextSMTP = %d32-33 / %d35-91 / %d93-126 ; quoted-pairSMTP = "\" %d32-126
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*"'
_LABEL = rf"[A-Za-z0-9{_U}](?:[A-Za-z0-9\-{_U}]*[A-Za-z0-9{_U}])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[^\[\]\\\s]+\]"
_ROUTE = rf"@{_DOMAIN}(?:,@{_DOMAIN})*:"
_PATH = re.compile(
    rf"<(?P<route>{_ROUTE})?(?P<local>{_DOT_STRING}|{_QUOTED})"
    rf"@(?P<domain>{_DOMAIN}|{_LITERAL})>"
)
_ROUTE_DOMAIN = re.compile(rf"@({_DOMAIN})")
_QUOTED_PAIR = re.compile(r"\\(.)")
_PARAM_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*\Z")  # RFC 5321 §4.1.2 esmtp-keyword


@dataclass(frozen=True, slots=True)
class Mailbox:
    local: str  # as written, quotes included
    domain: str  # as written: a domain, or an address literal with its brackets
    route: tuple[str, ...] = ()  # source-route domains, ignored (RFC 5321 §4.1.1.3)

    @property
    def address(self) -> str:
        """The mailbox without the source route: what goes in the envelope."""
        return f"{self.local}@{self.domain}"

    @property
    def local_unquoted(self) -> str:
        """The local part with its quotes and quoted-pairs undone (``"a\\@b"`` -> ``a@b``)."""
        if self.local.startswith('"'):
            return _QUOTED_PAIR.sub(r"\1", self.local[1:-1])
        return self.local

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def ascii_domain(self) -> str:
        """The domain in lower-case A-label form (IDNA), for comparisons."""
        return self.domain.lower() if self.is_literal else domain_to_ascii(self.domain)

    @property
    def is_ascii(self) -> bool:
        return self.local.isascii() and self.domain.isascii()


def domain_to_ascii(domain: str) -> str:
    """Lower-case A-label form of a domain; raises AddressError if IDNA refuses it."""
    domain = domain.rstrip(".")
    if domain.isascii():
        if any(len(label) > 63 for label in domain.split(".")):
            raise AddressError(f"domain label too long in {domain!r}")
        return domain.lower()
    try:
        return domain.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise AddressError(f"invalid internationalised domain {domain!r}: {exc}") from None


def _check_literal(literal: str) -> None:
    # RFC 5321 §4.1.3: IPv4 dotted quad or "IPv6:" address; General-address-literal
    # needs a registered tag, and none is registered, so it is refused.
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError(f"invalid address literal {literal!r}") from None


@functools.lru_cache(maxsize=1024)
def parse_path(text: str) -> Mailbox:
    """Parse ``<[route:]local@domain>`` strictly (RFC 5321 §4.1.2).

    Remembered (a Mailbox is immutable; a refused path raises every time): the
    same senders and recipients come back message after message, and the
    regular expression and IDNA checks cost more than the rest of MAIL or RCPT."""
    m = _PATH.fullmatch(text)
    if m is None:
        raise AddressError(f"not a valid path: {text!r}")
    domain = m.group("domain")
    if domain.startswith("["):
        _check_literal(domain)
    else:
        domain_to_ascii(domain)
    route = tuple(_ROUTE_DOMAIN.findall(m.group("route") or ""))
    return Mailbox(local=m.group("local"), domain=domain, route=route)


def split_argument(arg: str, keyword: str) -> tuple[str, list[str]] | None:
    """``FROM:<a@b> SIZE=10`` -> (``<a@b>``, [``SIZE=10``]); None if it is not that shape.

    The path ends at the ``>`` that closes it, skipping ``>`` inside a quoted
    local part.  A bare address without angle brackets (sent by some old
    clients) is taken up to the first space and wrapped in brackets.
    """
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :].lstrip(" ")  # tolerate "MAIL FROM: <a@b>"
    if not rest:
        return None
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            return None
        path, tail = rest[: end + 1], rest[end + 1 :]
        if tail and not tail.startswith(" "):
            return None
    else:
        path, _, tail = rest.partition(" ")
        path = f"<{path}>"
    return path, tail.split()


def _closing_bracket(text: str) -> int:
    end = text.find(">")
    if end < 0 or ('"' not in text[:end] and "\\" not in text[:end]):
        return end  # no quoting before the first ">": the loop below would stop there
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def parse_params(params: list[str]) -> dict[str, str | None] | None:
    """RFC 5321 §4.1.2 esmtp-param list -> {KEYWORD: value or None}; None if malformed."""
    out: dict[str, str | None] = {}
    for param in params:
        key, eq, value = param.partition("=")
        if not _PARAM_KEYWORD.match(key) or (eq and not value) or key.upper() in out:
            return None
        out[key.upper()] = value if eq else None
    return out
