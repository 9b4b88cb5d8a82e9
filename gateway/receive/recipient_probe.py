"""Recipient checks at RCPT with their I/O: the list file and next-hop verification.

:class:`RecipientGate` is what an SMTP session asks about a recipient of a local
domain.  The decisions (listed or not, probed or not, which reply a verdict
calls for, how long an answer is kept) are :mod:`gateway.receive.recipients`;
this module reads the list file and runs the probes, through the delivery
SMTP client (:meth:`gateway.deliver.smtp.SmtpClient.probe`) so that a probe
follows the route's TLS rules exactly as delivery does.

The answers are kept in ``DATA_DIR/recipients.db``, shared by the workers and kept
across restarts (:mod:`gateway.receive.verify_store`), or in memory with
``relay.recipients.cache: false``.  Concurrent RCPTs for the same address in one
process (one message to many sessions, or a client retrying) share one probe; every
probe is bounded by ``relay.recipients.verify_timeout``, well below a client's RCPT
timeout (RFC 5321 §4.5.3.2.3: five minutes).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway import log
from gateway.config import Config
from gateway.deliver.deliverer import next_hop_context
from gateway.deliver.routes import parse_routes
from gateway.deliver.smtp import Destination, ProbeResult, SmtpClient
from gateway.receive.addresses import Mailbox
from gateway.receive.recipients import (
    Cached,
    RecipientList,
    RecipientRules,
    Verdict,
    VerdictCache,
    VerifyCache,
    load_recipient_list,
    recipient_key,
    verdict_of,
)
from gateway.receive.verify_store import FILE_NAME, SharedVerifyCache, VerdictStore
from gateway.replies import Reply

# Reasons in coffer_messages_rejected_total and the smtp_reject log line.
REASON_UNLISTED = "unknown_recipient"
REASON_REFUSED_BY_HOP = "recipient_rejected_by_next_hop"
REASON_UNVERIFIED = "recipient_unverified"


@dataclass(frozen=True, slots=True)
class Refusal:
    reply: Reply
    reason: str
    detail: str = ""  # for the log: the next hop's own reply


class RecipientProber:
    """Probes next hops about recipients, remembering the answers in a VerdictCache."""

    def __init__(self, client: SmtpClient, cache: VerdictCache, timeout: float) -> None:
        self.client = client
        self.cache = cache
        self.timeout = timeout
        self.probes = 0  # probes started (tests, logs)
        self._inflight: dict[str, asyncio.Task[Cached]] = {}

    async def ask(self, dest: Destination, mailbox: Mailbox) -> Cached:
        """The verdict on ``mailbox`` at ``dest``: remembered, or probed now."""
        key = recipient_key(mailbox)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        return await self.probe(dest, mailbox)

    async def probe(self, dest: Destination, mailbox: Mailbox) -> Cached:
        """Ask ``dest`` about ``mailbox`` now (joining a probe under way for it) and
        remember the answer."""
        key = recipient_key(mailbox)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._probe(key, dest, mailbox.address),
                                       name=f"verify {key}")
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # Shielded: a session that goes away must not cancel the probe others wait for.
        return await asyncio.shield(task)

    async def _probe(self, key: str, dest: Destination, address: str) -> Cached:
        self.probes += 1
        try:
            async with asyncio.timeout(self.timeout):
                result = await self.client.probe(dest, address)
        except TimeoutError:
            result = ProbeResult(f"451 4.4.2 No answer from {dest.label} within "
                                 f"{self.timeout:g}s", answered=False)
        except Exception as exc:  # a bug of ours or the client's: unverified, not a 421
            log.event("recipient_verify_error", recipient=address, next_hop=dest.label,
                      error=f"{type(exc).__name__}: {exc}")
            result = ProbeResult("451 4.3.0 Verification failed", answered=False)
        verdict = verdict_of(result)
        log.event("recipient_verified", recipient=address, next_hop=dest.label,
                  verdict=verdict.value, reply=result.reply)
        return self.cache.put(key, verdict, result.reply)

    async def aclose(self) -> None:
        """Let the probes under way finish (sessions wait for them; each is bounded by
        the timeout), then close the pooled connections."""
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        await self.client.aclose()
        if isinstance(self.cache, SharedVerifyCache):
            self.cache.close()


def verdict_cache(cfg: Config, clock: Callable[[], float] = time.time) -> VerdictCache:
    """The shared verdicts file (``relay.recipients.cache``), else memory."""
    memory = VerifyCache.from_config(cfg.relay.recipients, clock)
    if not cfg.relay.recipients.cache:
        return memory
    return SharedVerifyCache(memory, VerdictStore(cfg.data_dir / FILE_NAME))


def make_prober(cfg: Config, tls_context: ssl.SSLContext | None = None,
                clock: Callable[[], float] = time.time) -> RecipientProber:
    """A prober with the delivery client's TLS rules (``tls_context`` verifies next hops
    for ``tls=required`` and ``smtps://``; default: the deliverer's)."""
    recipients = cfg.relay.recipients
    client = SmtpClient(
        helo_name=cfg.delivery.helo_name or cfg.hostname,
        connect_timeout=min(cfg.delivery.connect_timeout, recipients.verify_timeout),
        command_timeout=recipients.verify_timeout,
        destination_concurrency=cfg.queue.destination_concurrency,
        verified_context=tls_context or next_hop_context(cfg),
    )
    return RecipientProber(client, verdict_cache(cfg, clock), recipients.verify_timeout)


