"""Shared pieces of the archive backend tests (outage, several nodes): the messages they
send, how they count what was archived, and the ``s3:`` section for a SeaweedFS server."""

from __future__ import annotations

import smtplib
import sys
from pathlib import Path

# tests/archive/seaweed.py runs the SeaweedFS server these tests stop and start.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "archive"))

from seaweed import Seaweed

from archive.metadata import Metadata

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
