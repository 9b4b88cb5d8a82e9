"""The pack segment format: pure encode/decode functions, no file I/O.

The blob store (archive.store) keeps messages in append-only *segments*; each
segment ``<name>.pack`` has a *key table* ``<name>.keys`` holding the wrapped
data keys of its records, and an *acknowledgement log* ``<name>.ack`` saying
how far its records are acknowledged.  All integers are big-endian.

Segment file::

    "CFPS" | version (1) | count (2) | count x (len (1) | name)   the segment header
    record | record | ...

The header names the segments this one *supersedes* (a compaction's output:
see BlobStore.compact); a writer's segment supersedes nothing.

Record::

    "CFRR" | version (1) | sha256 (32) | dkid (8) | length (4) | ciphertext+tag

The plaintext is zstd-compressed, then sealed with AES-256-GCM (NIST SP 800-38D)
under a fresh random 256-bit data key; the associated data is the whole 49-byte
record header, which holds the SHA-256, so a record relabelled with another
hash or header fails to decrypt.  The nonce is fixed (all zero) and not stored:
SP 800-38D §8 requires a nonce never to repeat *under one key*, and each data
key seals exactly one record (as in HPKE's single-shot mode).  ``dkid`` is
random: it ties the record to its key table entry (a message deleted and
stored again gets a new one).

Key table file::

    "CFKT" | version (1)
    entry | entry | ...          each: length (2) | body

    body of a key entry:     "K" | dkid (8) | len(kid) (1) | archive key id
                             | nonce (12) | wrapped data key (48)
    body of a deleted mark:  "D" | dkid (8)

The data key is wrapped with AES-256-GCM under the archive key ``kid``
(archive.keys) with a random nonce; the associated data is ``"CFRK" | version |
len(kid) | kid`` followed by the record's SHA-256 and dkid, so an entry moved to
another record fails to unwrap.  An entry names its record by dkid only (the
SHA-256 is in the record): 32 bytes less per message.  GCM rather than AES-KW
(RFC 3394) binds the wrapped key to its record.
A "D" entry marks a record deleted after shredding: it no longer exists for
the store and the next compaction drops its bytes.

Acknowledgement log: 8-byte entries, one per batch, each the segment length up
to which every record is acknowledged (in the ledger).  There is no per-record
index file: it would cost 40-50 bytes per message (a SHA-256 and a position) and
the issue 3 size target leaves ~150 bytes of overhead per message in all; a
reader opening the store reads each record header instead (archive.segment.scan).
"""

from __future__ import annotations

import functools
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from archive.errors import BlobIntegrityError
from archive.keys import ArchiveKey, KeyRing

SEGMENT_MAGIC = b"CFPS"
RECORD_MAGIC = b"CFRR"
KEYTABLE_MAGIC = b"CFKT"
WRAP_MAGIC = b"CFRK"  # the wrapped key's associated data starts with this
VERSION = 1
DKID_BYTES = 8
NONCE_BYTES = 12
DATA_KEY_BYTES = 32
TAG_BYTES = 16
WRAPPED_BYTES = DATA_KEY_BYTES + TAG_BYTES
_RECORD_HEAD = struct.Struct(">4sB32s8sI")
RECORD_HEADER_LEN = _RECORD_HEAD.size  # 49
_RECORD_NONCE = bytes(NONCE_BYTES)  # see the module docstring: one key, one record
KEYTABLE_HEADER = KEYTABLE_MAGIC + bytes([VERSION])
_ACK = struct.Struct(">Q")
ACK_ENTRY_LEN = _ACK.size
MAX_RECORD = 1 << 31  # the length field is 32 bits; messages are far smaller


class FormatError(BlobIntegrityError):
    """Bytes that are not what the pack format says (tampering or a torn write)."""


# -- segment header -------------------------------------------------------------------


def encode_segment_header(supersedes: Iterable[str] = ()) -> bytes:
    names = [n.encode("ascii") for n in supersedes]
    out = bytearray(SEGMENT_MAGIC + bytes([VERSION]) + struct.pack(">H", len(names)))
    for n in names:
        if not 0 < len(n) < 256:
            raise ValueError(f"segment name {n!r} too long")
        out += bytes([len(n)]) + n
    return bytes(out)


MIN_SEGMENT_HEADER = 7  # magic, version, count: a header that supersedes nothing
# A segment's name (archive.store.SEGMENT_FILE without the extension).
SEGMENT_NAME = re.compile(r"[0-9a-f]{16}-[0-9a-f]{8}")