class RecipientGate:
    """``relay.recipients`` for one configuration: list, then verification."""

    def __init__(self, rules: RecipientRules, prober: RecipientProber | None) -> None:
        self.rules = rules
        self.prober = prober

    @classmethod
    def from_config(
        cls, cfg: Config, *, tls_context: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> RecipientGate:
        """Read the list file (ConfigError with file and line) and set up probing.

        ``tls_context`` verifies next hops for ``tls=required`` and ``smtps://``
        (default: the deliverer's, ``delivery.ca_file`` or the system trust store)."""
        recipients = cfg.relay.recipients
        listed: RecipientList | None = None
        if recipients.file is not None:
            listed = load_recipient_list(cfg.path(recipients.file))
        routes = parse_routes(cfg.delivery.routes, cfg.data_dir)
        rules = RecipientRules.from_config(recipients, listed, routes)
        skipped = rules.unverifiable(cfg.relay.local_domains)
        if skipped:
            log.event("recipient_verify_skipped", level=logging.WARNING, domains=skipped,
                      why="no smtp:// or smtps:// route in delivery.routes")
        prober = make_prober(cfg, tls_context, clock) if recipients.verify else None
        return cls(rules, prober)

    def forget_undetermined(self) -> None:
        """On reload: ask again about recipients no next hop answered for."""
        if self.prober is not None and isinstance(self.prober.cache, SharedVerifyCache):
            self.prober.cache.forget_undetermined()

    @property
    def active(self) -> bool:
        return self.rules.listed is not None or self.prober is not None

    async def refusal(self, mailbox: Mailbox) -> Refusal | None:
        """Why a recipient of a local domain is refused; None to accept it."""
        unlisted = self.rules.unlisted(mailbox)
        if unlisted is not None:
            return Refusal(unlisted, REASON_UNLISTED)
        dest = self.rules.probe_target(mailbox) if self.prober is not None else None
        if dest is None or self.prober is None:
            return None
        answer = await self.prober.ask(dest, mailbox)
        reply = self.rules.reply_for(answer.verdict, mailbox, answer.reply)
        if reply is None:
            if answer.verdict is Verdict.UNDETERMINED:
                log.event("recipient_accepted_unverified", recipient=mailbox.address,
                          reply=answer.reply)
            return None
        reason = REASON_REFUSED_BY_HOP if answer.verdict is Verdict.UNKNOWN \
            else REASON_UNVERIFIED
        return Refusal(reply, reason, answer.reply)

    async def aclose(self) -> None:
        if self.prober is not None:
            await self.prober.aclose()
