"""The one-object-per-blob format: what the S3 store (archive.s3store) writes.

Blob (all integers big-endian)::

    "CFRB" | version (1 byte, = 1) | dkid (8 bytes) | nonce (12 bytes) | ciphertext+tag

The plaintext is zstd-compressed, then sealed with AES-256-GCM (NIST SP 800-38D)
under a fresh random 256-bit data key; the associated data is the 25-byte header
followed by the 32-byte SHA-256, so a blob copied to another name, or given
another header, fails to decrypt.  ``dkid`` is a random id naming the data key.

Key object::

    "CFRK" | version (1) | len(kid) (1) | archive key id | nonce (12) | wrapped key (48)

The data key is wrapped with AES-256-GCM under the archive key ``kid``
(archive.keys); the associated data is the key header, the SHA-256 and the dkid.

The local store keeps many records per file instead (archive.pack); the types
both stores share (BlobRef, Recovered, ZstdContexts) live here too.
"""

from __future__ import annotations

import re
import secrets
import threading
from dataclasses import dataclass

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from archive.errors import ArchiveError, BlobIntegrityError
from archive.keys import ArchiveKey, KeyRing

BLOB_MAGIC = b"CFRB"
KEY_MAGIC = b"CFRK"
VERSION = 1
DKID_BYTES = 8
NONCE_BYTES = 12
HEADER_LEN = len(BLOB_MAGIC) + 1 + DKID_BYTES + NONCE_BYTES
SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class BlobRef:
    """What ``put`` tells the caller: ``new`` is False when the bytes were already stored."""

    sha256: str
    size: int
    stored_size: int
    new: bool


@dataclass(frozen=True)
class Sealed:
    dkid: str
    blob: bytes
    key_file: bytes


@dataclass(frozen=True)
class BlobHeader:
    version: int
    dkid: str
    nonce: bytes


@dataclass(frozen=True)
class KeyFile:
    version: int
    kid: str
    nonce: bytes
    wrapped: bytes
    header: bytes


# -- pure format functions ------------------------------------------------------------


def check_sha(sha256: str) -> str:
    if not SHA_RE.match(sha256):
        raise ArchiveError(f"{sha256!r} is not a lower-case hex SHA-256")
    return sha256


def seal(sha256: str, plaintext_z: bytes, archive_key: ArchiveKey) -> Sealed:
    """Encrypt already-compressed bytes under a fresh data key wrapped by ``archive_key``."""
    sha_raw = bytes.fromhex(sha256)
    dkid = secrets.token_bytes(DKID_BYTES)
    data_key = AESGCM.generate_key(bit_length=256)
    # NIST SP 800-38D §8.2.2: a random 96-bit nonce; each data key encrypts one
    # message only, so nonce reuse under a key is impossible.
    nonce = secrets.token_bytes(NONCE_BYTES)
    header = BLOB_MAGIC + bytes([VERSION]) + dkid + nonce
    blob = header + AESGCM(data_key).encrypt(nonce, plaintext_z, header + sha_raw)
    kid = archive_key.id.encode("ascii")
    knonce = secrets.token_bytes(NONCE_BYTES)
    kheader = KEY_MAGIC + bytes([VERSION, len(kid)]) + kid
    wrapped = AESGCM(archive_key.key).encrypt(knonce, data_key, kheader + sha_raw + dkid)
    return Sealed(dkid=dkid.hex(), blob=blob, key_file=kheader + knonce + wrapped)


def parse_header(blob: bytes) -> BlobHeader:
    if len(blob) < HEADER_LEN + 16 or blob[:4] != BLOB_MAGIC:
        raise BlobIntegrityError("not a Coffer blob (bad magic or too short)")
    if blob[4] != VERSION:
        raise BlobIntegrityError(f"unsupported blob format version {blob[4]}")
    return BlobHeader(version=blob[4], dkid=blob[5:5 + DKID_BYTES].hex(),
                      nonce=blob[5 + DKID_BYTES:HEADER_LEN])


def parse_key_file(data: bytes) -> KeyFile:
    if len(data) < 6 or data[:4] != KEY_MAGIC:
        raise BlobIntegrityError("not a Coffer data key file (bad magic)")
    if data[4] != VERSION:
        raise BlobIntegrityError(f"unsupported key file version {data[4]}")
    n = data[5]
    end = 6 + n
    if len(data) != end + NONCE_BYTES + 48:
        raise BlobIntegrityError("data key file has the wrong length")
    return KeyFile(version=data[4], kid=data[6:end].decode("ascii", "replace"),
                   nonce=data[end:end + NONCE_BYTES], wrapped=data[end + NONCE_BYTES:],
                   header=data[:end])


def unseal(sha256: str, blob: bytes, key_data: bytes, keyring: KeyRing) -> bytes:
    """Decrypt a blob to its compressed plaintext; raise BlobIntegrityError on any doubt."""
    sha_raw = bytes.fromhex(sha256)
    head = parse_header(blob)
    kf = parse_key_file(key_data)
    archive_key = keyring.get(kf.kid)
    try:
        data_key = AESGCM(archive_key.key).decrypt(
            kf.nonce, kf.wrapped, kf.header + sha_raw + bytes.fromhex(head.dkid)
        )
    except InvalidTag:
        raise BlobIntegrityError(
            f"blob {sha256}: its data key does not unwrap (key file altered or misplaced)"
        ) from None
    try:
        return AESGCM(data_key).decrypt(head.nonce, blob[HEADER_LEN:],
                                        blob[:HEADER_LEN] + sha_raw)
    except InvalidTag:
        raise BlobIntegrityError(
            f"blob {sha256}: authentication failed (ciphertext altered, or blob renamed)"
        ) from None


@dataclass(frozen=True)
class Recovered:
    """A blob found linked from an interrupted batch: it needs a ledger entry."""

    sha256: str
    stored_size: int
    journal: str


class ZstdContexts:
    """Per-thread zstd contexts (they are not thread-safe), shared by every blob store."""

    level: int
    _local: threading.local

    def _cctx(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level, write_checksum=False)
        return c

    def _dctx(self) -> zstandard.ZstdDecompressor:
        d: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d


