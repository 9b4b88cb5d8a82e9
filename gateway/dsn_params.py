"""The SMTP DSN extension's parameters (RFC 3461), parsed and read back (pure: no I/O).

RFC 3461 §4 adds two MAIL FROM parameters and two RCPT TO parameters::

    MAIL FROM:<a@x> RET=FULL|HDRS ENVID=xtext          ; §4.3, §4.4
    RCPT TO:<b@y> NOTIFY=NEVER|SUCCESS,FAILURE,DELAY   ; §4.1
                  ORCPT=addr-type;xtext                ; §4.2 (utf-8 type: RFC 6533 §3)

The receive side checks them (:func:`mail_param`, :func:`rcpt_param`, raising
:class:`DsnParamError`, a 501 5.5.4) and stores each as one canonical
``KEY=VALUE`` string in the envelope's ``mail_options`` / ``rcpt_options``, so
they survive the spool and a restart.  ENVID and ORCPT keep the encoded form the
client sent: RFC 3461 §5.2 passes them on unchanged to a DSN-capable next hop.
Notices read them back with :func:`message_request` / :func:`recipient_request`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.envelope import Envelope

NOTIFY_KEYWORDS = ("SUCCESS", "FAILURE", "DELAY")  # RFC 3461 §4.1, in canonical order
RET_KEYWORDS = ("FULL", "HDRS")  # RFC 3461 §4.3
MAIL_KEYS = frozenset({"RET", "ENVID"})
RCPT_KEYS = frozenset({"NOTIFY", "ORCPT"})
ENVID_MAX = 100  # RFC 3461 §4.4: the ENVID value may be up to 100 characters
ORCPT_MAX = 500  # RFC 3461 §4.2: the entire ORCPT parameter may be up to 500 characters

# RFC 3461 §4: xtext = *( xchar / hexchar ); xchar is "!".."~" except "+" and "=";
# hexchar is "+" and two upper-case hex digits.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*\Z")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
# RFC 2822 atom (the addr-type of ORCPT, RFC 3461 §4.2).
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+\Z")
# RFC 6533 §3: utf-8-addr-xtext / utf-8-addr-unitext.  QCHAR is printable ASCII but
# "+", "=" and "\"; QUCHAR adds any non-ASCII character; EmbeddedUnicodeChar is
# "\x{HEXPOINT}" (2 to 6 upper-case hex digits).
_QCHAR = r"[!-*,-<>-\[\]-~]"
_EMBEDDED = r"\\x\{[0-9A-F]{2,6}\}"
_UTF8_XTEXT = re.compile(rf"(?:{_QCHAR}|{_EMBEDDED})+\Z")
_UTF8_UNITEXT = re.compile(rf"(?:{_QCHAR}|[^\x00-\x7f]|{_EMBEDDED})+\Z")
_EMBEDDED_ONE = re.compile(r"\\x\{([0-9A-F]{2,6})\}")


class DsnParamError(ValueError):
    """A DSN parameter that RFC 3461 does not allow (the client gets 501 5.5.4)."""


def xtext_decode(text: str) -> str:
    """RFC 3461 §4 xtext -> its text; DsnParamError if it is not xtext."""
    if not _XTEXT.match(text):
        raise DsnParamError("not valid xtext")
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """Text -> RFC 3461 §4 xtext: "+", "=" and anything outside "!".."~" as "+XX"."""
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if code > 0x7F:
            # xtext is ASCII: a non-ASCII character goes as its UTF-8 octets.
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8"))
        elif 0x21 <= code <= 0x7E and ch not in "+=":
            out.append(ch)
        else:
            out.append(f"+{code:02X}")
    return "".join(out)


def _printable(text: str, what: str) -> str:
    # RFC 3461 §4.2/§4.4: before xtext encoding the value MUST be printable US-ASCII
    # (it becomes a header field of the DSN: no control character, no line break).
    if any(not 0x20 <= ord(c) <= 0x7E for c in text):
        raise DsnParamError(f"{what} must be printable US-ASCII")
    return text


def _utf8_decode(text: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext/unitext -> the address it encodes."""

    def one(m: re.Match[str]) -> str:
        point = int(m.group(1), 16)
        if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF or point < 0x20:
            raise DsnParamError(f"invalid embedded character \\x{{{m.group(1)}}}")
        return chr(point)

    return _EMBEDDED_ONE.sub(one, text)


def _value(key: str, value: str | None) -> str:
    if value is None:
        raise DsnParamError(f"{key} needs a value")
    return value


def mail_param(key: str, value: str | None) -> str:
    """The canonical ``KEY=VALUE`` for a MAIL FROM DSN parameter (RET or ENVID)."""
    value = _value(key, value)
    if key == "RET":  # RFC 3461 §4.3
        ret = value.upper()
        if ret not in RET_KEYWORDS:
            raise DsnParamError("RET must be FULL or HDRS")
        return f"RET={ret}"
    if key == "ENVID":  # RFC 3461 §4.4
        if len(value) > ENVID_MAX:
            raise DsnParamError(f"ENVID longer than {ENVID_MAX} characters")
        _printable(xtext_decode(value), "ENVID")
        return f"ENVID={value}"
    raise DsnParamError(f"{key} is not a MAIL FROM DSN parameter")


