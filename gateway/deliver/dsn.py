"""Delivery status notifications to the envelope sender (pure).

RFC 3464 §2: a DSN is a ``multipart/report; report-type=delivery-status`` (RFC
6522) with three parts: a human-readable explanation, a ``message/delivery-status``
part (per-message fields, then one block of per-recipient fields per reported
recipient) and the original message: its header section as
``text/rfc822-headers``, or the whole message as ``message/rfc822`` when the
sender asked for it (RFC 3461 §4.3 RET=FULL) and it is not too big.

One function builds every kind of notice; each recipient carries its RFC 3464
§2.3.3 action: ``failed`` (a bounce), ``delayed`` (still being retried),
``delivered`` (put in a local mailbox) or ``relayed`` (handed to a next hop that
does not offer DSN, RFC 3461 §5.2.2).

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
from typing import Literal

_ENHANCED = re.compile(r"^\s*(\d{3})[ -]([245]\.\d{1,3}\.\d{1,3})\b")
_BASIC = re.compile(r"^\s*([245])\d\d\b")

NoticeAction = Literal["failed", "delayed", "delivered", "relayed"]  # RFC 3464 §2.3.3

# Postfix's bounce_size_limit: a RET=FULL notice carries the whole message only up
# to this size, the header section above it.
FULL_RETURN_LIMIT = 100_000


@dataclass(frozen=True, slots=True)
class ReportedRecipient:
    address: str
    reply: str  # the reply that decided it, e.g. "550 5.1.1 No such user"
    remote_mta: str = ""  # the host that answered (empty: Coffer decided itself)
    expired: bool = False  # a temporary failure that outlived queue.max_age
    action: NoticeAction = "failed"
    # RFC 3464 §2.3.1 Original-Recipient, "addr-type; address", from RCPT TO ORCPT=.
    original_recipient: str = ""
    will_retry_until: float = 0.0  # "delayed": when the queue gives up (RFC 3464 §2.3.8)


# The name from when every DSN was a bounce.
FailedRecipient = ReportedRecipient


def status_code(reply: str, *, expired: bool = False, default: str = "5.0.0") -> str:
    """The RFC 3463 status for a DSN's Status field, taken from the reply when it has one."""
    if expired:
        return "4.4.7"  # RFC 3463 §3.5: delivery time expired
    m = _ENHANCED.match(reply)
    if m:
        return m.group(2)
    b = _BASIC.match(reply)
    if b:
        return f"{b.group(1)}.0.0"
    return default


def _status(r: ReportedRecipient) -> str:
    """RFC 3464 §2.3.4: the status class must agree with the action (5 or 4 for a
    failure, 4 for a delay, 2 for a success)."""
    if r.action == "failed":
        return status_code(r.reply, expired=r.expired)
    want = "4" if r.action == "delayed" else "2"
    code = status_code(r.reply, default=f"{want}.0.0")
    return code if code[0] == want else f"{want}.0.0"


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


# Subject and opening words per kind of notice (the wording Postfix users know).
_SUBJECT = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
}
_OPENING = {
    "failed": ["Your message could not be delivered to one or more recipients.",
               "The details are below and in the attached delivery report."],
    "delayed": ["Your message could not be delivered yet to one or more recipients.",
                "It will be retried; you do not need to send it again.",
                "The details are below and in the attached delivery report."],
    "success": ["Your message was successfully delivered to the destination(s) listed",
                "below. If the message was delivered to a mailbox you will receive no",
                "further notifications. Otherwise you may still receive notifications",
                "of mail delivery errors from other systems."],
}


def _kind(recipients: list[ReportedRecipient]) -> str:
    actions = {r.action for r in recipients}
    if "failed" in actions:
        return "failed"
    if "delayed" in actions:
        return "delayed"
    return "success"


