"""Parse a DSN with the stdlib email package into typed pieces for assertions."""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from email.message import Message


@dataclass
class Report:
    top: Message
    parts: list[Message]  # human text, message/delivery-status, text/rfc822-headers
    per_message: Message  # RFC 3464 §2.2 fields
    recipients: list[Message]  # RFC 3464 §2.3 fields, one block per recipient
    headers: str  # the text/rfc822-headers part ("" when the whole message came back)
    returned: Message | None = None  # the message/rfc822 part's message (RET=FULL)

    @property
    def human(self) -> str:
        raw = self.parts[0].get_payload(decode=True)
        assert isinstance(raw, bytes)
        return raw.decode()


def _messages(payload: object) -> list[Message]:
    assert isinstance(payload, list)
    assert all(isinstance(m, Message) for m in payload)
    return list(payload)


def parse_report(raw: bytes) -> Report:
    top = email.message_from_bytes(raw, policy=email.policy.compat32)
    parts = _messages(top.get_payload())
    blocks = _messages(parts[1].get_payload())
    if parts[2].get_content_type() == "message/rfc822":
        (returned,) = _messages(parts[2].get_payload())
        return Report(top, parts, blocks[0], blocks[1:], "", returned)
    headers = parts[2].get_payload()
    assert isinstance(headers, str)
    return Report(top, parts, blocks[0], blocks[1:], headers)
