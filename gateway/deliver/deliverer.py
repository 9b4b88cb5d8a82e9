"""The deliver stage: hand each pending recipient to its route, report per-recipient outcomes.

Recipients are grouped by route (``delivery.routes``, see gateway.deliver.routes):
one SMTP transaction per smarthost, one per recipient domain for MX delivery
(trying the exchangers in preference order), one Maildir file per local
recipient.  The groups run concurrently.  The deliverer only reports what
happened; the queue worker persists the outcomes and decides about retries and
bounces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from gateway import log
from gateway.config import Config
from gateway.deliver import dane, maildir, tlsrpt
from gateway.deliver.mta_sts import Policy
from gateway.deliver.mta_sts_fetch import PolicySource
from gateway.deliver.mx import MxHost, MxResolver, address_literal
from gateway.deliver.routes import (
    MaildirRoute,
    MxRoute,
    Route,
    SmtpRoute,
    parse_routes,
    select_route,
)
from gateway.deliver.smtp import Destination, SmtpClient, TransactionResult
from gateway.deliver.tlsrpt import SessionKey
from gateway.deliver.tlsrpt_store import TlsReportStore
from gateway.dsn_params import to_pass_on
from gateway.envelope import Envelope, domain_of
from gateway.errors import DeliveryError
from gateway.metrics import DANE_REFUSED, DANE_SESSIONS, MTA_STS_REFUSED
from gateway.queue.state import RcptStatus

# RFC 5321 §5.1 leaves the number of exchangers to try open; Postfix tries 5 addresses.
MAX_MX_ADDRESSES = 5


@dataclass(frozen=True, slots=True)
class Outcome:
    rcpt: str
    status: RcptStatus  # DELIVERED, DEFERRED or BOUNCED
    reply: str  # the reply that decided it, e.g. "250 2.0.0 Ok: queued as X"
    route: str  # e.g. "smtp:relay.example:25", "mx:example.com", "maildir:/srv/mail"
    remote: str = ""  # the host that answered ("" when Coffer decided itself)
    # For a delivered recipient: the success notice it is owed if the sender asked
    # for one (RFC 3461 NOTIFY=SUCCESS): "delivered" (a local mailbox), "relayed"
    # (a next hop without DSN, §5.2.2), or "" (the next hop took the request on).
    notice: str = ""


def status_of(reply: str) -> RcptStatus:
    """RFC 5321 §4.2.1: 2yz delivered, 4yz try again later, 5yz permanent failure."""
    first = reply[:1]
    if first == "2":
        return RcptStatus.DELIVERED
    if first == "5":
        return RcptStatus.BOUNCED
    return RcptStatus.DEFERRED


def next_hop_context(cfg: Config) -> ssl.SSLContext:
    """What verifies a next hop's certificate: ``delivery.ca_file``, else the system
    trust store (for delivery and for recipient verification alike)."""
    ca = cfg.delivery.ca_file
    return ssl.create_default_context(cafile=str(cfg.path(ca)) if ca is not None else None)


class Deliverer:
    def __init__(
        self,
        cfg: Config,
        *,
        resolver: MxResolver | None = None,
        tls_context: ssl.SSLContext | None = None,
        mx_port: int = 25,
        executor: Executor | None = None,
        sts: PolicySource | None = None,
        tls_reports: TlsReportStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``tls_context`` verifies next hops for ``tls=required``, ``smtps://`` and
        MTA-STS (default: ``delivery.ca_file``, else the system trust store);
        ``mx_port`` and ``sts`` (its HTTPS port) exist for tests on loopback;
        ``tls_reports`` counts the MTA-STS and DANE sessions for RFC 8460 reports
        (``delivery.tls_rpt``)."""
        self.cfg = cfg
        self.routes: dict[str, Route] = parse_routes(cfg.delivery.routes, cfg.data_dir)
        self.resolver = resolver or MxResolver.from_config(cfg.dns, dnssec=cfg.delivery.dane)
        self.mx_port = mx_port
        self.executor = executor
        if tls_context is None:
            tls_context = next_hop_context(cfg)
        self.client = SmtpClient(
            helo_name=cfg.delivery.helo_name or cfg.hostname,
            connect_timeout=cfg.delivery.connect_timeout,
            command_timeout=cfg.delivery.command_timeout,
            destination_concurrency=cfg.queue.destination_concurrency,
            verified_context=tls_context,
        )
        self.sts = sts or PolicySource(self.resolver, cfg.data_dir, context=tls_context,
                                       timeout=cfg.delivery.mta_sts_timeout)
        self.tls_reports = tls_reports
        self.clock = clock
        if tls_reports is not None:
            self.sts.on_fetch_failed = self._sts_fetch_failed

    async def deliver(
        self, envelope: Envelope, data: bytes, rcpts: Sequence[str], *, qid: str = ""
    ) -> list[Outcome]:
        """One outcome per recipient in ``rcpts``, in the same order."""
        groups: dict[str, tuple[Route | None, str, list[str]]] = {}
        for rcpt in rcpts:
            domain = domain_of(rcpt)
            route = select_route(self.routes, domain)
            if isinstance(route, MxRoute):
                key = f"mx:{domain}"
            elif route is None:
                key = f"none:{domain}"
            else:
                key = route.key
            groups.setdefault(key, (route, domain, []))[2].append(rcpt)

        if len(groups) == 1:
            # The usual case (one destination): no task and no gather for it.
            ((key, (route, domain, group)),) = groups.items()
            results = [await self._guarded(key, route, domain, envelope, data, group)]
        else:
            results = await asyncio.gather(
                *(self._guarded(key, route, domain, envelope, data, group)
                  for key, (route, domain, group) in groups.items())
            )
        by_rcpt = {o.rcpt: o for outcomes in results for o in outcomes}
        return [by_rcpt[r] for r in rcpts]

    async def _guarded(
        self, key: str, route: Route | None, domain: str, envelope: Envelope, data: bytes,
        rcpts: list[str],
    ) -> list[Outcome]:
        try:
            return await self._deliver_group(key, route, domain, envelope, data, rcpts)
        except Exception as exc:
            # A bug or an unforeseen error for one destination must not block the
            # message's other destinations, nor keep it forever: it is deferred like
            # a 4xx, so queue.max_age still ends in a bounce the sender hears about.
            log.event("delivery_error", route=key, error=f"{type(exc).__name__}: {exc}")
            reply = f"451 4.3.0 Internal error delivering via {key}"
            return [Outcome(r, RcptStatus.DEFERRED, reply, key) for r in rcpts]

    async def _deliver_group(
        self, key: str, route: Route | None, domain: str, envelope: Envelope, data: bytes,
        rcpts: list[str],
    ) -> list[Outcome]:
        if route is None:
            # A configuration gap, not the recipient's fault: keep the mail and retry,
            # so fixing delivery.routes delivers it.
            reply = f"451 4.4.4 No route for domain {domain!r} (set delivery.routes)"
            return [Outcome(r, RcptStatus.DEFERRED, reply, key) for r in rcpts]
        if isinstance(route, MaildirRoute):
            return await self._maildir(route, envelope, data, rcpts)
        if isinstance(route, SmtpRoute):
            dest = Destination(route.host, route.port, route.tls, route.host)
            result = await self._send(dest, envelope, data, rcpts)
            return _outcomes(result, rcpts, key, dest)
        return await self._mx(key, domain, envelope, data, rcpts)

    async def _send(
        self, dest: Destination, envelope: Envelope, data: bytes, rcpts: list[str]
    ) -> TransactionResult:
        mail_dsn, rcpt_dsn = to_pass_on(envelope)
        return await self.client.send(
            dest, envelope.mail_from, rcpts, data, smtputf8=envelope.smtputf8,
            mail_dsn=mail_dsn, rcpt_dsn=rcpt_dsn,
        )

    async def _maildir(
        self, route: MaildirRoute, envelope: Envelope, data: bytes, rcpts: list[str]
    ) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        out: list[Outcome] = []
        for rcpt in rcpts:
            try:
                path: Path = await loop.run_in_executor(
                    self.executor, _maildir_deliver, route.path, rcpt, envelope.mail_from, data,
                    self.cfg.queue.fsync, self.cfg.hostname,
                )
            except DeliveryError as exc:
                reply = exc.reply or f"451 4.3.0 {exc}"
                out.append(Outcome(rcpt, status_of(reply), reply, route.key))
                continue
            out.append(Outcome(rcpt, RcptStatus.DELIVERED,
                               f"250 2.0.0 Delivered to maildir as {path.name}", route.key,
                               notice="delivered"))  # RFC 3464 §2.3.3: final delivery
        return out

    async def _mx(
        self, key: str, domain: str, envelope: Envelope, data: bytes, rcpts: list[str]
    ) -> list[Outcome]:
        try:
            hosts = await self.resolver.lookup(domain)
        except DeliveryError as exc:
            reply = exc.reply or f"451 4.4.3 {exc}"
            status = RcptStatus.DEFERRED if exc.transient else RcptStatus.BOUNCED
            return [Outcome(r, status, reply, key) for r in rcpts]
        policy = await self._sts_policy(domain)
        tls = self.cfg.delivery.mx_tls
        tried = 0
        outcomes: list[Outcome] = []
        for host in hosts:
            try:
                host_dane = await self._dane_policy(domain, host, policy)
            except _DaneLookupFailed as exc:
                self._count_tlsa(domain, host.name, (), tlsrpt.DNSSEC_INVALID)
                outcomes = [Outcome(r, RcptStatus.DEFERRED, exc.reply, key, host.name)
                            for r in rcpts]
                continue
            refusal = None if host_dane is not None else self._sts_screen(policy, domain,
                                                                          host)
            if refusal is not None:
                outcomes = [Outcome(r, RcptStatus.DEFERRED, refusal, key, host.name)
                            for r in rcpts]
                continue
            for addr in host.addresses:
                if tried >= MAX_MX_ADDRESSES:
                    break
                tried += 1
                dest = Destination(addr, self.mx_port, tls, host.name)
                if host_dane is not None:
                    result = await self._send_dane(host_dane, domain, dest, envelope, data,
                                                   rcpts)
                else:
                    result = await self._send_sts(policy, domain, dest, envelope, data, rcpts)
                outcomes = _outcomes(result, rcpts, key, dest)
                # RFC 5321 §5.1: when a host cannot be reached or fails the session
                # temporarily, try the next one; a per-recipient answer is final for
                # this attempt, and so is a permanent refusal.
                if not (result.session_failed
                        and all(o.status is RcptStatus.DEFERRED for o in outcomes)):
                    return outcomes
        return outcomes

    async def _dane_policy(
        self, domain: str, host: MxHost, sts: Policy | None
    ) -> dane.HostPolicy | None:
        """How DANE (RFC 7672) has this MX host be talked to, or None when it does
        not apply (then MTA-STS or ``delivery.mx_tls`` do, as without DANE).

        §2.2.1, §2.2.2: only a host reached through secure MX and address records
        has its TLSA records looked up (``_<port>._tcp.<host>``, the port we connect
        to).  §2.1.1: when that lookup fails the host is not used
        (:class:`_DaneLookupFailed`): the failure may be an attacker's.
        """
        if not self.cfg.delivery.dane or not host.secure:
            return None
        answer = await self._tlsa(host)
        if answer is None:
            raise _DaneLookupFailed(_dane_refusal(domain, host.name, "TLSA lookup failed",
                                                  "tlsa_lookup"))
        found = dane.host_policy(answer)
        if found is not None:
            found = dataclasses.replace(found, names=_reference_ids(domain, host))
        if found is not None and found.mode == "encrypt" and sts is not None \
                and sts.mode == "enforce":
            # Only unusable records: DANE asks for TLS without authentication, an
            # enforced MTA-STS policy asks for more (a PKIX-valid certificate).
            return None
        # RFC 8461 §2: usable TLSA records take precedence over MTA-STS.
        return found

    async def _tlsa(self, host: MxHost) -> dane.TlsaAnswer | None:
        """The TLSA records of a secure MX host (None: the lookup failed).

        RFC 7672 §2.2.2: when the host name is an alias (its secure address answer
        came through CNAMEs), the records are looked up first at the CNAME-expanded
        name, and at the original name when the expanded one has no secure records.
        """
        if host.expanded:
            answer = await self.resolver.tlsa(host.expanded, self.mx_port)
            if answer is None or (answer.secure and answer.records):
                return answer
        return await self.resolver.tlsa(host.name, self.mx_port)

    async def _send_dane(
        self, host_dane: dane.HostPolicy, domain: str, dest: Destination, envelope: Envelope,
        data: bytes, rcpts: list[str],
    ) -> TransactionResult:
        """:meth:`_send` to a DANE-protected MX host (RFC 7672 §2.2, §3): STARTTLS
        and, in ``dane`` mode, a certificate matching the TLSA records, or the host
        is not used (session failed: the next MX host is tried, the recipients are
        deferred 4.7.5, nothing is ever sent in clear)."""
        DANE_SESSIONS.labels(host_dane.mode).inc()
        dest = dataclasses.replace(dest, tls=host_dane.mode, tlsa=host_dane.records,
                                   tlsa_names=host_dane.names)
        result = await self._send(dest, envelope, data, rcpts)
        failure = _tls_failure(result)
        if failure is None:
            if not result.session_failed and result.new_session:
                # RFC 8460 §4.3.2.1: with no usable record the policy could not be
                # applied ("none of the records in the RRset were found to be valid"),
                # though RFC 7672 §2.2 has the mail go over unauthenticated TLS.
                ok = host_dane.mode == "dane"
                self._count_tlsa(domain, dest.server_name, host_dane.published,
                                 tlsrpt.SUCCESS if ok else tlsrpt.TLSA_INVALID,
                                 "" if ok else dest.host, "" if ok else result.local_ip)
            return result
        self._count_tlsa(domain, dest.server_name, host_dane.published,
                         tlsrpt.result_type(failure, dane=True), dest.host, result.local_ip)
        reply = _dane_refusal(domain, dest.server_name, failure, "tls")
        return TransactionResult(dict.fromkeys(rcpts, reply), session_failed=True)

    async def _sts_policy(self, domain: str) -> Policy | None:
        """The domain's MTA-STS policy in enforce or testing mode, else None."""
        if not self.cfg.delivery.mta_sts or address_literal(domain) is not None:
            return None
        policy = await self.sts.policy_for(domain)
        # RFC 8461 §5: mode none is delivery as if the domain published no policy.
        return policy if policy is not None and policy.mode != "none" else None

    async def _send_sts(
        self, policy: Policy | None, domain: str, dest: Destination, envelope: Envelope,
        data: bytes, rcpts: list[str],
    ) -> TransactionResult:
        """:meth:`_send` under the domain's MTA-STS policy.

        RFC 8461 §4.2, §5: STARTTLS with a certificate valid for the MX host name
        (PKIX); in enforce mode a host that cannot give it is not used (the session
        failed: the next MX host is tried, and the recipients are deferred, never sent
        in clear); in testing mode the failure is logged and mail goes as without it.
        """
        if policy is None:
            return await self._send(dest, envelope, data, rcpts)
        result = await self._send(dataclasses.replace(dest, tls="required"), envelope, data,
                                  rcpts)
        failure = _tls_failure(result)
        # A new session that tried TLS (a pooled one was counted when it began).
        if failure is not None or (not result.session_failed and result.new_session):
            self._count_sts_session(policy, domain, dest, failure, result.local_ip)
        if failure is None:
            return result
        if policy.mode == "testing":
            log.event("mta_sts_testing_failure", domain=domain, mx=dest.label, reason=failure)
            if dest.tls == "required":  # delivery.mx_tls asked for no less anyway
                return result
            return await self._send(dest, envelope, data, rcpts)
        MTA_STS_REFUSED.labels("tls").inc()
        log.event("mta_sts_refused", logging.WARNING, domain=domain, mx=dest.label,
                  reason=failure)
        reply = _sts_reply(domain, failure)
        return TransactionResult(dict.fromkeys(rcpts, reply), session_failed=True)

    def _sts_screen(self, policy: Policy | None, domain: str, host: MxHost) -> str | None:
        """The reply for an MX host the enforced policy rules out, or None to try it.

        RFC 8461 §4.1: an MX host must match one of the policy's mx patterns; in
        testing mode a mismatch is logged only (§5)."""
        if policy is None or policy.allows(host.name):
            return None
        why = f"MX host {host.name} matches no mx pattern ({', '.join(policy.mx)})"
        if policy.mode == "testing":
            # Tried all the same: its session is counted as failed (_count_sts_session).
            log.event("mta_sts_testing_failure", domain=domain, mx=host.name, reason=why)
            return None
        self._count_sts(policy, domain, tlsrpt.result_type(why, dane=False), host.name)
        MTA_STS_REFUSED.labels("mx_mismatch").inc()
        log.event("mta_sts_refused", logging.WARNING, domain=domain, mx=host.name,
                  reason=why)
        return _sts_reply(domain, why)

    # -- RFC 8460 counts: one per session to a domain with a policy --------------------

    def _count_sts(self, policy: Policy, domain: str, result: str, mx: str = "",
                   ip: str = "", local: str = "") -> None:
        if self.tls_reports is None:
            return
        failed = result != tlsrpt.SUCCESS  # §4.4: only failures say where
        self.tls_reports.count(self.clock(), SessionKey(
            domain, "sts", tlsrpt.sts_policy_string(policy.mode, policy.mx, policy.max_age),
            policy.mx, result, mx if failed else "", ip if failed else "",
            local if failed else ""))

    def _count_sts_session(self, policy: Policy, domain: str, dest: Destination,
                           failure: str | None, local: str) -> None:
        """RFC 8460 §4.3: one result per session.  A host outside the mx patterns of a
        testing policy (tried all the same, §5) fails it whatever TLS gave (§4.1)."""
        if not policy.allows(dest.server_name):
            result = tlsrpt.VALIDATION_FAILURE
        elif failure is None:
            self._count_sts(policy, domain, tlsrpt.SUCCESS)
            return
        else:
            result = tlsrpt.result_type(failure, dane=False)
        self._count_sts(policy, domain, result, dest.server_name, dest.host, local)

    def _count_tlsa(self, domain: str, mx: str, records: Sequence[dane.Tlsa], result: str,
                    ip: str = "", local: str = "") -> None:
        if self.tls_reports is None:
            return
        failed = result != tlsrpt.SUCCESS
        self.tls_reports.count(self.clock(), SessionKey(
            domain, "tlsa", tuple(str(r) for r in records), (mx,), result,
            mx if failed else "", ip if failed else "", local if failed else ""))

    def _sts_fetch_failed(self, domain: str, result: str) -> None:
        """RFC 8460 §4.3.2.2: a policy that could not be fetched, or did not parse."""
        if self.tls_reports is not None:
            self.tls_reports.count(self.clock(), SessionKey(domain, "sts", (), (), result))

    async def aclose(self) -> None:
        await self.client.aclose()


