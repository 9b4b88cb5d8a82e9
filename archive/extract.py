"""Turn the raw bytes of a message into what the archive indexes and records.

``extract(raw)`` parses an RFC 5322 message with the standard library
(``email.policy.default``) and returns an :class:`Extracted`: decoded headers
(RFC 2047 encoded-words), the body as text (text/plain preferred, HTML converted
to text, charsets decoded), and every attachment with its name, type, size,
SHA-256 and extracted text (text/*, HTML, PDF, DOCX, XLSX, nested messages and
zip archives, within :class:`Limits`).

It NEVER raises: the archive must keep and index every message it is given,
including the malformed ones.  A piece that cannot be read is recorded as a flag
(``"could not be scanned: ..."``) on the message or the attachment, so an officer
can see what the index could not look into.
"""

from __future__ import annotations

import codecs
import contextlib
import email
import email.message
import email.policy
import email.utils
import functools
import hashlib
import io
import logging
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.header import decode_header, make_header
from typing import Any
from xml.etree import ElementTree

from gateway import mailparse
from gateway.check.headers import getaddresses_lenient
from gateway.htmltext import visible_text

__all__ = [
    "Attachment", "Extracted", "Limits", "Participant", "body_text", "clean_text", "crlf_size",
    "extract",
]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds that keep a hostile message from exhausting the indexer."""

    max_depth: int = 3  # nested message/rfc822 and zip levels
    max_parts: int = 500  # MIME leaves and zip members, all levels together
    max_part_bytes: int = 25 * 1024 * 1024  # a single decoded part or zip member
    max_zip_total: int = 100 * 1024 * 1024  # uncompressed bytes read from one archive
    max_text_chars: int = 2_000_000  # text kept per body or attachment
    max_pdf_pages: int = 200
    scan_attachments: bool = True  # False: headers and body only (snippets)


@dataclass(frozen=True, slots=True)
class Participant:
    role: str  # from | to | cc | bcc | sender | reply_to
    address: str  # lower-cased addr-spec, "" when the header held only a name
    name: str


@dataclass(slots=True)
class Attachment:
    name: str
    content_type: str
    size: int
    sha256: str
    text: str = ""
    depth: int = 0  # 0: part of the message itself; 1+: inside a nested message or zip
    flags: list[str] = field(default_factory=list)

    @property
    def scanned(self) -> bool:
        return not self.flags


@dataclass(slots=True)
class Extracted:
    message_id: str = ""  # without the angle brackets
    subject: str = ""
    date: datetime | None = None  # aware, UTC
    participants: list[Participant] = field(default_factory=list)
    body: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    size: int = 0
    # IMAP's RFC822.SIZE (crlf_size): None when not measured from the bytes (a row
    # rebuilt without its content).
    crlf_size: int | None = None

    def addresses(self, role: str) -> list[Participant]:
        return [p for p in self.participants if p.role == role]

    @property
    def from_address(self) -> str:
        found = self.addresses("from")
        return found[0].address if found else ""

    def participants_text(self) -> str:
        """Names and addresses from the headers, for bare-word full-text search."""
        return " ".join(f"{p.name} {p.address}".strip() for p in self.participants)

    def attachment_text(self) -> str:
        return "\n".join(a.text for a in self.attachments if a.text)

    def attachment_names(self) -> str:
        return "\n".join(a.name for a in self.attachments if a.name)


_LIMITS = Limits()  # frozen: one shared default, not a new one per message


def extract(raw: bytes, limits: Limits | None = None) -> Extracted:
    """Parse ``raw`` into an :class:`Extracted`; never raises."""
    limits = limits or _LIMITS
    out = Extracted(size=len(raw), crlf_size=crlf_size(raw))
    try:
        _Extractor(limits).run(raw, out, depth=0)
    except RecursionError:
        out.flags.append("could not be scanned: structure nested too deeply")
    except Exception as exc:  # the archive keeps every message; this is the last resort
        out.flags.append(f"could not be scanned: {type(exc).__name__}: {exc}"[:300])
    return _cleaned(out)


def crlf_size(raw: bytes) -> int:
    r"""The length of ``raw`` as IMAP serves it, every bare LF as CRLF: its RFC822.SIZE.

    Equal to ``len(archive.imap.render.to_crlf(raw))`` without building the copy
    (tests/archive/test_crlf_size.py proves it on the MIME corpus and random bytes):
    each LF not preceded by CR gains one byte.  ``b"\r\n"`` cannot overlap itself,
    so ``count`` finds every LF that has its CR; a bare CR, or a CR at the end, is
    served as is; NUL served as 0x80 keeps the length.  Two C scans of the bytes
    (~7 us for 5.7 kB, no copy; docs/benchmarks.md), made while the archive holds them.
    """
    lfs = raw.count(b"\n")
    return len(raw) + lfs - raw.count(b"\r\n") if lfs else len(raw)


_DEFAULT = email.policy.default


@functools.lru_cache(maxsize=4096)
def _parsed_header(name: str, value: str) -> Any:
    """One default-policy parse per distinct (name, value): header objects are
    immutable, and the same From or Subject recurs across a burst of messages."""
    return _DEFAULT.header_fetch_parse(name, value)
_SURROGATES = re.compile(r"[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Text safe for every database: 8-bit header bytes the parser kept as surrogate
    escapes are decoded (UTF-8, else Windows-1252) and NUL characters dropped."""
    # isascii is O(1) on CPython (a flag of the string): most text skips the search.
    if not text.isascii() and _SURROGATES.search(text):
        raw = text.encode("utf-8", "surrogateescape")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")
        text = _SURROGATES.sub("\ufffd", text)
    # str.replace walks and copies the whole text even when the character is absent
    # (about 0.3 ns a byte, most of a body's cleaning); the search alone is memchr.
    return text.replace("\x00", "") if "\x00" in text else text


