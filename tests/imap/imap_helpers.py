"""Shared helpers for the IMAP tests: a real server on loopback in its own thread.

Most clients under test are synchronous (imaplib, IMAPClient, mbsync), so the
server runs in a background event loop; ``RunningServer.call`` runs a coroutine
on that loop (e.g. to add a message while a client IDLEs).  TLS uses a
throw-away CA made with trustme.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme

from archive.imap.backend import Backend, MemoryBackend
from archive.imap.server import ImapConfig, ImapServer, LoginThrottle

T = TypeVar("T")

MSG1 = (b"From: Alice Example <alice@example.com>\r\n"
        b"To: Bob <bob@example.com>\r\n"
        b"Subject: quarterly numbers\r\n"
        b"Date: Mon, 1 Jul 2024 10:00:00 +0000\r\n"
        b"Message-ID: <one@example.com>\r\n\r\n"
        b"The numbers are in the attached sheet.\r\n")
MSG2 = (b"From: Bob <bob@example.com>\n"
        b"To: Alice Example <alice@example.com>\n"
        b"Subject: re: quarterly numbers\n"
        b"Date: Tue, 2 Jul 2024 11:00:00 +0200\n"
        b"MIME-Version: 1.0\n"
        b"Content-Type: multipart/mixed; boundary=XX\n\n"
        b"--XX\nContent-Type: text/plain\n\nthanks, looks fine\n"
        b"--XX\nContent-Type: message/rfc822\n\n"
        b"From: carol@example.org\nSubject: inner\n\ninner body zebra\n"
        b"--XX--\n")
SECRET = (b"From: Mallory <mallory@example.net>\r\nTo: mallory@example.net\r\n"
          b"Subject: mallory private plans\r\nDate: Wed, 3 Jul 2024 09:00:00 +0000\r\n\r\n"
          b"secret-token-xyzzy\r\n")


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext
    ca_file: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_tls(tmp: Path) -> Tls:
    ca = trustme.CA()
    # mbsync checks the common name against the host it was given (127.0.0.1).
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="127.0.0.1")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Tls(server, client, ca_file)


class RunningServer:
    def __init__(self, backend: Backend, config: ImapConfig,
                 throttle: LoginThrottle | None = None) -> None:
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ImapServer(backend, config, throttle)
        self.call(self.server.start())
        self.port = self.server.port

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def stop(self) -> None:
        self.call(self.server.close())

        async def drain() -> None:  # let transports finish closing before the loop stops
            await asyncio.sleep(0.05)

        self.call(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def memory_backend() -> MemoryBackend:
    """alice and bob (users), olga (officer); alice has MSG1, MSG2 in INBOX; mallory
    (another user) has SECRET."""
    b = MemoryBackend()
    b.add_account("alice", "alice-pw", addresses=("alice@example.com",))
    b.add_account("bob", "bob-pw", addresses=("bob@example.com",))
    b.add_account("mallory", "mallory-pw", addresses=("mallory@example.net",))
    b.add_account("olga", "olga-pw", role="officer")
    b.add_folder("olga", "All Mail", ("\\All",))
    when = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)
    b.add_message("alice", "INBOX", MSG1, when)
    b.add_message("alice", "INBOX", MSG2, when.replace(day=2))
    b.add_message("alice", "Sent", MSG1, when)
    b.add_message("mallory", "INBOX", SECRET, when.replace(day=3))
    for raw in (MSG1, MSG2, SECRET):
        b.add_message("olga", "All Mail", raw, when)
    return b


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("imap-tls"))


@pytest.fixture
def mem_backend() -> MemoryBackend:
    return memory_backend()


@pytest.fixture
def server(mem_backend: MemoryBackend, tls: Tls) -> Iterator[RunningServer]:
    """STARTTLS offered; plain LOGIN allowed on loopback (as after ``coffer init``)."""
    srv = RunningServer(mem_backend, ImapConfig(port=0, tls=tls.server,
                                            allow_plaintext_loopback=True, idle_poll=0.5))
    yield srv
    srv.stop()


def corpus_dir() -> Path:
    root = os.environ.get("COFFER_CORPUS")
    base = Path(root) if root else Path(__file__).resolve().parents[2].parent / "shared" / "corpus"
    mime = base / "mime"
    if not mime.is_dir():
        pytest.skip(f"MIME corpus not found at {mime} (set COFFER_CORPUS)")
    return mime


def corpus_sample(n: int = 60) -> list[Path]:
    """A fixed, spread-out subset of the MIME corpus (every k-th message file)."""
    files = sorted(p for p in corpus_dir().rglob("*")
                   if p.is_file() and p.suffix in (".eml", ".msg", ".txt")
                   and p.stat().st_size < 2_000_000)
    step = max(1, len(files) // n)
    return files[::step][:n]
