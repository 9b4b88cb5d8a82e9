"""Archive blobs and ledger segments in S3-compatible object storage with Object Lock.

The same blob format as the local store (archive.store: ``CFRB`` header, AES-256-GCM
under a fresh data key, zstd inside), so ``seal``/``unseal`` are shared and a blob
can move between backends byte for byte.  Object names::

    <prefix>blobs/ab/<sha256>                 the sealed blob, COMPLIANCE-locked
    <prefix>ledger/segments/<seq>.jsonl       a closed ledger segment, COMPLIANCE-locked
    <prefix>ledger/checkpoints/<seq>.json     one signed checkpoint line, COMPLIANCE-locked

WORM.  The blob bucket must have Object Lock enabled (S3 API reference,
PutObjectLockConfiguration; Object Lock implies versioning).  Every blob is
written with ``x-amz-object-lock-mode: COMPLIANCE`` and a retain-until date equal
to the message's retention end, so until then the storage itself refuses to
delete or overwrite that version -- for us, for an administrator with our
credentials, and for an attacker who stole them (SEC 17a-4(f)(2)(ii)(A):
non-rewriteable, non-erasable).  COMPLIANCE retention can be extended, never
shortened; when the same bytes arrive again with a later retention end the lock
is extended (single instance storage keeps the longest retention of any copy).
A legal hold (``place_hold``) blocks deletion whatever the retention; S3 has one
hold flag per version, so the caller (the holds table) releases it only when no
case still covers the blob.

Crypto-shredding.  The wrapped data keys never go into a locked object: they are
kept in a ``WrappedKeyStore`` -- a directory under the node's data dir
(``DirectoryKeyStore``, single node) or a second bucket WITHOUT Object Lock
shared by all nodes (``BucketKeyStore``).  Destroying the wrapped key makes the
locked ciphertext unreadable by anyone, years before the storage lets us delete
it.  The key file format is archive.store's, bound to the blob's SHA-256 and dkid.

Writes are exclusive: ``If-None-Match: *`` (RFC 9110 §13.1.2) makes a second PUT
of the same name fail with 412, so an existing blob is never overwritten (a racing
writer's own wrapped key is then discarded, as in the local store).  A crash
between the PUT and the caller's ledger append leaves a blob the ledger does not
list: the message was not acknowledged, the sender (or our spool) sends it again,
and the second ``put`` finds the blob (``new=False``) and ledgers it then.

Failures.  Timeouts and retries are short and configurable (S3Config); an
unreachable endpoint, a timeout or a 5xx becomes ``ObjectStoreUnavailableError``
(the gateway answers 4xx tempfail and keeps the message in its spool), any other
refusal ``ObjectStoreError``.  Error texts carry the operation, bucket, object
name and the S3 error code -- never the credentials (they are redacted from any
text taken from the server or botocore) -- and the botocore exception is not
chained, so a traceback cannot print a signed request either.

Exceptions (all ``archive.errors.ArchiveError``; the lead may move them to
archive/errors.py)::

    ArchiveError
    └── ObjectStoreError                 S3 refused a request (code in .code)
        ├── ObjectStoreUnavailableError  unreachable, timed out, 5xx: try again later
        ├── ObjectLockedError            deletion refused: retention or legal hold
        └── BucketConfigError            the bucket is missing or has no Object Lock
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import zstandard

from archive.blob import (
    HEADER_LEN,
    BlobRef,
    Recovered,
    ZstdContexts,
    check_sha,
    parse_header,
    seal,
    unseal,
)
from archive.errors import (
    ArchiveError,
    BlobIntegrityError,
    BlobNotFoundError,
    BlobShreddedError,
    KeyFileError,
    LedgerError,
)
from archive.keys import ArchiveKey, KeyRing, fsync_dir
from archive.ledger import SEGMENT_NAME, segments
from archive.s3config import S3Config

log = logging.getLogger("coffer.archive.s3")

Clock = Callable[[], datetime]
_KEY_NAME = re.compile(r"^([0-9a-f]{64})\.([0-9a-f]{16})\.key$")
_DKID = re.compile(r"^[0-9a-f]{16}$")
_CHECKPOINT_NAME = re.compile(r"^(\d{12})\.json$")
META_DKID = "coffer-dkid"
META_SHA = "coffer-sha256"


# -- errors ------------------------------------------------------------------------------


class ObjectStoreError(ArchiveError):
    """S3 refused or failed a request; ``code`` is the S3 error code (or the failure kind)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class ObjectStoreUnavailableError(ObjectStoreError):
    """The endpoint is unreachable, timed out or answered 5xx: a temporary failure."""


