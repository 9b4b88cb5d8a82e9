"""Delivery to a next hop over SMTP (aiosmtplib), with per-recipient results.

One SMTP transaction carries a message to one destination host with all of that
destination's recipients (RFC 5321 §3.3).  Each RCPT reply is kept: a mixed
250/450/550 transaction yields delivered, deferred and bounced recipients.  The
commands are driven one by one (not ``sendmail``) so that every recipient's
reply, and the point where a session failed, are known exactly.

Throughput comes from reusing connections: after a transaction the connection
goes back to a small per-destination pool (RFC 5321 §4.1.1.5: RSET first if the
transaction did not complete) and the next message to the same host skips
connect, greeting, EHLO and the TLS handshake.  A semaphore per destination caps
the connections open to it (``queue.destination_concurrency``).

TLS per route (RFC 3207):
  off            never STARTTLS
  opportunistic  STARTTLS when offered, certificate not verified (RFC 7435 §1.3:
                 encryption without authentication beats plaintext)
  required       STARTTLS must be offered and succeed with a verified certificate;
                 otherwise the recipients are deferred (4.7.10) and nothing is sent
  implicit       TLS from the first byte (port 465, RFC 8314 §3.3), verified
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import (
    SMTPConnectError,
    SMTPException,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from gateway.deliver.routes import TlsMode


@dataclass(frozen=True, slots=True)
class Destination:
    """One host to connect to."""

    host: str  # what to connect to: an IP address, or a name for a smarthost
    port: int
    tls: TlsMode
    server_name: str  # the name the certificate must carry (SNI), and for logs

    @property
    def label(self) -> str:
        return f"{self.server_name}[{self.host}]:{self.port}"


@dataclass(slots=True)
class TransactionResult:
    replies: dict[str, str]  # every recipient -> the reply that decided it ("250 2.0.0 Ok")
    # True when the failure was in the session (connect, greeting, EHLO, TLS, MAIL),
    # before any recipient was judged individually: another MX host may do better.
    session_failed: bool = False


def _fmt(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}".strip()


def _needs_rset(replies: dict[str, str]) -> bool:
    return not any(r.startswith("2") for r in replies.values())


@dataclass(slots=True)
class _Conn:
    smtp: aiosmtplib.SMTP
    uses: int = 0
    idle_since: float = 0.0


@dataclass(slots=True)
class _Pool:
    sem: asyncio.Semaphore
    idle: list[_Conn] = field(default_factory=list)


class _SessionError(Exception):
    """A failure before any recipient was judged: every recipient gets ``reply``."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        super().__init__(reply)


