"""Delivery to a next hop over SMTP (aiosmtplib), with per-recipient results.

One SMTP transaction carries a message to one destination host with all of that
destination's recipients (RFC 5321 §3.3).  Each RCPT reply is kept: a mixed
250/450/550 transaction yields delivered, deferred and bounced recipients.  The
commands are driven by this module (not ``sendmail``) so that every recipient's
reply, and the point where a session failed, are known exactly.

When the next hop advertises PIPELINING (RFC 2920), MAIL FROM, every RCPT TO and
DATA go out in one write and their replies are read back in order (§3.2); the
message body and its end-of-data go in a second write.  That is two writes and
two reply waits per message instead of one per command.  DATA ends the group
(§3.1: it must be the last command of a group, since what follows it is content).
Otherwise the commands go one by one.  Both paths give the same per-recipient
replies and the same session-failure and connection-reuse decisions.

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
and, for MX hosts that publish DNSSEC-signed TLSA records (RFC 7672, chosen by
gateway/deliver/deliverer.py, never by a route):
  dane           STARTTLS must be offered and succeed, and the certificate chain the
                 server sent must match one of the destination's TLSA records
                 (gateway/deliver/dane.py) before MAIL FROM; no CA is involved
  encrypt        STARTTLS must be offered and succeed, the certificate is not checked
                 (RFC 7672 §2.2: TLSA records present but none usable)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import aiosmtplib
from aiosmtplib import (
    SMTPConnectError,
    SMTPException,
    SMTPReadTimeoutError,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import SMTPProtocol, normalize_message_line_endings

from gateway.deliver import dane
from gateway.deliver.routes import TlsMode

_T = TypeVar("_T")

# A route's TLS modes, and the two only DANE (RFC 7672) asks for.
SessionTls = Literal[TlsMode, "dane", "encrypt"]
# The modes in which the session must not go on in clear (RFC 3207 §4).
_MANDATORY = ("required", "dane", "encrypt")


@dataclass(frozen=True, slots=True)
class Destination:
    """One host to connect to."""

    host: str  # what to connect to: an IP address, or a name for a smarthost
    port: int
    tls: SessionTls
    server_name: str  # the name the certificate must carry (SNI), and for logs
    tlsa: tuple[dane.Tlsa, ...] = ()  # usable TLSA records, for tls="dane"
    # The names a DANE-TA certificate may carry (RFC 7672 §3.2.2); () means server_name.
    tlsa_names: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.server_name}[{self.host}]:{self.port}"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a next hop said about one recipient it was asked about (:meth:`SmtpClient.probe`)."""

    reply: str  # "550 5.1.1 No such user", or what stopped the probe before RCPT TO
    answered: bool  # the reply is the next hop's answer to RCPT TO


@dataclass(slots=True)
class TransactionResult:
    replies: dict[str, str]  # every recipient -> the reply that decided it ("250 2.0.0 Ok")
    # True when the failure was in the session (connect, greeting, EHLO, TLS, MAIL),
    # before any recipient was judged individually: another MX host may do better.
    session_failed: bool = False
    # The next hop offered DSN (RFC 3461), so the sender's DSN parameters went with
    # the message and notices from here on are its business (§5.2.1).
    dsn: bool = False
    local_ip: str = ""  # our address in the session, when known (TLS reports)
    # The first transaction on its connection: a TLS report counts sessions (RFC 8460
    # §4.4), not the transactions a pooled connection carries.
    new_session: bool = True


def _fmt(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}".strip()


def _broken(smtp: aiosmtplib.SMTP, replies: dict[str, str], rcpts: list[str],
            accepted: list[str], reply: str) -> tuple[dict[str, str], bool]:
    """The session broke mid-transaction (one by one or pipelined alike): recipients
    already refused keep their reply; the rest were not delivered (RFC 5321 §4.1.1.4: no
    final reply to DATA means no delivery) and are retried.  The connection is dropped."""
    for rcpt in rcpts:
        if rcpt in accepted or rcpt not in replies:
            replies[rcpt] = reply
    smtp.close()
    return replies, False


