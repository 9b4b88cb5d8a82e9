"""A real sync client: Debian's mbsync (isync) pulls the archive into a Maildir over
STARTTLS and every file matches the archived original.

mbsync stores Maildir files with LF line ends (it converts the CRLF of IMAP) and adds
its own ``X-TUID:`` header line to find the message again; both are mbsync's doing,
so the comparison removes exactly that line and compares with the original's LF form
(which, for an original with LF line ends, is the original itself).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from imap_helpers import MSG1, MSG2, RunningServer, Tls, corpus_sample

from archive.imap.backend import MemoryBackend
from archive.imap.server import ImapConfig

pytestmark = pytest.mark.skipif(shutil.which("mbsync") is None,
                                reason="mbsync (Debian package isync) is not installed")

_TUID = re.compile(rb"^X-TUID: [A-Za-z0-9+/]{12}\n", re.M)


def _mbsyncrc(port: int, tls: Tls, maildir: Path) -> str:
    return f"""IMAPAccount coffer
Host 127.0.0.1
Port {port}
User alice
Pass alice-pw
SSLType STARTTLS
CertificateFile {tls.ca_file}
AuthMechs PLAIN

IMAPStore remote
Account coffer

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel archive
Far :remote:
Near :local:
Patterns *
Create Near
Sync Pull
SyncState *
"""


def _as_mbsync_stores(original: bytes) -> bytes:
    return original.replace(b"\r\n", b"\n")


def test_mbsync_pulls_every_message_identical_to_the_original(tmp_path: Path,
                                                              tls: Tls) -> None:
    originals = [f.read_bytes() for f in corpus_sample(60)]
    backend = MemoryBackend()
    backend.add_account("alice", "alice-pw")
    for raw in originals:
        backend.add_message("alice", "INBOX", raw)
    for raw in (MSG1, MSG2):
        backend.add_message("alice", "Sent", raw)
    # Plain LOGIN is not allowed: mbsync must use STARTTLS and verify our certificate.
    srv = RunningServer(backend, ImapConfig(port=0, tls=tls.server))
    maildir = tmp_path / "mail"
    maildir.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(_mbsyncrc(srv.port, tls, maildir))
    try:
        res = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True,
                             timeout=120, check=False)
    finally:
        srv.stop()
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    for folder, expected in (("INBOX", originals), ("Sent", [MSG1, MSG2])):
        files = [p for sub in ("cur", "new") for p in (maildir / folder / sub).iterdir()]
        # mbsync names files ...,U=<uid>: order them by our UID.
        files.sort(key=lambda p: int(re.search(r",U=(\d+)", p.name).group(1)))  # type: ignore[union-attr]
        got = [_TUID.sub(b"", p.read_bytes(), count=1) for p in files]
        assert len(got) == len(expected), folder
        for i, (g, want) in enumerate(zip(got, expected, strict=True)):
            assert g == _as_mbsync_stores(want), f"{folder} message {i + 1}"
    # A second run finds nothing new: UIDs and UIDVALIDITY are stable.
    srv2 = RunningServer(backend, ImapConfig(port=srv.port, tls=tls.server))
    try:
        res = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True,
                             timeout=120, check=False)
    finally:
        srv2.stop()
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert sum(1 for _ in (maildir / "INBOX" / "cur").iterdir()) + sum(
        1 for _ in (maildir / "INBOX" / "new").iterdir()) == len(originals)