def _cleaned(out: Extracted) -> Extracted:
    try:
        out.message_id = clean_text(out.message_id)
        out.subject = clean_text(out.subject)
        out.body = clean_text(out.body)
        out.participants = [_clean_participant(p) for p in out.participants]
        out.flags = [clean_text(f) for f in out.flags]
        for a in out.attachments:
            a.name = clean_text(a.name)
            a.content_type = clean_text(a.content_type)
            a.text = clean_text(a.text)
            a.flags = [clean_text(f) for f in a.flags]
    except Exception as exc:  # pragma: no cover - clean_text handles every str
        out.flags.append(f"could not be scanned: {type(exc).__name__}")
    return out


def _clean_participant(p: Participant) -> Participant:
    address, name = clean_text(p.address), clean_text(p.name)
    # Most are clean already: the same (immutable) participant, not a copy.
    return p if address == p.address and name == p.name else Participant(p.role, address, name)


def body_text(raw: bytes, limits: Limits | None = None) -> str:
    """Only the body text (as in :func:`extract`), fast: for snippets at query time.

    Parses as :func:`extract` does (``_PARSE``, no header objects); attachments are
    not opened.  Never raises.
    """
    limits = limits or Limits(scan_attachments=False)
    try:
        msg = email.message_from_bytes(raw, policy=_PARSE)
        out = Extracted(size=len(raw))
        bodies: list[str] = []
        _Extractor(Limits(max_depth=0, max_parts=limits.max_parts,
                          max_text_chars=limits.max_text_chars, scan_attachments=False)
                   )._walk(msg, out, bodies, 0)
        return clean_text("\n\n".join(b for b in bodies if b)[: limits.max_text_chars])
    except Exception:
        return ""


# -- headers ---------------------------------------------------------------

_ADDRESS_HEADERS = (("from", "From"), ("sender", "Sender"), ("reply_to", "Reply-To"),
                    ("to", "To"), ("cc", "Cc"), ("bcc", "Bcc"))
# The fields run() reads, lower-case (_read_fields).
_READ = frozenset({"message-id", "subject", "date", *(n.lower() for _, n in _ADDRESS_HEADERS)})


def _decode_words(value: str) -> str:
    """RFC 2047 §6: decode encoded-words; unknown charsets degrade, never raise."""
    try:
        return str(make_header(decode_header(value)))
    except Exception:
        parts = []
        for chunk, charset in decode_header(value):
            if isinstance(chunk, bytes):
                parts.append(_decode_bytes(chunk, charset)[0])
            else:
                parts.append(chunk)
        return "".join(parts)


_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _unfold(value: str) -> str:
    # RFC 5322 §2.2.3: unfolding removes the CRLF before folding white space.  Most
    # values hold no line break (the parse policy removed it): skip the search.
    return (_FOLD.sub("", value) if "\n" in value else value).strip()


_LINE_BREAK = re.compile(r"\n|\r")


