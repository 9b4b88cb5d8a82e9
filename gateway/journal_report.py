"""Exchange / Microsoft 365 envelope journal reports: detect and parse them (pure).

A mail server that journals sends, for every message, a *journal report* to the
journal address: a ``multipart/mixed`` message marked ``X-MS-Journal-Report``
whose first part is the report text (the envelope: who sent the message and who
received it, Bcc and expanded list members included) and whose second part is the
original message as a ``message/rfc822`` attachment.  The report text is lines of
``Field: value``:

    Sender: alice@example.org
    Subject: Quarterly figures
    Message-Id: <1234@example.org>
    To: bob@example.org
    Cc: carol@example.org
    Bcc: dave@example.org
    To: member@example.org, Expanded: team@example.org
    To: eve@example.org, Forwarded: frank@example.org

Exchange 2010 and later write one recipient per line, an annotation after a comma
(``Expanded:`` the distribution list it was expanded from, ``Forwarded:`` the
mailbox that forwarded it).  Microsoft 365 writes the same fields and adds others
(``On-Behalf-Of:``, ``Recipient:`` for a recipient whose header is not known,
several addresses on one line separated by commas); unknown fields are kept as
they are, never an error.

The archive keeps the attached bytes exactly (:attr:`JournalReport.original`): the
attachment is cut out of the report at its MIME boundaries, not re-serialised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message

from gateway.mailparse import parse

# Microsoft's header that marks a journal report (any value; Exchange writes none).
REPORT_HEADER = "x-ms-journal-report"

RECIPIENT_FIELDS = {"to": "to", "cc": "cc", "bcc": "bcc", "recipient": "recipient"}
ANNOTATIONS = frozenset({"expanded", "forwarded"})
_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*):[ \t]*(.*)$")


class JournalReportError(ValueError):
    """A message marked as a journal report that cannot be read as one."""


@dataclass(frozen=True, slots=True)
class ReportRecipient:
    address: str  # lower-cased
    field: str  # to | cc | bcc | recipient
    expanded_from: str = ""  # the distribution list this recipient was expanded from
    forwarded_from: str = ""  # the mailbox that forwarded the message to this one


@dataclass(frozen=True, slots=True)
class ReportEnvelope:
    """What the report text says (pure data, before the attachment is looked at)."""

    sender: str = ""
    subject: str = ""
    message_id: str = ""
    on_behalf_of: str = ""
    recipients: tuple[ReportRecipient, ...] = ()
    other: tuple[tuple[str, str], ...] = ()  # fields this parser does not interpret

    @property
    def addresses(self) -> list[str]:
        """Every recipient address once, in report order."""
        return list(dict.fromkeys(r.address for r in self.recipients))


@dataclass(frozen=True, slots=True)
class JournalReport:
    envelope: ReportEnvelope
    original: bytes  # the attached message, byte for byte


def is_journal_report(msg: Message) -> bool:
    return msg.get(REPORT_HEADER) is not None


def _unfold(text: str) -> list[str]:
    """Report lines with RFC 5322 §2.2.3 folding undone (a line that starts with
    white space continues the previous one)."""
    lines: list[str] = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        if raw[:1] in (" ", "\t") and lines:
            lines[-1] += " " + raw.strip()
        elif raw.strip():
            lines.append(raw.strip())
    return lines


def _bare(address: str) -> str:
    """An address without angle brackets or a display name, lower-cased."""
    address = address.strip()
    if "<" in address and address.endswith(">"):
        address = address[address.rindex("<") + 1:-1]
    return address.strip().lower()


def _recipients(field_name: str, value: str) -> list[ReportRecipient]:
    """One report line's recipients: addresses and the annotations that follow them."""
    out: list[ReportRecipient] = []
    for part in (p.strip() for p in value.split(",")):
        m = _FIELD.match(part)
        key = m.group(1).lower() if m else ""
        if m and key in ANNOTATIONS and out:
            last = out[-1]
            note = {"expanded_from" if key == "expanded" else "forwarded_from":
                    _bare(m.group(2))}
            out[-1] = ReportRecipient(last.address, last.field,
                                      note.get("expanded_from", last.expanded_from),
                                      note.get("forwarded_from", last.forwarded_from))
        elif part and "@" in part and not m:
            out.append(ReportRecipient(_bare(part), field_name))
    return out


