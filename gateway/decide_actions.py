"""Carry out the policy's message actions before the queue: pure functions.

The policy engine only *decides*; this module turns the decided actions into
changes the runner can merge (see :func:`gateway.decide.to_result`):

    remove_header, rewrite_header, tag_subject  -> new message bytes
    redirect                                    -> StageResult.recipients (replaces RCPT TO)
    bcc, journal                                -> StageResult.extra_recipients
    notify                                      -> StageResult.notify (separate messages)

Header edits touch only the header fields they change: every other byte of the
message — other fields, their folding, the body — is kept as received, so DKIM
signatures over untouched fields still verify.  The message is never
re-serialised through the ``email`` package.
"""

from __future__ import annotations

import email.header
import email.message
import email.policy
import email.utils
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.check import headers
from gateway.check.headers import Field
from policies.message import decode_header_value

HEADER_ACTIONS = frozenset({"remove_header", "rewrite_header", "tag_subject"})
# RFC 5322 §2.1.1: lines SHOULD be at most 78 characters (excluding CRLF).
_FOLD_AT = 78
# Unstructured fields (RFC 5322 §3.6.5 and private X- fields): their text may be
# RFC 2047 encoded as a whole, so a pattern is matched against the decoded text.
_UNSTRUCTURED = frozenset({"subject", "comments"})
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
# Marks Coffer's notices: a message carrying it never triggers another notice.
NOTICE_HEADER = "X-Coffer-Notice"


def _eol(data: bytes) -> bytes:
    """The message's line ending: CRLF on the wire (RFC 5322 §2.1), LF in some files."""
    nl = data.find(b"\n")
    return b"\n" if nl > 0 and data[nl - 1 : nl] != b"\r" else b"\r\n"


def _field_eol(f: Field, default: bytes) -> bytes:
    if f.raw.endswith(b"\r\n"):
        return b"\r\n"
    return b"\n" if f.raw.endswith(b"\n") else default


def _raw_value(f: Field) -> str:
    """The unfolded value as on the wire (RFC 5322 §2.2.3); 8-bit read as UTF-8 (RFC 6532)."""
    _, _, value = f.raw.partition(b":")
    return re.sub(rb"\r?\n(?=[ \t])", b"", value).strip().decode("utf-8", "surrogateescape")


def _name_of(f: Field) -> str:
    """The field name as the message spells it."""
    return f.raw.partition(b":")[0].strip().decode("ascii", "replace")


def _fold(name: str, text: str, eol: bytes) -> bytes:
    """``Name: text`` folded at white space (RFC 5322 §2.2.3), ending in ``eol``."""
    lines: list[str] = []
    line = f"{name}:"
    for word in text.split(" "):
        if word and len(line) + 1 + len(word) > _FOLD_AT and line.strip() != f"{name}:":
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    sep = eol.decode()
    return (sep.join(lines) + sep).encode("utf-8", "surrogateescape")


def _encoded(name: str, text: str, eol: bytes) -> bytes:
    """A header field for ``text``: plain when ASCII, else RFC 2047 encoded-words (UTF-8)."""
    if text.isascii():
        return _fold(name, text, eol)
    # Undecodable bytes read from the message (surrogate escapes) cannot be encoded.
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    # RFC 2047 §2: each encoded-word at most 75 characters; Header folds between them.
    value = email.header.Header(text, "utf-8", header_name=name).encode(linesep=eol.decode())
    return f"{name}: {value}".encode("ascii") + eol


def _header_end(fields: list[Field], eol: bytes) -> list[Field]:
    """Make sure the last field ends with a line ending before one is appended."""
    if fields and not fields[-1].raw.endswith(b"\n"):
        last = fields[-1]
        fields[-1] = Field(last.name, last.raw + eol)
    return fields


def remove_header(data: bytes, name: str) -> bytes:
    """Remove every occurrence of the field ``name`` (case-insensitive), folded lines too."""
    fields, rest = headers.split(data)
    want = name.lower()
    kept = [f for f in fields if f.name != want]
    if len(kept) == len(fields):
        return data
    return headers.join(kept, rest)