class _FastPolicy(email.policy.Compat32):
    """compat32 (no header objects), but a field is returned as the default policy's
    parser sees it: unfolded (RFC 5322 §2.2.3; a boundary folded across lines) and with
    8-bit bytes kept as surrogate escapes, which clean_text decodes (compat32 would
    turn them into U+FFFD)."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return "".join(_LINE_BREAK.split(str(value)))


_PARSE = _FastPolicy()


def _fetch(name: str, value: str) -> object:
    """A header field as ``email.policy.default`` returns it (structured: addresses,
    RFC 2047 decoded).  compat32 and default store a parsed field's value the same
    way (``header_source_parse``), so this is what the default policy's ``get`` gives."""
    return _parsed_header(name, value)


def _get(msg: email.message.Message, name: str) -> object:
    value = msg.get(name)
    return None if value is None else _fetch(name, str(value))


def _get_all(msg: email.message.Message, name: str) -> list[object]:
    return [_fetch(name, str(v)) for v in msg.get_all(name) or []]


def _raw_values(msg: email.message.Message, name: str) -> list[str]:
    if isinstance(msg, mailparse.IndexedMessage):  # the same values, from its index
        return [str(v) for v in msg.raw_values(name)]
    return [str(v) for k, v in msg.raw_items() if k.lower() == name.lower()]


def _read_fields(msg: email.message.Message) -> dict[str, list[str]]:
    """The stored values of the fields run() reads (:data:`_READ`), by lower-case
    name, in order: what :func:`_raw_values` gives for each, from one pass over the
    header section instead of one lookup per name."""
    found: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        key = name.lower()
        if key in _READ:
            values = found.get(key)
            if values is None:
                found[key] = [str(value)]
            else:
                values.append(str(value))
    return found


def _header_text(msg: email.message.Message, name: str, raw: list[str],
                 flags: list[str]) -> str:
    """The text of field ``name``, whose stored values are ``raw``."""
    if raw and _has_8bit(raw[0]):
        # 8-bit bytes in a header (RFC 6532 UTF-8, or a legacy charset): the policy
        # would replace them with U+FFFD; decode them as UTF-8, else Windows-1252.
        return _unfold(_decode_words(clean_text(raw[0])))
    if name.lower() in _UNSTRUCTURED:
        # The default policy's unstructured value of an ASCII text without
        # encoded-words (RFC 2047 "=?") is that text: its parse only splits it into
        # words and blanks and joins them again; the parse is skipped.
        fetched = msg.get(name)
        plain = None if fetched is None else str(fetched)
        if plain is not None and plain.isascii() and "=?" not in plain:
            return _unfold(plain)
    try:
        value = _get(msg, name)
    except Exception as exc:
        flags.append(f"header {name}: unparsable ({type(exc).__name__})")
        return _raw_header(msg, name)
    if value is None:
        return ""
    text = str(value)
    if "=?" in text:  # encoded-words the policy left alone (e.g. malformed ones)
        text = _decode_words(text)
    return _unfold(text)


# Fields the default policy parses as unstructured text (email.headerregistry).
_UNSTRUCTURED = frozenset({"subject", "comments"})


def _has_8bit(value: str) -> bool:
    # isascii is O(1) on CPython: an ASCII value cannot hold a surrogate escape.
    return not value.isascii() and _SURROGATES.search(value) is not None


def _first_text(raw: list[str]) -> str:
    """The text of the first of a field's stored values without the default policy's
    parse (Date: parsed by the caller; Message-ID: only its first token is kept): a
    pure function of ``raw[0]``."""
    if not raw:
        return ""
    value = raw[0]
    if _has_8bit(value):  # see _header_text
        return _unfold(_decode_words(clean_text(value)))
    return _unfold(_decode_words(value)) if "=?" in value else _unfold(value)


def _raw_header(msg: email.message.Message, name: str) -> str:
    raw = _raw_values(msg, name)
    return _unfold(_decode_words(raw[0])) if raw else ""


# RFC 5322 §3.4 mailboxes in their plainest form: an optional display name of atoms
# (§3.2.3 atext, ASCII), then <addr-spec>; or a bare addr-spec; both dot-atom only.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
_PLAIN_MAILBOX = re.compile(
    rf"[ \t]*(?:({_ATEXT}(?:[ \t]+{_ATEXT})*)?[ \t]*<({_DOT_ATOM}@{_DOT_ATOM})>"
    rf"|({_DOT_ATOM}@{_DOT_ATOM}))[ \t]*")


