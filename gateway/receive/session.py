"""One SMTP session: aiosmtpd's protocol, adapted to hand messages to an Acceptor.

aiosmtpd (``aiosmtpd.smtp.SMTP``) gives us the asyncio protocol plumbing: the
stream reader, the STARTTLS transport switch (which discards plaintext sent
after STARTTLS — RFC 3207 §4.2, the CVE-2011-0411 class), the AUTH challenge
exchange and the reply writer.  It is subclassed, not configured, because its
defaults do not meet issue 2: replies without enhanced status codes, no
PIPELINING/ENHANCEDSTATUSCODES in EHLO, lenient address parsing, a DATA reader
that accepts bare LF and bare CR, no per-session command limit, no 421 on
idle timeout, and no graceful drain.  Each override says why it exists.

No policy lives here: relay control is :mod:`gateway.receive.relay_control`,
which recipients exist :mod:`gateway.receive.recipient_probe`, address syntax
:mod:`gateway.receive.addresses`, and everything after the end
of DATA is the Acceptor's (:class:`gateway.runner.Runner`), whose reply is sent
back verbatim.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import secrets
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException

from gateway import dsn_params, log, metrics, replies
from gateway.config import Config, ListenerConfig
from gateway.envelope import Envelope, TlsInfo
from gateway.receive import addresses, relay_control
from gateway.receive.addresses import AddressError, Mailbox
from gateway.receive.auth import PasswordFile
from gateway.receive.data import read_data
from gateway.receive.rate_limits import Client, Kind, RateLimiter
from gateway.receive.received import received_header
from gateway.receive.recipient_probe import RecipientGate
from gateway.replies import Reply
from gateway.runner import Acceptor

# --- replies used only by the SMTP dialogue (RFC 5321 §4.2.3, RFC 3463) ----------
BANNER_SUFFIX = "ESMTP Coffer"
HELO_FIRST = Reply(503, "5.5.1", "Send EHLO or HELO first")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
IN_TRANSACTION = Reply(503, "5.5.1", "Not permitted during a mail transaction")
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
ARG_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
PARAM_UNKNOWN = Reply(555, "5.5.4", "Unsupported MAIL or RCPT parameter")
DSN_PARAM = Reply(501, "5.5.4", "Invalid DSN parameter")  # RFC 3461 §4, RFC 3463 §3.6
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_ENCODING = Reply(500, "5.5.2", "Command is not valid UTF-8")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
AUTH_UNAVAILABLE = Reply(502, "5.5.1", "AUTH not available")
AUTH_MECH_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_BAD_BLOB = Reply(501, "5.5.2", "Cannot decode AUTH response")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
VRFY_REPLY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP_REPLY = Reply(214, "2.0.0", "Coffer: see RFC 5321")
STARTTLS_READY = "220 2.0.0 Ready to start TLS"
NOT_SMTP = Reply(421, "4.7.0", "This is an SMTP server, closing connection")

CLOSE_GRACE = 10.0  # seconds a closing connection may take to flush its last replies
MAX_ERRORS = 20  # like Postfix smtpd_hard_error_limit: then 421 and close
# Web-proxy probes (Postfix smtpd_forbidden_commands): not a mail client at all.
FORBIDDEN_COMMANDS = frozenset({"CONNECT", "GET", "POST", "PUT", "HEAD"})
# Commands whose reply may wait for the next one's (RFC 2920 §3.2; see SmtpSession):
# quick ones that neither change the connection (STARTTLS, QUIT), wait for the
# client (DATA, AUTH) nor end a group (EHLO, HELO, RFC 2920 §3.1).
HOLDABLE = frozenset({"MAIL", "RCPT", "RSET", "NOOP"})


class _NoHooks:
    """aiosmtpd wants a handler object; every hook it would call is overridden here."""


@dataclass(slots=True)
class SessionContext:
    """State shared by every session of one :class:`~gateway.receive.server.Listeners`."""

    cfg: Config
    acceptor: Acceptor
    rules: relay_control.RelayRules
    passwords: PasswordFile | None
    tls_context: ssl.SSLContext | None
    recipients: RecipientGate
    clock: Callable[[], float] = time.time
    limiter: RateLimiter | None = None  # rate_limits, None when there are none
    sessions: set[SmtpSession] = field(default_factory=set)
    per_ip: Counter[str] = field(default_factory=Counter)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    listeners: dict[str, ListenerConfig] = field(default_factory=dict)  # by name, current
    draining: bool = False
    all_closed: asyncio.Event = field(default_factory=asyncio.Event)

    def admit(self, session: SmtpSession) -> Reply | None:
        """Register a new connection; the 421 to send instead of the banner, if any."""
        limits = self.cfg.limits
        if self.draining:
            return replies.SHUTTING_DOWN
        if len(self.sessions) >= limits.max_connections:
            return replies.SERVICE_UNAVAILABLE.with_text("Too many connections, try again later")
        if self.per_ip[session.client_ip] >= limits.max_connections_per_ip:
            return replies.TOO_MANY_CONNECTIONS
        self.sessions.add(session)
        self.per_ip[session.client_ip] += 1
        self.all_closed.clear()
        return None

    def release(self, session: SmtpSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.per_ip[session.client_ip] -= 1
            if self.per_ip[session.client_ip] <= 0:
                del self.per_ip[session.client_ip]
        if not self.sessions:
            self.all_closed.set()


@dataclass(slots=True)
class _Transaction:
    """MAIL FROM .. end of DATA (RFC 5321 §3.3)."""

    sender: str
    options: list[str]
    smtputf8: bool
    recipients: list[str] = field(default_factory=list)
    rcpt_options: list[list[str]] = field(default_factory=list)  # one list per recipient
    commands: int = 1  # MAIL, RCPT and DATA so far: credited back if a message is accepted


@dataclass(frozen=True, slots=True)
class _Refused:
    """Why an RCPT is refused: a protocol error (no ``reason``) or a logged rejection."""

    reply: Reply
    reason: str | None = None  # None: SmtpSession._error; else _reject's reason
    fields: dict[str, Any] = field(default_factory=dict)  # for _reject's log line


class _LineTooLong(Exception):
    pass


def _client_ip(peer: Any) -> tuple[str, int]:
    if not isinstance(peer, tuple) or len(peer) < 2:
        return "", 0
    ip = str(peer[0])
    try:
        addr = ipaddress.ip_address(ip)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            ip = str(addr.ipv4_mapped)  # a dual-stack socket: report the IPv4 client
    except ValueError:
        pass
    return ip, int(peer[1])


class SmtpSession(SMTP):
    """One connection on one listener."""

    def __init__(self, ctx: SessionContext, listener: ListenerConfig) -> None:
        # A session keeps the configuration it started with; a reload
        # (Listeners.reconfigure) applies to the sessions that start after it.
        cfg = self.cfg = ctx.cfg
        self.rules = ctx.rules
        self.passwords = ctx.passwords
        self.ctx = ctx
        self.listener = listener
        self.max_line = cfg.limits.max_line_length
        # aiosmtpd sizes its StreamReader from line_length_limit inside __init__, so
        # set it first: one byte more than a text line for a stuffed dot (RFC 5321
        # §4.5.2).  Exact limits are checked per line below.
        self.line_length_limit = self.max_line + 1
        starttls = ctx.tls_context if listener.tls == "starttls" else None
        super().__init__(
            _NoHooks(),
            data_size_limit=cfg.limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=cfg.hostname,
            ident=BANNER_SUFFIX,
            tls_context=starttls,
            timeout=cfg.limits.idle_timeout,
            loop=asyncio.get_running_loop(),
        )
        self.implicit_tls = listener.tls == "implicit"
        self.sid = secrets.token_hex(5)
        self.client_ip = ""
        self.client_port = 0
        self.started = ctx.clock()
        self.commands = 0  # every command, for the session's log line
        # Commands counted against limits.max_commands: those of a transaction that
        # ended in an accepted message are taken off again, so the limit stops a client
        # that talks without sending mail (RSET/NOOP/VRFY loops, refused RCPT probes) and
        # never a relay that reuses one connection for many messages (Postfix's
        # smtpd_junk_command_limit has the same aim).
        self.charged = 0
        self.errors = 0
        self.auth_failures = 0
        self.messages = 0
        self._tx: _Transaction | None = None
        self._auth_user: str | None = None
        self.max_size = cfg.limits.max_message_size
        self._busy = 0  # >0 while *we* work (acceptor, argon2, TLS): not idle
        self._last_rx = self.loop.time()
        self._registered = False
        self._closing_reason = ""
        # RFC 2920 §3.2: replies to a pipelined group may be held back and written
        # together, as long as they are sent before the server waits for the
        # client.  A reply is held only for a command in HOLDABLE and only while
        # the next command line is already buffered (so the next read does not
        # block, and its reply - held or not - comes after); the first reply not
        # held, or a 421 from _close_now, writes them all first.  The client of a
        # MAIL, RCPT, DATA group then gets the three replies in one write.
        self._trusted: bool | None = None  # _trusted_client(), once known
        self._held = bytearray()
        self._may_hold = False
        self._handlers: dict[str, Callable[[str | None], Awaitable[None]]] = {
            "HELO": self.smtp_HELO, "EHLO": self.smtp_EHLO, "MAIL": self.smtp_MAIL,
            "RCPT": self.smtp_RCPT, "DATA": self.smtp_DATA, "RSET": self.smtp_RSET,
            "NOOP": self.smtp_NOOP, "QUIT": self.smtp_QUIT, "VRFY": self.smtp_VRFY,
            "EXPN": self.smtp_EXPN, "HELP": self.smtp_HELP, "STARTTLS": self.smtp_STARTTLS,
            "AUTH": self.smtp_AUTH,
        }

    # ------------------------------------------------------------------ state
    @property
    def is_tls(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    @property
    def auth_user(self) -> str | None:
        return self._auth_user

    def tls_info(self) -> TlsInfo | None:
        if not self.is_tls or self.transport is None:
            return None
        obj = self.transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        cipher = obj.cipher()
        return TlsInfo(version=str(obj.version()), cipher=str(cipher[0] if cipher else ""))

    def _set_post_data_state(self) -> None:
        # Override: aiosmtpd calls this on connect, after STARTTLS (RFC 3207 §4.2:
        # forget everything) and after DATA; our transaction must go with its own.
        self.envelope = self._create_envelope()
        self._tx = None

    async def push(self, status: AnyStr) -> None:
        # Override to give aiosmtpd's own STARTTLS reply an enhanced status code
        # (RFC 2034 §3), rather than copying its transport switch, and to write
        # the replies to a pipelined group together (RFC 2920 §3.2, see _hold).
        if status == "220 Ready to start TLS":
            status = STARTTLS_READY  # type: ignore[assignment]
        response = status.encode() if isinstance(status, str) else status
        if self._may_hold and self._next_command_buffered():
            self._held += response + b"\r\n"
            return
        if self._held:
            response = bytes(self._held) + response
            self._held.clear()
        await super().push(response)

    def _next_command_buffered(self) -> bool:
        """True if the client's next command line is already in the reader's buffer,
        so that reading it will not wait for the client."""
        # StreamReader has no public way to look at its buffer; without one (another
        # implementation) nothing is held back, which is always correct.
        buffered = getattr(self._reader, "_buffer", None)
        return isinstance(buffered, bytearray) and b"\n" in buffered

    def _flush_held(self) -> None:
        """Write the replies held back, before anything else is written."""
        if self._held:
            transport = self._writer_transport()
            if transport is not None and not transport.is_closing():
                transport.write(bytes(self._held))
            self._held.clear()

    async def reply(self, r: Reply) -> None:
        await self.push(str(r))

    def _writer_transport(self) -> asyncio.WriteTransport | None:
        # Duck-typed on purpose: uvloop's transports do not subclass asyncio's.
        return cast("asyncio.WriteTransport | None", self.transport)

    def _close_now(self, r: Reply, reason: str) -> None:
        """Send a final reply (421) and close; safe to call from outside the session task."""
        self._closing_reason = self._closing_reason or reason
        transport = self._writer_transport()
        if transport is not None and not transport.is_closing():
            self._flush_held()
            transport.write(f"{r}\r\n".encode())
            self._close_transport()

    def _close_transport(self) -> None:
        transport = self._writer_transport()
        if transport is None:
            return
        transport.close()
        # close() waits for unsent replies; a client that stops reading would
        # keep the connection forever, so it is cut after a grace period.
        try:
            unsent = transport.get_write_buffer_size()
        except AttributeError:  # a TLS transport whose TLS layer is already gone
            unsent = 0
        if unsent:
            self.loop.call_later(CLOSE_GRACE, transport.abort)

    def kill(self) -> None:
        """Drop the connection now, sent or not (the last step of a shutdown)."""
        transport = self._writer_transport()
        if transport is not None:
            transport.abort()

    # ------------------------------------------------------- connection events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        # RFC 3207 §4.2: after STARTTLS the client is not authenticated (aiosmtpd
        # also replaces self.session and clears the plaintext read buffer).
        self._auth_user = None
        super().connection_made(transport)
        if first:
            self.client_ip, self.client_port = _client_ip(transport.get_extra_info("peername"))
            if self._handler_coroutine is not None:
                self.ctx.tasks.add(self._handler_coroutine)
                self._handler_coroutine.add_done_callback(self.ctx.tasks.discard)

    def data_received(self, data: bytes) -> None:
        # Override: remember when the client last sent anything, for the idle timer.
        self._last_rx = self.loop.time()
        super().data_received(data)

    def eof_received(self) -> bool | None:
        # Override: aiosmtpd cancels the session at EOF, dropping commands the
        # client pipelined just before closing its side (QUIT included).  We
        # only mark the reader at EOF: the loop answers what is buffered, then
        # stops on IncompleteReadError and closes.
        asyncio.StreamReaderProtocol.eof_received(self)
        return not self.is_tls  # keep the write side open, except over TLS (no half-close)

    def connection_lost(self, error: Exception | None) -> None:
        if self._registered:
            self._registered = False
            self.ctx.release(self)
            log.event(
                "smtp_disconnect", session=self.sid, listener=self.listener.name,
                client=self.client_ip, commands=self.commands, messages=self.messages,
                seconds=round(self.ctx.clock() - self.started, 3),
                reason=self._closing_reason or ("error" if error else "closed"),
            )
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        # Override: aiosmtpd closes silently and counts idleness from the last
        # command, so a long DATA upload would be cut.  We count from the last
        # byte received, never while we are the ones working, and say 421 4.4.2.
        if self.transport is None:
            return
        idle = self.loop.time() - self._last_rx
        if self._busy or idle < self._timeout_duration:
            left = self._timeout_duration - (0 if self._busy else idle)
            self._reset_timeout(max(left, 0.01))
            return
        metrics.REJECTED.labels("idle_timeout").inc()
        self._close_now(replies.IDLE_TIMEOUT, "idle_timeout")

    def begin_drain(self) -> None:
        """Shutdown: an idle session is told 421 now; a busy one after its transaction."""
        if self._tx is None and not self._busy:
            self._close_now(replies.SHUTTING_DOWN, "shutdown")

    def abort(self) -> None:
        """End of the drain period: 421 and close whatever the session was doing."""
        self._close_now(replies.SHUTTING_DOWN, "shutdown")

    # ------------------------------------------------------------ command loop
    async def _handle_client(self) -> None:
        # Override of aiosmtpd's loop, for: connection limits at connect, one
        # command limit per session, enhanced status codes, 421 and close on
        # shutdown between transactions, and the hard error limit.
        try:
            refusal = self.ctx.admit(self)
            if refusal is not None:
                reason = "shutdown" if self.ctx.draining else "too_many_connections"
                metrics.REJECTED.labels(reason).inc()
                log.event("smtp_refused", listener=self.listener.name, client=self.client_ip,
                          reply=str(refusal))
                self._close_now(refusal, reason)
                return
            self._registered = True
            metrics.CONNECTIONS.labels(self.listener.name).inc()
            log.event("smtp_connect", session=self.sid, listener=self.listener.name,
                      role=self.listener.role, client=self.client_ip, port=self.client_port,
                      tls=self.implicit_tls)
            await self.push(f"220 {self.hostname} {BANNER_SUFFIX}")
            while self.transport is not None and not self.transport.is_closing():
                if self.ctx.draining and self._tx is None:
                    self._close_now(replies.SHUTTING_DOWN, "shutdown")
                    return
                try:
                    line = await self._read_command()
                except _LineTooLong:
                    metrics.REJECTED.labels("line_too_long").inc()
                    await self._error(replies.LINE_TOO_LONG)
                    continue
                await self._dispatch(line)
        except TLSSetupException:
            self._closing_reason = "tls_failed"
            log.event("smtp_tls_failed", session=self.sid, client=self.client_ip)
            # The handshake never completed, so asyncio's TLS layer will never
            # call connection_lost: close the TCP connection and release the
            # session here (as aiosmtpd does).
            if self._original_transport is not None:
                self._original_transport.close()
            self.connection_lost(None)
        except (asyncio.IncompleteReadError, ConnectionError):
            self._closing_reason = self._closing_reason or "client_closed"
        except Exception as exc:  # a bug of ours: log it, tell the client 421, never a traceback
            log.event("smtp_session_error", logging.ERROR, session=self.sid,
                      client=self.client_ip, error=f"{type(exc).__name__}: {exc}")
            self._close_now(replies.SERVICE_UNAVAILABLE.with_text(
                "Local error, closing connection"), "error")
        finally:
            # At EOF, or when cancelled by connection_lost, the transport may
            # still be half open: close it so none is ever left behind.
            self._close_transport()

    async def _read_command(self) -> bytes:
        try:
            line: bytes = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            await self._discard_long_line(exc.consumed)
            raise _LineTooLong from None
        if len(line) > self.max_line:  # RFC 5321 §4.5.3.1.4: command line incl. CRLF
            raise _LineTooLong
        return line

    async def _discard_long_line(self, consumed: int) -> None:
        await self._reader.read(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)

    async def _dispatch(self, line: bytes) -> None:
        self.commands += 1
        self.charged += 1
        if self.charged > self.cfg.limits.max_commands:
            metrics.REJECTED.labels("too_many_commands").inc()
            self._close_now(replies.TOO_MANY_COMMANDS, "too_many_commands")
            return
        # Commands may end in a bare LF (as Postfix's default accepts); a CR
        # anywhere else in the line is not SMTP.
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if b"\r" in line or not line:
            await self._error(replies.SYNTAX_ERROR)
            return
        verb_b, _, arg_b = line.partition(b" ")
        try:
            verb = verb_b.decode("ascii").upper()
            arg = arg_b.decode("utf-8").strip() or None
        except UnicodeDecodeError:
            await self._error(BAD_ENCODING)
            return
        if verb in FORBIDDEN_COMMANDS:
            metrics.REJECTED.labels("not_smtp").inc()
            self._close_now(NOT_SMTP, "not_smtp")
            return
        handler = self._handlers.get(verb)
        if handler is None:
            await self._error(replies.SYNTAX_ERROR)
            return
        self._may_hold = verb in HOLDABLE
        try:
            await handler(arg)
        finally:
            self._may_hold = False
        # Drain: after the reply that ends (or when there is no) transaction.
        if self.ctx.draining and self._tx is None:
            self._close_now(replies.SHUTTING_DOWN, "shutdown")

    async def _error(self, r: Reply) -> None:
        """Reply with an error; after MAX_ERRORS of them, 421 and close."""
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            metrics.REJECTED.labels("too_many_errors").inc()
            self._close_now(TOO_MANY_ERRORS, "too_many_errors")
            return
        await self.reply(r)

    async def _reject(self, r: Reply, reason: str, *, ours: bool = False,
                      **fields: Any) -> None:
        """Refuse, logged and counted.  ``ours``: the cause is this server's (a full
        spool, an archive outage), which says nothing about the client: not one of
        its errors, so a client retrying through our outage is not cut off with 421."""
        metrics.REJECTED.labels(reason).inc()
        log.event("smtp_reject", session=self.sid, listener=self.listener.name,
                  client=self.client_ip, reason=reason, reply=str(r), **fields)
        if ours:
            await self.reply(r)
        else:
            await self._error(r)

    def _auth_missing(self) -> bool:
        return self.listener.auth_required and not self.auth_user

    # ---------------------------------------------------------------- commands
    async def smtp_HELO(self, arg: str | None) -> None:
        await self._hello(arg, extended=False)

    async def smtp_EHLO(self, arg: str | None) -> None:
        await self._hello(arg, extended=True)

    async def _hello(self, arg: str | None, *, extended: bool) -> None:
        if not arg:
            await self._error(ARG_SYNTAX.with_text("Syntax: EHLO hostname"))
            return
        assert self.session is not None
        # RFC 5321 §4.1.4: EHLO/HELO also resets any transaction in progress.
        self._set_post_data_state()
        self.session.host_name = arg
        self.session.extended_smtp = extended
        if not extended:
            await self.push(f"250 {self.hostname}")
            return
        lines = [
            self.hostname, "PIPELINING", f"SIZE {self.max_size}", "8BITMIME",
            "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN",  # DSN: RFC 3461 §4
        ]
        if self.tls_context is not None and not self.is_tls:
            lines.append("STARTTLS")
        # RFC 4954 §4 + RFC 3207: AUTH is offered only under TLS, never in clear.
        if self.is_tls and self.passwords is not None:
            lines.append("AUTH PLAIN LOGIN")
        text = "\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}"
        await self.push(text)

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.reply(replies.OK)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self._error(ARG_SYNTAX)
            return
        self._set_post_data_state()
        await self.reply(replies.RESET_OK)

    async def smtp_QUIT(self, arg: str | None) -> None:
        self._closing_reason = "quit"
        await self.reply(replies.BYE)
        self._close_transport()

    async def smtp_VRFY(self, arg: str | None) -> None:
        # RFC 5321 §3.5.3: 252 neither confirms nor denies (no address harvesting).
        await self.reply(VRFY_REPLY if arg else ARG_SYNTAX)

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.reply(NOT_IMPLEMENTED)

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.reply(HELP_REPLY)

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self._error(ARG_SYNTAX)
        elif self.is_tls:
            await self._error(ALREADY_TLS)
        elif self.tls_context is None:
            await self._error(TLS_UNAVAILABLE)
        elif self._tx is not None:
            await self._error(IN_TRANSACTION)
        else:
            # aiosmtpd does the switch; its connection_made then clears the
            # reader's buffer, so commands pipelined after STARTTLS in clear
            # text are discarded, never run inside TLS (RFC 3207 §4.2).
            self._busy += 1
            try:
                await super().smtp_STARTTLS(None)
            finally:
                self._busy -= 1
            log.event("smtp_starttls", session=self.sid, client=self.client_ip,
                      tls=str(self.tls_info()))

    async def smtp_AUTH(self, arg: str | None) -> None:
        # Own implementation instead of aiosmtpd's: argon2 runs in an executor
        # (it would block the loop), failures are counted, replies are ours.
        assert self.session is not None
        if not self.session.host_name or not self.session.extended_smtp:
            await self._error(HELO_FIRST.with_text("Send EHLO first"))
            return
        if not self.is_tls:
            await self._reject(replies.AUTH_TLS_REQUIRED, "auth_without_tls")
            return
        if self.passwords is None:
            await self._error(AUTH_UNAVAILABLE)
            return
        if self.auth_user:
            await self._error(ALREADY_AUTH)
            return
        if self._tx is not None:  # RFC 4954 §4: not during a mail transaction
            await self._error(IN_TRANSACTION)
            return
        args = (arg or "").split()
        if not args or len(args) > 2:
            await self._error(ARG_SYNTAX)
            return
        mechanism = args[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            await self._error(AUTH_MECH_UNKNOWN)
            return
        try:
            creds = await (self._auth_plain(args[1:]) if mechanism == "PLAIN"
                           else self._auth_login(args[1:]))
        except ValueError:  # a response line over the reader's limit
            await self._error(replies.LINE_TOO_LONG)
            return
        if creds is None:  # the exchange was aborted or malformed; already answered
            await self._auth_failed(None, answered=True)
            return
        user, password = creds
        self._busy += 1
        try:
            ok = await self.loop.run_in_executor(
                None, self.passwords.verify, user, password
            )
        finally:
            self._busy -= 1
        if not ok:
            await self._auth_failed(user, answered=False)
            return
        self.session.authenticated = True
        self._auth_user = user
        log.event("smtp_auth", session=self.sid, client=self.client_ip, user=user,
                  mechanism=mechanism)
        await self.reply(replies.AUTH_OK)

    async def _auth_failed(self, user: str | None, *, answered: bool) -> None:
        self.auth_failures += 1
        metrics.REJECTED.labels("auth_failed").inc()
        log.event("smtp_auth_failed", session=self.sid, client=self.client_ip, user=user,
                  failures=self.auth_failures)
        if self.auth_failures >= self.cfg.limits.max_auth_failures:
            self._close_now(TOO_MANY_AUTH_FAILURES, "auth_failures")
        elif not answered:
            await self.reply(replies.AUTH_FAILED)

    async def _challenge(self, text: str) -> bytes | None:
        blob = await self.challenge_auth(text)  # 334; answers 501 itself on '*' or bad base64
        return None if blob is MISSING else bytes(blob)

    async def _initial(self, value: str) -> bytes | None:
        if value == "=":  # RFC 4954 §4: an empty initial response
            return b""
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            await self.reply(AUTH_BAD_BLOB)
            return None

    async def _auth_plain(self, rest: list[str]) -> tuple[str, str] | None:
        blob = await (self._initial(rest[0]) if rest else self._challenge(""))
        if blob is None:
            return None
        parts = blob.split(b"\0")
        # RFC 4616 §2: [authzid] NUL authcid NUL passwd; acting as another
        # identity (authzid != authcid) is not supported.
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            await self.reply(AUTH_BAD_BLOB)
            return None
        return self._decode_creds(parts[1], parts[2])

    async def _auth_login(self, rest: list[str]) -> tuple[str, str] | None:
        user = await (self._initial(rest[0]) if rest else self._challenge("Username:"))
        if user is None:
            return None
        password = await self._challenge("Password:")
        if password is None:
            return None
        return self._decode_creds(user, password)

    @staticmethod
    def _decode_creds(user: bytes, password: bytes) -> tuple[str, str] | None:
        try:
            return user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            return "", ""  # cannot match any user: counted as a failure

    async def smtp_MAIL(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.host_name:
            await self._error(HELO_FIRST)
            return
        if self._auth_missing():
            await self._reject(replies.AUTH_REQUIRED, "auth_required")
            return
        if self._tx is not None:
            await self._error(NESTED_MAIL)
            return
        split = addresses.split_argument(arg or "", "FROM:")
        if split is None or (split[1] and not self.session.extended_smtp):
            bad_path = split is None and (arg or "").upper().startswith("FROM:") and \
                len(arg or "") > 5
            await self._error(replies.BAD_SENDER_SYNTAX if bad_path else MAIL_SYNTAX)
            return
        path, raw_params = split
        params = addresses.parse_params(raw_params)
        if params is None:
            await self._error(MAIL_SYNTAX)
            return
        options: list[str] = []
        size = 0
        for key, value in params.items():
            if key == "SIZE":  # RFC 1870
                if value is None or not value.isdigit():
                    await self._error(MAIL_SYNTAX)
                    return
                size = int(value)
                if size > self.max_size:
                    await self._reject(replies.MESSAGE_TOO_BIG, "message_too_big", declared=size)
                    return
            elif key == "BODY":  # RFC 6152 (8BITMIME); BINARYMIME is not offered
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    await self._error(PARAM_UNKNOWN)
                    return
                value = value.upper()
            elif key == "SMTPUTF8":  # RFC 6531 §3.4
                if value is not None:
                    await self._error(MAIL_SYNTAX)
                    return
            elif key in dsn_params.MAIL_KEYS:  # RFC 3461 §4.3 RET, §4.4 ENVID
                try:
                    options.append(dsn_params.mail_param(key, value))
                except dsn_params.DsnParamError as exc:
                    await self._error(DSN_PARAM.with_text(f"Invalid DSN parameter: {exc}"))
                    return
                continue
            elif key != "AUTH":  # RFC 4954 §5: accepted, recorded, not trusted
                await self._error(PARAM_UNKNOWN)
                return
            options.append(key if value is None else f"{key}={value}")
        smtputf8 = "SMTPUTF8" in params
        if path == "<>":  # RFC 5321 §4.5.5: the null reverse-path (bounces)
            sender = ""
        else:
            try:
                mailbox = addresses.parse_path(path)
            except AddressError as exc:
                await self._reject(replies.BAD_SENDER_SYNTAX, "bad_sender_syntax",
                                   detail=str(exc))
                return
            if not mailbox.is_ascii and not smtputf8:
                await self._reject(NEED_SMTPUTF8, "smtputf8_required")
                return
            sender = mailbox.address
        room = self.ctx.acceptor.room_for(size)
        if room is not None:
            await self._reject(room, "no_room", ours=True, declared=size)
            return
        limited = self._rate_limited("messages", sender)
        if limited is not None:
            await self._reject(limited, "rate_limited", sender=sender, user=self.auth_user)
            return
        self._tx = _Transaction(sender=sender, options=options, smtputf8=smtputf8)
        await self.reply(replies.SENDER_OK)

    async def smtp_RCPT(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.host_name:
            await self._error(HELO_FIRST)
            return
        if self._auth_missing():
            await self._reject(replies.AUTH_REQUIRED, "auth_required")
            return
        tx = self._tx
        if tx is None:
            await self._error(NEED_MAIL)
            return
        parsed = self._parse_rcpt(arg, tx)
        if isinstance(parsed, _Refused):
            if parsed.reason is None:
                await self._error(parsed.reply)
            else:
                await self._reject(parsed.reply, parsed.reason, **parsed.fields)
            return
        mailbox, options = parsed
        if mailbox.address in tx.recipients:  # the same mailbox twice: deliver once
            await self.reply(replies.RECIPIENT_OK)
            return
        if len(tx.recipients) >= self.cfg.limits.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 so the client sends the rest in another transaction.
            await self._reject(replies.TOO_MANY_RECIPIENTS, "too_many_recipients")
            return
        # The current recipient checks, not those of the session's start: a reload
        # retires the old ones (their list is stale, their probe client closed).
        gate = self.ctx.recipients
        if gate.active and self.rules.is_local(mailbox) and not self.rules.is_journal(mailbox):
            # Pipelined RCPTs behind this one (RFC 2920): probe them along with it.
            if self._next_command_buffered() and gate.would_probe(mailbox) is not None:
                self._probe_buffered(gate, mailbox, tx)
            self._busy += 1  # a probe waits for the next hop, not for the client
            try:
                refusal = await gate.refusal(mailbox)
            finally:
                self._busy -= 1
            if refusal is not None:
                await self._reject(refusal.reply, refusal.reason, recipient=mailbox.address,
                                   next_hop_reply=refusal.detail or None)
                return
        limited = self._rate_limited("recipients", tx.sender)
        if limited is not None:
            await self._reject(limited, "rate_limited", recipient=mailbox.address,
                               user=self.auth_user)
            return
        tx.recipients.append(mailbox.address)
        tx.rcpt_options.append(options)
        tx.commands += 1  # refused RCPTs stay charged: address probing is what to stop
        await self.reply(replies.RECIPIENT_OK)

    def _parse_rcpt(
        self, arg: str | None, tx: _Transaction,
    ) -> tuple[Mailbox, list[str]] | _Refused:
        """RCPT's argument as the recipient and its DSN options, or why it is refused
        (syntax, parameters, SMTPUTF8, relay control).  No effect on the session: the
        same answer for a command's own turn and for a look at it while it waits in the buffer."""
        split = addresses.split_argument(arg or "", "TO:")
        if split is None:
            bad_path = (arg or "").upper().startswith("TO:") and len(arg or "") > 3
            return _Refused(replies.BAD_MAILBOX_SYNTAX if bad_path else RCPT_SYNTAX)
        path, raw_params = split
        assert self.session is not None
        if raw_params and not self.session.extended_smtp:
            # Extension parameters need EHLO (RFC 5321 §2.2.1).
            return _Refused(RCPT_SYNTAX)
        params = addresses.parse_params(raw_params)
        if params is None:  # malformed, or a parameter given twice
            return _Refused(DSN_PARAM.with_text("Syntax error in RCPT parameters"))
        options: list[str] = []
        for key, value in params.items():
            if key not in dsn_params.RCPT_KEYS:  # RFC 3461 §4.1 NOTIFY, §4.2 ORCPT only
                return _Refused(PARAM_UNKNOWN)
            try:
                options.append(dsn_params.rcpt_param(key, value, smtputf8=tx.smtputf8))
            except dsn_params.DsnParamError as exc:
                return _Refused(DSN_PARAM.with_text(f"Invalid DSN parameter: {exc}"))
        try:
            mailbox = self._recipient(path)
        except AddressError as exc:
            return _Refused(replies.BAD_MAILBOX_SYNTAX, "bad_recipient_syntax",
                            {"detail": str(exc)})
        if not mailbox.is_ascii and not tx.smtputf8:
            return _Refused(NEED_SMTPUTF8, "smtputf8_required")
        if self.rules.is_journal(mailbox):
            # Never relayed (archived only): its sources decide, not relay control.
            denied = relay_control.check_journal(self.rules, mailbox, self.client_ip,
                                                 authenticated=self.auth_user is not None)
            reason = "journal_denied"
        else:
            may_relay = self.auth_user is not None or self._trusted_client()
            denied = relay_control.check_recipient(self.rules, mailbox, may_relay=may_relay)
            reason = "relay_denied"
        if denied is not None:
            return _Refused(denied, reason, {"recipient": mailbox.address})
        return mailbox, options

    def _probe_buffered(self, gate: RecipientGate, mailbox: Mailbox, tx: _Transaction) -> None:
        """``mailbox`` needs a probe: probe with it the recipients of the RCPTs the
        client has already sent after it (RFC 2920 pipelining) that would need one at
        their turn, so that N pipelined RCPTs wait for one next-hop session, not N.

        Only what their turn would probe: each line is read as its turn reads it; the
        look stops at the first command that is not RCPT (it may end the transaction)
        and at what the transaction's recipient limit, the session's command limit or
        its error limit would not let through.  A malformed RCPT is left to its turn.
        Nothing is read from the client: the replies still go one per command, in order."""
        limits = self.cfg.limits
        room = limits.max_recipients - len(tx.recipients) - 1  # this RCPT takes one
        commands = limits.max_commands - self.charged
        errors = MAX_ERRORS - self.errors - 1  # the one that closes the session is not run
        seen = {mailbox.address, *tx.recipients}
        together = [mailbox]
        for arg in self._buffered_rcpts():
            commands -= 1
            if commands < 0 or room <= 0 or errors <= 0:
                break
            parsed = self._parse_rcpt(arg, tx)
            if isinstance(parsed, _Refused):
                errors -= 1
                continue
            other = parsed[0]
            if other.address in seen:  # answered 250 at its turn without a check
                continue
            seen.add(other.address)
            room -= 1
            if self.rules.is_local(other) and not self.rules.is_journal(other):
                together.append(other)
        if len(together) > 1:
            gate.probe_together(together)

    def _buffered_rcpts(self) -> Iterator[str | None]:
        """The arguments of the RCPT commands at the head of the reader's buffer (the
        complete lines only), read as _dispatch reads a line; stops at anything else."""
        buffered = getattr(self._reader, "_buffer", None)  # see _next_command_buffered
        if not isinstance(buffered, bytearray):
            return
        end = buffered.rfind(b"\n")
        for raw in bytes(buffered[:end + 1]).split(b"\n")[:-1]:
            if len(raw) + 1 > self.max_line:
                return
            line = raw[:-1] if raw.endswith(b"\r") else raw
            verb, _, arg_b = line.partition(b" ")
            if verb.upper() != b"RCPT" or b"\r" in line:
                return
            try:
                yield arg_b.decode("utf-8").strip() or None
            except UnicodeDecodeError:
                continue  # answered 500 at its turn

    def _trusted_client(self) -> bool:
        """Whether the client is in a trusted network (relay.trusted_networks).

        Asked once per connection: the address and the rules (kept from the
        session's start) do not change, and parsing the address for every RCPT
        cost more than the rest of the relay check."""
        if self._trusted is None:
            self._trusted = self.rules.is_trusted(self.client_ip)
        return self._trusted

    def _rate_limited(self, kind: Kind, sender: str) -> Reply | None:
        """The 450 4.7.1 if this MAIL or RCPT is over a rate limit, else None (and
        counted).  Checked last, so that only what would be accepted is counted."""
        limiter = self.ctx.limiter
        if limiter is None:
            return None
        client = Client(self.listener.name, self.listener.role, self.client_ip,
                        self.auth_user, self._trusted_client())
        return limiter.check(client, kind, sender)

    def _recipient(self, path: str) -> Mailbox:
        # RFC 5321 §4.5.1: "<Postmaster>" without a domain must be accepted; it
        # means the postmaster of our first local domain.
        if path.lower() == "<postmaster>":
            local = sorted(self.rules.local_domains)
            if not local:
                raise AddressError("no local domain for <Postmaster>")
            return Mailbox(local="postmaster", domain=local[0])
        return addresses.parse_path(path)

    async def smtp_DATA(self, arg: str | None) -> None:
        assert self.session is not None
        tx = self._tx
        if not self.session.host_name:
            await self._error(HELO_FIRST)
            return
        if self._auth_missing():
            await self._reject(replies.AUTH_REQUIRED, "auth_required")
            return
        if tx is None:
            await self._error(NEED_MAIL)
            return
        if not tx.recipients:
            await self._error(NEED_RCPT)
            return
        if arg:
            await self._error(ARG_SYNTAX)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data, problem = await read_data(self._reader, max_line=self.max_line,
                                        max_size=self.max_size)
        # The transaction ends with the end of the data, whatever happens next.
        self._tx = None
        if problem is not None:
            reason = {replies.BAD_NEWLINE: "bare_newline", replies.LINE_TOO_LONG:
                      "line_too_long"}.get(problem, "message_too_big")
            await self._reject(problem, reason, sender=tx.sender, recipients=tx.recipients)
            return
        self.messages += 1
        envelope = Envelope(
            mail_from=tx.sender,
            rcpt_to=list(tx.recipients),
            client_ip=self.client_ip,
            client_port=self.client_port,
            helo=self.session.host_name or "",
            tls=self.tls_info(),
            auth_user=self.auth_user,
            received_at=self.ctx.clock(),
            listener=self.listener.name,
            role=self.listener.role,
            mail_options=list(tx.options),
            rcpt_options=[list(o) for o in tx.rcpt_options],
        )
        trace = f"{self.sid}.{self.messages}"
        header = received_header(envelope, hostname=self.hostname, trace_id=trace,
                                 extended=self.session.extended_smtp)
        self._busy += 1
        try:
            result = await self.ctx.acceptor.accept(envelope, header + data)
        except Exception as exc:  # the acceptor's own bug: never a traceback to the client
            log.event("acceptor_error", session=self.sid, trace=trace,
                      error=f"{type(exc).__name__}: {exc}")
            metrics.REJECTED.labels("local_error").inc()
            result = replies.LOCAL_ERROR
        finally:
            self._busy -= 1
        if result.code < 400:
            self.charged -= tx.commands + 1  # and this DATA
        # The runner logs the message itself; this ties the session to its queue id.
        log.event("smtp_data", logging.DEBUG, session=self.sid, trace=trace, reply=str(result))
        await self.reply(result)
