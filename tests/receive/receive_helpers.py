"""Helpers for the receive tests: TLS files, the Gateway handle, a raw SMTP client."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import Config
from gateway.queue.spool import Spool, SpooledMessage
from gateway.receive import Listeners
from gateway.receive.addresses import Mailbox, parse_path
from gateway.receive.recipient_probe import RecipientGate

# Verification reads the costs from the hash: cheap hashes keep AUTH tests fast.
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)

LOCAL = "local.example"
USER, PASSWORD = "alice@local.example", "correct horse battery staple"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cert))
        return ctx


class RawClient:
    """An SMTP client that sends exactly the bytes it is given (asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, *, tls: ssl.SSLContext | None = None,
                      source: str | None = None) -> RawClient:
        """``source``: the loopback address to connect from (127.0.0.0/8), e.g. to be a
        client outside a trusted network."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None,
            local_addr=(source, 0) if source else None,
        )
        return cls(reader, writer)

    async def reply(self) -> list[str]:
        """One (possibly multi-line) reply, as its lines without CRLF."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), 10)
            if not raw:
                raise ConnectionError(f"connection closed; got so far {lines!r}")
            line = raw.decode("utf-8").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    async def line(self) -> str:
        return (await self.reply())[-1]

    async def cmd(self, text: str | bytes) -> str:
        self.send(text if isinstance(text, bytes) else text.encode() + b"\r\n")
        return await self.line()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def rest(self) -> list[str]:
        """Every line until the server closes the connection."""
        data = await asyncio.wait_for(self.reader.read(), 10)
        return [x.decode() for x in data.split(b"\r\n") if x]

    async def start_tls(self, ctx: ssl.SSLContext) -> None:
        await self.writer.start_tls(ctx, server_hostname="localhost")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@dataclass
class Gateway:
    cfg: Config
    spool: Spool
    listeners: Listeners
    accepted: list[str] = field(default_factory=list)

    def port(self, name: str = "inbound") -> int:
        return self.listeners.address(name)[1]

    def spooled(self) -> list[SpooledMessage]:
        return [self.spool.load(q) for q in self.spool.queue_ids()]

    async def sessions_down_to(self, n: int = 0, timeout: float = 5.0) -> None:
        """Wait until at most ``n`` sessions are open (connection_lost runs a turn later)."""
        async def poll() -> None:
            while self.listeners.sessions > n:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(poll(), timeout)


StartGateway = Callable[..., Awaitable[Gateway]]
Connect = Callable[..., Awaitable[RawClient]]  # the ``raw`` fixture


async def greeted(gw: Gateway, raw: Connect) -> RawClient:
    """A raw client of ``gw`` past the banner and ``EHLO client.example``."""
    c: RawClient = await raw(gw.port())
    await c.line()
    await c.cmd("EHLO client.example")
    return c


async def tls_session(gw: Gateway, raw: Connect, tls_files: TlsFiles,
                      listener: str = "submission") -> RawClient:
    """A raw client on ``listener`` after banner, EHLO, STARTTLS and EHLO again."""
    c: RawClient = await raw(gw.port(listener))
    await c.line()
    await c.cmd("EHLO client.example")
    assert (await c.cmd("STARTTLS")).startswith("220 ")
    await c.start_tls(tls_files.client_context())
    c.send(b"EHLO client.example\r\n")
    await c.reply()
    return c


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out



def make_tls_files(d: Path) -> TlsFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return TlsFiles(d / "cert.pem", d / "key.pem")


# -- recipient verification (the `hop` and `gates` fixtures are in conftest.py) ---------

UNKNOWN_TEXT = "5.1.1 <nobody@local.example>: User unknown in virtual mailbox table"


class Clock:
    """An injected clock: tests move ``now``."""

    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def verify_config(tmp_path: Path, port: int, **recipients: Any) -> Config:
    """relay.recipients.verify for LOCAL, whose route is the next hop on ``port``."""
    return Config.model_validate({
        "hostname": "mx.coffer.test", "data_dir": str(tmp_path),
        "relay": {"local_domains": [LOCAL], "recipients": {"verify": True, **recipients}},
        "delivery": {"routes": {LOCAL: f"smtp://127.0.0.1:{port}?tls=off", "*": "mx"}},
    })


def make_gate(gates: list[RecipientGate], cfg: Config,
              clock: Clock | None = None) -> RecipientGate:
    """A gate on ``cfg``, closed by the ``gates`` fixture."""
    gate = RecipientGate.from_config(cfg, clock=clock or Clock())
    gates.append(gate)
    return gate


def mailbox(address: str) -> Mailbox:
    return parse_path(f"<{address}>")


async def rcpt_replies(port: int, raw: Connect, *rcpts: str) -> list[str]:
    """The replies to RCPT TO each of ``rcpts``, in one transaction from a new client."""
    c = await raw(port)
    await c.line()
    await c.cmd("EHLO client.example")
    await c.cmd("MAIL FROM:<a@ext.example>")
    return [await c.cmd(f"RCPT TO:<{r}>") for r in rcpts]