def _plain_addresses(raw: list[str]) -> list[tuple[str, str]] | None:
    """(address, name) of every mailbox in a field's stored values when each value
    is a comma-separated list of plain mailboxes (:data:`_PLAIN_MAILBOX`), else None.

    What the default policy's parse gives for such a list (the address lower-cased,
    the name's words joined by one space), without that parse.  Anything else (quoted
    strings, comments, groups, encoded-words, non-ASCII, empty entries, dots in a
    name, domain literals) is None: the caller takes the full parse.
    """
    found: list[tuple[str, str]] = []
    for stored in raw:
        # As the parse policy returns the field (_FastPolicy): line breaks removed.
        value = "".join(_LINE_BREAK.split(stored)) if "\n" in stored or "\r" in stored \
            else stored
        if not value.isascii() or "=?" in value:
            return None
        for item in value.split(","):
            m = _PLAIN_MAILBOX.fullmatch(item)
            if m is None:
                return None
            name, angled, bare = m.groups()
            if angled is not None:
                found.append((angled.lower(), " ".join(name.split()) if name else ""))
            else:
                found.append((bare.lower(), ""))
    return found


def _participants(msg: email.message.Message, fields: dict[str, list[str]],
                  flags: list[str]) -> list[Participant]:
    """The mailboxes of the address fields; ``fields`` as :func:`_read_fields` gives."""
    result: list[Participant] = []
    for role, name in _ADDRESS_HEADERS:
        raw = fields.get(name.lower())
        if not raw:
            continue  # no such field (most of the six): get_all would find none either
        if len(raw) == 1:  # one field of this name, as nearly always: see _MAILBOXES
            key = (role, raw[0])
            found = _MAILBOXES.get(key, _UNSEEN)
            if found is _UNSEEN:
                plain = _plain_addresses(raw)
                found = _MAILBOXES.keep(key, None if plain is None else tuple(
                    Participant(role, address, text) for address, text in plain))
            if found is not None:
                result.extend(found)
                continue
            result.extend(_parsed_participants(msg, role, name, raw, flags))
            continue
        plain = _plain_addresses(raw)
        if plain is not None:
            result.extend(Participant(role, address, text) for address, text in plain)
        else:
            result.extend(_parsed_participants(msg, role, name, raw, flags))
    return result


# (role, the field's one stored value) -> its participants when the value is a list of
# plain mailboxes (_plain_addresses), else None: the same From and To recur across a
# burst.  Participants are immutable, so every Extracted may hold the same ones.
_MAILBOXES: mailparse.ValueMemo[tuple[str, str], tuple[Participant, ...] | None] = (
    mailparse.ValueMemo())
_UNSEEN: Any = object()


def _parsed_participants(msg: email.message.Message, role: str, name: str, raw: list[str],
                         flags: list[str]) -> list[Participant]:
    """The participants of one address field through the default policy's parse."""
    result: list[Participant] = []
    try:
        values = _get_all(msg, name)
    except Exception as exc:
        flags.append(f"header {name}: unparsable ({type(exc).__name__})")
        values = [_raw_header(msg, name)] if _raw_header(msg, name) else []
    for i, value in enumerate(values):
        if i < len(raw) and _SURROGATES.search(raw[i]):
            value = clean_text(raw[i])  # see _header_text: keep 8-bit names readable
        result.extend(_parse_addresses(role, value, flags))
    return result


def _parse_addresses(role: str, value: object, flags: list[str]) -> list[Participant]:
    found: list[Participant] = []
    addresses = getattr(value, "addresses", None)
    try:
        if addresses is not None:
            for a in addresses:
                spec = a.addr_spec if a.username or a.domain else ""
                found.append(Participant(role, spec.strip().lower(), str(a.display_name)))
            if found or not str(value).strip():
                return found
    except Exception:
        found = []
    # Fallback: the permissive compat32 parser for headers the default policy rejects.
    try:
        text = _decode_words(str(value))
        # Lenient on every Python patch level (CVE-2023-27043 made the default strict
        # on some): a rebuild on another interpreter restores the same participants.
        for name, addr in getaddresses_lenient([text]):
            if name or addr:
                found.append(Participant(role, addr.strip().lower(), name))
    except Exception as exc:
        flags.append(f"header {role}: unparsable address list ({type(exc).__name__})")
    return found


def _message_id(raw: list[str]) -> str:
    text = _first_text(raw)
    text = text.split()[0] if text else ""  # _first_text stripped it
    return text.removeprefix("<").removesuffix(">")


# The first stored Date value -> (date, flag): the same Date recurs across a burst
# (one sender's clock second, a list's digest).
_DATES: mailparse.ValueMemo[str, tuple[datetime | None, str | None]] = mailparse.ValueMemo()


