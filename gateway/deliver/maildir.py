"""Local delivery into a Maildir (the ``maildir:PATH`` route).

Each recipient gets ``PATH/<address, lower-cased>/`` with ``tmp``, ``new`` and
``cur``.  Following the Maildir specification (cr.yp.to/proto/maildir.html) the
message is written under ``tmp/`` with a unique name, fsynced, then linked into
``new/`` (and the ``tmp/`` name removed), so a reader never sees a partial
message and a crash leaves at most a stale file in ``tmp/``.  The ``new/``
directory is fsynced before the delivery is reported, since the queue forgets
the message once every recipient is delivered.

A ``Return-Path`` (RFC 5321 §4.4: added by the final delivery MTA) and a
``Delivered-To`` header are prepended; the message bytes are otherwise kept
exactly as received.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import secrets
import socket
import time
from pathlib import Path

from gateway.errors import DeliveryError

_COUNTER = itertools.count()


def mailbox_name(address: str) -> str:
    """The directory name for a recipient; refuses anything that could leave PATH."""
    name = address.lower()
    if (
        not name
        or len(name.encode()) > 255
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name.startswith(".")
        or any(ord(c) < 32 for c in name)
    ):
        raise DeliveryError(
            f"{address!r} cannot be a maildir name", transient=False,
            reply="550 5.1.3 Recipient address not usable as a local mailbox",
        )
    return name


def _unique_name(hostname: str) -> str:
    # Maildir spec: "time.MusecPpid_counter.host"; '/' and ':' in host are escaped.
    now = time.time()
    sec, usec = int(now), int((now % 1) * 1_000_000)
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_COUNTER)}R{secrets.token_hex(4)}.{host}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver(
    root: Path, rcpt: str, sender: str, data: bytes, *, fsync: bool = True,
    hostname: str | None = None,
) -> Path:
    """Deliver one message to one recipient's Maildir; returns the file in ``new/``.

    Raises DeliveryError: transient for I/O trouble (full disk, permissions an
    operator can fix), permanent for an address that cannot name a mailbox.
    """
    box = root / mailbox_name(rcpt)
    prefix = f"Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n".encode()
    name = _unique_name(hostname or socket.gethostname())
    tmp = box / "tmp" / name
    new = box / "new" / name
    try:
        for sub in ("tmp", "new", "cur"):
            (box / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", closefd=False) as fh:
                fh.write(prefix)
                fh.write(data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, new)
        tmp.unlink()
        if fsync:
            _fsync_dir(new.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        code = "452 4.3.1" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "451 4.3.0"
        raise DeliveryError(
            f"maildir delivery to {box} failed: {exc}", transient=True,
            reply=f"{code} Local mailbox unavailable: {exc.strerror or exc}",
        ) from exc
    return new
