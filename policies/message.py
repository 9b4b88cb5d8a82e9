"""A parsed view of one message, built once from its raw bytes for every condition.

Conditions never parse the message themselves: :func:`MessageView.from_bytes`
walks the MIME tree once (stdlib :mod:`email`, the lenient ``compat32``
policy) and keeps what rules look at — decoded headers, the subject, the body
text (text/plain parts plus the text of text/html parts), and one
:class:`Attachment` per attached file, including the members of zip archives
and the parts of attached messages, each with its nesting depth.

Each field is computed when a condition first reads it (the decide stage runs
before the 250 on every message, and most policies read little of it): headers
are decoded per name asked for, and conditions on attachments use
:attr:`MessageView.attachment_meta`, a walk that lists the attachments without
extracting body or attachment text.  The values are those of the eager view it
replaced (tests/policies/test_policy_message_lazy.py holds them equal).

It never raises: mail is hostile input.  What could not be decoded or opened
is marked ``unscannable`` with the reason, so a rule can quarantine it
("could not be scanned") instead of the gateway failing.
"""

from __future__ import annotations

import contextlib
import email
import email.header
import email.message
import email.policy
import io
import mimetypes
import re
import zipfile
from dataclasses import dataclass
from typing import Any

from gateway import mailparse
from gateway.htmltext import visible_text

# Bounds that keep a hostile message from costing unbounded work; anything
# beyond them is marked unscannable rather than silently skipped.
MAX_PARTS = 1000
MAX_DEPTH = 8
MAX_ZIP_MEMBERS = 1000
MAX_NESTED_ARCHIVE = 16 * 1024 * 1024
MAX_ATTACHMENT_TEXT = 8 * 1024 * 1024
SNIFF_BYTES = 512

_READ_WHOLE = frozenset({"application/zip", "application/pdf", "application/x-ole-storage"})


@dataclass(frozen=True, slots=True)
class Attachment:
    name: str  # file name as declared ("" when none)
    extension: str  # lower case, without the dot ("" when none)
    declared_type: str  # Content-Type of the part, or guessed from the name inside archives
    detected_type: str  # from the first bytes (see :func:`sniff`)
    size: int  # decoded bytes
    depth: int  # containers around it: 0 = attached to the message itself
    encrypted: bool = False  # password-protected archive member or document
    unscannable: bool = False  # its content could not be inspected
    reason: str = ""  # why it is unscannable
    text: str = ""  # extracted text, for DLP over attachments


