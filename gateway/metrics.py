"""Prometheus metrics, served on a loopback HTTP port (``metrics.address``).

The names follow Prometheus conventions (``_total`` for counters, base units).
Metric objects live here so every module increments the same ones.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

CONNECTIONS = Counter(
    "coffer_smtp_connections_total", "SMTP sessions opened", ["listener"], registry=REGISTRY
)
ACCEPTED = Counter(
    "coffer_messages_accepted_total", "Messages acknowledged with 250 after DATA",
    ["listener"], registry=REGISTRY,
)
REJECTED = Counter(
    "coffer_messages_rejected_total", "Commands or messages refused, by reason",
    ["reason"], registry=REGISTRY,
)
DELIVERED = Counter(
    "coffer_recipients_delivered_total", "Recipients delivered", ["route"], registry=REGISTRY
)
DEFERRED = Counter(
    "coffer_recipients_deferred_total", "Recipients deferred for retry", ["route"],
    registry=REGISTRY,
)
BOUNCED = Counter(
    "coffer_recipients_bounced_total", "Recipients bounced", ["route"], registry=REGISTRY
)
HELD = Counter(
    "coffer_messages_held_total", "Messages moved to the held area", ["stage"], registry=REGISTRY
)
QUEUE_DEPTH = Gauge(
    "coffer_queue_depth", "Messages in the spool, by status", ["status"], registry=REGISTRY
)
STAGE_SECONDS = Histogram(
    "coffer_stage_seconds", "Time spent in each pipeline stage", ["stage"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ARCHIVE_BACKEND_UP = Gauge(
    "coffer_archive_backend_up", "1 while the archive backend (database, object storage) "
    "answers, 0 while new mail is refused with 451 4.3.0", registry=REGISTRY,
)
ARCHIVE_BACKEND_UP.set(1)
MTA_STS_FETCHES = Counter(
    "coffer_mta_sts_fetches_total", "MTA-STS policy fetches (RFC 8461 §3.3), by result "
    "(ok, failed)", ["result"], registry=REGISTRY,
)
MTA_STS_REFUSED = Counter(
    "coffer_mta_sts_refused_total", "Delivery attempts to an MX host refused by the "
    "domain's MTA-STS policy in enforce mode, by reason (mx_mismatch, tls)", ["reason"],
    registry=REGISTRY,
)
DANE_SESSIONS = Counter(
    "coffer_dane_sessions_total", "Delivery attempts to MX hosts with DNSSEC-validated "
    "TLSA records (RFC 7672), by mode (dane: certificate checked against the records, "
    "encrypt: only unusable records, TLS without authentication)", ["mode"],
    registry=REGISTRY,
)
TLSRPT_REPORTS = Counter(
    "coffer_tlsrpt_reports_total", "SMTP TLS reports (RFC 8460) sent to a domain's rua "
    "address, by channel (mailto: spooled, https: POSTed) and result (sent, failed, "
    "interrupted: a send cut short by a crash, not repeated)",
    ["channel", "result"], registry=REGISTRY,
)
DANE_REFUSED = Counter(
    "coffer_dane_refused_total", "MX hosts not used because DANE (RFC 7672) failed, by "
    "reason (tlsa_lookup: the TLSA lookup failed; tls: no STARTTLS, handshake failed or "
    "certificate matched no record)", ["reason"], registry=REGISTRY,
)

_STAGE_TIMERS: dict[str, Histogram] = {}


def stage_seconds(stage: str) -> Histogram:
    """STAGE_SECONDS for one stage: its labelled child, looked up once per name
    (``labels()`` locks and validates on every call; stages run for every message)."""
    child = _STAGE_TIMERS.get(stage)
    if child is None:
        child = _STAGE_TIMERS[stage] = STAGE_SECONDS.labels(stage)
    return child


_ACCEPTED: dict[str, Counter] = {}


def accepted(listener: str) -> Counter:
    """ACCEPTED for one listener: its labelled child, looked up once per name (as
    :func:`stage_seconds`; one increment per message)."""
    child = _ACCEPTED.get(listener)
    if child is None:
        child = _ACCEPTED[listener] = ACCEPTED.labels(listener)
    return child
