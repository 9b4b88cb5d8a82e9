"""The IMAP4rev1 server (RFC 3501): asyncio sessions over a mailbox :class:`Backend`.

Read-only for messages: the archive is immutable.  Per-user \\Seen / \\Flagged are
kept by the backend as private state; APPEND, COPY, MOVE, EXPUNGE, CREATE, DELETE
and RENAME answer ``NO [CANNOT]`` (RFC 5530).  Commands are handled strictly in
order, so pipelined commands get their responses in order.

Robustness: a command line is bounded (``max_line``), a literal by ``max_literal``
(a synchronising literal that is too large is refused before the client sends it,
RFC 7888 §4; a LITERAL+ one ends the session), sessions time out when idle
(RFC 3501 §5.4 autologout), a malformed command gets ``BAD`` and the session goes
on, and a client vanishing mid-literal only ends its own task.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import inspect
import ipaddress
import logging
import re
import ssl
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from archive.imap.backend import PERMANENT_FLAGS, Backend, MailboxInfo, MessageInfo, Principal
from archive.imap.errors import MailboxError, ParseError, UpstreamUnavailable
from archive.imap.parser import (
    SUPPORTED_CHARSETS,
    Command,
    FetchAtt,
    SearchKey,
    SeqSet,
    encode_mutf7,
    parse_command,
)
from archive.imap.render import (
    ParsedMessage,
    body_section,
    bodystructure,
    envelope,
    imap_string,
    parse_message,
    to_crlf,
)
from archive.imap.search import SearchTarget, evaluate, text_keys

__all__ = ["ImapConfig", "ImapServer", "LoginThrottle"]

T = TypeVar("T")
log = logging.getLogger("coffer.imap")

_LITERAL_AT_END = re.compile(rb"\{(\d{1,20})(\+?)\}\r?\n\Z")
# A pipelined (UID) FETCH without a literal: read ahead and prefetched (see _Session.run).
_FETCH_LINE = re.compile(rb"[^ ]+ (?:UID )?FETCH [^{}]*\r?\n\Z", re.IGNORECASE)
MAX_READ_AHEAD = 32  # pipelined FETCH commands parsed and being prefetched
PREFETCH_GROUP = 8  # commands whose messages one worker-thread job reads
PREFETCH_TARGETS = 4  # only commands fetching this few messages are prefetched (mbsync: 1)
# Fewer newly read-ahead commands than this are not prefetched: their bytes are read
# inline when answered (read_part), as a worker-thread hop (submit, future chaining,
# ~9 lock round trips) costs more CPU than reading a blob.  A client pipelining
# faster than we answer still gets its commands prefetched in PREFETCH_GROUPs.
PREFETCH_MIN_COMMANDS = 3
FLUSH_AT = 256 * 1024  # responses are written once the buffer holds this much
MAX_BAD_COMMANDS = 20
_SYSTEM_FLAGS = "(\\Answered \\Flagged \\Deleted \\Seen \\Draft)"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(slots=True)
class ImapConfig:
    host: str = "127.0.0.1"
    port: int = 1143
    tls: ssl.SSLContext | None = None  # offered with STARTTLS, or implicit (993 role)
    implicit_tls: bool = False
    # LOGIN / AUTHENTICATE without TLS only from a loopback address, and only when set.
    allow_plaintext_loopback: bool = False
    max_line: int = 64 * 1024
    max_literal: int = 1024 * 1024  # no command we accept needs more (APPEND is refused)
    max_command: int = 4 * 1024 * 1024
    idle_timeout: float = 30 * 60.0  # RFC 3501 §5.4: at least 30 minutes
    login_timeout: float = 60.0
    idle_poll: float = 30.0  # IDLE re-checks the folder this often without a notification
    max_sessions: int = 1000
    # Issue 7: SELECT answers [READ-ONLY] (the archive is immutable).  Python's imaplib
    # (and IMAPClient on top of it) refuse a READ-ONLY answer to SELECT, so a site can
    # answer [READ-WRITE] instead; only private \Seen/\Flagged can change either way.
    select_read_only: bool = True
    greeting_name: str = "Coffer"


class LoginThrottle:
    """Failed logins per account and per client IP in a sliding window.

    Over the limit, further attempts are refused without checking the password
    (a guessing attacker learns nothing and burns no argon2 time), until the oldest
    failure leaves the window.
    """

    def __init__(self, per_account: int = 5, per_ip: int = 20, window: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_account = per_account
        self.per_ip = per_ip
        self.window = window
        self.clock = clock
        self._fails: dict[str, deque[float]] = {}

    def _count(self, key: str) -> int:
        q = self._fails.get(key)
        if not q:
            return 0
        cutoff = self.clock() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._fails[key]
            return 0
        return len(q)

    def blocked(self, user: str, ip: str) -> bool:
        return (self._count("u:" + user.lower()) >= self.per_account
                or self._count("ip:" + ip) >= self.per_ip)

    def failed(self, user: str, ip: str) -> None:
        now = self.clock()
        for key in ("u:" + user.lower(), "ip:" + ip):
            self._fails.setdefault(key, deque()).append(now)

    def succeeded(self, user: str) -> None:
        self._fails.pop("u:" + user.lower(), None)


class _Bye(Exception):
    """End the session after sending an untagged BYE."""


def _internaldate(d: datetime) -> str:
    # RFC 3501 §9 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz"
    off = d.utcoffset()
    mins = int(off.total_seconds() // 60) if off is not None else 0
    sign = "-" if mins < 0 else "+"
    mins = abs(mins)
    return (f'"{d.day:2d}-{_MONTHS[d.month - 1]}-{d.year:04d} '
            f'{d.hour:02d}:{d.minute:02d}:{d.second:02d} {sign}{mins // 60:02d}{mins % 60:02d}"')


def _flags(flags: frozenset[str]) -> bytes:
    return ("(" + " ".join(sorted(flags)) + ")").encode()


def _quote_mailbox(name: str) -> bytes:
    return imap_string(encode_mutf7(name))


def _list_match(pattern: str, name: str) -> bool:
    # RFC 3501 §6.3.8: "*" matches anything, "%" anything but the delimiter.
    rx = "".join(".*" if c == "*" else "[^/]*" if c == "%" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, re.IGNORECASE if name.upper() == "INBOX" else 0) is not None


@dataclass(slots=True)
class _Selected:
    name: str
    info: MailboxInfo
    readonly: bool
    messages: list[MessageInfo]
    unsubscribe: Callable[[], None] | None = None
    uids: list[int] | None = None  # UIDs of ``messages``, for bisection
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class ImapServer:
    """``await ImapServer(backend, config).start()``; ``await server.close()``."""

    def __init__(self, backend: Backend, config: ImapConfig | None = None,
                 throttle: LoginThrottle | None = None) -> None:
        self.backend = backend
        self.config = config or ImapConfig()
        self.throttle = throttle or LoginThrottle()
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.Task[None], _Session] = {}

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> ImapServer:
        cfg = self.config
        self._server = await asyncio.start_server(
            self._accept, cfg.host, cfg.port, limit=cfg.max_line,
            ssl=cfg.tls if cfg.implicit_tls else None)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing the transports ends each session's read; cancelling the tasks would
        # make asyncio's stream callback log the CancelledError.
        for session in list(self._sessions.values()):
            session.writer.transport.abort()
        if self._sessions:
            await asyncio.wait(list(self._sessions), timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> ImapServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        session = _Session(self, reader, writer)
        self._sessions[task] = session
        try:
            await session.run()
        finally:
            self._sessions.pop(task, None)


class _Session:
    def __init__(self, server: ImapServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.backend = server.backend
        self.cfg = server.config
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        self.tls = self.cfg.implicit_tls
        self.principal: Principal | None = None
        self.selected: _Selected | None = None
        self.cache: OrderedDict[int, ParsedMessage] = OrderedDict()
        self.out: list[bytes] = []
        self.out_size = 0
        # Pipelined FETCH commands already read (parsed), and their messages' bytes
        # being read in worker threads meanwhile: uid -> (future, index in its result).
        self.ahead: deque[Command | ParseError] = deque()
        self.prefetch: dict[int, tuple[asyncio.Future[list[bytes | None]], int]] = {}
        self.bad_count = 0
        self.logout = False

    # -- plumbing --

    def send(self, data: bytes | str) -> None:
        # Buffered: one socket write per flush, not one per response line.
        b = data.encode() if isinstance(data, str) else data
        self.out.append(b)
        self.out_size += len(b)

    async def flush(self) -> None:
        if self.out:
            self.writer.write(b"".join(self.out))
            self.out.clear()
            self.out_size = 0
        await self.writer.drain()

    def pending_line(self) -> bytes | None:
        """The next command line if the client already sent it (pipelining), else None.

        StreamReader has no public peek; its buffer is what it has received."""
        buf: bytearray = getattr(self.reader, "_buffer", bytearray())
        end = buf.find(b"\n")
        return None if end < 0 else bytes(buf[:end + 1])

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        if getattr(self.backend, "blocking", False):
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.ip.split("%")[0]).is_loopback
        except ValueError:
            return False

    def login_allowed(self) -> bool:
        return self.tls or (self.cfg.allow_plaintext_loopback and self.loopback())

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE",
                "UNSELECT", "SPECIAL-USE"]
        if self.principal is None:
            if self.cfg.tls is not None and not self.tls:
                caps.append("STARTTLS")
            if self.login_allowed():
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")  # RFC 3501 §6.2.3
        return " ".join(caps)

    async def run(self) -> None:
        try:
            if self.server.session_count > self.cfg.max_sessions:
                self.send("* BYE Too many connections\r\n")
                await self.flush()
                return
            self.send(f"* OK [CAPABILITY {self.capabilities()}] "
                      f"{self.cfg.greeting_name} IMAP4rev1 ready (read-only archive)\r\n")
            await self.flush()
            while not self.logout:
                if self.ahead:
                    self.read_ahead()  # top up while the client keeps pipelining
                    await self.execute(self.ahead.popleft())
                elif self.pending_line() is not None:
                    # Pipelined: already here, so neither a wait nor a timer.
                    data = await self.read_command()
                    if data is not None:
                        await self.dispatch(data)
                else:
                    await self.flush()
                    timeout = (self.cfg.idle_timeout if self.principal
                               else self.cfg.login_timeout)
                    try:
                        async with asyncio.timeout(timeout):  # no task per command
                            data = await self.read_command()
                    except TimeoutError:
                        self.send("* BYE Autologout; idle for too long\r\n")
                        await self.flush()
                        return
                    if data is not None:
                        await self.dispatch(data)
                # Responses to pipelined commands go out together (mbsync pipelines
                # every FETCH): one socket write per batch, not one per command.
                if self.logout or self.out_size >= FLUSH_AT or (
                        not self.ahead and self.pending_line() is None):
                    await self.flush()
        except _Bye as exc:
            try:
                self.send(f"* BYE {exc}\r\n")
                await self.flush()
            except (ConnectionError, RuntimeError, OSError):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, EOFError, OSError):
            pass  # the client went away, possibly mid-literal: nothing is kept
        except Exception:
            log.exception("IMAP session from %s failed", self.ip)
        finally:
            self.unselect()
            self.cache.clear()
            self.writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
                await self.writer.wait_closed()

    async def read_line(self) -> bytes:
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _Bye("Line too long") from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            raise EOFError from None
        except ValueError:  # the stream's limit was hit while looking for the separator
            raise _Bye("Line too long") from None
        return line

    async def read_command(self) -> bytes | None:
        """One command with its literals inlined, or None if it was answered already."""
        buf = bytearray()
        while True:
            line = await self.read_line()
            buf += line
            if len(buf) > self.cfg.max_command:
                raise _Bye("Command too long")
            m = _LITERAL_AT_END.search(line)
            if m is None:
                return bytes(buf)
            size = int(m.group(1))
            plus = bool(m.group(2))
            tag = bytes(buf).split(b" ", 1)[0].decode("ascii", "replace")
            words = bytes(buf).split(b" ", 3)
            name = words[1].upper() if len(words) > 1 else b""
            if name == b"APPEND" and not plus:
                # RFC 3501 §7.5: refuse before the client sends the message.
                self.send(f"{tag} NO [CANNOT] The archive is read-only: "
                          "messages cannot be appended\r\n")
                return None
            if size > self.cfg.max_literal:
                if plus:
                    raise _Bye("Literal too large")  # RFC 7888 §4: cannot refuse LITERAL+
                self.send(f"{tag} BAD [TOOBIG] Literal too large\r\n")
                return None
            if not plus:
                self.send("+ OK\r\n")
                await self.flush()
            buf += await self.reader.readexactly(size)

    # -- dispatch --

    def bad(self, tag: str, reason: str) -> None:
        # Like Dovecot: a client that keeps sending garbage is disconnected.
        self.bad_count += 1
        if self.bad_count > MAX_BAD_COMMANDS:
            raise _Bye("Too many invalid IMAP commands")
        self.send(f"{tag} BAD {reason}\r\n")

    async def dispatch(self, data: bytes) -> None:
        try:
            cmd: Command | ParseError = parse_command(data)
        except ParseError as exc:
            cmd = exc
        if isinstance(cmd, Command) and cmd.name == "FETCH":
            self.read_ahead()
        await self.execute(cmd)

    def read_ahead(self) -> None:
        """Keep up to MAX_READ_AHEAD pipelined FETCH commands parsed, and the bytes of the
        newly parsed ones being read in worker threads (PREFETCH_GROUP commands a job)
        while this thread answers the ones before them.  Only commands already buffered
        and without a literal: reading them never waits nor needs a continuation."""
        if self.selected is None:
            return
        new: list[Command | ParseError] = []
        while len(self.ahead) < MAX_READ_AHEAD:
            line = self.pending_line()
            if line is None or not _FETCH_LINE.match(line):
                break
            buf: bytearray = self.reader._buffer  # type: ignore[attr-defined]
            del buf[:len(line)]
            try:
                cmd: Command | ParseError = parse_command(line)
            except ParseError as exc:
                cmd = exc
            self.ahead.append(cmd)
            new.append(cmd)
        for i in range(0, len(new), PREFETCH_GROUP):
            self.start_prefetch(new[i:i + PREFETCH_GROUP])

    def start_prefetch(self, cmds: Sequence[Command | ParseError]) -> None:
        """Read the bodies that pipelined FETCH commands will need in worker threads,
        while this thread answers the commands before them."""
        sel = self.selected
        if sel is None or len(cmds) < PREFETCH_MIN_COMMANDS \
                or not getattr(self.backend, "blocking", False) \
                or len(self.prefetch) > MAX_READ_AHEAD * PREFETCH_TARGETS:
            return
        uids: list[int] = []
        for cmd in cmds:
            if not isinstance(cmd, Command) or cmd.name != "FETCH" or cmd.seqset is None \
                    or not _needs_raw(cmd.fetch):
                continue
            try:
                targets = self.resolve(cmd, cmd.seqset)
            except ParseError:
                continue
            if len(targets) <= PREFETCH_TARGETS:
                uids += (m.uid for _, m in targets if m.uid not in self.prefetch)
        uids = list(dict.fromkeys(uids))
        if not uids:
            return
        # One worker-thread hop for the group, not one per command.
        fut = asyncio.get_running_loop().run_in_executor(None, self._raws, sel.name, uids)
        fut.add_done_callback(_retrieve)
        for i, uid in enumerate(uids):
            self.prefetch[uid] = (fut, i)

    async def execute(self, cmd: Command | ParseError) -> None:
        if isinstance(cmd, ParseError):
            self.bad(cmd.tag or "*", cmd.reason)
            return
        self.bad_count = 0
        handler = getattr(self, "cmd_" + cmd.name.replace(" ", "_"), None)
        if handler is None:
            self.bad(cmd.tag, f"Unknown command {cmd.name}")
            return
        state = _STATES.get(cmd.name, "any")
        if state in ("auth", "selected") and self.principal is None:
            self.send(f"{cmd.tag} BAD Not authenticated\r\n")
            return
        if state == "noauth" and self.principal is not None:
            self.send(f"{cmd.tag} BAD Already authenticated\r\n")
            return
        if state == "selected" and self.selected is None:
            self.send(f"{cmd.tag} BAD No mailbox selected\r\n")
            return
        try:
            await handler(cmd)
        except MailboxError:
            self.send(f"{cmd.tag} NO [NONEXISTENT] Mailbox doesn't exist\r\n")
        except ParseError as exc:
            self.send(f"{cmd.tag} BAD {exc.reason}\r\n")
        except (ConnectionError, asyncio.IncompleteReadError, EOFError, _Bye):
            raise
        except Exception:
            # A backend failure (database, store) fails this command, not the session;
            # the client sees no detail (RFC 5530 SERVERBUG), the log has the traceback.
            log.exception("IMAP %s failed for %s", cmd.name,
                          self.principal.name if self.principal else "-")
            self.send(f"{cmd.tag} NO [SERVERBUG] Internal error; see the server log\r\n")

    def ok(self, cmd: Command, text: str = "") -> None:
        name = ("UID " if cmd.uid else "") + cmd.name
        self.send(f"{cmd.tag} OK {text or name + ' completed'}\r\n")

    # -- any state --

    async def cmd_CAPABILITY(self, cmd: Command) -> None:
        self.send(f"* CAPABILITY {self.capabilities()}\r\n")
        self.ok(cmd)

    async def cmd_NOOP(self, cmd: Command) -> None:
        await self.refresh(expunge=True)
        self.ok(cmd)

    async def cmd_LOGOUT(self, cmd: Command) -> None:
        self.send("* BYE Logging out\r\n")
        self.ok(cmd)
        self.logout = True

    async def cmd_ID(self, cmd: Command) -> None:
        # RFC 2971: name only (no version: it helps attackers, not clients).
        self.send(f'* ID ("name" "{self.cfg.greeting_name}")\r\n')
        self.ok(cmd)

    async def cmd_ENABLE(self, cmd: Command) -> None:
        # RFC 5161: nothing we advertise can be enabled; ENABLED lists none.
        self.send("* ENABLED\r\n")
        self.ok(cmd)

    # -- not authenticated --

    async def cmd_STARTTLS(self, cmd: Command) -> None:
        if self.cfg.tls is None or self.tls:
            self.send(f"{cmd.tag} BAD STARTTLS not available\r\n")
            return
        if self.principal is not None:
            self.send(f"{cmd.tag} BAD Already authenticated\r\n")
            return
        pending = getattr(self.reader, "_buffer", b"")
        if pending or self.ahead:
            # Anything pipelined after STARTTLS would be read as if it came over TLS
            # (the STARTTLS command injection flaw, CVE-2011-0411): refuse.
            raise _Bye("Data after STARTTLS")
        self.ok(cmd, "Begin TLS negotiation now")
        await self.flush()
        await self.writer.start_tls(self.cfg.tls)
        self.tls = True

    async def _authenticated(self, cmd: Command, user: str, password: str) -> None:
        if not self.login_allowed():
            self.send(f"{cmd.tag} NO [PRIVACYREQUIRED] Log in over TLS (STARTTLS)\r\n")
            return
        if self.server.throttle.blocked(user, self.ip):
            self.send(f"{cmd.tag} NO [UNAVAILABLE] Too many failed logins; "
                      "try again later\r\n")
            return
        try:
            principal = await asyncio.to_thread(self.backend.authenticate, user, password)
        except UpstreamUnavailable as exc:
            # RFC 5530 §3: not the user's fault, so not counted as a failed login.
            log.warning("IMAP login of %r from %s: %s", user, self.ip, exc)
            self.send(f"{cmd.tag} NO [UNAVAILABLE] Authentication service unavailable; "
                      "try again later\r\n")
            return
        if principal is None:
            self.server.throttle.failed(user, self.ip)
            self.send(f"{cmd.tag} NO [AUTHENTICATIONFAILED] Authentication failed\r\n")
            return
        self.server.throttle.succeeded(user)
        self.principal = principal
        self.send(f"{cmd.tag} OK [CAPABILITY {self.capabilities()}] Logged in\r\n")

    async def cmd_LOGIN(self, cmd: Command) -> None:
        if self.principal is not None:
            self.send(f"{cmd.tag} BAD Already authenticated\r\n")
            return
        user, pw = (bytes(a) for a in cmd.args if isinstance(a, bytes))
        await self._authenticated(cmd, user.decode("utf-8", "replace"),
                                  pw.decode("utf-8", "replace"))

    async def cmd_AUTHENTICATE(self, cmd: Command) -> None:
        if self.principal is not None:
            self.send(f"{cmd.tag} BAD Already authenticated\r\n")
            return
        mech = str(cmd.args[0])
        if mech != "PLAIN":
            self.send(f"{cmd.tag} NO [CANNOT] Unsupported mechanism\r\n")
            return
        if not self.login_allowed():
            self.send(f"{cmd.tag} NO [PRIVACYREQUIRED] Log in over TLS (STARTTLS)\r\n")
            return
        if len(cmd.args) > 1:
            arg = cmd.args[1]
            assert isinstance(arg, bytes)
            response = b"" if arg == b"=" else arg  # RFC 4959 §3: "=" is empty
        else:
            self.send("+ \r\n")
            await self.flush()
            try:
                async with asyncio.timeout(self.cfg.login_timeout):
                    response = (await self.read_line()).rstrip(b"\r\n")
            except TimeoutError:
                raise _Bye("Autologout; no authentication response") from None
            if response == b"*":  # RFC 3501 §6.2.2: the client cancels
                self.send(f"{cmd.tag} BAD Authentication cancelled\r\n")
                return
        try:
            decoded = base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            self.send(f"{cmd.tag} BAD Invalid base64\r\n")
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            self.send(f"{cmd.tag} BAD Invalid PLAIN response\r\n")
            return
        authz, authc, pw = (p.decode("utf-8", "replace") for p in parts)
        if authz and authz != authc:  # RFC 4616 §2: no proxy authorisation here
            self.send(f"{cmd.tag} NO [AUTHORIZATIONFAILED] Cannot act as another user\r\n")
            return
        await self._authenticated(cmd, authc, pw)

    # -- authenticated --

    async def cmd_NAMESPACE(self, cmd: Command) -> None:
        self.send('* NAMESPACE (("" "/")) NIL NIL\r\n')
        self.ok(cmd)

    async def mailbox_infos(self) -> list[MailboxInfo]:
        assert self.principal is not None
        return await self.call(self.backend.mailboxes, self.principal)

    async def find(self, name: str) -> MailboxInfo:
        for info in await self.mailbox_infos():
            if info.name == name and "\\Noselect" not in info.attributes:
                return info
        raise MailboxError(name)

    async def cmd_LIST(self, cmd: Command) -> None:
        ref, pattern = (str(a) for a in cmd.args)
        verb = cmd.name
        if pattern == "":
            # RFC 3501 §6.3.8: the hierarchy delimiter and root name.
            self.send(f'* {verb} (\\Noselect) "/" ""\r\n')
            self.ok(cmd)
            return
        full = ref + pattern if not ref or ref.endswith("/") else f"{ref}/{pattern}"
        infos = await self.mailbox_infos()
        names = {i.name: i.attributes for i in infos}
        for i in infos:  # parents of nested folders are listed as \Noselect
            parts = i.name.split("/")
            for k in range(1, len(parts)):
                names.setdefault("/".join(parts[:k]), ("\\Noselect",))
        for name, attrs in names.items():
            if _list_match(full, name):
                self.send(f'* {verb} ({" ".join(attrs)}) "/" '.encode()
                          + _quote_mailbox(name) + b"\r\n")
        self.ok(cmd)

    cmd_LSUB = cmd_LIST

    async def cmd_SUBSCRIBE(self, cmd: Command) -> None:
        await self.find(cmd.mailbox)  # every folder is subscribed; nothing to change
        self.ok(cmd)

    async def cmd_UNSUBSCRIBE(self, cmd: Command) -> None:
        self.send(f"{cmd.tag} NO [CANNOT] Archive folders are always subscribed\r\n")

    async def cmd_STATUS(self, cmd: Command) -> None:
        assert self.principal is not None
        info = await self.find(cmd.mailbox)
        msgs = await self.call(self.backend.messages, self.principal, info.name)
        values = {
            "MESSAGES": len(msgs), "RECENT": 0,
            "UIDNEXT": (msgs[-1].uid + 1) if msgs else 1,
            "UIDVALIDITY": info.uidvalidity,
            "UNSEEN": sum(1 for m in msgs if "\\Seen" not in m.flags),
        }
        items = " ".join(f"{k} {values[k]}" for k in cmd.status_items)
        self.send(b"* STATUS " + _quote_mailbox(info.name) + f" ({items})\r\n".encode())
        self.ok(cmd)

    async def _select(self, cmd: Command, readonly: bool) -> None:
        assert self.principal is not None
        self.unselect()
        info = await self.find(cmd.mailbox)
        msgs = await self.call(self.backend.messages, self.principal, info.name)
        sel = _Selected(info.name, info, readonly, msgs)
        loop = asyncio.get_running_loop()

        def changed() -> None:
            loop.call_soon_threadsafe(sel.changed.set)

        sel.unsubscribe = await self.call(self.backend.watch, self.principal, info.name,
                                          changed)
        self.selected = sel
        if self.principal.is_officer:
            await self.audit("imap_select", mailbox=info.name, messages=len(msgs))
        self.send(f"* FLAGS {_SYSTEM_FLAGS}\r\n")
        perm = "()" if readonly else "(" + " ".join(sorted(PERMANENT_FLAGS)) + ")"
        self.send(f"* OK [PERMANENTFLAGS {perm}] Private flags only\r\n")
        self.send(f"* {len(msgs)} EXISTS\r\n* 0 RECENT\r\n")
        first_unseen = next((i for i, m in enumerate(msgs, 1) if "\\Seen" not in m.flags),
                            None)
        if first_unseen is not None:
            self.send(f"* OK [UNSEEN {first_unseen}] First unseen\r\n")
        self.send(f"* OK [UIDVALIDITY {info.uidvalidity}] UIDs valid\r\n")
        self.send(f"* OK [UIDNEXT {(msgs[-1].uid + 1) if msgs else 1}] Predicted next UID\r\n")
        # The archive is immutable: messages never change, whichever the answer.
        mode = "READ-ONLY" if readonly or self.cfg.select_read_only else "READ-WRITE"
        self.send(f"{cmd.tag} OK [{mode}] {cmd.name} completed\r\n")

    async def cmd_SELECT(self, cmd: Command) -> None:
        await self._select(cmd, readonly=False)

    async def cmd_EXAMINE(self, cmd: Command) -> None:
        await self._select(cmd, readonly=True)

    async def _cannot(self, cmd: Command) -> None:
        what = {
            "APPEND": "messages cannot be appended", "COPY": "messages cannot be copied",
            "MOVE": "messages cannot be moved", "EXPUNGE": "messages cannot be expunged",
            "CREATE": "folders cannot be created", "DELETE": "folders cannot be deleted",
            "RENAME": "folders cannot be renamed",
        }[cmd.name]
        self.send(f"{cmd.tag} NO [CANNOT] The archive is read-only: {what}\r\n")

    cmd_APPEND = cmd_CREATE = cmd_DELETE = cmd_RENAME = _cannot
    cmd_COPY = cmd_MOVE = cmd_EXPUNGE = _cannot

    async def cmd_IDLE(self, cmd: Command) -> None:
        # RFC 2177: report changes until the client says DONE.
        self.send("+ idling\r\n")
        await self.flush()
        line_task = asyncio.ensure_future(self.read_line())
        # RFC 2177 §3: a server may end an IDLE that lasts past its inactivity timeout.
        deadline = asyncio.get_running_loop().time() + self.cfg.idle_timeout
        try:
            while True:
                if asyncio.get_running_loop().time() > deadline:
                    raise _Bye("Autologout; idle for too long")
                sel = self.selected
                waiters: set[asyncio.Future[Any]] = {line_task}
                change_task = None
                if sel is not None:
                    change_task = asyncio.ensure_future(sel.changed.wait())
                    waiters.add(change_task)
                done, _ = await asyncio.wait(waiters, timeout=self.cfg.idle_poll,
                                             return_when=asyncio.FIRST_COMPLETED)
                if change_task is not None and not change_task.done():
                    change_task.cancel()
                if line_task in done:
                    line = line_task.result()
                    if line.rstrip(b"\r\n").upper() == b"DONE":
                        self.ok(cmd, "IDLE terminated")
                    else:
                        self.send(f"{cmd.tag} BAD Expected DONE\r\n")
                    return
                await self.refresh(expunge=True)
                await self.flush()
        finally:
            if not line_task.done():
                line_task.cancel()
                await asyncio.gather(line_task, return_exceptions=True)

    # -- selected --

    def unselect(self) -> None:
        if self.selected is not None and self.selected.unsubscribe is not None:
            self.selected.unsubscribe()
        self.selected = None
        self.cache.clear()
        self.prefetch.clear()

    async def cmd_CLOSE(self, cmd: Command) -> None:
        self.unselect()  # nothing is ever \Deleted, so nothing is expunged
        self.ok(cmd)


    async def cmd_UNSELECT(self, cmd: Command) -> None:
        self.unselect()
        self.ok(cmd)


    async def cmd_CHECK(self, cmd: Command) -> None:
        self.ok(cmd)


    async def refresh(self, expunge: bool) -> None:
        """Tell the client about new, removed (expired) and re-flagged messages."""
        sel = self.selected
        if sel is None or self.principal is None:
            return
        sel.changed.clear()
        new = await self.call(self.backend.messages, self.principal, sel.name)
        old = sel.messages
        new_uids = {m.uid for m in new}
        if expunge:
            # RFC 3501 §7.4.1: EXPUNGE in descending order keeps sequence numbers valid.
            for seq in range(len(old), 0, -1):
                if old[seq - 1].uid not in new_uids:
                    self.send(f"* {seq} EXPUNGE\r\n")
            kept = [m for m in old if m.uid in new_uids]
        else:
            kept = old
        by_uid = {m.uid: m for m in new}
        max_uid = old[-1].uid if old else 0
        for seq, m in enumerate(kept, 1):
            cur = by_uid.get(m.uid)
            if cur is not None and cur.flags != m.flags:
                self.send(f"* {seq} FETCH (FLAGS ".encode() + _flags(cur.flags) + b")\r\n")
                kept[seq - 1] = cur
        added = [m for m in new if m.uid > max_uid]
        sel.uids = None
        if added or len(kept) != len(old):
            sel.messages = kept + added
            self.send(f"* {len(sel.messages)} EXISTS\r\n")
        else:
            sel.messages = kept

    def resolve(self, cmd: Command, seqset: SeqSet) -> list[tuple[int, MessageInfo]]:
        """(sequence number, message) for a set, ascending, each once.

        Ranges are looked up by bisection (UIDs ascend with sequence numbers), so a
        client fetching one UID at a time (mbsync) costs O(log n) per command.
        """
        sel = self.selected
        assert sel is not None
        msgs = sel.messages
        n = len(msgs)
        if not cmd.uid:
            for lo, hi in seqset.ranges:
                if n == 0 or any(v is not None and v > n for v in (lo, hi)):
                    raise ParseError("Invalid messageset")
        if n == 0:
            return []
        if cmd.uid:
            if sel.uids is None or len(sel.uids) != n:
                sel.uids = [m.uid for m in msgs]
            uids = sel.uids
            star = uids[-1]
        seqs: set[int] = set()
        for lo, hi in seqset.ranges:
            a = (star if cmd.uid else n) if lo is None else lo
            b = (star if cmd.uid else n) if hi is None else hi
            if a > b:
                a, b = b, a
            if cmd.uid:
                # RFC 3501 §6.4.8: "n:*" includes the last message even if n > its UID.
                first = bisect_left(uids, a)
                last = bisect_right(uids, b)
                seqs.update(range(first + 1, last + 1))
            else:
                seqs.update(range(a, b + 1))
        return [(i, msgs[i - 1]) for i in sorted(seqs)]

    async def audit(self, action: str, **detail: object) -> None:
        assert self.principal is not None
        await self.call(self.backend.audit, self.principal, action, detail)

    async def cmd_FETCH(self, cmd: Command) -> None:
        sel = self.selected
        assert sel is not None and cmd.seqset is not None and self.principal is not None
        targets = self.resolve(cmd, cmd.seqset)
        atts, needs_parse, needs_raw, marks_seen, body_read = _fetch_plan(cmd)
        sets_seen = marks_seen and not sel.readonly
        if body_read and self.principal.is_officer and targets:
            await self.audit("imap_fetch", mailbox=sel.name,
                             uids=[m.uid for _, m in targets][:1000], count=len(targets))
        chunk = 64
        parts = [targets[i:i + chunk] for i in range(0, len(targets), chunk)]
        # Double buffering: the next part's bytes are read in a worker thread while this
        # thread answers for the current part.
        reading = self.read_part(sel.name, parts[0]) if needs_raw and parts else None
        try:
            for k, part in enumerate(parts):
                raws: list[bytes | None] = [None] * len(part)
                if reading is not None:
                    raws = await reading
                    reading = self.read_part(sel.name, parts[k + 1]) if k + 1 < len(parts) \
                        else None
                await self._answer_part(sel, part, raws, atts, needs_parse, needs_raw,
                                        sets_seen)
                if self.out_size >= FLUSH_AT:
                    await self.flush()
        finally:
            if inspect.iscoroutine(reading):  # a session that failed mid-FETCH
                reading.close()
        self.ok(cmd)

    async def _answer_part(self, sel: _Selected, part: list[tuple[int, MessageInfo]],
                           raws: list[bytes | None], atts: Sequence[FetchAtt],
                           needs_parse: bool, needs_raw: bool, sets_seen: bool) -> None:
        assert self.principal is not None
        for (seq, info), raw in zip(part, raws, strict=True):
            if needs_raw and raw is None:
                continue  # expired meanwhile: RFC 3501 allows omitting it
            flags = info.flags
            if sets_seen and "\\Seen" not in flags:
                flags = flags | {"\\Seen"}
                await self.call(self.backend.set_flags, self.principal, sel.name,
                                info.uid, flags & PERMANENT_FLAGS)
                sel.messages[seq - 1] = MessageInfo(info.uid, info.internaldate,
                                                    info.size, flags)
            out = self._fetch_one(info, flags, atts, needs_parse, raw,
                                  sets_seen and flags is not info.flags)
            self.send(f"* {seq} FETCH (".encode() + b" ".join(out) + b")\r\n")

    def read_part(self, mailbox: str,
                  part: list[tuple[int, MessageInfo]]) -> Awaitable[list[bytes | None]]:
        """The bytes of ``part``'s messages: read ahead for a pipelined command, inline
        for one or two (a worker-thread hop costs more than reading a blob), else in a
        worker thread started now.  Awaitables, not tasks: no task per command."""
        uids = [m.uid for _, m in part]
        if all(u in self.prefetch for u in uids):
            return self._gather_prefetched(uids)
        if len(uids) <= 2 or not getattr(self.backend, "blocking", False):
            return _ready(self._raws(mailbox, uids))
        fut = asyncio.get_running_loop().run_in_executor(None, self._raws, mailbox, uids)
        fut.add_done_callback(_retrieve)  # a session ending mid-FETCH never awaits it
        return fut

    async def _gather_prefetched(self, uids: list[int]) -> list[bytes | None]:
        return [await self.prefetched(u) for u in uids]

    async def prefetched(self, uid: int) -> bytes | None:
        fut, i = self.prefetch.pop(uid)
        return (await fut)[i]

    def _raws(self, mailbox: str, uids: list[int]) -> list[bytes | None]:
        """Several messages' bytes in one call (one worker-thread hop for a blocking
        backend); None for a message that has gone meanwhile."""
        assert self.principal is not None
        out: list[bytes | None] = []
        for uid in uids:
            try:
                out.append(self.backend.fetch_raw(self.principal, mailbox, uid))
            except MailboxError:
                out.append(None)
        return out

    def _fetch_one(self, info: MessageInfo, flags: frozenset[str],
                   atts: Sequence[FetchAtt], needs_parse: bool, raw: bytes | None,
                   flags_changed: bool) -> list[bytes]:
        msg: ParsedMessage | None = None
        data: bytes | None = None
        if needs_parse and raw is not None:
            msg = self.cache.get(info.uid)
            if msg is None:
                msg = parse_message(raw)
                self.cache[info.uid] = msg
                while len(self.cache) > 8:
                    self.cache.popitem(last=False)
            data = msg.data
        elif raw is not None:
            data = to_crlf(raw)
        out: list[bytes] = []
        for a in atts:
            name = a.name
            if name == "UID":
                out.append(b"UID %d" % info.uid)
            elif name == "FLAGS":
                out.append(b"FLAGS " + _flags(flags))
            elif name == "INTERNALDATE":
                out.append(b"INTERNALDATE " + _internaldate(info.internaldate).encode())
            elif name == "RFC822.SIZE":
                out.append(b"RFC822.SIZE %d" % info.size)
            elif name == "ENVELOPE":
                assert msg is not None
                out.append(b"ENVELOPE " + envelope(msg))
            elif name == "BODYSTRUCTURE":
                assert msg is not None
                out.append(b"BODYSTRUCTURE " + bodystructure(msg))
            elif name == "BODY":
                assert msg is not None
                out.append(b"BODY " + bodystructure(msg, extended=False))
            elif name == "RFC822":
                assert data is not None
                out.append(b"RFC822 {%d}\r\n%s" % (len(data), data))
            elif name in ("RFC822.HEADER", "RFC822.TEXT"):
                assert msg is not None
                r = msg.root
                chunk = data[r.hstart:r.bstart] if name == "RFC822.HEADER" and data \
                    else (data or b"")[r.bstart:r.end]
                out.append(name.encode() + b" {%d}\r\n%s" % (len(chunk), chunk))
            elif name == "BODY[]":
                assert a.section is not None and data is not None
                if a.section.part or a.section.text:
                    assert msg is not None
                    chunk_or_none = body_section(msg, a.section)
                else:
                    chunk_or_none = data
                label = b"BODY[" + a.section.spec().upper().encode() + b"]"
                # A section the message does not have is empty (Dovecot), not NIL.
                chunk = b"" if chunk_or_none is None else chunk_or_none
                if a.partial is not None:
                    origin, count = a.partial
                    label += b"<%d>" % origin
                    chunk = chunk[origin:origin + count]
                out.append(label + b" {%d}\r\n%s" % (len(chunk), chunk))
        if flags_changed and not any(a.name == "FLAGS" for a in atts):
            # RFC 3501 §6.4.5: an implicit \Seen change is reported.
            out.append(b"FLAGS " + _flags(flags))
        return out


    async def cmd_STORE(self, cmd: Command) -> None:
        sel = self.selected
        assert sel is not None and cmd.seqset is not None and self.principal is not None
        if sel.readonly:
            self.send(f"{cmd.tag} NO [READ-ONLY] Mailbox was opened with EXAMINE\r\n")
            return
        wanted = frozenset("\\" + f[1:].capitalize() if f.startswith("\\") else f
                           for f in cmd.flags)
        extra = wanted - PERMANENT_FLAGS
        if extra:
            self.send(f"{cmd.tag} NO [CANNOT] Only \\Seen and \\Flagged can be set "
                      f"(private flags); the archive is immutable\r\n")
            return
        targets = self.resolve(cmd, cmd.seqset)
        for seq, info in targets:
            if cmd.store_mode == "+":
                flags = info.flags | wanted
            elif cmd.store_mode == "-":
                flags = info.flags - wanted
            else:
                flags = wanted
            if flags != info.flags:
                await self.call(self.backend.set_flags, self.principal, sel.name, info.uid,
                                flags)
                sel.messages[seq - 1] = MessageInfo(info.uid, info.internaldate, info.size,
                                                    flags)
            if not cmd.store_silent:
                uid = b" UID %d" % info.uid if cmd.uid else b""
                self.send(f"* {seq} FETCH (FLAGS ".encode() + _flags(flags) + uid + b")\r\n")
        self.ok(cmd)


    async def cmd_SEARCH(self, cmd: Command) -> None:
        sel = self.selected
        assert sel is not None and cmd.search is not None and self.principal is not None
        if cmd.charset is not None and cmd.charset not in SUPPORTED_CHARSETS:
            self.send(f"{cmd.tag} NO [BADCHARSET ({' '.join(SUPPORTED_CHARSETS)})] "
                      "Unsupported charset\r\n")
            return
        targets = [SearchTarget(i, m) for i, m in enumerate(sel.messages, 1)]
        principal = self.principal
        name = sel.name
        text_hits: dict[tuple[str, bool], set[int]] = {}
        for query, body_only in set(text_keys(cmd.search)):
            hits_or_none = await self.call(self.backend.text_search, principal, name, query,
                                           body_only)
            if hits_or_none is not None:
                text_hits[(query, body_only)] = hits_or_none
        raws: dict[int, bytes] = {}
        if _needs_messages(cmd.search, text_hits):
            uids = [t.info.uid for t in targets]
            for start in range(0, len(uids), 256):
                chunk = uids[start:start + 256]
                for uid, raw in zip(chunk, await self.call(self._raws, name, chunk),
                                    strict=True):
                    raws[uid] = raw or b""

        def loader(uid: int) -> ParsedMessage:
            return parse_message(raws.get(uid, b""))

        search_key = cmd.search

        def run() -> list[SearchTarget]:
            return evaluate(search_key, targets, loader, text_hits)

        hits = await asyncio.to_thread(run) if getattr(self.backend, "blocking", False) \
            else run()
        if principal.is_officer:
            await self.audit("imap_search", mailbox=name, query=_describe(cmd.search),
                             count=len(hits))
        nums = [t.info.uid if cmd.uid else t.seq for t in hits]
        self.send("* SEARCH" + "".join(f" {n}" for n in nums) + "\r\n")
        self.ok(cmd)



_FetchPlan = tuple[tuple[FetchAtt, ...], bool, bool, bool, bool]
# Plans by (attribute list, UID command): a client pipelining one FETCH per message
# (mbsync) sends the same list each time.
_FETCH_PLANS: dict[tuple[tuple[FetchAtt, ...], bool], _FetchPlan] = {}


def _fetch_plan(cmd: Command) -> _FetchPlan:
    """The attributes to answer, and whether they need the message parsed, its bytes,
    mark it \\Seen (in a read-write mailbox) and read its body (audited)."""
    key = (tuple(cmd.fetch), cmd.uid)
    plan = _FETCH_PLANS.get(key)
    if plan is not None:
        return plan
    atts = list(cmd.fetch)
    if cmd.uid and not any(a.name == "UID" for a in atts):
        atts.insert(0, FetchAtt("UID"))  # RFC 3501 §6.4.8
    needs_parse = any(a.name in ("ENVELOPE", "BODYSTRUCTURE", "BODY")
                      or (a.name == "BODY[]" and a.section is not None
                          and (a.section.part or a.section.text))
                      or a.name in ("RFC822.HEADER", "RFC822.TEXT") for a in atts)
    needs_raw = needs_parse or _needs_raw(atts)
    marks_seen = any((a.name == "BODY[]" and not a.peek) or a.name in ("RFC822", "RFC822.TEXT")
                     for a in atts)
    body_read = any(a.name in ("BODY[]", "RFC822", "RFC822.TEXT") for a in atts)
    plan = (tuple(atts), needs_parse, needs_raw, marks_seen, body_read)
    if len(_FETCH_PLANS) >= 256:
        _FETCH_PLANS.clear()
    _FETCH_PLANS[key] = plan
    return plan


def _needs_raw(atts: Sequence[FetchAtt]) -> bool:
    return any(a.name in ("BODY[]", "RFC822", "RFC822.HEADER", "RFC822.TEXT", "ENVELOPE",
                          "BODYSTRUCTURE", "BODY") for a in atts)


async def _ready(value: T) -> T:
    return value


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A read-ahead dropped by UNSELECT or a closed session is never awaited: its
    # exception is not news.
    if not fut.cancelled():
        fut.exception()


# Which state a command needs (RFC 3501 §3); others work in any state.
_STATES = {
    **dict.fromkeys(("NAMESPACE", "LIST", "LSUB", "SUBSCRIBE", "UNSUBSCRIBE", "STATUS",
                     "SELECT", "EXAMINE", "APPEND", "CREATE", "DELETE", "RENAME", "IDLE",
                     "ENABLE"),
                    "auth"),
    **dict.fromkeys(("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE", "CLOSE",
                     "UNSELECT", "CHECK"), "selected"),
    **dict.fromkeys(("STARTTLS", "LOGIN", "AUTHENTICATE"), "noauth"),
}


_MESSAGE_KEYS = frozenset({"FROM", "TO", "CC", "BCC", "SUBJECT", "HEADER", "TEXT", "BODY",
                           "SENTBEFORE", "SENTON", "SENTSINCE"})


def _needs_messages(key: SearchKey, answered: dict[tuple[str, bool], set[int]]) -> bool:
    if key.op in ("TEXT", "BODY"):
        return (str(key.args[0]), key.op == "BODY") not in answered
    if key.op in _MESSAGE_KEYS:
        return True
    return any(isinstance(a, SearchKey) and _needs_messages(a, answered) for a in key.args)


def _describe(key: SearchKey) -> str:
    if not key.args:
        return key.op
    parts = [_describe(a) if isinstance(a, SearchKey) else str(a) for a in key.args]
    return f"({key.op} {' '.join(parts)})"
