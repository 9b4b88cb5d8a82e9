"""Shared pieces of the archive backend tests (outage, several nodes): the messages they
send, how they count what was archived, and the ``s3:`` section for a SeaweedFS server."""

from __future__ import annotations

import smtplib
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

# tests/archive/seaweed.py runs the SeaweedFS server these tests stop and start.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "archive"))

from seaweed import Seaweed

from archive.metadata import Metadata


class DatabaseUnavailable(Exception):
    """The PostgreSQL server to create the database on cannot be reached."""


@contextmanager
def fresh_database(admin_url: str, stem: str = "coffer_cluster") -> Iterator[str]:
    """A new PostgreSQL database (advisory locks are per database), dropped afterwards;
    its URL.  Also used by bench/cluster.py."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT",
                             connect_args={"connect_timeout": 3})
    name = f"{stem}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        raise DatabaseUnavailable(f"PostgreSQL at {admin_url}: {str(exc).splitlines()[0]}"
                                  ) from None
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


ARCHIVE_451 = "451 4.3.0 Archive temporarily unavailable, try again later"


def message(token: str) -> bytes:
    return (f"From: alice@src.test\r\nTo: bob@remote.test\r\nSubject: burst {token}\r\n"
            f"Message-ID: <{token}@src.test>\r\nX-Token: {token}\r\n\r\n"
            f"Body of {token}, about the zeppelin.\r\n").encode()


def send(port: int, token: str, timeout: float = 20) -> int:
    """The SMTP code the gateway answered for this message (250, or the refusal's code;
    0 when the connection failed, e.g. the node was killed)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as smtp:
            smtp.sendmail("alice@src.test", ["bob@remote.test"], message(token))
    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
        return exc.smtp_code
    except (OSError, smtplib.SMTPException):
        return 0
    return 250


def archived(url: str, token: str) -> int:
    """How many metadata rows hold the message with this token (archived once: 1)."""
    with Metadata(url) as meta:
        return len(meta.find_message_id(f"{token}@src.test"))


def s3_section(sw: Seaweed, bucket: str, key_bucket: str, secret_file: Path) -> str:
    """The ``s3:`` YAML for a SeaweedFS server; the secret goes into ``secret_file``."""
    secret_file.write_text(sw.secret_key + "\n")
    secret_file.chmod(0o600)
    return ("s3:\n"
            f"  endpoint: {sw.endpoint}\n"
            f"  region: {sw.region}\n"
            f"  bucket: {bucket}\n"
            f"  key_bucket: {key_bucket}\n"
            "  addressing_style: path\n"
            f"  access_key_id: {sw.access_key}\n"
            f"  secret_access_key_file: {secret_file}\n"
            "  create_bucket: true\n"
            "  connect_timeout: 1s\n  read_timeout: 10s\n  max_attempts: 1\n")