def _date(raw: list[str], flags: list[str]) -> datetime | None:
    """The date of the first of the Date field's stored values ``raw``."""
    if not raw:
        return None
    found = _DATES.get(raw[0])
    if found is None:
        found = _DATES.keep(raw[0], _date_of(_first_text(raw)))
    when, flag = found
    if flag:
        flags.append(flag)
    return when


def _date_of(text: str) -> tuple[datetime | None, str | None]:
    """The UTC date of a Date field's text, or None and why (pure)."""
    if not text:
        return None, None
    try:
        # RFC 5322 §3.3 date-time; obsolete forms (§4.3) are accepted by the parser.
        when = email.utils.parsedate_to_datetime(text)
    except Exception:
        return None, "header Date: unparsable"
    if when.tzinfo is None:  # RFC 5322 §3.3: "-0000" means no zone information
        when = when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC), None
    except (OverflowError, ValueError):
        return None, "header Date: out of range"


# -- text decoding ---------------------------------------------------------


def _decode_bytes(data: bytes, charset: str | None) -> tuple[str, str | None]:
    """Decode with the declared charset; fall back to UTF-8, then Windows-1252.

    Returns (text, flag) where flag names a problem worth recording.
    """
    codec, flag = _codec(charset)
    if codec is not None:
        try:
            return data.decode(codec), flag
        except UnicodeDecodeError:
            pass
    # Declared us-ascii but 8-bit data is common in the wild (RFC 6532 allows UTF-8).
    with contextlib.suppress(UnicodeDecodeError):
        return data.decode("utf-8"), flag
    if codec is not None:
        flag = f"text not valid {codec}"
    return data.decode("cp1252", errors="replace"), flag


@functools.lru_cache(maxsize=512)
def _codec(charset: str | None) -> tuple[str | None, str | None]:
    """The codec of a declared charset, or None and the flag to record (pure: kept
    per charset, a handful of names in the mail of a whole day)."""
    name = (charset or "us-ascii").strip().strip('"').lower()
    try:
        return codecs.lookup(name).name, None
    except LookupError:
        return None, f"unknown charset {name[:40]!r}"


def _part_bytes(part: email.message.Message, flags: list[str]) -> bytes:
    try:
        payload = part.get_payload(decode=True)
    except Exception as exc:
        flags.append(f"could not be scanned: undecodable body ({type(exc).__name__})")
        return b""
    if isinstance(payload, bytes):
        return payload
    return b""


# Codecs (as codecs.lookup names them) that decode every ASCII byte to itself.
_ASCII_IDENTITY = frozenset({"ascii", "utf-8", "iso8859-1", "iso8859-15", "cp1252"})
# Content-Transfer-Encodings get_payload(decode=True) decodes; any other is identity.
_DECODED_CTE = frozenset({"quoted-printable", "base64", "x-uuencode", "uuencode", "uue",
                          "x-uue"})


def _ascii_text(part: email.message.Message, charset: str | None
                ) -> tuple[str, str | None] | None:
    """``_decode_bytes(_part_bytes(part, ...), charset)`` for the common body, without
    its three copies of the text (None: take that way).

    A part whose stored payload is an ASCII string (no surrogate escapes) and whose
    transfer encoding is an identity one gets that string as bytes from
    ``get_payload(decode=True)``; an ASCII-compatible codec, or UTF-8 after an unknown
    charset, decodes them to the string again.
    """
    payload = vars(part).get("_payload")
    if type(payload) is not str or not payload.isascii():
        return None
    try:
        codec, flag = _codec(charset)
        cte = str(part.get("content-transfer-encoding", "")).lower()
    except Exception:  # the general way records it (or fails) as it always did
        return None
    if (codec is not None and codec not in _ASCII_IDENTITY) or cte in _DECODED_CTE:
        return None
    return payload, flag


# -- documents ---------------------------------------------------------------

_W_NS = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_S_NS = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"


def _safe_xml(data: bytes) -> ElementTree.Element:
    # A DOCTYPE can declare entities (billion laughs); Office documents never need one.
    if b"<!DOCTYPE" in data[:4096].upper() or b"<!ENTITY" in data.upper():
        raise ValueError("XML with a DOCTYPE or entity declaration")
    return ElementTree.fromstring(data)


def _docx_text(zf: zipfile.ZipFile, limits: Limits) -> str:
    paragraphs: list[str] = []
    extra = sorted(n for n in zf.namelist()
                   if re.fullmatch(r"word/(header|footer|footnotes)\d*\.xml", n))
    names = ["word/document.xml", *extra]
    for name in names:
        if name not in zf.namelist():
            continue
        root = _safe_xml(_read_member(zf, name, limits))
        for p in root.iter(f"{_W_NS}p"):
            paragraphs.append("".join(t.text or "" for t in p.iter(f"{_W_NS}t")))
    return "\n".join(paragraphs)