def _human_line(r: ReportedRecipient) -> str:
    if r.action == "failed":
        why = "gave up after retrying" if r.expired else "delivery failed"
    elif r.action == "delayed":
        why = "delivery temporarily suspended"
    elif r.action == "delivered":
        why = "delivery successful"
    else:
        why = "delivery via a system that does not report delivery status"
    return f"<{r.address}>: {why}: {_one_line(r.reply)}"


def build_dsn(
    *,
    sender: str,
    original: bytes,
    recipients: list[ReportedRecipient],
    reporting_mta: str,
    arrival: float,
    now: float,
    qid: str = "",
    boundary: str | None = None,
    ret: str | None = None,
    envid: str | None = None,
    full_limit: int = FULL_RETURN_LIMIT,
) -> bytes:
    """The bytes of a DSN to ``sender`` about ``recipients`` (each with its action).

    ``ret`` is the sender's RFC 3461 §4.3 RET (None: not given, headers only);
    ``envid`` the decoded §4.4 ENVID, reported as Original-Envelope-Id.
    """
    if not recipients:
        raise ValueError("a DSN needs at least one recipient to report")
    if not sender:
        raise ValueError("never send a DSN to the null reverse-path (RFC 5321 §4.5.5)")
    boundary = boundary or f"=_coffer_{secrets.token_hex(12)}"
    daemon = f"MAILER-DAEMON@{reporting_mta}"
    msgid = f"<{qid or secrets.token_hex(8)}.{secrets.token_hex(4)}.dsn@{reporting_mta}>"
    kind = _kind(recipients)

    human = [f"This is the mail system at host {reporting_mta}.", "", *_OPENING[kind], ""]
    human.extend(_human_line(r) for r in recipients)
    human_text = "\r\n".join(human) + "\r\n"

    # RFC 3464 §2.2: per-message fields, then §2.3: one block per recipient.
    status = []
    if envid is not None:
        status.append(f"Original-Envelope-Id: {envid}")  # §2.2.1: first, when given
    status.append(f"Reporting-MTA: dns; {reporting_mta}")
    if qid:
        status.append(f"X-Coffer-Queue-ID: {qid}")  # §2.2.5 extension field
    status.append(f"Arrival-Date: {_date(arrival)}")
    for r in recipients:
        status.append("")
        if r.original_recipient:
            status.append(f"Original-Recipient: {r.original_recipient}")  # §2.3.1
        status.append(f"Final-Recipient: {_address_type(r.address)}; {r.address}")
        status.append(f"Action: {r.action}")
        status.append(f"Status: {_status(r)}")
        if r.remote_mta:
            status.append(f"Remote-MTA: dns; {r.remote_mta}")
        if r.reply:
            status.append(f"Diagnostic-Code: smtp; {_one_line(r.reply)}")
        status.append(f"Last-Attempt-Date: {_date(now)}")
        if r.action == "delayed" and r.will_retry_until:
            status.append(f"Will-Retry-Until: {_date(r.will_retry_until)}")  # §2.3.8
    status_text = "\r\n".join(status) + "\r\n"

    # RFC 3461 §4.3: RET=FULL asks for the whole message in a failure notice;
    # otherwise (HDRS, not given, or a success or delay notice) the header section.
    # A message above full_limit comes back as its header section (Postfix
    # bounce_size_limit).
    full = ret == "FULL" and kind == "failed" and len(original) <= full_limit
    if full:
        returned = original.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if not returned.endswith(b"\r\n"):
            returned += b"\r\n"
        returned_type = b"message/rfc822"
    else:
        returned = header_section(original)
        returned_type = b"text/rfc822-headers"
    eight_bit = not (human_text.isascii() and status_text.isascii() and returned.isascii())
    cte = "8bit" if eight_bit else "7bit"

    top = [
        f"From: Mail Delivery System <{daemon}>",
        f"To: <{sender}>",
        f"Subject: {_SUBJECT[kind]}",
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
    out += b"Content-Type: " + returned_type + b"\r\n"
    out += f"Content-Transfer-Encoding: {cte}\r\n".encode() + b"\r\n"
    out += returned + b"\r\n"
    out += b"--" + b + b"--\r\n"
    return out