def rewrite_header(
    data: bytes, name: str, *, value: str | None = None, pattern: str | None = None,
    replace: str | None = None,
) -> bytes:
    """Replace the value of every occurrence of ``name``, or substitute within it.

    ``value``: the field's whole value becomes ``value``.  ``pattern`` and
    ``replace``: :func:`re.sub` over the unfolded value — the decoded text for
    unstructured fields (Subject, Comments, X-…), the text as written for the
    others, whose encoded-words may only sit in phrases (RFC 2047 §5).  A field
    the substitution leaves unchanged keeps its bytes.  An absent field stays absent.
    """
    if (value is None) == (pattern is None or replace is None):
        raise ValueError("rewrite_header takes value, or pattern and replace")
    fields, rest = headers.split(data)
    want = name.lower()
    eol = _eol(data)
    changed = False
    out: list[Field] = []
    for f in fields:
        if f.name != want:
            out.append(f)
            continue
        spelled = _name_of(f)
        f_eol = _field_eol(f, eol)
        if value is not None:
            new_text = value
        else:
            assert pattern is not None and replace is not None
            unstructured = want in _UNSTRUCTURED or want.startswith("x-")
            raw = _raw_value(f)
            old = decode_header_value(raw) if unstructured and "=?" in raw else raw
            new_text = re.sub(pattern, replace, old)
            if new_text == old:
                out.append(f)
                continue
            if not unstructured and not new_text.isascii():
                # A structured field must not become one big encoded-word (RFC 2047 §5).
                out.append(Field(f.name, _fold(spelled, new_text, f_eol)))
                changed = True
                continue
        out.append(Field(f.name, _encoded(spelled, new_text, f_eol)))
        changed = True
    if not changed:
        return data
    return headers.join(out, rest)


def tag_subject(data: bytes, prefix: str) -> bytes:
    """Prefix the Subject with ``prefix`` once; a subject already carrying it is unchanged.

    An ASCII prefix is inserted as plain text before the existing value, whose
    bytes (encoded-words, raw UTF-8) are kept.  A non-ASCII prefix becomes its
    own encoded-word (RFC 2047 §5(1)).  RFC 2047 §6.2: white space between two
    encoded-words is not displayed, so before an encoded-word the separating
    space goes inside the prefix's encoded-word.  No Subject: one is added.
    """
    tag = prefix.strip()
    if not tag:
        return data
    fields, rest = headers.split(data)
    eol = _eol(data)
    for i, f in enumerate(fields):
        if f.name != "subject":
            continue
        raw = _raw_value(f)
        if tag.lower() in decode_header_value(raw).lower():
            return data  # already tagged: once, not twice
        name_part, _, value_part = f.raw.partition(b":")
        stripped = value_part.lstrip(b" \t")
        before_ew = _ENCODED_WORD.match(stripped.decode("ascii", "replace")) is not None
        if tag.isascii():
            tag_bytes = tag.encode("ascii")
        else:
            text = tag + " " if before_ew else tag
            tag_bytes = email.header.Header(text, "utf-8").encode(
                linesep=_field_eol(f, eol).decode()).encode("ascii")
        body = stripped if stripped.strip() else b""
        first_len = len(name_part) + 2 + len(tag_bytes) + len(body.split(b"\n", 1)[0])
        if not body:
            new = name_part + b": " + tag_bytes + _field_eol(f, eol)
        elif first_len > _FOLD_AT:
            # RFC 5322 §2.2.3: fold at the white space after the tag.
            new = name_part + b": " + tag_bytes + _field_eol(f, eol) + b" " + body
        else:
            new = name_part + b": " + tag_bytes + b" " + body
        fields[i] = Field(f.name, new)
        return headers.join(fields, rest)
    fields = _header_end(fields, eol)
    fields.append(Field("subject", _encoded("Subject", tag, eol)))
    return headers.join(fields, rest)