def _xlsx_text(zf: zipfile.ZipFile, limits: Limits) -> str:
    cells: list[str] = []
    if "xl/sharedStrings.xml" in zf.namelist():
        root = _safe_xml(_read_member(zf, "xl/sharedStrings.xml", limits))
        for si in root.iter(f"{_S_NS}si"):
            cells.append("".join(t.text or "" for t in si.iter(f"{_S_NS}t")))
    for name in sorted(n for n in zf.namelist() if n.startswith("xl/worksheets/sheet")):
        root = _safe_xml(_read_member(zf, name, limits))
        for c in root.iter(f"{_S_NS}c"):
            if c.get("t") == "inlineStr":
                cells.append("".join(t.text or "" for t in c.iter(f"{_S_NS}t")))
            elif c.get("t") in (None, "n"):
                v = c.find(f"{_S_NS}v")
                if v is not None and v.text:
                    cells.append(v.text)
    return "\n".join(cells)


def _read_member(zf: zipfile.ZipFile, name: str, limits: Limits) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > limits.max_part_bytes:
        raise ValueError(f"{name}: {info.file_size} bytes is over the limit")
    with zf.open(info) as fh:
        # file_size is declared by the archive; read one byte more to catch a lie.
        data = fh.read(limits.max_part_bytes + 1)
    if len(data) > limits.max_part_bytes:
        raise ValueError(f"{name}: larger than declared")
    return data


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pdf_text(data: bytes, limits: Limits) -> str:
    from pypdf import PdfReader

    logger = logging.getLogger("pypdf")
    with warnings.catch_warnings(), _quiet(logger):
        # pypdf warns and logs about every oddity of a damaged PDF; we record one flag.
        warnings.simplefilter("ignore")
        reader = PdfReader(io.BytesIO(data), strict=False)
        pages = []
        for i, page in enumerate(reader.pages):
            if i >= limits.max_pdf_pages:
                break
            pages.append(page.extract_text() or "")
    return "\n".join(pages)


_EXT_TYPES = {
    ".txt": "text/plain", ".csv": "text/csv", ".htm": "text/html", ".html": "text/html",
    ".pdf": "application/pdf", ".eml": "message/rfc822", ".zip": "application/zip",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".md": "text/plain", ".json": "application/json", ".xml": "text/xml",
}


def _guess_type(name: str, declared: str, data: bytes) -> str:
    lower = name.lower()
    ext = lower[lower.rfind("."):] if "." in lower else ""
    if declared in ("application/octet-stream", "") and ext in _EXT_TYPES:
        return _EXT_TYPES[ext]
    if declared in ("application/octet-stream", "") and data[:5] == b"%PDF-":
        return "application/pdf"
    if declared in ("application/zip", "application/x-zip-compressed") and ext in (
        ".docx", ".xlsx"
    ):
        return _EXT_TYPES[ext]
    return declared


