"""Settings of the S3 object storage backend (the ``s3:`` section of coffer.yaml).

The lead adds one line to :class:`gateway.config.Config` (and the import
``from archive.s3config import S3Config``)::

    s3: S3Config | None = Field(None, description="S3 object storage with Object Lock "
                                "for archive blobs and ledger segments (default: local files)")

    s3:
      endpoint: https://minio.internal:9000     # omit for AWS S3
      region: eu-central-1
      bucket: coffer-archive                    # created with Object Lock enabled
      key_bucket: coffer-archive-keys           # NO Object Lock: wrapped data keys
      addressing_style: path
      access_key_id: AKIA...
      secret_access_key_file: secrets/s3.secret # mode 0600, relative to data_dir

The secret is a pydantic ``SecretStr``: it prints as ``**********`` in a repr,
a log line or an error, and only ``S3Config.secret()`` reads it.  With neither
``access_key_id`` nor a secret the standard AWS chain applies (environment,
shared credentials file, instance or pod role).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)


def _duration(value: Any) -> float:
    # Imported when a value is validated, not at import time: gateway.config
    # imports this module to build Config.
    from gateway.config import parse_duration

    return parse_duration(value)


Duration = Annotated[float, BeforeValidator(_duration)]

# S3 bucket naming rules (AWS "Bucket naming rules"): 3-63 characters, lower-case
# letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class _Model(BaseModel):
    # the same rules as gateway.config._Model (not imported: gateway.config imports us)
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Config(_Model):
    endpoint: str | None = Field(
        None, description="S3 endpoint URL (MinIO, Ceph RGW, SeaweedFS ...); omit for AWS S3"
    )
    region: str = Field("us-east-1", description="Region the requests are signed for")
    bucket: str = Field(description="Bucket for blobs and ledger segments; must have Object "
                        "Lock enabled (Coffer refuses to start otherwise)")
    key_bucket: str | None = Field(
        None, description="Bucket WITHOUT Object Lock for the wrapped data keys, shared by all "
        "nodes; omit to keep them in the node's data_dir (single node only)"
    )
    prefix: str = Field("", description="Prefix of every object name, e.g. 'coffer/'")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="path: endpoint/bucket/key; virtual: bucket.endpoint/key"
    )
    access_key_id: str | None = Field(None, description="Access key id (default: AWS chain)")
    secret_access_key: SecretStr | None = Field(
        None, description="Secret access key (prefer secret_access_key_file)"
    )
    secret_access_key_file: Path | None = Field(
        None, description="File holding the secret access key, mode 0600 (relative to data_dir)"
    )
    ca_bundle: Path | None = Field(None, description="PEM CA bundle for a private endpoint")
    connect_timeout: Duration = Field(5.0, gt=0, description="TCP connect timeout per attempt")
    read_timeout: Duration = Field(30.0, gt=0, description="Socket read timeout per attempt")
    max_attempts: int = Field(
        2, ge=1, le=10, description="Attempts per request (1 = no retry) before a tempfail"
    )
    default_retention: Duration = Field(
        7 * 365 * 86400.0,
        description="Object Lock retention of a blob stored without a retention end",
    )
    ledger_retention: Duration = Field(
        10 * 365 * 86400.0,
        description="Object Lock retention of mirrored ledger segments and checkpoints "
        "(longer than any message retention)",
    )
    create_bucket: bool = Field(
        False, description="Create missing buckets at startup (Object Lock on the blob bucket); "
        "for tests and first runs"
    )

    @field_validator("bucket", "key_bucket")
    @classmethod
    def _bucket_name(cls, value: str | None) -> str | None:
        if value is not None and not _BUCKET.match(value):
            raise ValueError(f"{value!r} is not a valid S3 bucket name (3-63 of a-z 0-9 . -)")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value.startswith("/"):
            raise ValueError("prefix must not start with '/'")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> S3Config:
        if self.secret_access_key is not None and self.secret_access_key_file is not None:
            raise ValueError("give secret_access_key or secret_access_key_file, not both")
        has_secret = self.secret_access_key is not None or self.secret_access_key_file is not None
        if has_secret != (self.access_key_id is not None):
            raise ValueError("access_key_id and a secret access key go together")
        if self.key_bucket is not None and self.key_bucket == self.bucket:
            raise ValueError("key_bucket must differ from bucket: data keys must stay "
                             "deletable, outside Object Lock")
        return self

    def secret(self, base: Path | None = None) -> str | None:
        """The secret access key (read from its file relative to ``base``), or None."""
        if self.secret_access_key is not None:
            return self.secret_access_key.get_secret_value()
        if self.secret_access_key_file is None:
            return None
        path = self.secret_access_key_file
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            st = path.stat()
            if st.st_mode & 0o077:
                raise ValueError(f"{path}: secret file is accessible to group or others "
                                 f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
            with open(path, encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the S3 secret ({os.strerror(exc.errno or 0)})"
                             ) from None
        if not value:
            raise ValueError(f"{path}: the S3 secret file is empty")
        return value
