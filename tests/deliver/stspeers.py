"""Loopback peers for the MTA-STS tests: a test CA made with the real ``openssl``, and an
HTTPS server (asyncio + ssl) that serves ``/.well-known/mta-sts.txt``."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class StsCa:
    ca_pem: Path
    dir: Path

    def client_context(self) -> ssl.SSLContext:
        """Trusts this CA only and checks host names, as a sender must (RFC 8461 §3.3, §4.2)."""
        return ssl.create_default_context(cafile=str(self.ca_pem))

    def server_context(self, *names: str) -> ssl.SSLContext:
        """A server context whose certificate, signed by the CA, is valid for ``names``."""
        crt, key = self.leaf(*names)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(crt, key)
        return ctx

    def leaf(self, *names: str) -> tuple[Path, Path]:
        """(certificate, key) PEM files of a certificate signed by the CA for ``names``."""
        stem = names[0].replace("*", "star")
        key, csr, crt, ext = (self.dir / f"{stem}.{s}" for s in ("key", "csr", "pem", "ext"))
        if not crt.exists():
            ext.write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n"
                           "extendedKeyUsage=serverAuth\n")
            openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}",
                     cwd=self.dir)
            openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca_pem), "-CAkey",
                     str(self.dir / "ca.key"), "-CAcreateserial", "-days", "2", "-sha256",
                     "-extfile", str(ext), "-out", str(crt), cwd=self.dir)
        return crt, key


def make_ca(tmp: Path) -> StsCa:
    tmp.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Coffer STS test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=tmp)
    return StsCa(tmp / "ca.pem", tmp)


def policy_response(policy: str, *, status: str = "200 OK",
                    content_type: str = "text/plain", extra: str = "") -> bytes:
    body = policy.encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


@dataclass
class PolicyServer:
    """Answers every request with ``response``; records each request's first lines."""

    context: ssl.SSLContext
    response: bytes = b""
    requests: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head.decode("latin-1"))
            writer.write(self.response)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # a client that gave up (e.g. on our certificate)
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


@dataclass
class ReportReceiver(PolicyServer):
    """An HTTPS server taking TLS report POSTs (RFC 8460 §5.4): (head, body) of each it
    accepted; the first ``refuse`` POSTs it answers 503 (``requests`` has every head).
    With ``hold``, it reads a whole POST, sets ``held`` and never answers: the sender
    cannot know whether the report arrived."""

    posts: list[tuple[str, bytes]] = field(default_factory=list)
    refuse: int = 0
    hold: bool = False
    held: asyncio.Event = field(default_factory=asyncio.Event)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            length = next(int(line.split(":", 1)[1]) for line in head.split("\r\n")
                          if line.lower().startswith("content-length:"))
            body = await reader.readexactly(length)
            self.requests.append(head)
            if self.hold:
                self.held.set()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await reader.read()  # until the sender goes away
                return
            status = b"200 OK"
            if self.refuse > 0:
                self.refuse -= 1
                status = b"503 Service Unavailable"
            else:
                self.posts.append((head, body))
            writer.write(b"HTTP/1.1 " + status +
                         b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()