class _Extractor:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.parts = 0
        self.zip_bytes = 0

    def run(self, raw: bytes, out: Extracted, depth: int) -> None:
        # compat32 builds no header objects: the parser and the MIME walk look at
        # Content-Type and Content-Disposition of every part many times, and the
        # default policy parsed them anew at each look (most of extract()'s time).
        # The few top-level fields indexed are parsed with the default policy once
        # each (_fetch), from the same stored values.
        # The message itself: the compat32 tree the decide stage of this process may
        # have parsed already (gateway.mailparse), on this policy when that gives
        # the same tree; a nested message is parsed here, not kept in that cache.
        msg = (mailparse.parse_as(raw, _PARSE) if depth == 0
               else email.message_from_bytes(raw, policy=_PARSE))
        for defect in getattr(msg, "defects", [])[:5]:
            out.flags.append(f"defect: {type(defect).__name__}")
        fields = _read_fields(msg)
        out.message_id = _message_id(fields.get("message-id", []))
        out.subject = _header_text(msg, "Subject", fields.get("subject", []), out.flags)
        out.date = _date(fields.get("date", []), out.flags)
        out.participants = _participants(msg, fields, out.flags)
        bodies: list[str] = []
        self._walk(msg, out, bodies, depth)
        out.body = "\n\n".join(b for b in bodies if b)[: self.limits.max_text_chars]

    # RFC 2046 §5.1: walk the multipart tree; §5.1.4: alternatives hold the same content.
    def _walk(self, part: email.message.Message, out: Extracted, bodies: list[str],
              depth: int) -> None:
        self.parts += 1
        if self.parts > self.limits.max_parts:
            if "could not be scanned: too many parts" not in out.flags:
                out.flags.append("could not be scanned: too many parts")
            return
        ctype, attached, charset = _part_facts(part)
        if ctype in ("message/rfc822", "message/global"):
            self._nested_message(part, out, depth)
            return
        if part.is_multipart():
            payload = part.get_payload()
            if not isinstance(payload, list):
                return
            children = [c for c in payload if isinstance(c, email.message.Message)]
            if ctype == "multipart/alternative":
                chosen = _best_alternative(children)
                for child in children:
                    if child is chosen or _part_facts(child)[1]:
                        self._walk(child, out, bodies, depth)
                return
            for child in children:
                self._walk(child, out, bodies, depth)
            return
        if not attached and ctype in ("text/plain", "text/html", "text/enriched"):
            found = _ascii_text(part, charset)
            if found is None:
                text, flag = _decode_bytes(_part_bytes(part, out.flags), charset)
            else:
                text, flag = found
            if flag:
                out.flags.append(f"body: {flag}")
            bodies.append(visible_text(text) if ctype == "text/html" else text)
            return
        if ctype.startswith("multipart/"):
            # RFC 2046 §5.1.1: no usable boundary; index the raw text rather than nothing.
            out.flags.append(f"malformed {ctype[:40]}: indexed as plain text")
            text, _ = _decode_bytes(_part_bytes(part, out.flags), charset)
            bodies.append(text)
            return
        self._attachment(part, ctype, out, depth)

    def _attachment(self, part: email.message.Message, ctype: str, out: Extracted,
                    depth: int) -> None:
        flags: list[str] = []
        data = _part_bytes(part, flags)
        name = _filename(part, flags)
        att = Attachment(name=name, content_type=ctype, size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), depth=depth, flags=flags)
        out.attachments.append(att)
        if flags:
            return
        self._scan(att, data, out, depth)

    def _scan(self, att: Attachment, data: bytes, out: Extracted, depth: int) -> None:
        """Fill in ``att.text`` (and nested attachments) from ``data``."""
        limits = self.limits
        if not limits.scan_attachments:
            return
        if len(data) > limits.max_part_bytes:
            att.flags.append(f"could not be scanned: larger than {limits.max_part_bytes} bytes")
            return
        ctype = _guess_type(att.name, att.content_type, data)
        try:
            if ctype == "text/html":
                att.text = visible_text(_decode_bytes(data, None)[0])
            elif ctype.startswith("text/") or ctype in ("application/json", "application/xml"):
                att.text = _decode_bytes(data, None)[0]
            elif ctype == "application/pdf":
                att.text = _pdf_text(data, limits)
            elif ctype.endswith("wordprocessingml.document"):
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    att.text = _docx_text(zf, limits)
            elif ctype.endswith("spreadsheetml.sheet"):
                with zipfile.ZipFile(io.BytesIO(data)) as zf:
                    att.text = _xlsx_text(zf, limits)
            elif ctype in ("application/zip", "application/x-zip-compressed"):
                self._zip(att, data, out, depth)
            elif ctype == "message/rfc822":
                self._nested_bytes(att, data, out, depth)
        except RecursionError:
            att.flags.append("could not be scanned: nested too deeply")
        except Exception as exc:
            att.flags.append(f"could not be scanned: {type(exc).__name__}: {exc}"[:300])
        att.text = att.text[: limits.max_text_chars]

    def _zip(self, att: Attachment, data: bytes, out: Extracted, depth: int) -> None:
        if depth + 1 > self.limits.max_depth:
            att.flags.append("could not be scanned: archive nested too deeply")
            return
        names: list[str] = []
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                self.parts += 1
                if self.parts > self.limits.max_parts:
                    att.flags.append("could not be scanned: too many members")
                    break
                names.append(info.filename)
                member = Attachment(name=info.filename, content_type=_guess_type(
                    info.filename, "application/octet-stream", b""), size=info.file_size,
                    sha256="", depth=depth + 1)
                out.attachments.append(member)
                if info.flag_bits & 0x1:
                    member.flags.append("could not be scanned: encrypted archive member")
                    continue
                self.zip_bytes += info.file_size
                if (info.file_size > self.limits.max_part_bytes
                        or self.zip_bytes > self.limits.max_zip_total):
                    member.flags.append("could not be scanned: over the size limit")
                    continue
                try:
                    content = _read_member(zf, info.filename, self.limits)
                except Exception as exc:
                    member.flags.append(f"could not be scanned: {type(exc).__name__}")
                    continue
                member.size = len(content)
                member.sha256 = hashlib.sha256(content).hexdigest()
                member.content_type = _guess_type(info.filename, "application/octet-stream",
                                                  content)
                self._scan(member, content, out, depth + 1)
        att.text = "\n".join(names)

    def _nested_message(self, part: email.message.Message, out: Extracted, depth: int) -> None:
        flags: list[str] = []
        payload = part.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        if isinstance(inner, email.message.Message):
            try:
                data = inner.as_bytes(policy=email.policy.default.clone(linesep="\r\n"))
            except Exception:
                data = _part_bytes(part, flags)
        else:
            data = _part_bytes(part, flags)
        name = _filename(part, flags)
        att = Attachment(name=name, content_type="message/rfc822", size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), depth=depth, flags=flags)
        out.attachments.append(att)
        if flags:
            return
        try:
            self._nested_bytes(att, data, out, depth)
        except RecursionError:
            att.flags.append("could not be scanned: nested too deeply")
        except Exception as exc:  # one bad nested message must not hide the rest
            att.flags.append(f"could not be scanned: {type(exc).__name__}: {exc}"[:300])

    def _nested_bytes(self, att: Attachment, data: bytes, out: Extracted, depth: int) -> None:
        if depth + 1 > self.limits.max_depth:
            att.flags.append("could not be scanned: message nested too deeply")
            return
        inner = Extracted(size=len(data))
        self.run(data, inner, depth + 1)
        if not att.name:
            att.name = (inner.subject or "message")[:100] + ".eml"
        people = inner.participants_text()
        att.text = "\n".join(x for x in (inner.subject, people, inner.body) if x)
        out.attachments.extend(inner.attachments)
        att.flags.extend(f for f in inner.flags if f.startswith("could not be scanned"))