class ObjectLockedError(ObjectStoreError):
    """The storage refused to delete a version: its retention has not ended, or it is held."""


class BucketConfigError(ObjectStoreError):
    """The bucket does not exist, or Object Lock is not enabled on it."""


# -- the interfaces ---------------------------------------------------------------------


class BlobBackend(Protocol):
    """What archive.facade.Archive needs from a blob store (local files or S3).

    ``archive.store.BlobStore`` and ``S3BlobStore`` both provide it.
    """

    def write_many(self, datas: Sequence[bytes],
                   after: Callable[[int, list[BlobRef]], object] | None = None
                   ) -> list[BlobRef]: ...

    def read(self, sha256: str) -> bytes: ...

    def exists(self, sha256: str) -> bool: ...

    def data_key_present(self, sha256: str) -> bool: ...

    def shred(self, sha256: str) -> int: ...

    def delete(self, sha256: str) -> bool: ...

    def recover(self, append: Callable[[list[Recovered]], object],
                known: Callable[[], Collection[str]] | None = None,
                repaired: Callable[..., object] | None = None,
                live: Callable[[], Collection[str]] | None = None,
                ) -> list[Recovered]: ...

    def close(self) -> None: ...


if TYPE_CHECKING:
    from archive.store import BlobStore

    def _both_are_backends(local: BlobStore, s3: S3BlobStore) -> list[BlobBackend]:
        return [local, s3]  # mypy proves both stores satisfy BlobBackend


class WrappedKeyStore(Protocol):
    """Where the wrapped data keys live: never inside a locked object."""

    def put(self, sha256: str, dkid: str, data: bytes) -> None: ...

    def get(self, sha256: str, dkid: str) -> bytes | None: ...

    def discard(self, sha256: str, dkid: str) -> None: ...

    def shred(self, sha256: str) -> int: ...


# -- the S3 client, with error translation ------------------------------------------------


