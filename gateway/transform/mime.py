"""MIME structure for the encryption gateway: pure functions on message bytes.

Nothing here runs a tool or touches a key.  The functions answer three questions:

* **Is it already encrypted / signed?**  Decided by parsing the top-level
  Content-Type (RFC 3156 §4 ``multipart/encrypted; protocol="application/pgp-
  encrypted"``; RFC 8551 §3.2 ``application/pkcs7-mime; smime-type=enveloped-data``
  or ``authEnveloped-data``), never by looking for ``-----BEGIN PGP`` in the
  bytes: a quoted armour block in a reply is not an encrypted message (the
  mistake lacre and zeyple make).
* **What is protected?**  The *entity* is the message's Content-* header fields
  and its body (RFC 3156 §3: "the entire MIME entity"); the other header fields
  stay outside.  With RFC 9788 protected headers the entity also carries a copy of
  the user-facing fields and the outer Subject becomes a placeholder.
* **How is it wrapped / unwrapped?**  Builders for the PGP/MIME and S/MIME
  containers, and exact-byte extraction of their parts: a signature covers the
  bytes between the boundaries exactly, so the parts are cut from the raw
  message, never re-serialised by :mod:`email`.

Line endings: everything works on CRLF messages (the spool stores what SMTP
carried); :func:`crlf` canonicalises a file that uses bare LF.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.parser
import email.policy
import email.utils
import functools
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from gateway import mailparse
from gateway.transform.errors import MimeError

Kind = Literal["pgp", "smime"]

CRLF = b"\r\n"
# RFC 9788 §4.1: the fields a reader sees and which are worth protecting.
USER_FACING = ("from", "to", "cc", "reply-to", "subject", "date", "message-id",
               "in-reply-to", "references", "followup-to", "mail-followup-to")


def crlf(data: bytes) -> bytes:
    """Bare LF (and bare CR) line ends -> CRLF (RFC 5322 §2.1)."""
    return re.sub(rb"\r\n|\r|\n", CRLF, data)


_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")  # RFC 5322 §2.2 (and obs- WSP before ':')


def split(data: bytes) -> tuple[bytes, bytes]:
    """(header section incl. its last line's CRLF, body).

    The header section ends at the blank line, or, like every mail parser does, at
    the first line that is neither a field nor a continuation: that line starts
    the body (nothing is dropped).  An mbox ``From `` line at the very start is
    kept in the header section."""
    pos = 0
    n = len(data)
    while pos < n:
        eol = data.find(CRLF, pos)
        end = n if eol < 0 else eol + 2
        line = data[pos:end]
        if line == CRLF:
            return data[:pos], data[end:]
        is_field = bool(_FIELD.match(line)) or (pos == 0 and line.startswith(b"From "))
        if not is_field and not (pos > 0 and line[:1] in (b" ", b"\t")):
            return data[:pos], data[pos:]
        if eol < 0:
            return data + CRLF, b""
        pos = end
    return data, b""


def fields(header: bytes) -> list[bytes]:
    """The raw header fields, each with its folded continuation lines and CRLF."""
    out: list[bytes] = []
    if not header:
        return out
    for line in header.split(CRLF)[:-1] if header.endswith(CRLF) else header.split(CRLF):
        # RFC 5322 §2.2.3: a line starting with WSP continues the previous field.
        if out and line[:1] in (b" ", b"\t"):
            out[-1] += line + CRLF
        else:
            out.append(line + CRLF)
    return out


def field_name(raw: bytes) -> str:
    return raw.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def is_content_field(raw: bytes) -> bool:
    # RFC 2045 §9: Content-* fields describe the entity and travel with it.
    return field_name(raw).startswith("content-")


def _header_message(header: bytes) -> email.message.Message:
    # Only the header block goes to the parser (up to its first empty line, RFC 5322
    # §2.1): the fields and defects are those of the whole text, and the parser does
    # not read the rest line by line into a payload nobody reads (``split`` finds no
    # CRLF in a bare-LF message and returns all of it as the header section).
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        mailparse.header_block(header + CRLF))


def content_type(data: bytes) -> tuple[str, dict[str, str]]:
    """The top-level media type (lower case) and its parameters (names lower case)."""
    ctype, params = _content_type(data)
    return ctype, dict(params)


# The encrypt stage asks encryption_of, signature_of and signed_entity about the
# same bytes one after the other: the header section is split and parsed once.
# (A few entries only: the cache keeps those messages' bytes alive.)
@functools.lru_cache(maxsize=4)
def _content_type(data: bytes) -> tuple[str, dict[str, str]]:
    header, _ = split(data)
    # The whole message's tree, shared with the other stages of this process (the
    # decide stage parsed these bytes before the queue, the archive stage reads
    # them after this one): its fields are those of the header section when that
    # ends at the empty line, as the parser read the same lines up to it.  A
    # message too large for the cache gets the header-only parse.
    tree = None
    if data[len(header):len(header) + 2] == CRLF:
        try:
            tree = (mailparse.parse(data) if len(data) <= mailparse.MAX_ENTRY_BYTES
                    else mailparse.cached(data))
        except RecursionError:
            tree = None  # MIME nested too deeply for the parser: its header suffices
    msg = _header_message(header) if tree is None else tree
    params: dict[str, str] = {}
    for item in msg.get_params(failobj=[])[1:]:
        name, value = item if isinstance(item, tuple) else (item, "")
        params[str(name).lower()] = str(email.utils.collapse_rfc2231_value(value))
    return msg.get_content_type(), params


# The media types (lower case) that make the answers below other than None.  A
# Content-Type is one of them only if its field, lowered, holds the name verbatim:
# the parser's value is the field's text after the colon (8-bit bytes kept or
# replaced, never turned into ASCII), and get_content_type lowers and strips it.
# The fields the parser reads all lie within the header block (mailparse.header_block),
# so a message whose lowered header block names none of them is answered without a
# parse: most messages, which the encrypt stage only looks at.
_ENCRYPTED_TYPES = (b"multipart/encrypted", b"pkcs7-mime")
_SIGNED_TYPES = (b"multipart/signed", b"pkcs7-mime")
_SIGNED_ENTITY_TYPES = (*_SIGNED_TYPES, b"multipart/mixed")


def _may_be(data: bytes, types: tuple[bytes, ...]) -> bool:
    """False if the top-level Content-Type can be none of ``types`` (pure, cheap)."""
    block = mailparse.header_block(data).lower()
    return any(t in block for t in types)


def encryption_of(data: bytes) -> Kind | None:
    """"pgp" or "smime" if the message as a whole is encrypted, else None."""
    if not _may_be(data, _ENCRYPTED_TYPES):
        return None
    return _encryption_of(data)


def _encryption_of(data: bytes) -> Kind | None:
    ctype, params = content_type(data)
    if ctype == "multipart/encrypted":
        # RFC 3156 §4: the protocol parameter MUST be application/pgp-encrypted.
        if params.get("protocol", "").lower() == "application/pgp-encrypted":
            return "pgp"
        return None
    if ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        smime_type = params.get("smime-type", "").lower()
        if smime_type in ("enveloped-data", "authenveloped-data"):  # RFC 8551 §3.2.2
            return "smime"
        if not smime_type:
            # Older agents omit smime-type: look at the CMS content type itself.
            try:
                return "smime" if cms_content_type(smime_der(data)) in (
                    ENVELOPED_DATA, AUTH_ENVELOPED_DATA) else None
            except MimeError:
                return None
    return None


def signature_of(data: bytes) -> Kind | None:
    """"pgp" or "smime" if the message as a whole is signed (detached or opaque)."""
    if not _may_be(data, _SIGNED_TYPES):
        return None
    return _signature_of(data)


def _signature_of(data: bytes) -> Kind | None:
    ctype, params = content_type(data)
    if ctype == "multipart/signed":
        proto = params.get("protocol", "").lower()
        if proto == "application/pgp-signature":  # RFC 3156 §5
            return "pgp"
        if proto in ("application/pkcs7-signature", "application/x-pkcs7-signature"):
            return "smime"  # RFC 8551 §3.5.3
        return None
    if ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime") and \
            params.get("smime-type", "").lower() == "signed-data":
        return "smime"
    return None


def signed_entity(data: bytes) -> tuple[Kind, bytes, bool] | None:
    """(kind, the signed entity, whole message?) for a signed message, or for a
    multipart/mixed whose first part is signed (a mailing list's footer added after
    signing).  Only that first part is reported as signed, never the whole."""
    if not _may_be(data, _SIGNED_ENTITY_TYPES):
        return None
    return _signed_entity(data)


def _signed_entity(data: bytes) -> tuple[Kind, bytes, bool] | None:
    kind = signature_of(data)
    if kind is not None:
        return kind, data, True
    ctype, _ = content_type(data)
    if ctype == "multipart/mixed":
        try:
            parts = raw_parts(data)
        except MimeError:
            return None
        if parts and (kind := signature_of(parts[0])) is not None:
            return kind, parts[0], False
    return None


@dataclass(frozen=True, slots=True)
class Split:
    """A message cut into what stays outside and the entity that is protected."""

    outer: list[bytes]  # raw header fields, without Content-* and MIME-Version
    entity: bytes  # Content-* fields, blank line, body


def protect(data: bytes) -> Split:
    header, body = split(data)
    outer: list[bytes] = []
    content: list[bytes] = []
    for raw in fields(header):
        if is_content_field(raw):
            content.append(raw)
        elif field_name(raw) != "mime-version":
            outer.append(raw)
    return Split(outer, b"".join(content) + CRLF + body)


def protect_headers(s: Split, placeholder: str) -> Split:
    """RFC 9788 §2: copy the user-facing fields into the entity (its Content-Type gets
    ``hp="cipher"``); outside, the Subject becomes ``placeholder`` and every outer
    field is recorded inside as ``HP-Outer`` so a reader can tell what was exposed."""
    e_header, e_body = split(s.entity)
    e_fields = fields(e_header)
    inner = [raw for raw in s.outer if field_name(raw) in USER_FACING]
    outer: list[bytes] = []
    hp_outer: list[bytes] = []
    for raw in s.outer:
        name = field_name(raw)
        if name == "subject":
            raw = b"Subject: " + placeholder.encode() + CRLF
        outer.append(raw)
        if name in USER_FACING:
            hp_outer.append(b"HP-Outer: " + raw)  # §2.2.1
    ctype = [raw for raw in e_fields if field_name(raw) == "content-type"]
    rest = [raw for raw in e_fields if field_name(raw) != "content-type"]
    ct = ctype[0].rstrip(b"\r\n") if ctype else b"Content-Type: text/plain; charset=us-ascii"
    ct += b'; hp="cipher"' + CRLF  # RFC 9788 §2.1.1
    entity = b"".join([ct, *rest, *inner, *hp_outer]) + CRLF + e_body
    return Split(outer, entity)


def boundary(*contents: bytes) -> str:
    """A boundary that occurs in none of ``contents`` (RFC 2046 §5.1.1)."""
    while True:
        b = "=_coffer_" + secrets.token_hex(12)
        if not any(b.encode() in c for c in contents):
            return b


def assemble(outer: list[bytes], content_fields: list[str], body: bytes) -> bytes:
    head = b"".join(outer) + b"MIME-Version: 1.0\r\n"
    head += b"".join(f.encode("ascii") + CRLF for f in content_fields)
    return head + CRLF + body


def _multipart(bnd: str, parts: list[bytes]) -> bytes:
    # RFC 2046 §5.1.1: the CRLF before a delimiter belongs to the delimiter.
    b = bnd.encode()
    out = b""
    for p in parts:
        out += b"--" + b + CRLF + p + CRLF
    return out + b"--" + b + b"--" + CRLF


def pgp_encrypted(outer: list[bytes], armored: bytes) -> bytes:
    """RFC 3156 §4: multipart/encrypted with the version part and the ciphertext."""
    armored = crlf(armored)
    bnd = boundary(armored)
    body = _multipart(bnd, [
        b"Content-Type: application/pgp-encrypted\r\n"
        b"Content-Description: PGP/MIME version identification\r\n\r\nVersion: 1\r\n",
        b"Content-Type: application/octet-stream; name=\"encrypted.asc\"\r\n"
        b"Content-Description: OpenPGP encrypted message\r\n"
        b"Content-Disposition: inline; filename=\"encrypted.asc\"\r\n\r\n" + armored.rstrip(CRLF)
        + CRLF,
    ])
    return assemble(outer, [
        f'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
        f' boundary="{bnd}"'], body)


def pgp_signed(outer: list[bytes], entity: bytes, signature: bytes, micalg: str) -> bytes:
    """RFC 3156 §5: multipart/signed, the entity byte for byte, then the signature."""
    signature = crlf(signature)
    bnd = boundary(entity, signature)
    body = _multipart(bnd, [
        entity,
        b"Content-Type: application/pgp-signature; name=\"signature.asc\"\r\n"
        b"Content-Description: OpenPGP digital signature\r\n"
        b"Content-Disposition: attachment; filename=\"signature.asc\"\r\n\r\n"
        + signature.rstrip(CRLF) + CRLF,
    ])
    return assemble(outer, [
        f'Content-Type: multipart/signed; micalg="{micalg}";\r\n'
        f' protocol="application/pgp-signature"; boundary="{bnd}"'], body)


def _b64(der: bytes) -> bytes:
    enc = base64.b64encode(der)
    return b"".join(enc[i : i + 76] + CRLF for i in range(0, len(enc), 76))


def smime_enveloped(outer: list[bytes], der: bytes, smime_type: str = "enveloped-data") -> bytes:
    """RFC 8551 §3.3: application/pkcs7-mime; smime-type=enveloped-data, base64."""
    return assemble(outer, [
        f'Content-Type: application/pkcs7-mime; smime-type={smime_type};\r\n name="smime.p7m"',
        "Content-Transfer-Encoding: base64",
        'Content-Disposition: attachment; filename="smime.p7m"',
    ], _b64(der))


def smime_signed_opaque(outer: list[bytes], der: bytes) -> bytes:
    """RFC 8551 §3.5.2: application/pkcs7-mime; smime-type=signed-data."""
    return smime_enveloped(outer, der, "signed-data")


def smime_signed_detached(outer: list[bytes], entity: bytes, der_sig: bytes) -> bytes:
    """RFC 8551 §3.5.3: multipart/signed with application/pkcs7-signature."""
    sig = _b64(der_sig)
    bnd = boundary(entity, sig)
    body = _multipart(bnd, [
        entity,
        b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n' + sig.rstrip(CRLF)
        + CRLF,
    ])
    return assemble(outer, [
        f'Content-Type: multipart/signed; protocol="application/pkcs7-signature";\r\n'
        f' micalg=sha-256; boundary="{bnd}"'], body)


def raw_parts(data: bytes) -> list[bytes]:
    """The body parts of a multipart message, each exactly as it appears between its
    delimiters (RFC 2046 §5.1.1), so signatures over them can be checked."""
    _, params = content_type(data)
    bnd = params.get("boundary")
    if not bnd:
        raise MimeError("multipart without a boundary parameter")
    _, body = split(data)
    delim = b"--" + bnd.encode("utf-8")
    # A delimiter line: at the start of the body or after CRLF, then optional LWSP.
    pattern = re.compile(rb"(?:^|\r\n)" + re.escape(delim) + rb"(--)?[ \t]*(?:\r\n|$)")
    parts: list[bytes] = []
    start: int | None = None
    for m in pattern.finditer(body):
        if start is not None:
            parts.append(body[start : m.start()])
        if m.group(1):
            break
        start = m.end()
    else:
        raise MimeError("multipart without its closing delimiter")
    return parts


def pgp_ciphertext(data: bytes) -> bytes:
    """The OpenPGP message of a RFC 3156 §4 multipart/encrypted message."""
    parts = raw_parts(data)
    if len(parts) != 2:
        raise MimeError(f"multipart/encrypted has {len(parts)} parts, RFC 3156 §4 wants 2")
    ctype, _ = content_type(parts[0])
    if ctype != "application/pgp-encrypted" or b"Version: 1" not in split(parts[0])[1]:
        raise MimeError("the first part is not application/pgp-encrypted Version: 1")
    return split(parts[1])[1]


def signed_parts(data: bytes) -> tuple[bytes, bytes]:
    """(the signed entity, exact bytes; the signature part's decoded body)."""
    parts = raw_parts(data)
    if len(parts) != 2:
        raise MimeError(f"multipart/signed has {len(parts)} parts, RFC 1847 §2.1 wants 2")
    return parts[0], decoded_body(parts[1])


def decoded_body(entity: bytes) -> bytes:
    header, body = split(entity)
    cte = (_header_message(header).get("content-transfer-encoding") or "").strip().lower()
    if cte == "base64":
        try:
            return base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MimeError(f"bad base64 body: {exc}") from None
    return body


def smime_der(data: bytes) -> bytes:
    """The CMS (DER) object of an application/pkcs7-mime message."""
    return decoded_body(data)


# CMS content types (RFC 5652 §3, RFC 5083 §1).
ENVELOPED_DATA = "1.2.840.113549.1.7.3"
SIGNED_DATA = "1.2.840.113549.1.7.2"
AUTH_ENVELOPED_DATA = "1.2.840.113549.1.9.16.1.23"


def cms_content_type(der: bytes) -> str:
    """The contentType OID of a CMS ContentInfo (RFC 5652 §3): only its first field
    is read, to tell enveloped from signed data when smime-type is missing."""
    try:
        if der[0] != 0x30:
            raise IndexError
        i = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)  # SEQUENCE header
        if der[i] != 0x06:
            raise IndexError
        n = der[i + 1]
        oid = der[i + 2 : i + 2 + n]
        if len(oid) != n or not n:
            raise IndexError
    except IndexError:
        raise MimeError("not a CMS ContentInfo") from None
    arcs = [oid[0] // 40, oid[0] % 40]
    value = 0
    for byte in oid[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    return ".".join(map(str, arcs))


def unwrap(outer_message: bytes, entity: bytes) -> bytes:
    """The message a reader (and the archive's index) sees after decryption: the
    outer fields that are not Content-*, then the decrypted entity.  The entity
    replaces the whole body: nothing unencrypted is merged into it (EFAIL)."""
    s = protect(outer_message)
    return b"".join(s.outer) + b"MIME-Version: 1.0\r\n" + entity


__all__ = [
    "MimeError", "Split", "assemble", "boundary", "content_type", "crlf", "encryption_of",
    "pgp_ciphertext", "pgp_encrypted", "pgp_signed", "protect", "protect_headers",
    "raw_parts", "signature_of", "signed_entity", "signed_parts", "smime_der", "smime_enveloped",
    "smime_signed_detached", "smime_signed_opaque", "split", "unwrap",
]
