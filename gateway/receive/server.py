"""Start the SMTP listeners of ``cfg.listeners`` and drain them on shutdown.

    listeners = await start_listeners(cfg, runner, reuse_port=True)
    listeners.address("inbound")      # the bound (host, port): port 0 works
    ...
    await listeners.close(drain_timeout=30)

One asyncio server per listener, all sharing one :class:`SessionContext`
(connection counts per client IP, the session set, the drain flag).  With
``reuse_port`` (SO_REUSEPORT) several worker processes bind the same port and
the kernel spreads connections between them.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway import log
from gateway.config import Config, ListenerConfig
from gateway.errors import ConfigError
from gateway.receive.auth import PasswordFile
from gateway.receive.rate_limits import RateLimiter, RateRules
from gateway.receive.rate_store import RateStore, open_store
from gateway.receive.recipient_probe import RecipientGate
from gateway.receive.relay_control import RelayRules
from gateway.receive.session import SessionContext, SmtpSession
from gateway.runner import Acceptor

SslContextFactory = Callable[[Config], ssl.SSLContext]


def default_ssl_context(cfg: Config) -> ssl.SSLContext:
    """A server context from ``tls.cert``/``tls.key``: TLS 1.2 or later, no client certs."""
    if cfg.tls.cert is None or cfg.tls.key is None:
        raise ConfigError("a listener offers TLS but tls.cert and tls.key are not set",
                          file=cfg.source, key="tls")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.path(cfg.tls.cert), cfg.path(cfg.tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate/key: {exc}", file=cfg.source,
                          key="tls") from None
    return ctx


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except TimeoutError:
        return False


def rate_limiter(cfg: Config, clock: Callable[[], float],
                 store: RateStore | None = None) -> RateLimiter | None:
    """The limiter of ``cfg.rate_limits`` (None without rules), on ``store`` if given
    (a reload keeps the open counters file), else on DATA_DIR/ratelimit.db."""
    rules = RateRules(cfg.rate_limits)
    if not rules:
        return None
    return RateLimiter(rules, store or open_store(cfg.data_dir), clock)


@dataclass(frozen=True, slots=True)
class BoundListener:
    config: ListenerConfig
    host: str
    port: int
    server: asyncio.Server


class Listeners:
    """The running listeners of one process."""

    def __init__(
        self, ctx: SessionContext, bound: list[BoundListener],
        ssl_context_factory: SslContextFactory | None = None,
        gate_factory: Callable[[Config], RecipientGate] = RecipientGate.from_config,
    ) -> None:
        self._ctx = ctx
        self._ssl_context_factory = ssl_context_factory
        self._gate_factory = gate_factory
        self._retired: set[asyncio.Task[None]] = set()
        self.bound = {b.config.name: b for b in bound}

    @property
    def config(self) -> Config:
        return self._ctx.cfg

    def reconfigure(self, cfg: Config) -> None:
        """Apply a reloaded configuration to the sessions that start from now on.

        Relay rules, limits, hostname, the passwd file, listener roles and
        require_auth change; so do the TLS certificate and key (re-read into
        the live context) when the default context factory is used.  Changing
        the set of listeners, an address or a TLS mode needs a restart: that
        is a ConfigError, and nothing is changed.  Validation happens before
        anything is swapped, so a bad configuration leaves the old one running.
        """
        old = {n: (b.config.address, b.config.tls) for n, b in self.bound.items()}
        new = {lst.name: (lst.address, lst.tls) for lst in cfg.listeners}
        if old != new:
            raise ConfigError("listeners, their addresses or TLS modes changed: restart "
                              "Coffer to apply", file=cfg.source, key="listeners")
        rules = RelayRules.from_config(cfg.relay, cfg.archive.journal)
        passwords = PasswordFile(cfg.path(cfg.auth.passwd_file)) if cfg.auth.passwd_file else None
        # The recipient list is re-read here: a bad one keeps the old configuration.
        gate = self._gate_factory(cfg)
        ctx = self._ctx
        if ctx.tls_context is not None:
            (self._ssl_context_factory or default_ssl_context)(cfg)  # validates cert and key
            if self._ssl_context_factory is None and cfg.tls.cert and cfg.tls.key:
                # Same SSLContext object (the implicit-TLS servers hold it): new cert in
                # place.  It replaces the old pair only if it loads.
                try:
                    ctx.tls_context.load_cert_chain(cfg.path(cfg.tls.cert),
                                                    cfg.path(cfg.tls.key))
                except (OSError, ssl.SSLError) as exc:
                    raise ConfigError(f"cannot load TLS certificate/key: {exc}",
                                      file=cfg.source, key="tls") from None
        old_store = ctx.limiter.store if ctx.limiter is not None else None
        ctx.limiter = rate_limiter(cfg, ctx.clock,
                                   old_store if isinstance(old_store, RateStore) else None)
        ctx.cfg, ctx.rules, ctx.passwords = cfg, rules, passwords
        ctx.listeners = {lst.name: lst for lst in cfg.listeners}
        # The verdicts file outlives the gate; only unanswered probes are asked again (the
        # next hop may just have been fixed).  With relay.recipients.cache off the fresh
        # gate forgets every answer.  The old gate's pooled probe connections are closed.
        gate.forget_undetermined()
        old_gate, ctx.recipients = ctx.recipients, gate
        self._retire(old_gate)
        log.event("smtp_reconfigured", local_domains=sorted(rules.local_domains),
                  recipients_listed=_listed(gate), recipients_verified=gate.prober is not None)

    def _retire(self, gate: RecipientGate) -> None:
        if gate.prober is None:
            return
        task = asyncio.get_running_loop().create_task(gate.aclose())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def address(self, name: str) -> tuple[str, int]:
        """The (host, port) listener ``name`` is really bound to."""
        b = self.bound[name]
        return b.host, b.port

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        return {name: (b.host, b.port) for name, b in self.bound.items()}

    @property
    def sessions(self) -> int:
        """SMTP sessions open right now (all listeners)."""
        return len(self._ctx.sessions)

    @property
    def closing(self) -> bool:
        return self._ctx.draining

    async def close(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting at once; let transactions in flight finish; then close.

        Idle sessions are told ``421 4.3.2`` at once; a session inside a
        transaction finishes it (its client gets the DATA reply) and is then
        told 421.  Whatever is still open after ``drain_timeout`` seconds gets
        421 and is closed.
        """
        ctx = self._ctx
        if not ctx.draining:
            ctx.draining = True
            for b in self.bound.values():
                b.server.close()
            log.event("smtp_draining", sessions=len(ctx.sessions), timeout=drain_timeout)
        for session in list(ctx.sessions):
            session.begin_drain()
        if not await _wait(ctx.all_closed, drain_timeout):
            log.event("smtp_drain_timeout", sessions=len(ctx.sessions))
            for session in list(ctx.sessions):
                session.abort()
            if not await _wait(ctx.all_closed, 1.0):  # clients that do not read their 421
                for session in list(ctx.sessions):
                    session.kill()
                await _wait(ctx.all_closed, 1.0)
        # Let the session tasks see their connection_lost and finish, so no task
        # or transport outlives the listeners.
        tasks = [t for t in (*ctx.tasks, *self._retired) if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for b in self.bound.values():
            await b.server.wait_closed()
        await ctx.recipients.aclose()
        if ctx.limiter is not None and isinstance(ctx.limiter.store, RateStore):
            ctx.limiter.store.close()

    async def __aenter__(self) -> Listeners:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(drain_timeout=5.0)


async def start_listeners(
    cfg: Config,
    acceptor: Acceptor,
    *,
    reuse_port: bool = False,
    ssl_context_factory: SslContextFactory | None = None,
    clock: Callable[[], float] = time.time,
    gate_factory: Callable[[Config], RecipientGate] = RecipientGate.from_config,
) -> Listeners:
    """Start one SMTP server per ``cfg.listeners`` entry; raise ConfigError if one cannot.

    ``gate_factory`` builds the recipient checks from a configuration, at start
    and on every reload (tests give it a clock or a TLS context for probes)."""
    needs_tls = any(lst.tls != "none" for lst in cfg.listeners)
    tls_context = (ssl_context_factory or default_ssl_context)(cfg) if needs_tls else None
    passwords = PasswordFile(cfg.path(cfg.auth.passwd_file)) if cfg.auth.passwd_file else None
    ctx = SessionContext(
        cfg=cfg, acceptor=acceptor,
        rules=RelayRules.from_config(cfg.relay, cfg.archive.journal),
        passwords=passwords, tls_context=tls_context, recipients=gate_factory(cfg),
        clock=clock, limiter=rate_limiter(cfg, clock),
    )
    ctx.all_closed.set()
    loop = asyncio.get_running_loop()
    bound: list[BoundListener] = []
    ctx.listeners = {lst.name: lst for lst in cfg.listeners}
    for i, lst in enumerate(cfg.listeners):
        host, port = lst.host_port

        def factory(name: str = lst.name) -> SmtpSession:
            return SmtpSession(ctx, ctx.listeners[name])

        try:
            server = await loop.create_server(
                factory, host, port,
                ssl=tls_context if lst.tls == "implicit" else None,
                ssl_handshake_timeout=min(60.0, cfg.limits.idle_timeout)
                if lst.tls == "implicit" else None,
                reuse_port=reuse_port or None,
                backlog=min(1024, cfg.limits.max_connections),
            )
        except OSError as exc:
            for b in bound:
                b.server.close()
                await b.server.wait_closed()
            raise ConfigError(
                f"listener {lst.name!r} cannot listen on {lst.address}: {exc.strerror or exc}",
                file=cfg.source, key=f"listeners.{i}.address",
            ) from None
        sockname = server.sockets[0].getsockname()
        bound.append(BoundListener(lst, str(sockname[0]), int(sockname[1]), server))
        log.event("smtp_listening", listener=lst.name, role=lst.role, tls=lst.tls,
                  address=f"{sockname[0]}:{sockname[1]}", auth_required=lst.auth_required)
        if lst.auth_required and (passwords is None or lst.tls == "none"):
            log.event("smtp_listener_unusable", listener=lst.name,
                      why="requires AUTH but has no TLS or no auth.passwd_file")
    return Listeners(ctx, bound, ssl_context_factory, gate_factory)


def _listed(gate: RecipientGate) -> int | None:
    listed = gate.rules.listed
    return None if listed is None else len(listed.addresses) + len(listed.domains)