def make_client(cfg: S3Config, base: Path | None = None) -> S3:
    """A boto3 client for ``cfg`` wrapped in ``S3`` (``base``: data_dir for relative paths)."""
    import boto3
    from botocore.config import Config as BotoConfig

    # botocore logs whole requests (with the signed Authorization header) at DEBUG:
    # keep its loggers at WARNING unless the operator set them on purpose.
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    try:
        secret = cfg.secret(base)
    except ValueError as exc:
        raise KeyFileError(str(exc)) from None
    boto_cfg = BotoConfig(
        region_name=cfg.region,
        connect_timeout=cfg.connect_timeout,
        read_timeout=cfg.read_timeout,
        # "standard" retry mode: exponential backoff on throttling and 5xx, capped at
        # max_attempts in all, so an outage costs seconds, never an SMTP timeout.
        retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
        s3={"addressing_style": cfg.addressing_style},
        # Since botocore 1.36 the SDK adds CRC checksums that some S3-compatible
        # servers reject; ask only where the operation requires one (we send
        # Content-MD5 ourselves).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    verify: str | bool = True
    if cfg.ca_bundle is not None:
        ca = cfg.ca_bundle if base is None or cfg.ca_bundle.is_absolute() else base / cfg.ca_bundle
        verify = str(ca)
    client = boto3.client(
        "s3", endpoint_url=cfg.endpoint, region_name=cfg.region,
        aws_access_key_id=cfg.access_key_id, aws_secret_access_key=secret,
        config=boto_cfg, verify=verify,
    )
    return S3(client, redact=[s for s in (secret, cfg.access_key_id) if s])


class S3:
    """A boto3 S3 client whose failures come out as ObjectStoreError, credentials redacted."""

    def __init__(self, client: Any, *, redact: Sequence[str] = ()) -> None:
        self.client = client
        self._redact = [s for s in redact if s]

    def close(self) -> None:
        self.client.close()

    def scrub(self, text: str) -> str:
        for s in self._redact:
            text = text.replace(s, "***")
        return text

    def call(self, op: str, where: str, **kwargs: Any) -> Any:
        """Run ``client.<op>(**kwargs)``; ``where`` names bucket/object in an error."""
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        try:
            return getattr(self.client, op)(**kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "") or "")
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            text = self.scrub(str(err.get("Message", "") or ""))
            msg = f"S3 {op} {where}: {code or status}" + (f" ({text})" if text else "")
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "RequestTimeout"):
                raise ObjectStoreUnavailableError(msg, code) from None
            raise ObjectStoreError(msg, code or str(status)) from None
        except (BotoConnectionError, HTTPClientError) as exc:
            raise ObjectStoreUnavailableError(
                f"S3 {op} {where}: storage unreachable ({self.scrub(str(exc))})",
                type(exc).__name__,
            ) from None
        except BotoCoreError as exc:
            raise ObjectStoreError(f"S3 {op} {where}: {self.scrub(str(exc))}",
                                   type(exc).__name__) from None

    # -- helpers used by the stores --

    def versions(self, bucket: str, key: str) -> list[dict[str, Any]]:
        """Every version and delete marker of exactly ``key`` (newest first)."""
        out: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
        while True:
            page = self.call("list_object_versions", f"s3://{bucket}/{key}", **kwargs)
            for v in page.get("Versions", []) + page.get("DeleteMarkers", []):
                if v.get("Key") == key:
                    out.append(v)
            if not page.get("IsTruncated"):
                return out
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["VersionIdMarker"] = page.get("NextVersionIdMarker")

    def keys(self, bucket: str, prefix: str) -> Iterator[tuple[str, int]]:
        """(name, size) of every current object under ``prefix``."""
        for name, size, _modified in self.objects(bucket, prefix):
            yield name, size

    def objects(self, bucket: str, prefix: str) -> Iterator[tuple[str, int, datetime | None]]:
        """(name, size, last modified) of every current object under ``prefix``."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = self.call("list_objects_v2", f"s3://{bucket}/{prefix}", **kwargs)
            for obj in page.get("Contents", []):
                modified = obj.get("LastModified")
                yield (str(obj["Key"]), int(obj.get("Size", 0)),
                       modified.astimezone(UTC) if isinstance(modified, datetime) else None)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token

    def head(self, bucket: str, key: str, **kwargs: Any) -> dict[str, Any] | None:
        try:
            return dict(self.call("head_object", f"s3://{bucket}/{key}",
                                  Bucket=bucket, Key=key, **kwargs))
        except ObjectStoreError as exc:
            if exc.code in ("404", "NoSuchKey", "NotFound", "NoSuchVersion"):
                return None
            raise

    def get_bytes(self, bucket: str, key: str, **kwargs: Any) -> bytes | None:
        try:
            resp = self.call("get_object", f"s3://{bucket}/{key}", Bucket=bucket, Key=key,
                             **kwargs)
        except ObjectStoreError as exc:
            if exc.code in ("404", "NoSuchKey", "NotFound", "NoSuchVersion"):
                return None
            raise
        body = resp["Body"]
        try:
            return bytes(body.read())
        except Exception as exc:  # a connection dropped mid-body (urllib3 / botocore)
            raise ObjectStoreUnavailableError(
                f"S3 get_object s3://{bucket}/{key}: body read failed "
                f"({self.scrub(type(exc).__name__)})", "BodyReadError") from None
        finally:
            body.close()

    def put_exclusive(self, bucket: str, key: str, body: bytes, *,
                      retain_until: datetime | None = None, legal_hold: bool = False,
                      metadata: dict[str, str] | None = None) -> str | None:
        """Create ``key``; its VersionId, or None when the name already exists (412)."""
        kwargs: dict[str, Any] = {
            "Bucket": bucket, "Key": key, "Body": body, "IfNoneMatch": "*",
            "ContentType": "application/octet-stream",
            # Object Lock PUTs need an integrity header (S3 API PutObject: Content-MD5
            # or an x-amz-checksum); MD5 is the one every S3 implementation knows.
            "ContentMD5": base64.b64encode(hashlib.md5(body, usedforsecurity=False)
                                           .digest()).decode("ascii"),
            "Metadata": metadata or {},
        }
        if retain_until is not None:
            kwargs["ObjectLockMode"] = "COMPLIANCE"
            kwargs["ObjectLockRetainUntilDate"] = retain_until
        if legal_hold:
            kwargs["ObjectLockLegalHoldStatus"] = "ON"
        try:
            resp = self.call("put_object", f"s3://{bucket}/{key}", **kwargs)
        except ObjectStoreError as exc:
            # 412: RFC 9110 §13.1.2 If-None-Match failed; 409: a concurrent PUT won.
            if exc.code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return None
            raise
        return str(resp.get("VersionId") or "")

    def delete_all_versions(self, bucket: str, key: str) -> int:
        """Permanently delete every version; ObjectLockedError when the storage refuses."""
        removed = 0
        for v in self.versions(bucket, key):
            try:
                self.call("delete_object", f"s3://{bucket}/{key}", Bucket=bucket, Key=key,
                          VersionId=v["VersionId"])
            except ObjectStoreError as exc:
                if exc.code == "AccessDenied":
                    # Object Lock: a version under retention or legal hold cannot be
                    # deleted (S3 User Guide, "How S3 Object Lock works").
                    raise ObjectLockedError(
                        f"s3://{bucket}/{key}: the storage refuses deletion (retention not "
                        "ended, or a legal hold)", exc.code) from None
                raise
            removed += 1
        return removed

    def check_bucket(self, bucket: str, *, locked: bool, create: bool) -> None:
        """Refuse to run on a missing bucket, or a blob bucket without Object Lock."""
        if create and self.head_bucket(bucket) is None:
            kwargs: dict[str, Any] = {"Bucket": bucket}
            if locked:
                kwargs["ObjectLockEnabledForBucket"] = True
            try:
                self.call("create_bucket", f"s3://{bucket}", **kwargs)
            except ObjectStoreError as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
        if self.head_bucket(bucket) is None:
            raise BucketConfigError(f"s3://{bucket}: bucket not found (create it with Object "
                                    "Lock enabled, or set s3.create_bucket)", "NoSuchBucket")
        if not locked:
            return
        try:
            conf = self.call("get_object_lock_configuration", f"s3://{bucket}", Bucket=bucket)
        except ObjectStoreError as exc:
            if exc.code in ("ObjectLockConfigurationNotFoundError", "404"):
                conf = {}
            else:
                raise
        if conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            raise BucketConfigError(
                f"s3://{bucket}: Object Lock is not enabled on this bucket; Coffer stores "
                "the archive only in a bucket created with Object Lock (WORM)",
                "ObjectLockNotEnabled")

    def head_bucket(self, bucket: str) -> dict[str, Any] | None:
        try:
            return dict(self.call("head_bucket", f"s3://{bucket}", Bucket=bucket))
        except ObjectStoreError as exc:
            if exc.code in ("404", "NoSuchBucket", "NotFound"):
                return None
            raise


# -- wrapped data keys ----------------------------------------------------------------------


class DirectoryKeyStore:
    """Wrapped keys as files ``<root>/ab/<sha256>.<dkid>.key`` (mode 0400, fsynced)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, sha256: str, dkid: str) -> Path:
        return self.root / sha256[:2] / f"{check_sha(sha256)}.{_check_dkid(dkid)}.key"

    def put(self, sha256: str, dkid: str, data: bytes) -> None:
        path = self._path(sha256, dkid)
        new_dir = not path.parent.exists()
        path.parent.mkdir(exist_ok=True, mode=0o700)
        if new_dir:
            fsync_dir(self.root)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)

    def get(self, sha256: str, dkid: str) -> bytes | None:
        try:
            return self._path(sha256, dkid).read_bytes()
        except FileNotFoundError:
            return None

    def discard(self, sha256: str, dkid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(sha256, dkid).unlink()

    def shred(self, sha256: str) -> int:
        d = self.root / check_sha(sha256)[:2]
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return 0
        removed = 0
        for name in names:
            m = _KEY_NAME.match(name)
            if m and m.group(1) == sha256:
                (d / name).unlink()
                removed += 1
        if removed:
            fsync_dir(d)
        return removed


class BucketKeyStore:
    """Wrapped keys as objects ``<prefix>keys/ab/<sha256>.<dkid>.key`` in a bucket
    WITHOUT Object Lock (shared by every node; deletion is immediate and final
    when the bucket is unversioned)."""

    def __init__(self, s3: S3, bucket: str, prefix: str = "") -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix

    def _name(self, sha256: str, dkid: str) -> str:
        return f"{self.prefix}keys/{sha256[:2]}/{check_sha(sha256)}.{_check_dkid(dkid)}.key"

    def put(self, sha256: str, dkid: str, data: bytes) -> None:
        name = self._name(sha256, dkid)
        if self.s3.put_exclusive(self.bucket, name, data) is None:
            raise ArchiveError(f"s3://{self.bucket}/{name}: data key already exists")

    def get(self, sha256: str, dkid: str) -> bytes | None:
        return self.s3.get_bytes(self.bucket, self._name(sha256, dkid))

    def discard(self, sha256: str, dkid: str) -> None:
        self.s3.delete_all_versions(self.bucket, self._name(sha256, dkid))

    def shred(self, sha256: str) -> int:
        prefix = f"{self.prefix}keys/{check_sha(sha256)[:2]}/{sha256}."
        removed = 0
        for name, _size in list(self.s3.keys(self.bucket, prefix)):
            removed += 1
            self.s3.delete_all_versions(self.bucket, name)
        return removed


def _check_dkid(dkid: str) -> str:
    if not _DKID.match(dkid):
        raise ArchiveError(f"{dkid!r} is not a data key id (16 hex digits)")
    return dkid


# -- the blob store ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LockState:
    """What the storage enforces on a blob's current version."""

    mode: str | None
    retain_until: datetime | None
    legal_hold: bool


class S3BlobStore(ZstdContexts):
    """Sealed blobs as COMPLIANCE-locked objects; see the module docstring."""

    def __init__(
        self,
        s3: S3,
        bucket: str,
        keyring: KeyRing | None,
        keys: WrappedKeyStore,
        *,
        prefix: str = "",
        default_retention: float = 7 * 365 * 86400.0,
        level: int = 3,
        clock: Clock | None = None,
        threads: int = 8,
    ) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.keyring = keyring
        self.keys = keys
        self.prefix = prefix
        self.default_retention = default_retention
        self.level = level
        self.clock = clock or (lambda: datetime.now(UTC))
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="coffer-s3")
        self._local = threading.local()

    @classmethod
    def open(cls, cfg: S3Config, keyring: KeyRing | None, data_dir: Path, *,
             clock: Clock | None = None, level: int = 3) -> S3BlobStore:
        """Connect, check both buckets (Object Lock on the blob bucket), pick the key store."""
        s3 = make_client(cfg, data_dir)
        try:
            s3.check_bucket(cfg.bucket, locked=True, create=cfg.create_bucket)
            keys: WrappedKeyStore
            if cfg.key_bucket is not None:
                s3.check_bucket(cfg.key_bucket, locked=False, create=cfg.create_bucket)
                keys = BucketKeyStore(s3, cfg.key_bucket, cfg.prefix)
            else:
                keys = DirectoryKeyStore(data_dir / "archive" / "s3-keys")
        except BaseException:
            s3.close()
            raise
        return cls(s3, cfg.bucket, keyring, keys, prefix=cfg.prefix,
                   default_retention=cfg.default_retention, level=level, clock=clock)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.s3.close()

    def __enter__(self) -> S3BlobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def probe(self) -> None:
        """One cheap request (HEAD of the bucket): raises while the storage is unreachable."""
        if self.s3.head_bucket(self.bucket) is None:
            raise BucketConfigError(f"s3://{self.bucket}: the bucket is gone", "NoSuchBucket")

    def name(self, sha256: str) -> str:
        return f"{self.prefix}blobs/{check_sha(sha256)[:2]}/{sha256}"

    def _where(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.name(sha256)}"

    # -- reading --

    def exists(self, sha256: str) -> bool:
        return self.s3.head(self.bucket, self.name(sha256)) is not None

    def read(self, sha256: str) -> bytes:
        """The original bytes: decrypt, decompress, and check the SHA-256."""
        keyring = self._need_keys()
        blob = self.s3.get_bytes(self.bucket, self.name(sha256))
        if blob is None:
            raise BlobNotFoundError(f"no blob {sha256} in s3://{self.bucket}")
        head = parse_header(blob)
        key_data = self.keys.get(sha256, head.dkid)
        if key_data is None:
            raise BlobShreddedError(
                f"blob {sha256} cannot be opened: its data key was destroyed "
                "(crypto-shredded; the ledger shows whether by expiry or tampering)")
        compressed = unseal(sha256, blob, key_data, keyring)
        try:
            plain = self._dctx().decompress(compressed)
        except zstandard.ZstdError as exc:
            raise BlobIntegrityError(f"blob {sha256}: does not decompress ({exc})") from None
        if hashlib.sha256(plain).hexdigest() != sha256:
            raise BlobIntegrityError(f"blob {sha256}: content does not match its SHA-256")
        return plain

    def read_sealed(self, sha256: str) -> bytes:
        """The stored ciphertext as it is (for verify and migration)."""
        blob = self.s3.get_bytes(self.bucket, self.name(sha256))
        if blob is None:
            raise BlobNotFoundError(f"no blob {sha256} in s3://{self.bucket}")
        return blob

    def _dkid_of(self, sha256: str, head: dict[str, Any]) -> str:
        dkid = str(head.get("Metadata", {}).get(META_DKID, ""))
        if _DKID.match(dkid):
            return dkid
        # No (or odd) metadata: the header inside the object is authoritative.
        first = self.s3.get_bytes(self.bucket, self.name(sha256), Range=f"bytes=0-{HEADER_LEN}")
        if first is None:
            raise BlobNotFoundError(f"no blob {sha256} in s3://{self.bucket}")
        return parse_header(first + b"\0" * 16).dkid

    def data_key_present(self, sha256: str) -> bool:
        head = self.s3.head(self.bucket, self.name(sha256))
        if head is None:
            return False
        return self.keys.get(sha256, self._dkid_of(sha256, head)) is not None

    def iterate(self) -> Iterator[str]:
        """The SHA-256 of every blob in the bucket (listing order)."""
        for sha, _modified in self.listing():
            yield sha

    def listing(self) -> Iterator[tuple[str, datetime | None]]:
        """(SHA-256, last modified) of every blob in the bucket (listing order)."""
        for name, _size, modified in self.s3.objects(self.bucket, f"{self.prefix}blobs/"):
            sha = name.rsplit("/", 1)[-1]
            if len(sha) == 64 and all(c in "0123456789abcdef" for c in sha):
                yield sha, modified

    def lock_state(self, sha256: str) -> LockState:
        head = self.s3.head(self.bucket, self.name(sha256))
        if head is None:
            raise BlobNotFoundError(f"no blob {sha256} in s3://{self.bucket}")
        until = head.get("ObjectLockRetainUntilDate")
        return LockState(mode=head.get("ObjectLockMode"),
                         retain_until=until.astimezone(UTC) if until else None,
                         legal_hold=head.get("ObjectLockLegalHoldStatus") == "ON")

    # -- writing --

    def put(self, data: bytes, retain_until: datetime | None = None) -> BlobRef:
        return self.write_many([data], retain_until=[retain_until])[0]

    def write_many(
        self, datas: Sequence[bytes],
        after: Callable[[int, list[BlobRef]], object] | None = None,
        *, retain_until: Sequence[datetime | None] | None = None,
    ) -> list[BlobRef]:
        """Store each message once, locked until its ``retain_until`` (default: now +
        default_retention); ``after(0, refs)`` runs once every object is stored."""
        if retain_until is not None and len(retain_until) != len(datas):
            raise ValueError("write_many: one retain_until per message")
        self._need_keys()
        now = self.clock()
        default = now + timedelta(seconds=self.default_retention)
        until: dict[str, datetime | None] = {}
        first: dict[str, int] = {}
        shas = [hashlib.sha256(d).hexdigest() for d in datas]
        for i, sha in enumerate(shas):
            want = (retain_until[i] if retain_until is not None else None) or default
            want = want.astimezone(UTC)
            # Same bytes twice in one batch: stored once, locked for the longest.
            prev = until.get(sha)
            until[sha] = want if prev is None or want > prev else prev
            first.setdefault(sha, i)
        stored = dict(zip(first, self._pool.map(
            lambda sha: self._store_one(sha, datas[first[sha]], until[sha], now), first),
            strict=True))
        refs: list[BlobRef] = []
        for i, sha in enumerate(shas):
            ref = stored[sha]
            refs.append(ref if i == first[sha] else BlobRef(sha, ref.size, ref.stored_size,
                                                             False))
        if after is not None:
            after(0, refs)
        return refs

    def _store_one(self, sha: str, data: bytes, until: datetime | None,
                   now: datetime) -> BlobRef:
        name = self.name(sha)
        head = self.s3.head(self.bucket, name)
        if head is None:
            sealed = seal(sha, self._cctx().compress(data), self._archive_key())
            # The wrapped key first: a blob never exists without its key.
            self.keys.put(sha, sealed.dkid, sealed.key_file)
            lock = until if until is not None and until > now + timedelta(seconds=1) else None
            try:
                version = self.s3.put_exclusive(
                    self.bucket, name, sealed.blob, retain_until=lock,
                    metadata={META_DKID: sealed.dkid, META_SHA: sha})
            except BaseException:
                self.keys.discard(sha, sealed.dkid)
                raise
            if version is not None:
                return BlobRef(sha, len(data), len(sealed.blob), True)
            self.keys.discard(sha, sealed.dkid)  # another writer got there first
            head = self.s3.head(self.bucket, name)
            if head is None:
                raise ObjectStoreError(f"{self._where(sha)}: exists, then vanished", "Race")
        if self.keys.get(sha, self._dkid_of(sha, head)) is None:
            raise BlobShreddedError(
                f"blob {sha} was crypto-shredded; the same bytes cannot be stored "
                "again until the object itself is deleted")
        if until is not None:
            self._extend(sha, head, until)
        return BlobRef(sha, len(data), int(head.get("ContentLength", 0)), False)

    def _extend(self, sha: str, head: dict[str, Any], until: datetime) -> None:
        current = head.get("ObjectLockRetainUntilDate")
        if current is not None and current >= until:
            return
        self.extend_retention(sha, until)

    def extend_retention(self, sha256: str, until: datetime) -> None:
        """Lock every version until ``until`` (COMPLIANCE can be extended, never shortened)."""
        name = self.name(sha256)
        for v in self.s3.versions(self.bucket, name):
            if "VersionId" not in v or "Size" not in v:
                continue  # a delete marker has no retention
            self.s3.call("put_object_retention", self._where(sha256), Bucket=self.bucket,
                         Key=name, VersionId=v["VersionId"],
                         Retention={"Mode": "COMPLIANCE",
                                    "RetainUntilDate": until.astimezone(UTC)})

    # -- legal hold --

    def place_hold(self, sha256: str) -> None:
        """S3 legal hold ON: no deletion, whatever the retention, until released."""
        self._set_hold(sha256, "ON")

    def release_hold(self, sha256: str) -> None:
        """Legal hold OFF; call only when no case still holds the blob."""
        self._set_hold(sha256, "OFF")

    def _set_hold(self, sha256: str, status: str) -> None:
        name = self.name(sha256)
        versions = [v for v in self.s3.versions(self.bucket, name) if "Size" in v]
        if not versions:
            raise BlobNotFoundError(f"no blob {sha256} in s3://{self.bucket}")
        for v in versions:
            self.s3.call("put_object_legal_hold", self._where(sha256), Bucket=self.bucket,
                         Key=name, VersionId=v["VersionId"], LegalHold={"Status": status})

    # -- shredding and deletion --

    def shred(self, sha256: str) -> int:
        """Destroy every wrapped data key of the blob (works while the object is locked)."""
        return self.keys.shred(sha256)

    def delete(self, sha256: str) -> bool:
        """Delete every version of the blob; ObjectLockedError while retention or a hold
        protects it.  Only after ``shred`` (the caller checks references)."""
        return self.s3.delete_all_versions(self.bucket, self.name(sha256)) > 0

    def recover(self, append: Callable[[list[Recovered]], object],
                known: Callable[[], Collection[str]] | None = None,
                repaired: Callable[..., object] | None = None,
                live: Callable[[], Collection[str]] | None = None) -> list[Recovered]:
        """Nothing to finish: see the module docstring (a re-sent message is ledgered)."""
        return []

    # -- helpers --

    def _need_keys(self) -> KeyRing:
        if self.keyring is None:
            raise KeyFileError(f"s3://{self.bucket}: no archive keys loaded "
                               "(ciphertext-only mode)")
        return self.keyring

    def _archive_key(self) -> ArchiveKey:
        return self._need_keys().current