class MessageView:
    """What rules look at, computed on first use (see the module docstring).

    Built with explicit fields (``MessageView(size, body_text=...)``) it holds
    them as given; built by :meth:`from_bytes` it holds the parsed tree and
    derives each field when a condition first reads it, so a policy that never
    looks at headers or body text never pays for decoding them.
    """

    __slots__ = ("_attachments", "_body_text", "_by_name", "_defects", "_headers", "_items",
                 "_meta", "_msg", "_sizes", "_subject", "cache", "size")

    def __init__(
        self, size: int, headers: list[tuple[str, str]] | None = None, subject: str = "",
        body_text: str = "", attachments: list[Attachment] | None = None,
        defects: list[str] | None = None, cache: dict[str, Any] | None = None,
    ) -> None:
        self.size = size
        # Per-message memo for expensive detectors (DLP), keyed by the detector.
        self.cache: dict[str, Any] = {} if cache is None else cache
        self._msg: email.message.Message | None = None
        self._items: list[tuple[str, Any]] = []  # the top-level fields, undecoded
        self._headers: list[tuple[str, str]] | None = [] if headers is None else headers
        self._by_name: dict[str, list[str]] = {}
        self._subject: str | None = subject
        self._body_text = body_text
        self._attachments: list[Attachment] | None = [] if attachments is None else attachments
        self._meta: list[Attachment] | None = None
        self._defects: list[str] = [] if defects is None else defects
        # Sizes of embedded messages by node: serialising one may add a boundary to
        # it (email.generator), so a second walk reuses the first walk's figure.
        self._sizes: dict[int, int] = {}

    @classmethod
    def from_bytes(cls, raw: bytes) -> MessageView:
        view = cls(size=len(raw))
        try:
            # compat32, the tree shared with the spam stage (gateway.mailparse).
            msg = mailparse.parse(raw)
        except Exception as exc:  # the parser is lenient, but never trust it fully
            view._defects.append(f"unparseable message: {exc}")
            view._body_text = raw.decode("utf-8", "replace")
            return view
        # The fields and defects as they are now, before any walk decodes a payload
        # (which records its own defects on the part).
        view._items = list(msg.raw_items())
        view._defects.extend(type(d).__name__ for d in getattr(msg, "defects", []) or [])
        view._msg = msg
        view._headers = None
        view._subject = None
        view._attachments = None
        return view

    @property
    def headers(self) -> list[tuple[str, str]]:
        """(name, decoded value) of every top-level field, in order."""
        if self._headers is None:
            fetch = self._fetch()
            self._headers = [(str(n), decode_header_value(fetch(n, v))) for n, v in self._items]
        return self._headers

    def header_values(self, name: str) -> list[str]:
        want = name.lower()
        if self._headers is not None:
            return [v for n, v in self._headers if n.lower() == want]
        values = self._by_name.get(want)
        if values is None:
            # Only the fields asked for are decoded (decoding is per value, so a
            # value decodes the same alone as within all of them).
            fetch = self._fetch()
            values = [decode_header_value(fetch(n, v)) for n, v in self._items
                      if str(n).lower() == want]
            self._by_name[want] = values
        return list(values)

    def _fetch(self) -> Any:
        """The tree's own header_fetch_parse: what ``Message.items()`` applies to each value."""
        assert self._msg is not None
        return self._msg.policy.header_fetch_parse

    @property
    def subject(self) -> str:
        if self._subject is None:
            subjects = self.header_values("subject")
            self._subject = subjects[0] if subjects else ""
        return self._subject

    @property
    def body_text(self) -> str:
        """text/plain parts plus the text of text/html parts."""
        self._walk_full()
        return self._body_text

    @property
    def attachments(self) -> list[Attachment]:
        """Every attachment with its extracted text."""
        self._walk_full()
        assert self._attachments is not None
        return self._attachments

    @property
    def attachment_meta(self) -> list[Attachment]:
        """The attachments with every field but ``text``, which may be "" here: what
        attachment conditions look at, without extracting any text."""
        if self._attachments is not None:
            return self._attachments
        if self._meta is None:
            self._meta = []
            with contextlib.suppress(Exception):  # the full walk records the failure
                _Walker(self, self._meta, text=False).top(self._tree())
        return self._meta

    @property
    def defects(self) -> list[str]:
        self._walk_full()
        return self._defects

    @property
    def max_depth(self) -> int:
        """Deepest nesting of any attachment (0: none nested; -1: no attachments)."""
        return max((a.depth for a in self.attachment_meta), default=-1)

    @property
    def attachment_text(self) -> str:
        return "\n".join(a.text for a in self.attachments if a.text)

    def embedded_size(self, inner: email.message.Message) -> int:
        """Bytes of an attached message, serialised once per view."""
        size = self._sizes.get(id(inner))
        if size is None:
            size = len(_safe(lambda: inner.as_bytes(), b""))
            self._sizes[id(inner)] = size
        return size

    def _tree(self) -> email.message.Message:
        assert self._msg is not None
        return self._msg

    def _walk_full(self) -> None:
        if self._attachments is not None:
            return
        self._attachments = []
        walker = _Walker(self, self._attachments, text=True)
        try:
            walker.top(self._tree())
        except Exception as exc:
            self._defects.append(f"message walk failed: {type(exc).__name__}: {exc}")
            return
        self._body_text = "\n".join(walker.body)

    def _fields(self) -> tuple[Any, ...]:
        return (self.size, self.headers, self.subject, self.body_text, self.attachments,
                self.defects, self.cache)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MessageView):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it was

    def __repr__(self) -> str:
        return (f"MessageView(size={self.size}, headers={self.headers!r}, "
                f"subject={self.subject!r}, body_text={self.body_text!r}, "
                f"attachments={self.attachments!r}, defects={self.defects!r})")