@dataclass(slots=True)
class _Conn:
    smtp: aiosmtplib.SMTP
    uses: int = 0
    idle_since: float = 0.0
    sent: bool = False  # a transaction (not only probes) ran on it


@dataclass(slots=True)
class _Pool:
    sem: asyncio.Semaphore
    idle: list[_Conn] = field(default_factory=list)


class _SessionError(Exception):
    """A failure before any recipient was judged: every recipient gets ``reply``."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.local_ip = ""  # our end of the connection, when it got that far
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
        pipelining: bool = True,
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
        # Use RFC 2920 PIPELINING when the next hop offers it (False: always one by
        # one; the tests compare both paths against the same server).
        self.pipelining = pipelining
        self._pools: dict[tuple[str, int, str, str, tuple[dane.Tlsa, ...]], _Pool] = {}
        self.connections_opened = 0  # for tests and metrics: how much reuse we get

    def _pool(self, dest: Destination) -> _Pool:
        # The TLSA records are part of the key: a connection authenticated by one
        # set of records is not reused once DNS publishes another.
        key = (dest.host, dest.port, dest.tls, dest.server_name, dest.tlsa)
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
            if dest.tls in ("opportunistic", *_MANDATORY):
                await self._starttls(smtp, dest)
        except _SessionError as exc:
            exc.local_ip = local_ip(smtp)  # RFC 8460 §4.4 sending-mta-ip of a TLS failure
            await _close(smtp, quit=True)
            raise
        except SMTPResponseException as exc:
            smtp.close()
            raise _SessionError(_fmt(exc.code, exc.message)) from None
        except (SMTPException, OSError, ssl.SSLError, TimeoutError) as exc:
            smtp.close()
            raise _SessionError(_network_reply(exc, dest)) from None
        except BaseException:  # cancelled (a probe's timeout, a shutdown): never left open
            smtp.close()
            raise
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
        mandatory = dest.tls in _MANDATORY
        if not smtp.supports_extension("starttls"):
            if dest.tls == "required":
                # RFC 3207 §4: a client that requires TLS must not continue in clear.
                raise _SessionError(
                    "451 4.7.10 TLS required for this route but the next hop "
                    "does not offer STARTTLS"
                )
            if mandatory:  # RFC 7672 §2.2: a DANE host without STARTTLS is not used
                raise _SessionError("451 4.7.10 next hop does not offer STARTTLS")
            return
        # DANE authenticates with the TLSA records, not a CA (RFC 7672 §3.1): the
        # handshake itself checks nothing, the chain is judged below.
        ctx = self.verified_context if dest.tls == "required" else self.opportunistic_context
        try:
            await smtp.starttls(server_hostname=dest.server_name, tls_context=ctx)
        except SMTPResponseException as exc:
            if mandatory or not smtp.is_connected:
                raise _SessionError(
                    f"451 4.7.10 STARTTLS refused by next hop: {_fmt(exc.code, exc.message)}"
                ) from None
            return  # opportunistic: the server declined, carry on in clear
        except (ssl.SSLError, SMTPException, OSError) as exc:
            raise _SessionError(f"451 4.7.10 TLS handshake with {dest.label} failed: {exc}") \
                from None
        if dest.tls == "dane":
            # RFC 7672 §3: authenticated before anything else is said over TLS.
            why = dane.verify(dest.tlsa, peer_chain(smtp),
                              dest.tlsa_names or (dest.server_name,))
            if why is not None:
                raise _SessionError(f"451 4.7.10 {why}")
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

    async def _on_connection(
        self, dest: Destination, op: Callable[[_Conn], Awaitable[tuple[_T, bool]]],
    ) -> _T | _SessionError:
        """Run ``op`` (its result, whether the connection can be reused) on a pooled or
        new connection to ``dest``; the _SessionError that stopped it otherwise."""
        pool = self._pool(dest)
        async with pool.sem:
            for attempt in range(2):
                try:
                    conn, reused = await self._acquire(pool, dest)
                except _SessionError as exc:
                    return exc
                try:
                    value, reusable = await op(conn)
                except _SessionError as exc:
                    await self._release(pool, conn, False)
                    if reused and attempt == 0:
                        # The pooled connection went stale (the server closed it while
                        # idle): nothing was accepted, so a fresh connection is safe.
                        continue
                    return exc
                except asyncio.CancelledError:
                    # Abandoned (a probe's timeout, a shutdown): drop the connection
                    # rather than wait for the reply to a QUIT.
                    conn.smtp.close()
                    raise
                except BaseException:
                    await self._release(pool, conn, False)
                    raise
                await self._release(pool, conn, reusable)
                return value
        raise AssertionError("unreachable")  # pragma: no cover

    # -- the transaction -------------------------------------------------------
    async def send(
        self, dest: Destination, sender: str, rcpts: list[str], data: bytes,
        *, smtputf8: bool = False, mail_dsn: Sequence[str] = (),
        rcpt_dsn: Mapping[str, Sequence[str]] | None = None,
    ) -> TransactionResult:
        """Deliver ``data`` to ``rcpts`` at ``dest``; every recipient gets a reply.

        ``mail_dsn`` (RET, ENVID) and ``rcpt_dsn`` (NOTIFY, ORCPT per recipient) are
        the sender's RFC 3461 parameters, in the canonical form the envelope keeps
        them (ENVID and ORCPT still xtext): sent when the next hop offers DSN."""

        async def transaction(conn: _Conn) -> tuple[TransactionResult, bool]:
            smtp = conn.smtp
            new_session, conn.sent = not conn.sent, True
            dsn = smtp.supports_extension("dsn")
            replies, reusable = await self._transaction(
                smtp, dest, sender, rcpts, data, smtputf8=smtputf8,
                mail_dsn=mail_dsn if dsn else (), rcpt_dsn=(rcpt_dsn or {}) if dsn else {},
            )
            return TransactionResult(replies, dsn=dsn, local_ip=local_ip(smtp),
                                     new_session=new_session), reusable

        result = await self._on_connection(dest, transaction)
        if isinstance(result, _SessionError):
            return TransactionResult(dict.fromkeys(rcpts, result.reply), session_failed=True,
                                     local_ip=result.local_ip)
        return result

    # -- address verification ----------------------------------------------------
    async def probe(self, dest: Destination, rcpt: str) -> ProbeResult:
        """Ask ``dest`` whether it would take mail for ``rcpt``, sending none.

        ``MAIL FROM:<>``, ``RCPT TO:<rcpt>``, then ``RSET`` (RFC 5321 §4.1.1.5) so
        that the connection goes back to the pool; the null sender means no
        notice can come back to anyone (RFC 5321 §4.5.5).  This is Postfix's
        address verification; VRFY (§3.5.2) is disabled on most mail stores."""
        if _unsafe(rcpt):
            return ProbeResult("553 5.1.3 Invalid recipient address", answered=False)

        async def ask(conn: _Conn) -> tuple[ProbeResult, bool]:
            return await self._probe(conn.smtp, dest, rcpt)

        result = await self._on_connection(dest, ask)
        if isinstance(result, _SessionError):
            return ProbeResult(result.reply, answered=False)
        return result

    async def _probe(
        self, smtp: aiosmtplib.SMTP, dest: Destination, rcpt: str
    ) -> tuple[ProbeResult, bool]:
        options: list[str] = []
        encoding = "ascii"
        if not rcpt.isascii():
            if not smtp.supports_extension("smtputf8"):  # RFC 6531 §3.2
                return ProbeResult("553 5.6.7 Next hop does not support SMTPUTF8",
                                   answered=False), True
            options, encoding = ["SMTPUTF8"], "utf-8"
        try:
            await _command(smtp, b"MAIL FROM:", "", options, encoding, (250,))
        except SMTPResponseException as exc:
            reply = _fmt(exc.code, exc.message)
            if exc.code == 421 or not smtp.is_connected:
                raise _SessionError(reply) from None
            await _rset(smtp)
            return ProbeResult(reply, answered=False), smtp.is_connected
        except (SMTPException, OSError, TimeoutError) as exc:
            raise _SessionError(_network_reply(exc, dest)) from None
        try:
            resp = await _command(smtp, b"RCPT TO:", rcpt, (), encoding, (250, 251))
        except SMTPResponseException as exc:
            reply = _fmt(exc.code, exc.message)
            if exc.code == 421:  # RFC 5321 §3.8: the server is closing; not an answer
                smtp.close()
                return ProbeResult(reply, answered=False), False
            await _rset(smtp)
            return ProbeResult(reply, answered=True), smtp.is_connected
        except (SMTPException, OSError, TimeoutError) as exc:
            smtp.close()
            return ProbeResult(_network_reply(exc, dest), answered=False), False
        await _rset(smtp)
        return ProbeResult(_fmt(resp.code, resp.message), answered=True), smtp.is_connected

    async def probe_many(
        self, dest: Destination, rcpts: Sequence[str],
        answer: Callable[[str, ProbeResult], None],
        on_mail: Callable[[], None] = lambda: None,
    ) -> None:
        """:meth:`probe` for several recipients in one session: ``MAIL FROM:<>``, every
        ``RCPT TO``, ``RSET``; pipelined as one group when the next hop offers PIPELINING
        (RFC 2920 §3.1: RSET may sit anywhere in a group, so one round trip asks all).

        ``answer(rcpt, result)`` is called for each recipient as soon as its reply is
        read (a caller waiting on one recipient need not wait for the rest).  A failure
        before any RCPT is judged (connect, TLS, ``MAIL FROM:<>``) answers every one of
        them, as it would each one's own probe.  A ``421`` to an RCPT, or a connection
        lost or timed out at one, answers that recipient as its own probe would have
        been answered and ends the session: the recipients after it are left
        unanswered, for the caller to ask about again.  ``on_mail()`` is called when
        the next hop has accepted ``MAIL FROM:<>``: from then on a stall is a
        recipient's, before it the session's."""
        answered: set[str] = set()

        def reply(rcpt: str, result: ProbeResult) -> None:
            answered.add(rcpt)
            answer(rcpt, result)

        asked: list[str] = []
        for rcpt in rcpts:
            if _unsafe(rcpt):
                reply(rcpt, ProbeResult("553 5.1.3 Invalid recipient address", answered=False))
            else:
                asked.append(rcpt)
        if not asked:
            return

        async def ask(conn: _Conn) -> tuple[None, bool]:
            return None, await self._probe_many(conn.smtp, dest, asked, reply, on_mail)

        result = await self._on_connection(dest, ask)
        if isinstance(result, _SessionError):
            for rcpt in asked:
                if rcpt not in answered:
                    answer(rcpt, ProbeResult(result.reply, answered=False))

    async def _probe_many(
        self, smtp: aiosmtplib.SMTP, dest: Destination, rcpts: list[str],
        reply: Callable[[str, ProbeResult], None], on_mail: Callable[[], None],
    ) -> bool:
        """The session of :meth:`probe_many`; whether the connection can be reused.
        _SessionError before any recipient is answered (so a stale pooled connection
        is retried once by _on_connection, as for :meth:`probe`)."""
        options: list[str] = []
        encoding = "ascii"
        asked = rcpts
        if not all(r.isascii() for r in rcpts):
            if smtp.supports_extension("smtputf8"):  # RFC 6531 §3.4
                options, encoding = ["SMTPUTF8"], "utf-8"
            else:  # RFC 6531 §3.2: those addresses cannot be asked about; the rest can
                asked = [r for r in rcpts if r.isascii()]
                for rcpt in rcpts:
                    if not rcpt.isascii():
                        reply(rcpt, ProbeResult("553 5.6.7 Next hop does not support "
                                                "SMTPUTF8", answered=False))
        if self.pipelining and smtp.supports_extension("pipelining") and _plain("", asked):
            return await self._probe_group(smtp, dest, asked, options, encoding, reply,
                                           on_mail)
        return await self._probe_each(smtp, dest, asked, options, encoding, reply, on_mail)

    async def _probe_each(
        self, smtp: aiosmtplib.SMTP, dest: Destination, rcpts: list[str],
        options: list[str], encoding: str, reply: Callable[[str, ProbeResult], None],
        on_mail: Callable[[], None],
    ) -> bool:
        """One command at a time, each answered as :meth:`_probe` answers it."""
        if not rcpts:
            return True
        try:
            await _command(smtp, b"MAIL FROM:", "", options, encoding, (250,))
        except SMTPResponseException as exc:
            refused = _fmt(exc.code, exc.message)
            if exc.code == 421 or not smtp.is_connected:
                raise _SessionError(refused) from None
            await _rset(smtp)
            for rcpt in rcpts:
                reply(rcpt, ProbeResult(refused, answered=False))
            return smtp.is_connected
        except (SMTPException, OSError, TimeoutError) as exc:
            raise _SessionError(_network_reply(exc, dest)) from None
        on_mail()
        for rcpt in rcpts:
            try:
                resp = await _command(smtp, b"RCPT TO:", rcpt, (), encoding, (250, 251))
            except SMTPResponseException as exc:
                text = _fmt(exc.code, exc.message)
                if exc.code == 421:  # RFC 5321 §3.8: the server is closing; not an answer
                    smtp.close()
                    reply(rcpt, ProbeResult(text, answered=False))
                    return False
                reply(rcpt, ProbeResult(text, answered=True))
                continue
            except (SMTPException, OSError, TimeoutError) as exc:
                smtp.close()
                reply(rcpt, ProbeResult(_network_reply(exc, dest), answered=False))
                return False
            reply(rcpt, ProbeResult(_fmt(resp.code, resp.message), answered=True))
        await _rset(smtp)
        return smtp.is_connected

    async def _probe_group(
        self, smtp: aiosmtplib.SMTP, dest: Destination, rcpts: list[str],
        options: list[str], encoding: str, reply: Callable[[str, ProbeResult], None],
        on_mail: Callable[[], None],
    ) -> bool:
        """:meth:`_probe_each` as one RFC 2920 group ``MAIL``, ``RCPT``..., ``RSET``,
        its replies read in order (§3.2) by a :class:`_ReplyReader`; the same answers."""
        if not rcpts:
            return True
        protocol, transport = _group_transport(smtp, dest)
        group = [_line(b"MAIL FROM:", "", options, encoding)]
        group += [_line(b"RCPT TO:", rcpt, (), encoding) for rcpt in rcpts]
        group.append(b"RSET\r\n")  # RFC 5321 §4.1.1.5: the connection can carry another
        timeout = self.command_timeout
        reader = _ReplyReader(protocol)
        transport.set_protocol(reader)
        try:
            mail = await _write_group(smtp, protocol, reader, group, dest, timeout)
            refused = "" if mail.code == 250 else _fmt(mail.code, mail.message)
            if not refused:
                on_mail()
            for rcpt in rcpts:
                try:
                    resp = await reader.read(timeout)
                except (SMTPException, OSError, TimeoutError) as exc:
                    smtp.close()
                    if refused:  # the refused MAIL said it all (as _probe_each's)
                        break
                    reply(rcpt, ProbeResult(_network_reply(exc, dest), answered=False))
                    return False
                if refused:
                    continue  # a 503 behind the refused MAIL (answered below)
                text = _fmt(resp.code, resp.message)
                if resp.code == 421:  # RFC 5321 §3.8: the server is closing; not an answer
                    smtp.close()
                    reply(rcpt, ProbeResult(text, answered=False))
                    return False
                reply(rcpt, ProbeResult(text, answered=True))
            if refused:
                for rcpt in rcpts:
                    reply(rcpt, ProbeResult(refused, answered=False))
            if not smtp.is_connected:
                return False
            try:
                rset = await reader.read(timeout)
            except (SMTPException, OSError, TimeoutError):
                smtp.close()
                return False
            if rset.code != 250:
                smtp.close()
                return False
            return True
        finally:
            transport.set_protocol(protocol)

    async def _transaction(
        self, smtp: aiosmtplib.SMTP, dest: Destination, sender: str, rcpts: list[str],
        data: bytes, *, smtputf8: bool, mail_dsn: Sequence[str],
        rcpt_dsn: Mapping[str, Sequence[str]],
    ) -> tuple[dict[str, str], bool]:
        """(replies, whether the connection can be reused).  _SessionError before RCPT.

        ``mail_dsn``/``rcpt_dsn`` are sent as given: empty unless the next hop offers DSN."""
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
        options.extend(mail_dsn)  # RFC 3461 §4.3 RET, §4.4 ENVID

        if _unsafe(sender):
            return dict.fromkeys(rcpts, "553 5.1.7 Invalid sender address"), True
        if self.pipelining and smtp.supports_extension("pipelining") and _plain(sender, rcpts):
            return await self._pipelined(smtp, dest, sender, rcpts, data, options, encoding,
                                         rcpt_dsn)
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
                    resp = await _command(smtp, b"RCPT TO:", rcpt, rcpt_dsn.get(rcpt, ()),
                                          encoding, (250, 251))
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
            return _broken(smtp, replies, rcpts, accepted, _network_reply(exc, dest))

    async def _pipelined(
        self, smtp: aiosmtplib.SMTP, dest: Destination, sender: str, rcpts: list[str],
        data: bytes, options: list[str], encoding: str,
        rcpt_dsn: Mapping[str, Sequence[str]],
    ) -> tuple[dict[str, str], bool]:
        """:meth:`_transaction` with RFC 2920 command groups; the same results.

        The replies are read by a :class:`_ReplyReader` put in front of
        aiosmtplib's protocol for the length of the transaction: aiosmtplib reads
        exactly one reply per command written and would drop or strand the
        others of a group.  Connection, TLS, EHLO and RSET stay aiosmtplib's.
        """
        protocol, transport = _group_transport(smtp, dest)
        replies: dict[str, str] = {}
        sent: list[str] = []  # the recipients whose RCPT is in the group, in order
        group = [_line(b"MAIL FROM:", sender, options, encoding)]
        for rcpt in rcpts:
            if _unsafe(rcpt):
                replies[rcpt] = "553 5.1.3 Invalid recipient address"
                continue
            group.append(_line(b"RCPT TO:", rcpt, rcpt_dsn.get(rcpt, ()), encoding))
            sent.append(rcpt)
        group.append(b"DATA\r\n")  # RFC 2920 §3.1: DATA is the last command of a group
        timeout = self.command_timeout
        reader = _ReplyReader(protocol)
        transport.set_protocol(reader)
        try:
            mail = await _write_group(smtp, protocol, reader, group, dest, timeout)
            if mail.code != 250:
                reply = _fmt(mail.code, mail.message)
                # The RCPTs and DATA behind a refused MAIL are refused too (503): read
                # their replies so that the connection stays in step, then RSET.
                try:
                    for _ in sent:
                        await reader.read(timeout)
                    await _end_group(protocol, reader, timeout)
                except (SMTPException, OSError, TimeoutError):
                    smtp.close()
                    raise _SessionError(reply) from None
                transport.set_protocol(protocol)
                await _rset(smtp)
                return dict.fromkeys(rcpts, reply), smtp.is_connected

            accepted: list[str] = []
            try:
                for rcpt in sent:
                    resp = await reader.read(timeout)
                    replies[rcpt] = _fmt(resp.code, resp.message)
                    if resp.code in (250, 251):
                        accepted.append(rcpt)
                    elif resp.code == 421:
                        raise SMTPServerDisconnected(replies[rcpt])
                if not accepted:
                    await _end_group(protocol, reader, timeout)
                    transport.set_protocol(protocol)
                    await _rset(smtp)
                    return replies, smtp.is_connected
                start = await reader.read(timeout)
                if start.code == 354:
                    protocol.write(_wire_body(data))
                    resp = await reader.read(timeout)
                    if resp.code == 250:
                        final = _fmt(resp.code, resp.message)
                        for rcpt in accepted:
                            replies[rcpt] = final
                        return replies, True
                else:
                    resp = start
                # The DATA reply (or the 354's refusal) decides for every accepted recipient.
                reply = _fmt(resp.code, resp.message)
                for rcpt in accepted:
                    replies[rcpt] = reply
                transport.set_protocol(protocol)
                await _rset(smtp)
                return replies, smtp.is_connected
            except (SMTPException, OSError, TimeoutError) as exc:
                return _broken(smtp, replies, rcpts, accepted, _network_reply(exc, dest))
        finally:
            transport.set_protocol(protocol)

    async def aclose(self) -> None:
        """QUIT and close every pooled connection."""
        pools, self._pools = self._pools, {}
        await asyncio.gather(
            *(_close(conn.smtp, quit=True) for pool in pools.values() for conn in pool.idle),
            return_exceptions=True,
        )


def peer_chain(smtp: aiosmtplib.SMTP) -> list[bytes]:
    """The certificates the server sent in the TLS handshake (DER, leaf first),
    unverified.

    Python 3.13 has ``SSLObject.get_unverified_chain()``; 3.11 and 3.12 have it only
    on the private ``_sslobj`` (returning ``_ssl.Certificate`` objects).  Both are
    used here and only here, so moving to 3.13 changes this one function.
    """
    ssl_object = smtp.get_transport_info("ssl_object")
    if ssl_object is None:
        return []
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = ssl_object._sslobj.get_unverified_chain
    chain = getter() or []
    return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
            for c in chain]


def local_ip(smtp: aiosmtplib.SMTP) -> str:
    """Our address on ``smtp``'s connection ("" when it has none, or no more)."""
    if not smtp.is_connected:
        return ""
    try:
        sockname = smtp.get_transport_info("sockname")
    except SMTPException:
        return ""
    return str(sockname[0]) if isinstance(sockname, tuple) and sockname else ""


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
    smtp: aiosmtplib.SMTP, verb: bytes, address: str, options: Sequence[str], encoding: str,
    ok: tuple[int, ...],
) -> SMTPResponse:
    """MAIL FROM / RCPT TO without aiosmtplib's address re-parsing (the spool holds
    addresses the receive side already validated; re-parsing costs more than the
    round trip on loopback).  Options are ASCII but for an RFC 6533 utf-8 ORCPT,
    which only an SMTPUTF8 transaction carries."""
    arg = verb + b"<" + address.encode(encoding) + b">"
    resp = await smtp.execute_command(arg, *(o.encode(encoding) for o in options))
    if resp.code not in ok:
        raise SMTPResponseException(resp.code, resp.message)
    return resp


