"""Sending the daily SMTP TLS reports (RFC 8460 §4, §5).

:class:`TlsReporter` runs in every worker process (:meth:`TlsReporter.run`): it
flushes the process's session counts to ``DATA_DIR/tlsrpt.db`` every
:data:`FLUSH_EVERY` seconds and, once the UTC day is over (plus
:data:`REPORT_DELAY`, so that every worker has flushed), reports the day: for each
policy domain with counts that it manages to claim in the store (one worker, once),
it looks up ``_smtp._tls.<domain>`` and sends the gzipped JSON report to every
``rua`` URI: ``mailto:`` as a ``multipart/report`` message spooled in Coffer's own
queue (as DSNs are, which retries it), ``https:`` as a POST of
``application/tlsrpt+gzip``.  A claim is a lease of :data:`CLAIM_LEASE`: a worker that
dies while reporting leaves the report to another one after it.  Each send is marked
in the store before it starts and each rua that got the report is recorded at once;
a rua whose send a crash cut short is not sent the report again (at most once per
report-id and rua, ``tlsrpt_interrupted``); a failed one is tried again after a backoff
(:func:`retry_delay`; RFC 8460 §5.4 leaves retries to the sender) and only it, until
:data:`GIVE_UP_AFTER` past the end of the reported day, then given up with one
``tlsrpt_given_up`` log line.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from gateway import log
from gateway.config import Config
from gateway.deliver import tlsrpt
from gateway.deliver.mta_sts_fetch import FetchError, https_exchange
from gateway.deliver.mx import MxResolver
from gateway.deliver.tlsrpt_store import KEEP_DAYS, TlsReportStore, day_of
from gateway.envelope import Envelope
from gateway.errors import SpoolError
from gateway.metrics import TLSRPT_REPORTS
from gateway.queue.spool import Spool, new_queue_id, store_from_loop

FLUSH_EVERY = 60.0
# A day is reported this long after it ends: every worker has flushed its counts.
REPORT_DELAY = 600.0
# A report's POST is bounded in time like a policy fetch; its response is not read.
POST_TIMEOUT = 30.0
# A claim not settled within this may be taken again (its worker died).
CLAIM_LEASE = 1800.0
# A failed rua is tried again after RETRY_FIRST, doubling, until this long after the
# reported day's end (the next day's report is due then).
RETRY_FIRST = 900.0
GIVE_UP_AFTER = 86400.0


@dataclass(frozen=True, slots=True)
class Submitter:
    """Who reports (§4.4 organization-name, contact-info; §5.3 submitter, From)."""

    organization: str
    contact: str
    name: str  # TLS-Report-Submitter: our host name
    sender: str

    @classmethod
    def from_config(cls, cfg: Config) -> Submitter:
        rpt = cfg.delivery.tls_rpt
        domains = cfg.relay.local_domains
        contact_domain = domains[0] if domains else cfg.hostname
        return cls(organization=rpt.organization or cfg.hostname,
                   contact=rpt.contact or f"postmaster@{contact_domain}",
                   name=cfg.hostname,
                   sender=rpt.from_address or f"noreply-tlsrpt@{cfg.hostname}")


def due_day(now: float) -> date:
    """The last UTC day whose report is due at ``now``."""
    return day_of(now - REPORT_DELAY) - timedelta(days=1)


def retry_delay(tries: int) -> float:
    """How long to wait before the try after ``tries`` failed ones (1, 2, ...)."""
    return RETRY_FIRST * 2.0 ** min(tries - 1, 16)


def give_up_at(day: date) -> float:
    """When the report of ``day`` stops being retried."""
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)
    return end.timestamp() + GIVE_UP_AFTER


def preview(store: TlsReportStore, day: date, submitter: Submitter) -> list[dict[str, Any]]:
    """The report each domain with counts on ``day`` would get (``coffer tlsrpt show``)."""
    sessions = store.sessions(day)
    return [tlsrpt.build_report(day, domain, sessions, organization=submitter.organization,
                                contact=submitter.contact, submitter=submitter.name)
            for domain in store.domains(day)]


class TlsReporter:
    def __init__(
        self, cfg: Config, store: TlsReportStore, resolver: MxResolver, spool: Spool, *,
        context: ssl.SSLContext, notify: Callable[[str], None] = lambda qid: None,
        executor: Executor | None = None, clock: Callable[[], float] = time.time,
        who: str = "0",
    ) -> None:
        """``context`` verifies https: report receivers; ``notify`` wakes the queue
        worker for a spooled report; ``who`` names this worker in the claims."""
        self.submitter = Submitter.from_config(cfg)
        self.store = store
        self.resolver = resolver
        self.spool = spool
        self.context = context
        self.notify = notify
        self.executor = executor
        self.clock = clock
        self.who = who
        self._reported: date | None = None

    async def run(self) -> None:
        """Flush, and report each day once it is over; until cancelled."""
        try:
            while True:
                try:
                    await self.tick()
                except Exception as exc:  # a bug must not end the reports for good
                    log.event("tlsrpt_error", logging.ERROR,
                              error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(FLUSH_EVERY)
        finally:
            await asyncio.to_thread(self.store.flush)
            self.store.close()

    async def tick(self) -> list[str]:
        """One round: flush this worker's counts, report the due day's domains that are
        open (not yet reported, a retry due, or a dead worker's lease run out).  The
        domains this worker reported (or tried to)."""
        await asyncio.to_thread(self.store.flush)
        day = due_day(self.clock())
        done = await self.report_day(day)
        if self._reported != day:
            self._reported = day
            await asyncio.to_thread(self.store.purge, day - timedelta(days=KEEP_DAYS))
        return done

    async def report_day(self, day: date) -> list[str]:
        """Report ``day`` for every domain this worker claims."""
        done: list[str] = []
        now = self.clock()
        domains = await asyncio.to_thread(self.store.open_domains, day, now)
        if not domains:
            return done  # the usual minute: nothing to do, the counts not read
        sessions = await asyncio.to_thread(self.store.sessions, day)
        for domain in domains:
            tries = await asyncio.to_thread(self.store.claim, day, domain, self.who,
                                            now, CLAIM_LEASE)
            if tries < 0:
                continue  # another worker has it
            await self._report_claimed(day, domain, sessions, tries)
            done.append(domain)
        return done

    async def _report_claimed(self, day: date, domain: str,
                              sessions: list[tuple[tlsrpt.SessionKey, int]],
                              tries: int) -> None:
        """Send a claimed report, then settle it or put it back for a retry."""
        failed, outcome = await self._report(day, domain, sessions)
        if not failed:
            await asyncio.to_thread(self.store.finish, day, domain, outcome)
            return
        when = self.clock() + retry_delay(tries + 1)
        if when > give_up_at(day):
            log.event("tlsrpt_given_up", logging.WARNING, domain=domain,
                      day=day.isoformat(), to=", ".join(failed), tries=tries + 1)
            await asyncio.to_thread(self.store.finish, day, domain, outcome)
            return
        await asyncio.to_thread(self.store.retry_at, day, domain, outcome, when)

    async def _report(self, day: date, domain: str,
                      sessions: list[tuple[tlsrpt.SessionKey, int]]) -> tuple[list[str], str]:
        """Send the report to each rua that does not have it yet: the ones that
        failed, and the outcome for the operator."""
        records = await self.resolver.txt(f"_smtp._tls.{domain}")
        rua = tlsrpt.parse_txt(records) if records is not None else None
        if rua is None:
            # §3: no (single, valid) record: the domain asked for no report.
            log.event("tlsrpt_not_requested", domain=domain, day=day.isoformat(),
                      lookup="failed" if records is None else "no record")
            return [], "not requested"
        served = await asyncio.to_thread(self.store.served, day, domain)
        s = self.submitter
        report = tlsrpt.build_report(day, domain, sessions, organization=s.organization,
                                     contact=s.contact, submitter=s.name)
        gz = tlsrpt.compress(report)
        results: list[str] = []
        cut = sorted(await asyncio.to_thread(self.store.interrupted, day, domain) - served)
        for uri in cut:
            # A send cut short (its worker died): the rua may have the report or not.
            # RFC 8460 asks no receiver to drop a second copy of a report-id (§4.4 only
            # makes it unique), and reports are optional, their redelivery a best
            # effort (§5.4): better none than one counted twice.
            await asyncio.to_thread(self.store.serve, day, domain, uri)
            channel = "mailto" if uri.lower().startswith("mailto:") else "https"
            TLSRPT_REPORTS.labels(channel, "interrupted").inc()
            log.event("tlsrpt_interrupted", logging.WARNING, domain=domain,
                      day=day.isoformat(), to=uri, report_id=report["report-id"])
            results.append(f"{channel} interrupted")
        served.update(cut)
        mailto = [u for u in rua if u.lower().startswith("mailto:") and u not in served]
        to = [tlsrpt.mailto_address(u) for u in mailto]
        sends: list[tuple[str, list[str], Callable[[], Awaitable[None]]]] = []
        if mailto:
            sends.append(("mailto", mailto, lambda: self._mail(report, gz, domain, day, to)))
        for uri in rua:
            if uri.lower().startswith("https:") and uri not in served:
                sends.append(("https", [uri], lambda uri=uri: post_report(  # type: ignore[misc]
                    uri, gz, self.resolver, context=self.context)))
        failed: list[str] = []
        for channel, uris, send in sends:
            shown = ", ".join(to) if channel == "mailto" else uris[0]
            # Marked before, settled after: a crash in between is seen by whoever
            # claims the report next (above), and the report is not sent again.
            await asyncio.to_thread(self.store.sending, day, domain, uris, self.who,
                                    self.clock())
            try:
                await send()
            except (ReportError, SpoolError) as exc:
                for uri in uris:  # it did not arrive: a retry may send it
                    await asyncio.to_thread(self.store.unsent, day, domain, uri)
                TLSRPT_REPORTS.labels(channel, "failed").inc()
                log.event("tlsrpt_failed", logging.WARNING, domain=domain,
                          day=day.isoformat(), to=shown, error=str(exc))
                results.append(f"{channel} failed")
                failed.extend(uris)
                continue
            for uri in uris:
                await asyncio.to_thread(self.store.serve, day, domain, uri)
            TLSRPT_REPORTS.labels(channel, "sent").inc()
            log.event("tlsrpt_sent", domain=domain, day=day.isoformat(), to=shown,
                      report_id=report["report-id"], bytes=len(gz))
            results.append(f"{channel} sent")
        return failed, ", ".join(results)

    async def _mail(self, report: dict[str, Any], gz: bytes, domain: str, day: date,
                    to: list[str]) -> None:
        now = self.clock()
        s = self.submitter
        data = tlsrpt.build_message(report, gz, domain=domain, day=day, submitter=s.name,
                                    sender=s.sender, to=to,
                                    now=datetime.fromtimestamp(now, UTC))
        env = Envelope(mail_from=s.sender, rcpt_to=list(to), received_at=now,
                       helo=s.name, listener="tlsrpt", role="local")
        qid = await store_from_loop(self.spool, self.executor, env, data,
                                    {"tlsrpt": {"domain": domain, "day": day.isoformat()}},
                                    new_queue_id(now))
        self.notify(qid)


class ReportError(FetchError):
    """A report could not be POSTed (network, TLS, or the receiver's answer)."""


async def post_report(uri: str, gz: bytes, resolver: MxResolver, *,
                      context: ssl.SSLContext, timeout: float = POST_TIMEOUT) -> None:
    """RFC 8460 §5.4: POST the gzipped report to ``uri`` as ``application/tlsrpt+gzip``
    over HTTPS with a verified certificate; a 2xx answer is success."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    port = parts.port or 443
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = host if port == 443 else f"{host}:{port}"
    request = (f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n"
               f"Content-Type: {tlsrpt.MEDIA_TYPE_GZIP}\r\nContent-Length: {len(gz)}\r\n"
               "Connection: close\r\n\r\n").encode("ascii") + gz
    addresses = await resolver.addresses(host) if host else ()
    if not addresses:
        raise ReportError(f"{host or uri}: no address")
    errors = []
    for addr in addresses:
        try:
            async with asyncio.timeout(timeout):
                raw = await https_exchange(addr, port, host, request, context)
        except (OSError, ssl.SSLError, TimeoutError, FetchError) as exc:
            errors.append(f"{addr}: {type(exc).__name__}: {exc}")
            continue
        status = raw.split(b"\r\n", 1)[0].decode("iso-8859-1")
        fields = status.split(" ", 2)
        if len(fields) < 2 or not fields[1].startswith("2"):
            raise ReportError(f"{uri}: {status[:80]!r}")
        return
    raise ReportError("; ".join(errors))
