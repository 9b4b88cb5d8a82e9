"""Delivery status notifications: the bounce message sent to the envelope sender (pure).

RFC 3464 §2: a DSN is a ``multipart/report; report-type=delivery-status`` (RFC
6522) with three parts: a human-readable explanation, a ``message/delivery-status``
part (per-message fields, then one block of per-recipient fields per failed
recipient) and the original message's header section as ``text/rfc822-headers``.

The worker spools the result as a new message with the null reverse-path
(RFC 5321 §4.5.5: notifications MUST be sent with a null return path, so a
failure to deliver the bounce never generates another bounce).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

_ENHANCED = re.compile(r"^\s*(\d{3})[ -]([245]\.\d{1,3}\.\d{1,3})\b")
_BASIC = re.compile(r"^\s*([245])\d\d\b")


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str
    reply: str  # the reply that made it fail, e.g. "550 5.1.1 No such user"
    remote_mta: str = ""  # the host that answered (empty: Coffer decided itself)
    expired: bool = False  # a temporary failure that outlived queue.max_age


def status_code(reply: str, *, expired: bool = False) -> str:
    """The RFC 3463 status for a DSN's Status field, taken from the reply when it has one."""
    if expired:
        return "4.4.7"  # RFC 3463 §3.5: delivery time expired
    m = _ENHANCED.match(reply)
    if m:
        return m.group(2)
    b = _BASIC.match(reply)
    if b:
        return f"{b.group(1)}.0.0"
    return "5.0.0"


def _one_line(text: str) -> str:
    # A header field value on one line: multi-line replies are joined.
    return " ".join(text.replace("\r", "\n").split())


def _address_type(address: str) -> str:
    # RFC 3464 §2.3.2 rfc822 addresses are ASCII; RFC 6533 §3 adds utf-8 for SMTPUTF8.
    return "rfc822" if address.isascii() else "utf-8"


def header_section(data: bytes) -> bytes:
    """The original header section (up to the empty line), with CRLF line ends."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        head = data[: end + 2]
    else:
        lf = data.find(b"\n\n")
        head = data[: lf + 1] if lf >= 0 else data
    lines = head.replace(b"\r\n", b"\n").split(b"\n")
    return b"".join(line + b"\r\n" for line in lines if line)


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def build_dsn(
    *,
    sender: str,
    original: bytes,
    failed: list[FailedRecipient],
    reporting_mta: str,
    arrival: float,
    now: float,
    qid: str = "",
    boundary: str | None = None,
) -> bytes:
    """The bytes of a failure DSN to ``sender`` for the ``failed`` recipients."""
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    if not sender:
        raise ValueError("never send a DSN to the null reverse-path (RFC 5321 §4.5.5)")
    boundary = boundary or f"=_coffer_{secrets.token_hex(12)}"
    daemon = f"MAILER-DAEMON@{reporting_mta}"
    msgid = f"<{qid or secrets.token_hex(8)}.{secrets.token_hex(4)}.dsn@{reporting_mta}>"

    human = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "The details are below and in the attached delivery report.",
        "",
    ]
    for f in failed:
        why = "gave up after retrying" if f.expired else "delivery failed"
        human.append(f"<{f.address}>: {why}: {_one_line(f.reply)}")
    human_text = "\r\n".join(human) + "\r\n"

    # RFC 3464 §2.2: per-message fields, then §2.3: one block per recipient.
    status = [f"Reporting-MTA: dns; {reporting_mta}"]
    if qid:
        status.append(f"X-Coffer-Queue-ID: {qid}")  # §2.2.5 extension field
    status.append(f"Arrival-Date: {_date(arrival)}")
    for f in failed:
        status.append("")
        status.append(f"Final-Recipient: {_address_type(f.address)}; {f.address}")
        status.append("Action: failed")
        status.append(f"Status: {status_code(f.reply, expired=f.expired)}")
        if f.remote_mta:
            status.append(f"Remote-MTA: dns; {f.remote_mta}")
        if f.reply:
            status.append(f"Diagnostic-Code: smtp; {_one_line(f.reply)}")
        status.append(f"Last-Attempt-Date: {_date(now)}")
    status_text = "\r\n".join(status) + "\r\n"

    headers = header_section(original)
    eight_bit = not (human_text.isascii() and status_text.isascii() and headers.isascii())
    cte = "8bit" if eight_bit else "7bit"

    top = [
        f"From: Mail Delivery System <{daemon}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {formatdate(now, localtime=False, usegmt=True)}",
        f"Message-ID: {msgid}",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5: never answer this automatically
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        f"Content-Transfer-Encoding: {cte}",
        "",
        "This is a MIME-encapsulated message (RFC 3464 delivery status notification).",
        "",
    ]
    b = boundary.encode()
    out = "\r\n".join(top).encode() + b"\r\n"
    out += b"--" + b + b"\r\n"
    out += b"Content-Type: text/plain; charset=utf-8\r\n"
    out += f"Content-Transfer-Encoding: {cte}\r\n".encode()
    out += b"\r\n" + human_text.encode() + b"\r\n"
    out += b"--" + b + b"\r\n"
    out += b"Content-Type: message/delivery-status\r\n"
    out += f"Content-Transfer-Encoding: {cte}\r\n".encode() + b"\r\n"
    out += status_text.encode() + b"\r\n"
    out += b"--" + b + b"\r\n"
    out += b"Content-Type: text/rfc822-headers\r\n"
    out += f"Content-Transfer-Encoding: {cte}\r\n".encode() + b"\r\n"
    out += headers + b"\r\n"
    out += b"--" + b + b"--\r\n"
    return out