def decode_header_value(value: Any) -> str:
    """RFC 2047 encoded-words decoded, folding removed; never raises."""
    try:
        if isinstance(value, email.header.Header):
            # compat32 wraps raw 8-bit header bytes as "unknown-8bit"; RFC 6532 says
            # they are UTF-8, and older mail is most often Latin-1.
            text = "".join(
                _decode_8bit(chunk) if charset in (None, "unknown-8bit") and isinstance(
                    chunk, bytes) else _decode(chunk, charset) if isinstance(chunk, bytes)
                else chunk
                for chunk, charset in email.header.decode_header(value)
            )
        else:
            text = str(value)
            # compat32 carries undecodable header bytes as surrogate escapes.
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            if "=?" in text:
                parts = email.header.decode_header(text)
                out = []
                for chunk, charset in parts:
                    if isinstance(chunk, bytes):
                        out.append(_decode(chunk, charset))
                    else:
                        out.append(chunk)
                text = "".join(out)
        # RFC 5322 §2.2.3: unfolding removes CRLF before whitespace.
        return re.sub(r"\r?\n(?=[ \t])", "", text).strip()
    except Exception:
        try:
            return str(value)
        except Exception:
            return ""


def _decode_8bit(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _decode(data: bytes, charset: str | None) -> str:
    try:
        return data.decode(charset or "utf-8", "replace")
    except (LookupError, TypeError):
        return data.decode("utf-8", "replace")


# Magic numbers of the types rules most often ask about (file(1)'s magic, abridged).
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF-", "application/pdf"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"PK\x05\x06", "application/zip"),  # empty archive
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"BZh", "application/x-bzip2"),
    (0, b"\xfd7zXZ\x00", "application/x-xz"),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (0, b"Rar!\x1a\x07", "application/vnd.rar"),
    (257, b"ustar", "application/x-tar"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"BM", "image/bmp"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (0, b"MZ", "application/x-msdownload"),
    (0, b"\x7fELF", "application/x-executable"),
    (0, b"\xcf\xfa\xed\xfe", "application/x-mach-binary"),
    (0, b"\xca\xfe\xba\xbe", "application/x-mach-binary"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
    (0, b"{\\rtf", "application/rtf"),
    (0, b"-----BEGIN PGP MESSAGE-----", "application/pgp-encrypted"),
    (0, b"OggS", "audio/ogg"),
    (0, b"ID3", "audio/mpeg"),
    (0, b"\x00\x00\x01\x00", "image/vnd.microsoft.icon"),
)

_OOXML = (
    (b"word/", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
    (b"xl/", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
    (b"ppt/", "application/vnd.openxmlformats-officedocument.presentationml.presentation"),
)


def sniff(data: bytes) -> str:
    """The MIME type the content's first bytes say it is (not what the sender declared)."""
    head = data[:SNIFF_BYTES]
    for offset, magic, mime in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            if mime == "application/zip":
                # OOXML documents are zip archives whose first entries name their kind.
                for marker, ooxml in _OOXML:
                    if marker in data[:4096]:
                        return ooxml
            if mime == "image/bmp" and len(head) < 14:
                continue
            return mime
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        return "video/mp4"
    stripped = head.lstrip()
    if stripped[:2] == b"#!":
        return "text/x-script"
    lower = stripped[:64].lower()
    if lower.startswith((b"<!doctype html", b"<html")):
        return "text/html"
    if lower.startswith(b"<?xml"):
        return "application/xml"
    if not head:
        return "application/x-empty"
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "text/plain"
        except UnicodeDecodeError as exc:
            # A multi-byte sequence cut by the sniff window is still text.
            if exc.start >= len(head) - 4:
                return "text/plain"
    return "application/octet-stream"


def _extension(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base.strip(".") else ""


def _is_encrypted_document(data: bytes, detected: str) -> bool:
    if detected == "application/pdf":
        # ISO 32000-1 §7.6.1: an encrypted PDF has /Encrypt in its trailer dictionary.
        return b"/Encrypt" in data
    if detected == "application/x-ole-storage":
        # MS-OFFCRYPTO §2.3.4: encrypted OOXML is an OLE file with an EncryptionInfo stream.
        return "EncryptionInfo".encode("utf-16-le") in data
    return detected == "application/pgp-encrypted"


# Charsets whose codec decodes any bytes with errors="replace" without raising, so a
# walk that does not need the text may skip decoding it: the full walk cannot fail
# there either.  Any other charset is decoded anyway (idna, for one, refuses
# "replace" and fails the walk, which must then fail at the same part).
_QUIET_CHARSETS = frozenset({
    "", "us-ascii", "ascii", "utf-8", "utf8", "iso-8859-1", "latin-1", "latin1",
    "iso-8859-2", "iso-8859-5", "iso-8859-7", "iso-8859-9", "iso-8859-15",
    "windows-1250", "windows-1251", "windows-1252", "windows-1253", "windows-1254",
    "windows-1256", "windows-1257", "cp1252", "koi8-r", "koi8-u",
    "gb2312", "gbk", "gb18030", "big5", "shift_jis", "euc-jp", "iso-2022-jp", "euc-kr",
})


@dataclass(frozen=True, slots=True)
class _Leaf:
    """What the walk reads from a leaf part's Content-Type and Content-Disposition."""

    filename: str  # decoded
    disposition: str  # lower case, "" when none
    charset: str | None
    smime_type: str  # lower case


# The stdlib's header parameter parsing is the walk's largest cost, and most parts
# carry the same few field values ("text/plain; charset=utf-8"): the results are a
# pure function of the raw values, so they are memoised per process.
_MEMO_VALUE_MAX = 512  # a longer (hostile or odd) value is not kept: bounded memory
_ctype_memo: mailparse.ValueMemo[tuple[str | None, str], str] = mailparse.ValueMemo()
_leaf_memo: mailparse.ValueMemo[tuple[str | None, str | None], _Leaf] = mailparse.ValueMemo()


def _raw_fields(part: email.message.Message) -> tuple[Any, Any]:
    """The first raw Content-Type and Content-Disposition values (what Message.get reads)."""
    ct = cd = None
    for name, value in part.raw_items():
        low = name.lower()
        if low == "content-type":
            if ct is None:
                ct = value
        elif low == "content-disposition" and cd is None:
            cd = value
    return ct, cd


def _memoisable(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= _MEMO_VALUE_MAX)


def _content_type(part: email.message.Message, ct: Any) -> str:
    if not _memoisable(ct):
        return str(_safe(lambda: part.get_content_type(), "text/plain")).lower()
    key = (ct, part.get_default_type())
    ctype = _ctype_memo.get(key)
    if ctype is None:
        ctype = str(_safe(lambda: part.get_content_type(), "text/plain")).lower()
        _ctype_memo.keep(key, ctype)
    return ctype


def _leaf(part: email.message.Message, ct: Any, cd: Any) -> _Leaf:
    plain = _memoisable(ct) and _memoisable(cd)
    key = (ct, cd)
    leaf = _leaf_memo.get(key) if plain else None
    if leaf is None:
        leaf = _Leaf(
            filename=decode_header_value(_safe(lambda: part.get_filename() or "", "")),
            disposition=_safe(lambda: (part.get_content_disposition() or ""), "").lower(),
            charset=_safe(lambda: part.get_content_charset(), None),
            smime_type=str(_safe(lambda: part.get_param("smime-type") or "", "")).lower(),
        )
        if plain:
            _leaf_memo.keep(key, leaf)
    return leaf


def _is_smime_enveloped(ctype: str, leaf: _Leaf) -> bool:
    """RFC 8551 §3.2.2: application/pkcs7-mime with smime-type=enveloped-data (or
    authEnveloped-data) is an encrypted message; a bare .p7m part is one too.
    """
    if ctype not in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        return False
    if leaf.smime_type:
        return leaf.smime_type in ("enveloped-data", "authenveloped-data")
    return leaf.filename.lower().endswith(".p7m")


class _Walker:
    """One pass over the MIME tree, appending to ``out``.

    With ``text=False`` it lists the attachments only: no body text, no extracted
    text (``Attachment.text`` stays ""); every other field, and the point where
    the walk fails on odd input, is the same as with ``text=True``.
    """

    def __init__(self, view: MessageView, out: list[Attachment], text: bool) -> None:
        self.view = view
        self.out = out
        self.text = text
        self.parts = 0
        self.body: list[str] = []
        self.text_budget = MAX_ATTACHMENT_TEXT

    def top(self, msg: email.message.Message) -> None:
        self.part(msg, depth=0, top=True)

    def part(self, part: email.message.Message, depth: int, top: bool = False) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            if self.parts == MAX_PARTS + 1:
                self.out.append(Attachment(
                    "", "", "multipart/mixed", "application/octet-stream", 0, depth,
                    unscannable=True, reason=f"more than {MAX_PARTS} MIME parts",
                ))
            return
        ct, cd = _raw_fields(part)
        ctype = _content_type(part, ct)
        if part.is_multipart() and ctype != "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list):
                for sub in payload:
                    if isinstance(sub, email.message.Message):
                        self.part(sub, depth)
            return
        leaf = _leaf(part, ct, cd)
        filename = leaf.filename
        if ctype == "message/rfc822":
            self.embedded_message(part, filename, depth)
            return
        is_text = ctype in ("text/plain", "text/html") or (top and ctype.startswith("text/"))
        if is_text and leaf.disposition != "attachment" and not filename:
            if not self.text and (leaf.charset or "") in _QUIET_CHARSETS:
                return
            data = self.payload(part)
            if data is not None:
                text = _decode(data, leaf.charset)
                self.body.append(visible_text(text) if ctype == "text/html" else text)
            return
        data = self.payload(part)
        if data is None:
            self.out.append(Attachment(
                filename, _extension(filename), ctype, "application/octet-stream", 0, depth,
                unscannable=True, reason="content could not be decoded",
            ))
            return
        self.file(filename, ctype, data, depth, charset=leaf.charset,
                  encrypted=_is_smime_enveloped(ctype, leaf))

    def embedded_message(self, part: email.message.Message, name: str, depth: int) -> None:
        payload = part.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        size = self.view.embedded_size(inner) if isinstance(
            inner, email.message.Message) else 0
        index = len(self.out)
        self.out.append(Attachment(
            name, _extension(name), "message/rfc822", "message/rfc822", size, depth,
        ))
        if not isinstance(inner, email.message.Message):
            return
        if depth + 1 > MAX_DEPTH:
            self.mark_too_deep(depth + 1)
            return
        # The embedded message's own text belongs to that attachment, not to this body.
        saved, self.body = self.body, []
        if not self.text:
            self.part(inner, depth + 1)
            self.body = saved
            return
        subject = decode_header_value(_safe(lambda: inner.get("subject", ""), ""))
        self.part(inner, depth + 1)
        text, self.body = "\n".join([subject, *self.body]), saved
        self.out[index] = Attachment(
            name, _extension(name), "message/rfc822", "message/rfc822", size, depth,
            text=self.take_text(text),
        )

    def payload(self, part: email.message.Message) -> bytes | None:
        try:
            data = part.get_payload(decode=True)
        except Exception:
            return None
        if isinstance(data, bytes):
            return data
        raw = part.get_payload()
        if isinstance(raw, str):
            return raw.encode("utf-8", "surrogateescape")
        return None

    def take_text(self, text: str) -> str:
        if self.text_budget <= 0:
            return ""
        text = text[: self.text_budget]
        self.text_budget -= len(text)
        return text

    def mark_too_deep(self, depth: int) -> None:
        self.out.append(Attachment(
            "", "", "application/octet-stream", "application/octet-stream", 0, depth,
            unscannable=True, reason=f"nested deeper than {MAX_DEPTH} levels",
        ))

    def file(
        self, name: str, declared: str, data: bytes, depth: int, charset: str | None = None,
        encrypted: bool = False,
    ) -> None:
        detected = sniff(data)
        enc = encrypted or _is_encrypted_document(data, detected)
        text = ""
        kind = detected if detected.startswith("text/") else declared
        if not enc and kind.startswith("text/") and (
                self.text or (charset or "") not in _QUIET_CHARSETS):
            decoded = _decode(data, charset)
            if self.text:
                text = self.take_text(visible_text(decoded) if kind == "text/html" else decoded)
        unscannable, reason = enc, "encrypted" if enc else ""
        index = len(self.out)
        self.out.append(Attachment(
            name, _extension(name), declared, detected, len(data), depth,
            encrypted=enc, unscannable=unscannable, reason=reason, text=text,
        ))
        if detected == "application/zip" and not enc:
            problem = self.archive(data, depth + 1)
            if problem:
                encrypted_members = problem == "encrypted"
                self.out[index] = Attachment(
                    name, _extension(name), declared, detected, len(data), depth,
                    encrypted=encrypted_members, unscannable=True, reason=problem, text=text,
                )

    def archive(self, data: bytes, depth: int) -> str:
        """List a zip's members as attachments; a non-empty return says why it is unscannable."""
        if depth > MAX_DEPTH:
            self.mark_too_deep(depth)
            return f"nested deeper than {MAX_DEPTH} levels"
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
            return f"corrupt archive: {exc}"
        problem = ""
        with zf:
            infos = zf.infolist()
            if len(infos) > MAX_ZIP_MEMBERS:
                problem = f"more than {MAX_ZIP_MEMBERS} archive members"
                infos = infos[:MAX_ZIP_MEMBERS]
            for info in infos:
                if info.is_dir():
                    continue
                name = info.filename
                declared = mimetypes.guess_type(name)[0] or "application/octet-stream"
                # APPNOTE.TXT §4.4.4: general purpose bit 0 set = the member is encrypted.
                if info.flag_bits & 0x1:
                    self.out.append(Attachment(
                        name, _extension(name), declared, "application/octet-stream",
                        info.file_size, depth, encrypted=True, unscannable=True,
                        reason="encrypted",
                    ))
                    problem = "encrypted"
                    continue
                try:
                    limit = MAX_NESTED_ARCHIVE if info.file_size <= MAX_NESTED_ARCHIVE else 0
                    with zf.open(info) as fh:
                        head = fh.read(SNIFF_BYTES)
                        rest = b""
                        detected = sniff(head)
                        # Containers, text and documents that hide an encryption
                        # marker past the first bytes are read whole (bounded).
                        wants_all = detected in _READ_WHOLE or detected.startswith("text/")
                        if wants_all and limit:
                            # Read one byte past the declared size: a lying header is a bomb.
                            rest = fh.read(limit - len(head) + 1)
                except Exception as exc:
                    self.out.append(Attachment(
                        name, _extension(name), declared, "application/octet-stream",
                        info.file_size, depth, unscannable=True,
                        reason=f"cannot read archive member: {exc}",
                    ))
                    problem = problem or "member could not be read"
                    continue
                content = head + rest
                if wants_all and (not limit or len(content) > MAX_NESTED_ARCHIVE):
                    self.out.append(Attachment(
                        name, _extension(name), declared, detected, info.file_size, depth,
                        unscannable=True, reason="archive member too large to inspect",
                    ))
                    problem = problem or "member too large to inspect"
                    continue
                if wants_all:
                    self.file(name, declared, content, depth)
                else:
                    enc = _is_encrypted_document(content, detected)
                    self.out.append(Attachment(
                        name, _extension(name), declared, detected, info.file_size, depth,
                        encrypted=enc, unscannable=enc, reason="encrypted" if enc else "",
                    ))
        return problem


def _safe(fn: Any, default: Any) -> Any:
    with contextlib.suppress(Exception):
        return fn()
    return default


__all__ = ["Attachment", "MessageView", "decode_header_value", "sniff"]