# -- the ledger mirror ------------------------------------------------------------------------


@dataclass(frozen=True)
class MirrorProblem:
    """One disagreement between the local ledger and its locked copy in S3."""

    code: str  # segment_differs | segment_missing_locally | segment_not_mirrored |
    #            checkpoint_differs | checkpoint_missing_locally
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.code}: {self.name}: {self.detail}"


@dataclass(frozen=True)
class SyncResult:
    segments: list[str]
    checkpoints: list[int]


class S3LedgerMirror:
    """Uploads closed ledger segments and every checkpoint line as locked objects.

    A segment is closed once a later segment exists (archive.ledger appends only
    to the last one), so a closed segment is final and can be locked.  Checkpoint
    lines are mirrored one object each as soon as they are written, so the signed
    head is in WORM storage before its segment closes.  ``verify`` compares the
    local ledger with the locked copies; ``download`` fetches them so
    ``archive.verify`` can check the chain and signatures from WORM storage alone.
    """

    def __init__(self, s3: S3, bucket: str, *, prefix: str = "",
                 retention: float = 10 * 365 * 86400.0, clock: Clock | None = None) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.retention = retention
        self.clock = clock or (lambda: datetime.now(UTC))

    def _seg_prefix(self) -> str:
        return f"{self.prefix}ledger/segments/"

    def _cp_prefix(self) -> str:
        return f"{self.prefix}ledger/checkpoints/"

    def mirrored_segments(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, size in self.s3.keys(self.bucket, self._seg_prefix()):
            base = name.rsplit("/", 1)[-1]
            if SEGMENT_NAME.match(base):
                out[base] = size
        return out

    def mirrored_checkpoints(self) -> list[int]:
        seqs: list[int] = []
        for name, _size in self.s3.keys(self.bucket, self._cp_prefix()):
            m = _CHECKPOINT_NAME.match(name.rsplit("/", 1)[-1])
            if m:
                seqs.append(int(m.group(1)))
        return sorted(seqs)

    def sync(self, ledger_dir: Path) -> SyncResult:
        """Upload what is not yet mirrored; LedgerError if a local segment differs from
        its locked copy (the local ledger was altered after it was mirrored)."""
        until = self.clock() + timedelta(seconds=self.retention)
        segs = segments(ledger_dir)
        done = self.mirrored_segments()
        uploaded: list[str] = []
        for _first, path in segs[:-1]:  # the last segment is still being appended to
            data = path.read_bytes()
            key = self._seg_prefix() + path.name
            if path.name in done:
                remote = self.s3.get_bytes(self.bucket, key)
                if remote != data:
                    raise LedgerError(f"{path}: differs from its locked copy s3://{self.bucket}/"
                                      f"{key} (altered after it was mirrored)")
                continue
            if self.s3.put_exclusive(self.bucket, key, data, retain_until=until,
                                     metadata={META_SHA: hashlib.sha256(data).hexdigest()}
                                     ) is not None:
                uploaded.append(path.name)
        have = set(self.mirrored_checkpoints())
        last = max(have, default=0)
        cps: list[int] = []
        for seq, line in self._checkpoint_lines(segs, after=last):
            if seq in have:
                continue
            key = f"{self._cp_prefix()}{seq:012d}.json"
            if self.s3.put_exclusive(self.bucket, key, line + b"\n",
                                     retain_until=until) is not None:
                cps.append(seq)
        if uploaded or cps:
            log.info("ledger mirrored to s3://%s: %d segments, %d checkpoints",
                     self.bucket, len(uploaded), len(cps))
        return SyncResult(uploaded, cps)

    @staticmethod
    def _checkpoint_lines(segs: list[tuple[int, Path]], *,
                          after: int = 0) -> Iterator[tuple[int, bytes]]:
        """(seq, exact line) of each checkpoint with seq > ``after``."""
        import json

        for i, (_first, path) in enumerate(segs):
            nxt = segs[i + 1][0] if i + 1 < len(segs) else None
            if nxt is not None and nxt <= after + 1:
                continue  # every entry of this segment is at or before ``after``
            with open(path, "rb") as fh:
                for line in fh:
                    if not line.endswith(b"\n"):
                        break  # the end when read: a writer may be finishing it
                    if b'"kind":"checkpoint"' not in line:
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue
                    if obj.get("kind") == "checkpoint" and int(obj.get("seq", 0)) > after:
                        yield int(obj["seq"]), line.rstrip(b"\n")

    def verify(self, ledger_dir: Path) -> list[MirrorProblem]:
        """Compare the local ledger with its locked copies (read-only)."""
        problems: list[MirrorProblem] = []
        segs = segments(ledger_dir)
        local = {p.name: p for _f, p in segs}
        closed = {p.name for _f, p in segs[:-1]}
        remote = self.mirrored_segments()
        for name in sorted(remote):
            data = self.s3.get_bytes(self.bucket, self._seg_prefix() + name)
            if name not in local:
                problems.append(MirrorProblem("segment_missing_locally", name,
                                              "mirrored in S3 but gone from the ledger"))
            elif data != local[name].read_bytes():
                problems.append(MirrorProblem("segment_differs", name,
                                              "the local segment differs from the locked copy"))
        for name in sorted(closed - set(remote)):
            problems.append(MirrorProblem("segment_not_mirrored", name,
                                          "closed, but not yet in S3"))
        lines = dict(self._checkpoint_lines(segs))
        for seq in self.mirrored_checkpoints():
            key = f"{self._cp_prefix()}{seq:012d}.json"
            data = self.s3.get_bytes(self.bucket, key)
            if seq not in lines:
                problems.append(MirrorProblem("checkpoint_missing_locally", f"seq {seq}",
                                              "a locked checkpoint the ledger no longer has"))
            elif data is None or data.rstrip(b"\n") != lines[seq]:
                problems.append(MirrorProblem("checkpoint_differs", f"seq {seq}",
                                              "the ledger's checkpoint differs from the "
                                              "locked copy"))
        return problems

    def download(self, dest: Path) -> list[Path]:
        """Write every mirrored segment into ``dest`` (a ledger directory to verify)."""
        dest.mkdir(parents=True, exist_ok=True, mode=0o750)
        out: list[Path] = []
        for name in sorted(self.mirrored_segments()):
            data = self.s3.get_bytes(self.bucket, self._seg_prefix() + name)
            if data is None:
                continue
            path = dest / name
            path.write_bytes(data)
            out.append(path)
        return out