def parse_segment_header(data: bytes) -> tuple[list[str], int] | None:
    """(superseded names, header length); None if ``data`` is too short to tell."""
    if len(data) < MIN_SEGMENT_HEADER:
        if SEGMENT_MAGIC.startswith(data[:4]):
            return None
        raise FormatError("not a Coffer pack segment (bad magic)")
    if data[:4] != SEGMENT_MAGIC:
        raise FormatError("not a Coffer pack segment (bad magic)")
    if data[4] != VERSION:
        raise FormatError(f"unsupported pack segment version {data[4]}")
    (count,) = struct.unpack_from(">H", data, 5)
    pos, names = MIN_SEGMENT_HEADER, []
    for _ in range(count):
        if pos >= len(data) or pos + 1 + data[pos] > len(data):
            return None
        n = data[pos]
        name = data[pos + 1:pos + 1 + n].decode("ascii", "replace")
        if not SEGMENT_NAME.fullmatch(name):
            # A damaged count or name (a power loss): the segments a compaction's
            # header names are removed once it is in place, so a garbled name must
            # make the header damaged, never name a segment to delete.
            raise FormatError(f"segment header names {name!r}, not a segment")
        names.append(name)
        pos += 1 + n
    return names, pos


# -- records --------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordHeader:
    sha256: str
    dkid: str
    length: int  # of the ciphertext+tag
    raw: bytes

    @property
    def total(self) -> int:
        return RECORD_HEADER_LEN + self.length


@dataclass(frozen=True)
class KeyEntry:
    dkid: str
    kid: str
    nonce: bytes
    wrapped: bytes
    encoded: bytes  # the whole framed entry, as it is in the key table


@dataclass(frozen=True)
class Sealed:
    """A record ready to append, and its key table entry."""

    sha256: str
    dkid: str
    record: bytes
    key_entry: bytes


def _unpack_head(data: bytes, pos: int) -> tuple[bytes, bytes, int]:
    """(sha256, dkid, sealed length) of the record header at ``data[pos:]``, checked."""
    if len(data) - pos < RECORD_HEADER_LEN:
        raise FormatError("record header too short")
    magic, version, sha, dkid, length = _RECORD_HEAD.unpack_from(data, pos)
    if magic != RECORD_MAGIC:
        raise FormatError("not a Coffer record (bad magic)")
    if version != VERSION:
        raise FormatError(f"unsupported record version {version}")
    if length < TAG_BYTES:
        raise FormatError("record shorter than its authentication tag")
    return sha, dkid, length


def parse_record_header(data: bytes) -> RecordHeader:
    sha, dkid, length = _unpack_head(data, 0)
    return RecordHeader(sha.hex(), dkid.hex(), length, bytes(data[:RECORD_HEADER_LEN]))


def record_fields(data: bytes, pos: int = 0) -> tuple[str, str, int]:
    """(sha256, dkid, whole record length) of the record header at ``data[pos:]``: what
    a scan keeps of :func:`parse_record_header`, with its checks and errors, without
    building a RecordHeader per record."""
    sha, dkid, length = _unpack_head(data, pos)
    return sha.hex(), dkid.hex(), RECORD_HEADER_LEN + length


def _wrap_aad(kid: bytes, sha_raw: bytes, dkid_raw: bytes) -> bytes:
    return WRAP_MAGIC + bytes([VERSION, len(kid)]) + kid + sha_raw + dkid_raw


@functools.lru_cache(maxsize=8)
def _wrapper(key: bytes) -> AESGCM:
    """The AEAD of an archive key, made once (it wraps every data key of a batch)."""
    return AESGCM(key)


def seal(sha256: str, plaintext_z: bytes, archive_key: ArchiveKey) -> Sealed:
    """Encrypt already-compressed bytes under a fresh data key wrapped by ``archive_key``."""
    if len(plaintext_z) + TAG_BYTES >= MAX_RECORD:
        raise ValueError("message too large for one record")
    sha_raw = bytes.fromhex(sha256)
    # os.urandom is what secrets.token_bytes and AESGCM.generate_key return; one call
    # (one getrandom) for the record's three random values.
    fresh = os.urandom(DKID_BYTES + DATA_KEY_BYTES + NONCE_BYTES)
    dkid = fresh[:DKID_BYTES]
    data_key = fresh[DKID_BYTES:DKID_BYTES + DATA_KEY_BYTES]  # AES-256
    knonce = fresh[DKID_BYTES + DATA_KEY_BYTES:]
    header = _RECORD_HEAD.pack(RECORD_MAGIC, VERSION, sha_raw, dkid,
                               len(plaintext_z) + TAG_BYTES)
    record = header + AESGCM(data_key).encrypt(_RECORD_NONCE, plaintext_z, header)
    kid = archive_key.id.encode("ascii")
    # NIST SP 800-38D §8.2.2: the archive key wraps many data keys, so each wrap
    # gets a random 96-bit nonce (knonce, above).
    wrapped = _wrapper(archive_key.key).encrypt(knonce, data_key,
                                                _wrap_aad(kid, sha_raw, dkid))
    body = b"K" + dkid + bytes([len(kid)]) + kid + knonce + wrapped
    return Sealed(sha256, dkid.hex(), record, _frame(body))