def opportunistic_context() -> ssl.SSLContext:
    # RFC 7435 §1.3: opportunistic security encrypts without authenticating the peer.
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class SmtpClient:
    """Sends messages to next-hop SMTP servers, reusing connections per destination."""

    def __init__(
        self,
        *,
        helo_name: str,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,
        destination_concurrency: int = 10,
        verified_context: ssl.SSLContext | None = None,
        max_idle: float = 10.0,
        max_uses: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.helo_name = helo_name
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.destination_concurrency = destination_concurrency
        self.verified_context = verified_context or ssl.create_default_context()
        self.opportunistic_context = opportunistic_context()
        self.max_idle = max_idle
        self.max_uses = max_uses
        self.clock = clock
        self._pools: dict[tuple[str, int, str, str], _Pool] = {}
        self.connections_opened = 0  # for tests and metrics: how much reuse we get

    def _pool(self, dest: Destination) -> _Pool:
        key = (dest.host, dest.port, dest.tls, dest.server_name)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(asyncio.Semaphore(self.destination_concurrency))
        return pool

    # -- connections ---------------------------------------------------------
    async def _connect(self, dest: Destination) -> _Conn:
        implicit = dest.tls == "implicit"
        smtp = aiosmtplib.SMTP(
            hostname=dest.host, port=dest.port, local_hostname=self.helo_name,
            timeout=self.command_timeout, use_tls=implicit, start_tls=False,
            tls_context=self.verified_context if implicit else None,
        )
        try:
            await smtp.connect(timeout=self.connect_timeout)
            self.connections_opened += 1
            await self._ehlo(smtp)
            if dest.tls in ("required", "opportunistic"):
                await self._starttls(smtp, dest)
        except _SessionError:
            await _close(smtp, quit=True)
            raise
        except SMTPResponseException as exc:
            smtp.close()
            raise _SessionError(_fmt(exc.code, exc.message)) from None
        except (SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            smtp.close()
            raise _SessionError(_network_reply(exc, dest)) from None
        return _Conn(smtp)

    async def _ehlo(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            # RFC 5321 §4.1.4: a server that does not know EHLO gets HELO.
            if not smtp.is_connected:
                raise
            await smtp.helo()

    async def _starttls(self, smtp: aiosmtplib.SMTP, dest: Destination) -> None:
        if not smtp.supports_extension("starttls"):
            if dest.tls == "required":
                # RFC 3207 §4: a client that requires TLS must not continue in clear.
                raise _SessionError(
                    "451 4.7.10 TLS required for this route but the next hop "
                    "does not offer STARTTLS"
                )
            return
        ctx = self.verified_context if dest.tls == "required" else self.opportunistic_context
        try:
            await smtp.starttls(server_hostname=dest.server_name, tls_context=ctx)
        except SMTPResponseException as exc:
            if dest.tls == "required" or not smtp.is_connected:
                raise _SessionError(
                    f"451 4.7.10 STARTTLS refused by next hop: {_fmt(exc.code, exc.message)}"
                ) from None
            return  # opportunistic: the server declined, carry on in clear
        except (ssl.SSLError, SMTPException, OSError) as exc:
            raise _SessionError(f"451 4.7.10 TLS handshake with {dest.label} failed: {exc}") \
                from None
        # RFC 3207 §4.2: forget what the server said before TLS, and ask again.
        await smtp.ehlo()

    async def _acquire(self, pool: _Pool, dest: Destination) -> tuple[_Conn, bool]:
        now = self.clock()
        while pool.idle:
            conn = pool.idle.pop()
            if conn.smtp.is_connected and now - conn.idle_since < self.max_idle:
                return conn, True
            await _close(conn.smtp, quit=conn.smtp.is_connected)
        return await self._connect(dest), False

    async def _release(self, pool: _Pool, conn: _Conn, reusable: bool) -> None:
        conn.uses += 1
        if reusable and conn.smtp.is_connected and conn.uses < self.max_uses:
            conn.idle_since = self.clock()
            pool.idle.append(conn)
        else:
            await _close(conn.smtp, quit=conn.smtp.is_connected)

    # -- the transaction -------------------------------------------------------
    async def send(
        self, dest: Destination, sender: str, rcpts: list[str], data: bytes,
        *, smtputf8: bool = False,
    ) -> TransactionResult:
        """Deliver ``data`` to ``rcpts`` at ``dest``; every recipient gets a reply."""
        pool = self._pool(dest)
        async with pool.sem:
            for attempt in range(2):
                try:
                    conn, reused = await self._acquire(pool, dest)
                except _SessionError as exc:
                    return TransactionResult(dict.fromkeys(rcpts, exc.reply), session_failed=True)
                try:
                    replies, reusable = await self._transaction(
                        conn.smtp, dest, sender, rcpts, data, smtputf8=smtputf8
                    )
                except _SessionError as exc:
                    await self._release(pool, conn, False)
                    if reused and attempt == 0:
                        # The pooled connection went stale (the server closed it while
                        # idle): nothing was accepted, so a fresh connection is safe.
                        continue
                    return TransactionResult(dict.fromkeys(rcpts, exc.reply), session_failed=True)
                except BaseException:
                    await self._release(pool, conn, False)
                    raise
                await self._release(pool, conn, reusable)
                return TransactionResult(replies)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _transaction(
        self, smtp: aiosmtplib.SMTP, dest: Destination, sender: str, rcpts: list[str],
        data: bytes, *, smtputf8: bool,
    ) -> tuple[dict[str, str], bool]:
        """(replies, whether the connection can be reused).  _SessionError before RCPT."""
        options: list[str] = []
        encoding = "ascii"
        if smtputf8 or not (sender.isascii() and all(r.isascii() for r in rcpts)):
            if not smtp.supports_extension("smtputf8"):
                # RFC 6531 §3.2: without SMTPUTF8 at the next hop the message cannot go.
                reply = "553 5.6.7 Next hop does not support SMTPUTF8 (internationalised address)"
                return dict.fromkeys(rcpts, reply), True
            options.append("SMTPUTF8")
            encoding = "utf-8"
        # RFC 6152 §2: declare 8-bit content when the next hop supports 8BITMIME.
        if not data.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtp.supports_extension("size"):
            options.append(f"SIZE={len(data)}")  # RFC 1870 §6.1

        if _unsafe(sender):
            return dict.fromkeys(rcpts, "553 5.1.7 Invalid sender address"), True
        try:
            await _command(smtp, b"MAIL FROM:", sender, options, encoding, (250,))
        except SMTPResponseException as exc:
            reply = _fmt(exc.code, exc.message)
            if exc.code == 421 or not smtp.is_connected:
                raise _SessionError(reply) from None
            await _rset(smtp)
            return dict.fromkeys(rcpts, reply), smtp.is_connected
        except (SMTPException, OSError, TimeoutError) as exc:
            raise _SessionError(_network_reply(exc, dest)) from None

        replies: dict[str, str] = {}
        accepted: list[str] = []
        try:
            for rcpt in rcpts:
                if _unsafe(rcpt):
                    replies[rcpt] = "553 5.1.3 Invalid recipient address"
                    continue
                try:
                    resp = await _command(smtp, b"RCPT TO:", rcpt, [], encoding, (250, 251))
                except SMTPResponseException as exc:
                    replies[rcpt] = _fmt(exc.code, exc.message)
                    if exc.code == 421:
                        raise SMTPServerDisconnected(replies[rcpt]) from None
                    continue
                replies[rcpt] = _fmt(resp.code, resp.message)
                accepted.append(rcpt)
            if not accepted:
                await _rset(smtp)
                return replies, smtp.is_connected
            try:
                resp = await smtp.data(data)
            except SMTPResponseException as exc:
                # The DATA reply (or the 354's refusal) decides for every accepted recipient.
                reply = _fmt(exc.code, exc.message)
                for rcpt in accepted:
                    replies[rcpt] = reply
                if smtp.is_connected:
                    await _rset(smtp)
                return replies, smtp.is_connected
            final = _fmt(resp.code, resp.message)
            for rcpt in accepted:
                replies[rcpt] = final
            return replies, True
        except (SMTPException, OSError, TimeoutError) as exc:
            # The session broke mid-transaction.  Recipients already refused keep
            # their reply; the rest were not delivered (RFC 5321 §4.1.1.4: no final
            # reply to DATA means no delivery) and are retried.
            reply = _network_reply(exc, dest)
            for rcpt in rcpts:
                if rcpt in accepted or rcpt not in replies:
                    replies[rcpt] = reply
            smtp.close()
            return replies, False

    async def aclose(self) -> None:
        """QUIT and close every pooled connection."""
        pools, self._pools = self._pools, {}
        await asyncio.gather(
            *(_close(conn.smtp, quit=True) for pool in pools.values() for conn in pool.idle),
            return_exceptions=True,
        )


def _network_reply(exc: BaseException, dest: Destination) -> str:
    # Order matters: ssl.SSLError and SMTPServerDisconnected are OSErrors too.
    if isinstance(exc, ssl.SSLError):
        return f"451 4.7.10 TLS failure with {dest.label}: {exc}"
    if isinstance(exc, SMTPTimeoutError | TimeoutError):
        return f"451 4.4.2 Timeout talking to {dest.label}: {exc}"
    if isinstance(exc, SMTPServerDisconnected):
        return f"451 4.4.2 Connection to {dest.label} lost: {exc}"
    if isinstance(exc, SMTPConnectError | OSError):
        return f"451 4.4.1 Connection to {dest.label} failed: {exc}"
    return f"451 4.4.0 Error talking to {dest.label}: {exc}"


def _unsafe(address: str) -> bool:
    # Never let an address split the command line (RFC 5321 §2.3.8: CRLF ends commands).
    return any(c in address for c in "\r\n\0")


async def _command(
    smtp: aiosmtplib.SMTP, verb: bytes, address: str, options: list[str], encoding: str,
    ok: tuple[int, ...],
) -> SMTPResponse:
    """MAIL FROM / RCPT TO without aiosmtplib's address re-parsing (the spool holds
    addresses the receive side already validated; re-parsing costs more than the
    round trip on loopback)."""
    arg = verb + b"<" + address.encode(encoding) + b">"
    resp = await smtp.execute_command(arg, *(o.encode("ascii") for o in options))
    if resp.code not in ok:
        raise SMTPResponseException(resp.code, resp.message)
    return resp


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    # RFC 5321 §4.1.1.5: abort the transaction so the connection can carry another.
    if not smtp.is_connected:
        return
    try:
        await smtp.rset()
    except (SMTPException, OSError, TimeoutError):
        smtp.close()


async def _close(smtp: aiosmtplib.SMTP, *, quit: bool) -> None:
    if quit and smtp.is_connected:
        with contextlib.suppress(SMTPException, OSError, TimeoutError):
            await smtp.quit(timeout=5.0)
    smtp.close()
