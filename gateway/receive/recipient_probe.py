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

RCPTs a client pipelines (RFC 2920) are probed together: the session hands the
recipients already waiting in its buffer to :meth:`RecipientGate.probe_together`,
which asks each next hop about all of them in one session
(:meth:`~gateway.deliver.smtp.SmtpClient.probe_many`); each RCPT's own turn then
joins that probe.  Every recipient's reply must come within the timeout of the one
before it, so each is bounded as its own probe would be; one that gets none (a
timeout, a 421, a lost connection) is answered as its own probe would have been,
and those after it are asked again at their turn.  A next hop that stalls before
any RCPT stalls every recipient's probe alike: all are undetermined after one timeout.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

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


# A recipient's answer under way: None if the probe of several recipients it was in
# ended (a 421, a lost connection) before its reply.
_Answer: TypeAlias = "asyncio.Future[Cached | None]"


class RecipientProber:
    """Probes next hops about recipients, remembering the answers in a VerdictCache."""

    def __init__(self, client: SmtpClient, cache: VerdictCache, timeout: float) -> None:
        self.client = client
        self.cache = cache
        self.timeout = timeout
        self.probes = 0  # probe sessions started, one recipient or several (tests, logs)
        # recipient_key -> its answer under way: a probe's task, or a future that a
        # probe of several recipients sets.
        self._inflight: dict[str, _Answer] = {}
        self._batches: set[asyncio.Task[None]] = set()

    async def ask(self, dest: Destination, mailbox: Mailbox) -> Cached:
        """The verdict on ``mailbox`` at ``dest``: remembered, or probed now."""
        key = recipient_key(mailbox)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        return await self.probe(dest, mailbox)

    def wants(self, mailbox: Mailbox) -> bool:
        """Whether asking about ``mailbox`` now would start a probe: nothing remembered
        and no probe under way."""
        key = recipient_key(mailbox)
        return key not in self._inflight and self.cache.get(key) is None

    async def probe(self, dest: Destination, mailbox: Mailbox) -> Cached:
        """Ask ``dest`` about ``mailbox`` now (joining a probe under way for it) and
        remember the answer."""
        key = recipient_key(mailbox)
        while True:
            pending = self._inflight.get(key)
            if pending is None:
                task = asyncio.create_task(self._probe(key, dest, mailbox.address),
                                           name=f"verify {key}")
                pending = self._track(key, task)
            # Shielded: a session that goes away must not cancel the probe others wait for.
            answer = await asyncio.shield(pending)
            if answer is not None:
                return answer
            # The probe it joined asked about several recipients and ended before this
            # one's reply (a 421, a lost connection): ask again, alone or in another.
            if self._inflight.get(key) is pending:
                del self._inflight[key]

    def probe_together(self, dest: Destination, mailboxes: list[Mailbox]) -> int:
        """Start one probe session at ``dest`` for every one of ``mailboxes`` that
        :meth:`wants` it (:meth:`SmtpClient.probe_many`), without waiting for it; a
        :meth:`probe` of one of them then joins it.  How many it asks about."""
        loop = asyncio.get_running_loop()
        asked: dict[str, tuple[str, _Answer]] = {}
        for mailbox in mailboxes:
            key = recipient_key(mailbox)
            if mailbox.address in asked or not self.wants(mailbox):
                continue
            future: _Answer = loop.create_future()
            asked[mailbox.address] = (key, self._track(key, future))
        if asked:
            log.event("recipient_verify_together", logging.DEBUG, next_hop=dest.label,
                      recipients=len(asked))
            task = asyncio.create_task(self._probe_many(dest, asked),
                                       name=f"verify {len(asked)} at {dest.label}")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
        return len(asked)

    def _track(self, key: str, pending: _Answer) -> _Answer:
        self._inflight[key] = pending

        def done(_f: object) -> None:
            if self._inflight.get(key) is pending:
                del self._inflight[key]

        pending.add_done_callback(done)
        return pending

    async def _probe(self, key: str, dest: Destination, address: str) -> Cached | None:
        self.probes += 1
        try:
            async with asyncio.timeout(self.timeout):
                result = await self.client.probe(dest, address)
        except TimeoutError:
            result = self._timed_out(dest)
        except Exception as exc:  # a bug of ours or the client's: unverified, not a 421
            result = self._failed(dest, address, exc)
        return self._remember(key, dest, address, result)

    async def _probe_many(
        self, dest: Destination, asked: dict[str, tuple[str, _Answer]],
    ) -> None:
        """The probe of :meth:`probe_together`: each recipient's future is set as its
        reply comes.  Each reply must come within the timeout of the one before (the
        first within the timeout of the start), as if each recipient had its own probe."""
        self.probes += 1
        waiting = dict(asked)
        mail_accepted = False

        def on_mail() -> None:
            nonlocal mail_accepted
            mail_accepted = True

        def settle(address: str, result: ProbeResult) -> bool:
            entry = waiting.pop(address, None)
            if entry is None:  # answered already (a stale pooled connection's retry)
                return False
            key, future = entry
            future.set_result(self._remember(key, dest, address, result))
            return True

        try:
            async with asyncio.timeout(self.timeout) as deadline:

                def answer(address: str, result: ProbeResult) -> None:
                    if settle(address, result):
                        deadline.reschedule(asyncio.get_running_loop().time() + self.timeout)

                await self.client.probe_many(dest, list(waiting), answer, on_mail)
        except TimeoutError:
            # Stalled before MAIL FROM:<> was accepted (connect, greeting, TLS): each
            # recipient's own probe would have stalled there too, so all are answered
            # now rather than after a timeout each.  Stalled at an RCPT: that recipient
            # gets its own probe's answer; the rest were not asked yet, as far as
            # anyone knows.
            for address in list(waiting) if not mail_accepted else list(waiting)[:1]:
                settle(address, self._timed_out(dest))
        except Exception as exc:  # as in _probe: every recipient left is unverified
            for address in list(waiting):
                settle(address, self._failed(dest, address, exc))
        finally:
            for _key, future in waiting.values():
                if not future.done():
                    future.set_result(None)  # not answered: its probe() asks again

    def _timed_out(self, dest: Destination) -> ProbeResult:
        return ProbeResult(f"451 4.4.2 No answer from {dest.label} within "
                           f"{self.timeout:g}s", answered=False)

    @staticmethod
    def _failed(dest: Destination, address: str, exc: Exception) -> ProbeResult:
        log.event("recipient_verify_error", recipient=address, next_hop=dest.label,
                  error=f"{type(exc).__name__}: {exc}")
        return ProbeResult("451 4.3.0 Verification failed", answered=False)

    def _remember(self, key: str, dest: Destination, address: str,
                  result: ProbeResult) -> Cached:
        verdict = verdict_of(result)
        log.event("recipient_verified", recipient=address, next_hop=dest.label,
                  verdict=verdict.value, reply=result.reply)
        return self.cache.put(key, verdict, result.reply)

    async def aclose(self) -> None:
        """Let the probes under way finish (sessions wait for them; each is bounded by
        the timeout), then close the pooled connections."""
        await asyncio.gather(*self._inflight.values(), *self._batches,
                             return_exceptions=True)
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

    def would_probe(self, mailbox: Mailbox) -> Destination | None:
        """Where :meth:`refusal` would probe ``mailbox`` now (listed, verified, nothing
        remembered, no probe under way); None if it would not."""
        dest = self._probe_target(mailbox)
        if dest is None or self.prober is None or not self.prober.wants(mailbox):
            return None
        return dest

    def _probe_target(self, mailbox: Mailbox) -> Destination | None:
        """Where ``mailbox`` is verified, if it is (listed, a verified route)."""
        if self.prober is None or self.rules.unlisted(mailbox) is not None:
            return None
        return self.rules.probe_target(mailbox)

    def probe_together(self, mailboxes: list[Mailbox]) -> int:
        """Start probing, one session per next hop, those of ``mailboxes`` that
        :meth:`refusal` would probe, so that their RCPTs, pipelined by the client (RFC
        2920), wait for one round trip instead of one probe each.  Their
        :meth:`refusal` then joins these probes.  How many recipients it asks about."""
        if self.prober is None:
            return 0
        by_hop: dict[Destination, list[Mailbox]] = {}
        for mailbox in mailboxes:
            dest = self._probe_target(mailbox)  # the prober leaves out what it knows
            if dest is not None:
                by_hop.setdefault(dest, []).append(mailbox)
        return sum(self.prober.probe_together(dest, group) for dest, group in by_hop.items())

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