_PartFacts = tuple[str, bool, str | None]  # content type, attachment?, charset
# (Content-Type, Content-Disposition, default type) -> the part's facts: every
# part of a burst of mail from the same agents asks the same.
_FACTS: mailparse.ValueMemo[tuple[str | None, str | None, str], _PartFacts] = mailparse.ValueMemo()


def _part_facts(part: email.message.Message) -> _PartFacts:
    """_content_type, _is_attachment and _charset of ``part`` at once.

    The three read nothing but the first Content-Type and Content-Disposition
    fields (as the policy returns them) and the default type, so they are kept per
    those values: one lookup instead of a dozen field reads and parameter parses.
    """
    ctype_field, disposition = part.get("content-type"), part.get("content-disposition")
    if not (ctype_field is None or type(ctype_field) is str) or not (
            disposition is None or type(disposition) is str):
        return _content_type(part), _is_attachment(part), _charset(part)  # e.g. a Header
    key = (ctype_field, disposition, part.get_default_type())
    found = _FACTS.get(key)
    if found is None:
        found = _FACTS.keep(key, (_content_type(part), _is_attachment(part), _charset(part)))
    return found


def _content_type(part: email.message.Message) -> str:
    try:
        return part.get_content_type().lower()
    except Exception:
        return "application/octet-stream"


def _charset(part: email.message.Message) -> str | None:
    try:
        return part.get_content_charset()
    except Exception:
        return None


def _is_attachment(part: email.message.Message) -> bool:
    try:
        disposition = (part.get_content_disposition() or "").lower()
    except Exception:
        disposition = ""
    if disposition == "attachment":
        return True
    try:
        return bool(part.get_filename())
    except Exception:
        return False


def _filename(part: email.message.Message, flags: list[str]) -> str:
    try:
        # RFC 2231 §4 parameter value continuations/charsets are decoded by the policy;
        # RFC 2047 words in a filename are not legal but common, so decode them too.
        name = part.get_filename() or ""
    except Exception:
        flags.append("attachment name unparsable")
        return ""
    return _decode_words(name) if "=?" in name else name


def _best_alternative(children: list[email.message.Message]) -> email.message.Message | None:
    candidates = [c for c in children if not _part_facts(c)[1]]
    for wanted in ("text/plain", "text/html"):
        for child in candidates:
            if _part_facts(child)[0] == wanted:
                return child
    # e.g. multipart/related holding the HTML: the richest is last (RFC 2046 §5.1.4)
    return candidates[-1] if candidates else None