def rcpt_param(key: str, value: str | None, *, smtputf8: bool) -> str:
    """The canonical ``KEY=VALUE`` for a RCPT TO DSN parameter (NOTIFY or ORCPT)."""
    value = _value(key, value)
    if key == "NOTIFY":  # RFC 3461 §4.1
        words = value.upper().split(",")
        if words == ["NEVER"]:
            return "NOTIFY=NEVER"
        if len(set(words)) != len(words) or not set(words) <= set(NOTIFY_KEYWORDS):
            # NEVER with anything else, a keyword twice, an unknown or empty one.
            raise DsnParamError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
        return "NOTIFY=" + ",".join(k for k in NOTIFY_KEYWORDS if k in words)
    if key == "ORCPT":  # RFC 3461 §4.2
        addr_type, semi, address = value.partition(";")
        if not semi or not _ATOM.match(addr_type) or not address:
            raise DsnParamError("ORCPT must be addr-type;xtext")
        if len(value) > ORCPT_MAX:
            raise DsnParamError(f"ORCPT longer than {ORCPT_MAX} characters")
        addr_type = addr_type.lower()
        if addr_type == "utf-8":
            # RFC 6533 §3: unitext (raw UTF-8) only in an SMTPUTF8 transaction.
            form = _UTF8_UNITEXT if smtputf8 else _UTF8_XTEXT
            if not form.match(address):
                raise DsnParamError("ORCPT utf-8 address is not utf-8-addr-xtext")
            _utf8_decode(address)
        else:
            _printable(xtext_decode(address), "ORCPT")
        return f"ORCPT={addr_type};{address}"
    raise DsnParamError(f"{key} is not a RCPT TO DSN parameter")


# -- reading them back ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class MessageRequest:
    """What MAIL FROM asked for (RFC 3461 §4.3, §4.4); None when not given."""

    ret: str | None = None  # "FULL" or "HDRS"
    envid: str | None = None  # decoded
    envid_xtext: str | None = None  # as received, to pass on


@dataclass(frozen=True, slots=True)
class RecipientRequest:
    """What RCPT TO asked for one recipient (RFC 3461 §4.1, §4.2)."""

    notify: frozenset[str] | None = None  # None: not given; {"NEVER"} or a subset
    orcpt: str | None = None  # "addr-type;xtext" as received, to pass on

    def wants(self, event: str) -> bool:
        """Whether a notice of this kind (SUCCESS, FAILURE, DELAY) is wanted.

        RFC 3461 §4.1: without NOTIFY, an MTA may behave as for FAILURE,DELAY (as
        Postfix does: delay warnings, when configured, go to every sender); success
        is reported only when asked for.
        """
        if self.notify is None:
            return event in ("FAILURE", "DELAY")
        return event in self.notify

    @property
    def original_recipient(self) -> str:
        """The RFC 3464 §2.3.1 Original-Recipient value ("" without ORCPT):
        ``addr-type; address``, the address decoded from xtext (RFC 6533 §3 for utf-8)."""
        if not self.orcpt:
            return ""
        addr_type, _, encoded = self.orcpt.partition(";")
        try:
            address = _utf8_decode(encoded) if addr_type == "utf-8" else xtext_decode(encoded)
        except DsnParamError:
            return ""  # checked at RCPT; a spool edited by hand is not worth a crash
        return f"{addr_type}; {address}"


def _options_dict(options: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for option in options:
        key, _, value = option.partition("=")
        out.setdefault(key.upper(), value)
    return out


def message_request(mail_options: list[str]) -> MessageRequest:
    opts = _options_dict(mail_options)
    ret = opts.get("RET")
    envid_x = opts.get("ENVID")
    envid: str | None = None
    if envid_x:
        try:
            envid = xtext_decode(envid_x)
        except DsnParamError:
            envid_x = None
    return MessageRequest(ret=ret.upper() if ret else None, envid=envid, envid_xtext=envid_x)


def recipient_request(rcpt_options: list[str]) -> RecipientRequest:
    opts = _options_dict(rcpt_options)
    notify = opts.get("NOTIFY")
    return RecipientRequest(
        notify=frozenset(notify.upper().split(",")) if notify else None,
        orcpt=opts.get("ORCPT") or None,
    )


def recipient_requests(envelope: Envelope) -> dict[str, RecipientRequest]:
    """Each recipient's request, by address.  Options out of step with ``rcpt_to``
    (a stage replaced the recipients) count as none given."""
    return {r: recipient_request(o) for r, o in envelope.options_by_recipient().items() if o}


def to_pass_on(envelope: Envelope) -> tuple[list[str], dict[str, list[str]]]:
    """The DSN parameters to give a DSN-capable next hop (RFC 3461 §5.2.1: RET,
    ENVID, NOTIFY and ORCPT are relayed unchanged): MAIL's, and each recipient's."""
    mail = [o for o in envelope.mail_options if o.partition("=")[0].upper() in MAIL_KEYS]
    rcpts: dict[str, list[str]] = {}
    for rcpt, options in envelope.options_by_recipient().items():
        keep = [o for o in options if o.partition("=")[0].upper() in RCPT_KEYS]
        if keep:
            rcpts[rcpt] = keep
    return mail, rcpts