def parse_envelope(text: str) -> ReportEnvelope:
    """The report text's envelope; JournalReportError if it names no sender or no
    recipient (then it is no envelope report and must not be archived as one)."""
    singles: dict[str, str] = {}
    recipients: list[ReportRecipient] = []
    other: list[tuple[str, str]] = []
    for line in _unfold(text):
        m = _FIELD.match(line)
        if m is None:
            continue  # prose around the fields (some versions add a heading)
        name, value = m.group(1).lower(), m.group(2).strip()
        if name in RECIPIENT_FIELDS:
            recipients += _recipients(RECIPIENT_FIELDS[name], value)
        elif name in ("sender", "subject", "message-id", "on-behalf-of") and name not in singles:
            singles[name] = value
        else:
            other.append((m.group(1), value))
    if not singles.get("sender"):
        raise JournalReportError("the report names no Sender")
    if not recipients:
        raise JournalReportError("the report names no recipient")
    return ReportEnvelope(
        sender=_bare(singles["sender"]), subject=singles.get("subject", ""),
        message_id=singles.get("message-id", ""),
        on_behalf_of=_bare(singles.get("on-behalf-of", "")),
        recipients=tuple(recipients), other=tuple(other))


def _report_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise JournalReportError("the report part has no text")
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:
        return payload.decode("utf-8", errors="replace")


def _attached_bytes(data: bytes, boundary: str, index: int) -> bytes:
    """The body of the ``index``-th part between the top-level MIME ``boundary``
    lines of ``data``, exactly as it was sent (RFC 2046 §5.1.1)."""
    # The delimiter is a whole line: "--abc-1" (a nested part's boundary) is not "--abc".
    delimiter = re.compile(rb"(?:^|\r?\n)--" + re.escape(boundary.encode())
                           + rb"(?:--)?[ \t]*(?:\r?\n|$)")
    marks = list(delimiter.finditer(data))
    if len(marks) < index + 2:
        raise JournalReportError("the attachment's MIME part is not closed")
    part = data[marks[index].end():marks[index + 1].start()]
    # The part's own header section ends at its first empty line (none: no fields).
    m = re.match(rb"\r?\n", part) or re.search(rb"\r?\n\r?\n", part)
    if m is None:
        raise JournalReportError("the attachment part has no body")
    return part[m.end():]


def parse_report(data: bytes) -> JournalReport:
    """The envelope a journal report gives and the original message it carries.

    JournalReportError when ``data`` is not a readable report: not multipart, no
    report text, no attached message, no sender or recipient.
    """
    msg = parse(data)
    if not msg.is_multipart():
        raise JournalReportError("not a multipart message")
    parts = [p for p in msg.get_payload() if isinstance(p, Message)]
    if len(parts) < 2:
        raise JournalReportError("no attached original message")
    envelope = parse_envelope(_report_text(parts[0]))
    index = next((i for i, p in enumerate(parts) if i > 0
                  and p.get_content_type() == "message/rfc822"), None)
    if index is None:
        raise JournalReportError("no message/rfc822 part")
    if (parts[index].get("content-transfer-encoding") or "7bit").lower() not in (
            "7bit", "8bit", "binary"):
        # RFC 2046 §5.2.1: message/rfc822 is never encoded; one that is cannot be
        # cut out byte for byte.
        raise JournalReportError("the attached message has a transfer encoding")
    boundary = msg.get_boundary()
    if not boundary:
        raise JournalReportError("multipart without a boundary")
    original = _attached_bytes(data, boundary, index)
    if not original.strip():
        raise JournalReportError("the attached message is empty")
    return JournalReport(envelope, original)