def apply_header_actions(
    data: bytes, actions: Iterable[Mapping[str, Any]],
) -> tuple[bytes, list[str]]:
    """Apply the header actions in rule order -> (message, errors); other actions are ignored.

    An action that cannot be applied (a ``replace`` template naming a group the
    pattern lacks) is skipped and reported; the message still goes on.
    """
    errors: list[str] = []
    for a in actions:
        kind = a.get("action")
        try:
            if kind == "remove_header":
                data = remove_header(data, str(a["name"]))
            elif kind == "rewrite_header":
                data = rewrite_header(
                    data, str(a["name"]), value=a.get("value"), pattern=a.get("pattern"),
                    replace=a.get("replace"))
            elif kind == "tag_subject":
                data = tag_subject(data, str(a["prefix"]))
        except (re.error, ValueError, IndexError, UnicodeError) as exc:
            errors.append(f"{kind} from rule {a.get('rule')!r}: {type(exc).__name__}: {exc}")
    return data, errors


def _dedupe(addresses: Iterable[str], skip: Iterable[str] = ()) -> list[str]:
    seen = {s.lower() for s in skip}
    out = []
    for addr in addresses:
        if addr.lower() not in seen:
            seen.add(addr.lower())
            out.append(addr)
    return out


@dataclass(slots=True)
class Routing:
    """Envelope changes: ``recipients`` replaces RCPT TO when not None; ``extra`` is added."""

    recipients: list[str] | None = None
    extra: list[str] = field(default_factory=list)


def routing(rcpt_to: Sequence[str], actions: Iterable[Mapping[str, Any]]) -> Routing:
    """redirect replaces the recipients (every redirect's addresses, in rule order);
    bcc and journal add recipients who get this same message (no header names them)."""
    redirect: list[str] = []
    copies: list[str] = []
    for a in actions:
        if a.get("action") == "redirect":
            redirect.extend(a["to"])
        elif a.get("action") in ("bcc", "journal"):
            copies.extend(a["to"])
    recipients = _dedupe(redirect) if redirect else None
    base = recipients if recipients is not None else list(rcpt_to)
    return Routing(recipients, _dedupe(copies, skip=base))


def _one_line(text: str) -> str:
    return re.sub(r"[\r\n]+", " ", text).strip()


def build_notice(
    *, to: str, rule: str, decision: str, message_id: str, sender: str,
    sender_from: str, hostname: str, now: float, subject: str | None = None,
    text: str | None = None,
) -> bytes:
    """A short notice about a message: who sent it, its Message-ID, the rule — never its body.

    Marked ``Auto-Submitted: auto-generated`` (RFC 3834 §5) so responders do
    not answer it; sent with the null reverse-path by the caller, like a DSN.
    """
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender_from
    msg["To"] = to
    msg["Subject"] = _one_line(subject or f"Policy notice: rule {rule}")
    msg["Date"] = email.utils.formatdate(now, usegmt=True)
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@{hostname}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg[NOTICE_HEADER] = _one_line(rule)
    lines = [
        f"The mail policy rule {_one_line(rule)!r} matched a message.",
        "",
        f"Rule:       {_one_line(rule)}",
        f"Decision:   {decision}",
        f"Message-ID: {_one_line(message_id) or '(none)'}",
        f"Sender:     {_one_line(sender) or '<>'}",
    ]
    if text:
        lines[1:1] = ["", _one_line(text)]
    msg.set_content("\n".join(lines) + "\n", charset="utf-8")
    return msg.as_bytes()


def header_value(data: bytes, name: str) -> str:
    """The first ``name`` field's decoded value, "" if none."""
    fields, _ = headers.split(data)
    for f in fields:
        if f.name == name.lower():
            return decode_header_value(_raw_value(f))
    return ""


__all__ = [
    "HEADER_ACTIONS", "NOTICE_HEADER", "Routing", "apply_header_actions",
    "build_notice", "header_value", "remove_header", "rewrite_header", "routing",
    "tag_subject",
]