def _plain(sender: str, rcpts: list[str]) -> bool:
    # aiosmtplib refuses command arguments with control characters (ValueError);
    # such an address takes the one-by-one path so that it fails the same way.
    return not any(_CONTROL.search(a) for a in (sender, *rcpts))


def _line(verb: bytes, address: str, options: Sequence[str], encoding: str) -> bytes:
    """One command line of a group, as :func:`_command` would send it."""
    return b" ".join((verb + b"<" + address.encode(encoding) + b">",
                      *(o.encode(encoding) for o in options))) + b"\r\n"


def _wire_body(data: bytes) -> bytes:
    """The message as sent after 354: CRLF line ends, dot-stuffed, then end-of-data.

    The same bytes as aiosmtplib's ``data()`` sends (RFC 5321 §2.3.8 line ends,
    §4.5.2 transparency), without its two regular-expression passes when the
    message already has only CRLF line ends (the spool keeps them so; a
    transform stage might not) and no line that starts with a dot.
    """
    # Only CRLF line ends: ending in CRLF, no CR before anything but a LF, and as
    # many LFs as CRs (so each LF has its CR).  Counting the CRLF pairs themselves
    # cost more than twice this (a two-byte count on a 15 kB message: 25 us).
    if not (data.endswith(b"\r\n") and data.count(b"\r") == data.count(b"\n")
            and _CR_NOT_LF.search(data) is None):
        data = normalize_message_line_endings(data)
    # After normalisation every line starts at the beginning or after a LF.  (The
    # regular expression finds a line's dot in half the time ``in`` takes.)
    if _LINE_DOT.search(data) is not None:
        data = data.replace(b"\n.", b"\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


async def _end_group(protocol: SMTPProtocol, reader: _ReplyReader, timeout: float) -> None:
    """Read the DATA reply of a group whose transaction carries no recipient.

    A conforming server refuses that DATA (RFC 2920 §3.1: 503 or 554); one that
    answers 354 anyway gets an empty content (a lone end-of-data) so that the
    transaction ends without a message.
    """
    if (await reader.read(timeout)).code == 354:
        protocol.write(b".\r\n")
        await reader.read(timeout)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CR_NOT_LF = re.compile(rb"\r[^\n]")  # a bare CR (one at the very end has no byte after)
_LINE_DOT = re.compile(rb"\n\.")
_MAX_LINE = 8192  # as aiosmtplib: a reply line, and a whole reply four times that


def _parse_reply(buf: bytearray) -> SMTPResponse | None:
    """Take one complete (possibly multiline) reply off ``buf``; None if incomplete.

    RFC 5321 §4.2.1: ``code-text`` lines, the last one with a space after the
    code.  The text is kept as aiosmtplib keeps it (lines stripped, joined by LF).
    """
    offset = 0
    lines: list[bytes] = []
    while True:
        end = buf.find(b"\n", offset)
        if end < 0:
            if len(buf) - offset > _MAX_LINE:
                raise SMTPResponseException(-1, "Response too long")
            return None
        line = bytes(buf[offset:end + 1])
        if len(line) > _MAX_LINE:
            raise SMTPResponseException(-1, "Response too long")
        try:
            code = int(line[:3])
        except ValueError:
            raise SMTPResponseException(
                -1, f"Malformed SMTP response line: {line.decode('utf-8', 'ignore')}"
            ) from None
        offset = end + 1
        lines.append(line[4:].strip(b" \t\r\n"))
        if line[3:4] != b"-":
            del buf[:offset]
            return SMTPResponse(code, b"\n".join(lines).decode("utf-8", "surrogateescape"))


def _group_transport(
    smtp: aiosmtplib.SMTP, dest: Destination,
) -> tuple[SMTPProtocol, asyncio.BaseTransport]:
    """aiosmtplib's protocol and the transport under it, for a command group."""
    protocol = smtp.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None:
        raise _SessionError(_network_reply(SMTPServerDisconnected("Server not connected"),
                                           dest))
    return protocol, transport


async def _write_group(
    smtp: aiosmtplib.SMTP, protocol: SMTPProtocol, reader: _ReplyReader, group: list[bytes],
    dest: Destination, timeout: float | None,
) -> SMTPResponse:
    """Write an RFC 2920 command group and read the reply to its first command (MAIL).

    A network error or a 421 (RFC 5321 §3.8) closes the session and raises
    _SessionError: nothing in the group is judged yet, as with a failed MAIL FROM
    sent one command at a time."""
    try:
        protocol.write(b"".join(group))
        mail = await reader.read(timeout)
    except (SMTPException, OSError, TimeoutError) as exc:
        smtp.close()
        raise _SessionError(_network_reply(exc, dest)) from None
    if mail.code == 421:
        smtp.close()
        raise _SessionError(_fmt(mail.code, mail.message))
    return mail


class _ReplyReader(asyncio.Protocol):
    """Receives the replies to a command group, in order (RFC 2920 §3.2).

    It stands in for aiosmtplib's protocol on the transport during one pipelined
    transaction and passes the connection's loss and flow control on to it, so
    aiosmtplib still knows when the connection is gone.
    """

    def __init__(self, inner: SMTPProtocol) -> None:
        self._inner = inner
        self._buf = bytearray()
        self._replies: collections.deque[SMTPResponse] = collections.deque()
        self._error: SMTPException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buf += data
        try:
            while (resp := _parse_reply(self._buf)) is not None:
                self._replies.append(resp)
        except SMTPResponseException as exc:
            # The stream is out of step: nothing after this can be paired with a command.
            self._error = exc
        if len(self._buf) > 4 * _MAX_LINE:
            self._error = SMTPResponseException(-1, "Response too long")
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(SMTPServerDisconnected("Connection lost"))
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _fail(self, exc: SMTPException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, timeout: float | None) -> SMTPResponse:
        """The next reply; the replies received before a failure come first."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            # A timer rather than asyncio.wait_for: this wait happens twice per message.
            timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self._replies.popleft()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(SMTPReadTimeoutError("Timed out waiting for server response"))


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