def _reference_ids(domain: str, host: MxHost) -> tuple[str, ...]:
    """The names a DANE-TA(2) certificate of ``host`` may carry (RFC 7672 §3.2.2).

    The MX host name as the MX record gives it and, behind a secure CNAME chain, the
    name it expands to (§2.2.2: the TLSA base domain is one of the two); and the
    next-hop domain, the recipient domain whose MX records named the host (the host
    itself when it has none).  Only a host reached through a secure MX RRset gets
    here (``MxHost.secure``), so the next-hop domain is bound to the host by DNSSEC,
    not by an attacker's answer.
    """
    names = (host.name, host.expanded, domain.rstrip(".").lower())
    return tuple(dict.fromkeys(n for n in names if n))


class _DaneLookupFailed(Exception):
    """A secure MX host whose TLSA records could not be had; ``reply`` says so."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def _dane_refusal(domain: str, host: str, why: str, reason: str) -> str:
    """Log and count an MX host DANE rules out; the reply its recipients get."""
    DANE_REFUSED.labels(reason).inc()
    log.event("dane_refused", logging.WARNING, domain=domain, mx=host, reason=why)
    # RFC 3463 X.7.5 (cryptographic failure), temporary: the queue retries, then bounces.
    return f"451 4.7.5 DANE: {host}: {why}"


def _sts_reply(domain: str, why: str) -> str:
    # RFC 3463 X.7.5 (cryptographic failure), temporary: the queue retries, then bounces.
    return f"451 4.7.5 MTA-STS policy of {domain}: {why}"


def _tls_failure(result: TransactionResult) -> str | None:
    """What went wrong with TLS when a session failed for want of it (RFC 3207's
    4.7.10 replies from the SMTP client), else None."""
    if not result.session_failed:
        return None
    for reply in result.replies.values():
        if reply.startswith("451 4.7.10 "):
            return reply.removeprefix("451 4.7.10 ")
    return None


def _outcomes(
    result: TransactionResult, rcpts: list[str], key: str, dest: Destination
) -> list[Outcome]:
    # RFC 3461 §5.2.2: a next hop without DSN cannot report success, so a delivered
    # recipient is owed a "relayed" notice from us (if it asked, see the worker).
    notice = "" if result.dsn else "relayed"
    return [Outcome(r, status_of(result.replies[r]), result.replies[r], key, dest.label,
                    notice=notice) for r in rcpts]


def _maildir_deliver(
    root: Path, rcpt: str, sender: str, data: bytes, fsync: bool, hostname: str
) -> Path:
    return maildir.deliver(root, rcpt, sender, data, fsync=fsync, hostname=hostname)
