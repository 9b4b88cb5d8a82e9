"""The Received trace header Coffer prepends to each message (pure: no I/O).

RFC 5321 §4.4 requires a Received line ("time stamp line") from every SMTP
server that accepts a message for relay or delivery::

    Received: from <helo> ([<client ip>])
            by <hostname> (Coffer) with <protocol> (<tls>) id <id>
            for <recipient>; <date-time>

The ``with`` protocol is ESMTP/ESMTPA/ESMTPS/ESMTPSA as registered by RFC 3848
(SMTP after HELO; UTF8SMTP* from RFC 6531 §4.3 when the SMTPUTF8 parameter was
used).  ``for`` names the recipient only when there is exactly one, so Bcc
recipients are not disclosed to each other (RFC 5321 §7.2).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from datetime import UTC, datetime
from email.utils import format_datetime

from gateway.envelope import Envelope

# What we are willing to copy from the client's HELO into a header: a domain or
# an address literal.  Anything else (spaces, parentheses, ';') could forge the
# structure of the header, so it is replaced by a neutral word.
_HELO_OK = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-_]{0,253})|\[[0-9A-Fa-f:.IPv6]{2,60}\]")


def protocol(envelope: Envelope, *, extended: bool) -> str:
    """RFC 3848 / RFC 6531 §4.3 value of the ``with`` clause."""
    tls, auth = envelope.tls is not None, envelope.auth_user is not None
    if envelope.smtputf8:
        base = "UTF8SMTP"
    elif extended or tls or auth:
        base = "ESMTP"
    else:
        return "SMTP"
    suffix = ("S" if tls else "") + ("A" if auth else "")
    return base + suffix


@functools.lru_cache(maxsize=1024)
def address_literal(ip: str) -> str:
    """RFC 5321 §4.1.3 address literal for a client IP: [192.0.2.1] or [IPv6:2001:db8::1].

    Remembered: a client sends many messages, and parsing the address cost more
    than the rest of the Received field."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return "[unknown]"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return f"[{addr.ipv4_mapped}]"
        return f"[IPv6:{addr.compressed}]"
    return f"[{addr}]"


@functools.lru_cache(maxsize=16)
def _date(when: datetime) -> str:
    """format_datetime(when), remembered for the few seconds that messages arrive in
    at a time (it costs more than the rest of the field; it ignores microseconds)."""
    return format_datetime(when)


def received_header(
    envelope: Envelope, *, hostname: str, trace_id: str, extended: bool = True
) -> bytes:
    """The complete ``Received:`` header field, folded, ending in CRLF."""
    helo = envelope.helo if _HELO_OK.fullmatch(envelope.helo or "") else "unknown"
    lines = [f"Received: from {helo} ({address_literal(envelope.client_ip)})"]
    by = f"by {hostname} (Coffer) with {protocol(envelope, extended=extended)}"
    if envelope.tls is not None:
        by += f" ({envelope.tls.version} {envelope.tls.cipher})"
    lines.append(f"{by} id {trace_id}")
    # RFC 5322 §3.3 date-time with a numeric zone ("+0000", never "-0000").
    date = _date(datetime.fromtimestamp(envelope.received_at, UTC).replace(microsecond=0))
    if len(envelope.rcpt_to) == 1:
        lines.append(f"for <{envelope.rcpt_to[0]}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(date)
    # RFC 5322 §2.2.3 folding: continuation lines start with white space.
    return "\r\n\t".join(lines).encode("utf-8") + b"\r\n"
