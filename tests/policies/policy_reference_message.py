"""The policy view as it was before it was built lazily (commit 6cdee6e): the reference
the differential test (test_policy_message_lazy.py) holds the lazy view to.  Frozen: do not edit,
but for its HTML converter, which is the one the view uses (gateway.htmltext): the
test compares how the view walks the message, not how HTML becomes text."""

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
from dataclasses import dataclass, field
from typing import Any

from gateway import mailparse
from gateway.htmltext import visible_text as html_to_text

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


@dataclass(slots=True)
class MessageView:
    size: int
    headers: list[tuple[str, str]] = field(default_factory=list)  # (name, decoded value)
    subject: str = ""
    body_text: str = ""
    attachments: list[Attachment] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    # Per-message memo for expensive detectors (DLP), keyed by the detector.
    cache: dict[str, Any] = field(default_factory=dict)

    def header_values(self, name: str) -> list[str]:
        want = name.lower()
        return [v for n, v in self.headers if n.lower() == want]

    @property
    def max_depth(self) -> int:
        """Deepest nesting of any attachment (0: none nested; -1: no attachments)."""
        return max((a.depth for a in self.attachments), default=-1)

    @property
    def attachment_text(self) -> str:
        return "\n".join(a.text for a in self.attachments if a.text)

    @classmethod
    def from_bytes(cls, raw: bytes) -> MessageView:
        view = cls(size=len(raw))
        try:
            # compat32, the tree shared with the spam stage (gateway.mailparse).
            msg = mailparse.parse(raw)
        except Exception as exc:  # the parser is lenient, but never trust it fully
            view.defects.append(f"unparseable message: {exc}")
            view.body_text = raw.decode("utf-8", "replace")
            return view
        try:
            _Walker(view).top(msg)
        except Exception as exc:
            view.defects.append(f"message walk failed: {type(exc).__name__}: {exc}")
        return view


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


def _is_smime_enveloped(part: email.message.Message, ctype: str, filename: str) -> bool:
    """RFC 8551 §3.2.2: application/pkcs7-mime with smime-type=enveloped-data (or
    authEnveloped-data) is an encrypted message; a bare .p7m part is one too.
    """
    if ctype not in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        return False
    smime_type = str(_safe(lambda: part.get_param("smime-type") or "", "")).lower()
    if smime_type:
        return smime_type in ("enveloped-data", "authenveloped-data")
    return filename.lower().endswith(".p7m")


class _Walker:
    def __init__(self, view: MessageView) -> None:
        self.view = view
        self.parts = 0
        self.body: list[str] = []
        self.text_budget = MAX_ATTACHMENT_TEXT

    def top(self, msg: email.message.Message) -> None:
        view = self.view
        for name, value in msg.items():
            view.headers.append((str(name), decode_header_value(value)))
        subjects = view.header_values("subject")
        view.subject = subjects[0] if subjects else ""
        for defect in getattr(msg, "defects", []) or []:
            view.defects.append(type(defect).__name__)
        self.part(msg, depth=0, top=True)
        view.body_text = "\n".join(self.body)

    def part(self, part: email.message.Message, depth: int, top: bool = False) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            if self.parts == MAX_PARTS + 1:
                self.view.attachments.append(Attachment(
                    "", "", "multipart/mixed", "application/octet-stream", 0, depth,
                    unscannable=True, reason=f"more than {MAX_PARTS} MIME parts",
                ))
            return
        ctype = _safe(lambda: part.get_content_type(), "text/plain").lower()
        if part.is_multipart() and ctype != "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list):
                for sub in payload:
                    if isinstance(sub, email.message.Message):
                        self.part(sub, depth)
            return
        filename = decode_header_value(_safe(lambda: part.get_filename() or "", ""))
        disposition = _safe(lambda: (part.get_content_disposition() or ""), "").lower()
        if ctype == "message/rfc822":
            self.embedded_message(part, filename, depth)
            return
        is_text = ctype in ("text/plain", "text/html") or (top and ctype.startswith("text/"))
        if is_text and disposition != "attachment" and not filename:
            data = self.payload(part)
            if data is not None:
                text = _decode(data, _safe(lambda: part.get_content_charset(), None))
                self.body.append(html_to_text(text) if ctype == "text/html" else text)
            return
        data = self.payload(part)
        if data is None:
            self.view.attachments.append(Attachment(
                filename, _extension(filename), ctype, "application/octet-stream", 0, depth,
                unscannable=True, reason="content could not be decoded",
            ))
            return
        self.file(filename, ctype, data, depth,
                  charset=_safe(lambda: part.get_content_charset(), None),
                  encrypted=_is_smime_enveloped(part, ctype, filename))

    def embedded_message(self, part: email.message.Message, name: str, depth: int) -> None:
        payload = part.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        size = len(_safe(lambda: inner.as_bytes(), b"")) if isinstance(
            inner, email.message.Message) else 0
        index = len(self.view.attachments)
        self.view.attachments.append(Attachment(
            name, _extension(name), "message/rfc822", "message/rfc822", size, depth,
        ))
        if not isinstance(inner, email.message.Message):
            return
        if depth + 1 > MAX_DEPTH:
            self.mark_too_deep(depth + 1)
            return
        # The embedded message's own text belongs to that attachment, not to this body.
        saved, self.body = self.body, []
        subject = decode_header_value(_safe(lambda: inner.get("subject", ""), ""))
        self.part(inner, depth + 1)
        text, self.body = "\n".join([subject, *self.body]), saved
        self.view.attachments[index] = Attachment(
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
        self.view.attachments.append(Attachment(
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
        if not enc and kind.startswith("text/"):
            decoded = _decode(data, charset)
            text = self.take_text(html_to_text(decoded) if kind == "text/html" else decoded)
        unscannable, reason = enc, "encrypted" if enc else ""
        index = len(self.view.attachments)
        self.view.attachments.append(Attachment(
            name, _extension(name), declared, detected, len(data), depth,
            encrypted=enc, unscannable=unscannable, reason=reason, text=text,
        ))
        if detected == "application/zip" and not enc:
            problem = self.archive(data, depth + 1)
            if problem:
                encrypted_members = problem == "encrypted"
                self.view.attachments[index] = Attachment(
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
                    self.view.attachments.append(Attachment(
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
                    self.view.attachments.append(Attachment(
                        name, _extension(name), declared, "application/octet-stream",
                        info.file_size, depth, unscannable=True,
                        reason=f"cannot read archive member: {exc}",
                    ))
                    problem = problem or "member could not be read"
                    continue
                content = head + rest
                if wants_all and (not limit or len(content) > MAX_NESTED_ARCHIVE):
                    self.view.attachments.append(Attachment(
                        name, _extension(name), declared, detected, info.file_size, depth,
                        unscannable=True, reason="archive member too large to inspect",
                    ))
                    problem = problem or "member too large to inspect"
                    continue
                if wants_all:
                    self.file(name, declared, content, depth)
                else:
                    enc = _is_encrypted_document(content, detected)
                    self.view.attachments.append(Attachment(
                        name, _extension(name), declared, detected, info.file_size, depth,
                        encrypted=enc, unscannable=enc, reason="encrypted" if enc else "",
                    ))
        return problem


def _safe(fn: Any, default: Any) -> Any:
    with contextlib.suppress(Exception):
        return fn()
    return default


__all__ = ["Attachment", "MessageView", "decode_header_value", "html_to_text", "sniff"]