def unseal(record: bytes, key: KeyEntry, keyring: KeyRing) -> bytes:
    """Decrypt a whole record to its compressed plaintext; BlobIntegrityError on any doubt."""
    head = parse_record_header(record)
    if len(record) != head.total:
        raise BlobIntegrityError(f"blob {head.sha256}: record truncated")
    if key.dkid != head.dkid:
        raise BlobIntegrityError(f"blob {head.sha256}: key table entry is for another record")
    archive_key = keyring.get(key.kid)
    sha_raw, dkid_raw = bytes.fromhex(head.sha256), bytes.fromhex(head.dkid)
    try:
        data_key = AESGCM(archive_key.key).decrypt(
            key.nonce, key.wrapped, _wrap_aad(key.kid.encode("ascii"), sha_raw, dkid_raw))
    except InvalidTag:
        raise BlobIntegrityError(
            f"blob {head.sha256}: its data key does not unwrap (key table altered)"
        ) from None
    try:
        return AESGCM(data_key).decrypt(_RECORD_NONCE, record[RECORD_HEADER_LEN:], head.raw)
    except InvalidTag:
        raise BlobIntegrityError(
            f"blob {head.sha256}: authentication failed (ciphertext altered, or record "
            "relabelled)"
        ) from None


# -- key table ------------------------------------------------------------------------


def _frame(body: bytes) -> bytes:
    return struct.pack(">H", len(body)) + body


def dead_entry(dkid: str) -> bytes:
    return _frame(b"D" + bytes.fromhex(dkid))


@dataclass
class KeyTable:
    """A parsed key table: ``keys`` and ``dead`` are keyed by the record's dkid."""

    keys: dict[str, KeyEntry] = field(default_factory=dict)
    dead: dict[str, bytes] = field(default_factory=dict)
    torn: int = 0  # bytes of an incomplete last entry (a crash during an append)

    def encode(self, drop_keys: set[str] | frozenset[str] = frozenset()) -> bytes:
        """The file content, in a stable order, without the keys in ``drop_keys``."""
        out = [KEYTABLE_HEADER]
        out.extend(e.encoded for k, e in self.keys.items() if k not in drop_keys)
        out.extend(self.dead.values())
        return b"".join(out)


def parse_key_table(data: bytes) -> KeyTable:
    if len(data) < len(KEYTABLE_HEADER) or data[:4] != KEYTABLE_MAGIC:
        raise FormatError("not a Coffer key table (bad magic)")
    if data[4] != VERSION:
        raise FormatError(f"unsupported key table version {data[4]}")
    table = KeyTable()
    parse_key_entries(data, len(KEYTABLE_HEADER), table)
    return table


def parse_key_entries(data: bytes, pos: int, table: KeyTable) -> int:
    """Add the entries of ``data[pos:]`` to ``table`` (a key table only grows by
    appends, so a reader parses just the new bytes); returns the end of the last
    whole entry."""
    table.torn = 0
    while pos < len(data):
        if pos + 2 > len(data):
            table.torn = len(data) - pos
            break
        (n,) = struct.unpack_from(">H", data, pos)
        end = pos + 2 + n
        if end > len(data):
            table.torn = len(data) - pos
            break
        body, encoded = data[pos + 2:end], data[pos:end]
        pos = end
        if n == 9 and body[:1] == b"D":
            table.dead[body[1:9].hex()] = encoded
            continue
        if n < 10 or body[:1] != b"K" or n != 10 + body[9] + NONCE_BYTES + WRAPPED_BYTES:
            raise FormatError(f"malformed key table entry at byte {pos - n - 2}")
        klen = body[9]
        entry = KeyEntry(dkid=body[1:9].hex(), kid=body[10:10 + klen].decode("ascii", "replace"),
                         nonce=body[10 + klen:10 + klen + NONCE_BYTES],
                         wrapped=body[10 + klen + NONCE_BYTES:], encoded=encoded)
        table.keys[entry.dkid] = entry
    return pos


# -- acknowledgement log -------------------------------------------------------------


def encode_ack(end: int) -> bytes:
    return _ACK.pack(end)


def parse_acks(data: bytes) -> list[int]:
    """Each whole entry (a torn last one is ignored)."""
    whole = len(data) - len(data) % ACK_ENTRY_LEN
    return [end for (end,) in _ACK.iter_unpack(data[:whole])]
