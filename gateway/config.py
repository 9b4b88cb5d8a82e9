"""Typed settings loaded from one YAML file (``coffer.yaml``).

Every key, its meaning and its default is listed in docs/configuration.md; the
models below are the single source of truth for both.  A mistake is reported as
a :class:`gateway.errors.ConfigError` naming file, line and key, and the process
refuses to start (or, on SIGHUP, keeps the configuration it has).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from archive.imap.config import ImapSection
from archive.s3config import S3Config
from gateway import yamlsource
from gateway.check.config import CheckConfig
from gateway.check.spam.config import SpamConfig
from gateway.errors import ConfigError
from gateway.transform.config import CryptoConfig

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_duration(value: Any) -> float:
    """'30s', '5m', '2h', '5d', '1w' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 2h or 5d")
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 5m, 2h, 5d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: Any) -> int:
    """'10M', '512k', '1G' (powers of 1024) or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512k, 10M or 1G")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size (use e.g. 512k, 10M, 1G)")
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S+)\s*$")


def parse_rate(value: Any) -> tuple[int, float]:
    """'500/1h' (COUNT/DURATION) -> (500, 3600.0)."""
    m = _RATE.match(str(value)) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{value!r} is not a rate (use COUNT/DURATION, e.g. 500/1h or 100/1m)")
    count = int(m.group(1))
    try:
        window = parse_duration(m.group(2))
    except ValueError:
        raise ValueError(f"{value!r}: {m.group(2)!r} is not a duration (use COUNT/DURATION, "
                         "e.g. 500/1h or 100/1m)") from None
    if count < 1 or window < 1:
        raise ValueError(f"{value!r}: the count must be at least 1 and the window at least 1s")
    return count, window


def parse_hostport(value: str, default_port: int) -> tuple[str, int]:
    """'127.0.0.1:2525', '[::1]:25', 'host' -> (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    if not host:
        raise ValueError(f"{value!r}: missing host")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ValueError(f"{value!r}: port is not a number") from None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerConfig(_Model):
    name: str = Field(description="Name used in logs and metrics")
    role: Literal["inbound", "submission"] = Field(
        "inbound", description="inbound: MX role; submission: clients that authenticate"
    )
    address: str = Field("127.0.0.1:2525", description="host:port to listen on")
    tls: Literal["none", "starttls", "implicit"] = Field(
        "starttls", description="STARTTLS offered, implicit TLS (port 465 role) or none"
    )
    require_auth: bool | None = Field(
        None, description="AUTH required before MAIL; default: true for submission"
    )

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_hostport(self.address, 25)

    @property
    def auth_required(self) -> bool:
        return self.require_auth if self.require_auth is not None else self.role == "submission"


def _default_listeners() -> list[ListenerConfig]:
    return [ListenerConfig(name="inbound")]


class TlsConfig(_Model):
    cert: Path | None = Field(None, description="PEM certificate chain (relative to data_dir)")
    key: Path | None = Field(None, description="PEM private key (relative to data_dir)")


class RecipientsConfig(_Model):
    """Which recipients of the local domains exist, checked at RCPT for every client:
    an unknown one gets 550 5.1.1 instead of a bounce later to a sender that is often
    forged (backscatter). Like Postfix's `relay_recipient_maps` (`file`) and
    `reject_unverified_recipient` (`verify`); mail to other domains is never checked."""

    file: Path | None = Field(
        None, description="File of valid recipients, one address a line, '@domain' for a "
        "whole domain, '#' comments (relative to data_dir); null: every recipient of a "
        "local domain is accepted. Re-read on SIGHUP",
    )
    verify: bool = Field(
        False, description="Probe the next hop (delivery.routes smtp:// or smtps://) with "
        "MAIL FROM:<> and RCPT TO before answering RCPT, and cache its answer; RCPTs a "
        "client pipelines are probed together, in one next-hop session",
    )
    verify_timeout: Duration = Field(
        10.0, gt=0, description="Longest a probe may take (connect included); then the "
        "recipient is undetermined. Recipients probed together: each one's reply may take "
        "this long after the one before",
    )
    positive_ttl: Duration = Field(
        7 * 86400.0, gt=0, description="How long a recipient the next hop accepted is "
        "remembered (Postfix address_verify_positive_expire_time)",
    )
    negative_ttl: Duration = Field(
        3 * 3600.0, gt=0, description="How long a recipient the next hop refused (5xx) is "
        "remembered (Postfix address_verify_negative_expire_time)",
    )
    undetermined_ttl: Duration = Field(
        60.0, gt=0, description="How long a probe without an answer (4xx, no connection, "
        "timeout) is remembered before the next hop is asked again",
    )
    cache: bool = Field(
        True, description="Keep the next hop's answers in DATA_DIR/recipients.db, shared by "
        "the worker processes and kept across restarts (inspect and forget them with `coffer "
        "recipients cache`); false: in memory, per process, forgotten on restart and SIGHUP",
    )
    undetermined: Literal["tempfail", "accept"] = Field(
        "tempfail", description="RCPT reply when a probe gets no answer: tempfail (450 "
        "4.1.1, the client retries; Postfix's default) or accept",
    )


class RelayConfig(_Model):
    local_domains: list[str] = Field(
        default_factory=list, description="Domains Coffer accepts mail for from anyone"
    )
    trusted_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs allowed to relay to any domain without AUTH (like Postfix mynetworks)",
    )

    recipients: RecipientsConfig = Field(default_factory=RecipientsConfig)

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.trusted_networks]


class LimitsConfig(_Model):
    max_message_size: Size = Field(
        36700160, description="SIZE advertised and enforced (552 5.3.4), bytes or 35M"
    )
    max_recipients: int = Field(100, ge=1, description="RCPT TO per transaction (452 4.5.3)")
    max_line_length: int = Field(
        1000, ge=80, description="Longest command or text line incl. CRLF (RFC 5321 §4.5.3.1)"
    )
    max_commands: int = Field(
        1000, ge=10, description="Commands per session before 421 4.7.0, not counting those "
        "of transactions that ended in an accepted message")
    idle_timeout: Duration = Field(300.0, description="Idle time before 421 4.4.2")
    max_connections_per_ip: int = Field(20, ge=1, description="Concurrent sessions per client IP")
    max_connections: int = Field(1000, ge=1, description="Concurrent sessions per process")
    max_auth_failures: int = Field(3, ge=1, description="Failed AUTH attempts before 421")


RateKey = Literal["auth_user", "client_ip", "sender_domain"]
Role = Literal["inbound", "submission"]


def _all_roles() -> list[Role]:
    return ["inbound", "submission"]


class RateLimitRule(_Model):
    """One sending rate limit, counted per key across every worker process (the counts
    live in DATA_DIR/ratelimit.db); over it, MAIL or RCPT gets 450 4.7.1."""

    key: RateKey = Field(
        description="What is counted: auth_user (the AUTH identity; unauthenticated "
        "sessions are not counted), client_ip (an IPv6 client by its /64), sender_domain "
        "(the MAIL FROM domain, only for authenticated or relay.trusted_networks clients)"
    )
    name: str | None = Field(
        None, description="Names the rule in logs and `coffer ratelimit list`; default: "
        "the key. Two rules on the same key need distinct names"
    )
    messages: str | None = Field(
        None, description="Transactions (MAIL FROM) per sliding window, COUNT/DURATION "
        "(e.g. 500/1h); over it MAIL FROM gets 450 4.7.1; null: not limited"
    )
    recipients: str | None = Field(
        None, description="Accepted recipients (RCPT TO) per sliding window, "
        "COUNT/DURATION (e.g. 2000/1h); over it RCPT TO gets 450 4.7.1; null: not limited"
    )
    roles: list[Role] = Field(
        default_factory=_all_roles,
        description="Listener roles the rule applies on",
    )
    listeners: list[str] = Field(
        default_factory=list, description="Listener names the rule applies on; empty: "
        "every listener of `roles`"
    )
    exempt_networks: list[str] = Field(
        default_factory=list, description="CIDRs of clients the rule does not count "
        "(e.g. the mail store that relays for everyone)"
    )
    exempt_trusted: bool = Field(
        False, description="Do not count clients in relay.trusted_networks either"
    )

    @field_validator("messages", "recipients")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    @property
    def rule_name(self) -> str:
        return self.name or self.key

    @property
    def message_rate(self) -> tuple[int, float] | None:
        return parse_rate(self.messages) if self.messages is not None else None

    @property
    def recipient_rate(self) -> tuple[int, float] | None:
        return parse_rate(self.recipients) if self.recipients is not None else None


def _default_rate_limits() -> list[RateLimitRule]:
    # A person sends tens of messages an hour, a busy one a hundred or two; a stolen
    # password sends tens of thousands.  500 messages and 2000 recipients an hour stay
    # far above the first and cut the second to a few percent (docs/operations.md).
    return [RateLimitRule(key="auth_user", messages="500/1h", recipients="2000/1h",
                          roles=["submission"])]


class AuthConfig(_Model):
    passwd_file: Path | None = Field(
        None, description="File of 'user:argon2-hash' lines for SMTP AUTH (relative to data_dir)"
    )


class QueueConfig(_Model):
    fsync: bool = Field(True, description="fsync spool writes before 250 (never turn off)")
    max_age: Duration = Field(5 * 86400.0, description="Give up and bounce after this long")
    retry_initial: Duration = Field(300.0, description="First retry delay")
    retry_max: Duration = Field(3600.0, description="Longest retry delay")
    retry_jitter: float = Field(0.2, ge=0, le=1, description="Random spread of retry delays")
    scan_interval: Duration = Field(5.0, description="How often the spool is rescanned")
    min_free_space: Size = Field(
        100 * 1024 * 1024, description="Answer 452 4.3.1 below this much free disk"
    )
    workers: int = Field(1, ge=1, le=64, description="Processes sharing the SMTP ports")
    delivery_concurrency: int = Field(50, ge=1, description="Messages delivered at once")
    destination_concurrency: int = Field(10, ge=1, description="Connections per destination")
    delay_warning: Duration = Field(
        0.0, description="Tell the sender once per recipient when a message has been "
        "deferred this long (RFC 3464 Action: delayed; NOTIFY=DELAY, or no NOTIFY); "
        "0: never (Postfix delay_warning_time)"
    )
    bounce_size_limit: Size = Field(
        100 * 1000, description="A RET=FULL failure notice returns the whole message up to "
        "this size, its header section above it (RFC 3461 §4.3; Postfix bounce_size_limit)"
    )


def _address(addr: str) -> str:
    """``addr`` if it has the shape local@domain (a config mistake otherwise)."""
    if "@" not in addr.strip("@") or any(c.isspace() for c in addr):
        raise ValueError(f"{addr!r} is not an address (local@domain)")
    return addr


class TlsRptConfig(_Model):
    """SMTP TLS Reporting (RFC 8460): daily reports to the domains that ask for them."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    enabled: bool = Field(
        False, description="Count MX sessions to domains with an MTA-STS policy or DANE "
        "records (successes and RFC 8460 §4.3 failures, in DATA_DIR/tlsrpt.db) and, after "
        "each UTC day, send each such domain that publishes a _smtp._tls TXT record its "
        "report (mailto: through the queue, https: POST)"
    )
    organization: str | None = Field(
        None, description="organization-name in the report (default: hostname)"
    )
    contact: str | None = Field(
        None, description="contact-info in the report (default: postmaster@ the first "
        "relay.local_domains entry, else postmaster@hostname)"
    )
    from_address: str | None = Field(
        None, alias="from", description="From: and envelope sender of mailed reports "
        "(default: noreply-tlsrpt@hostname)"
    )

    @field_validator("from_address")
    @classmethod
    def _from(cls, value: str | None) -> str | None:
        return None if value is None else _address(value)


class DeliveryConfig(_Model):
    routes: dict[str, str] = Field(
        default_factory=lambda: {"*": "mx"},
        description="domain (or '*', or '.sub.example') -> mx | smtp://host:port[?tls=...] "
        "| maildir:PATH",
    )
    helo_name: str | None = Field(None, description="EHLO name (default: hostname)")
    connect_timeout: Duration = Field(30.0, description="TCP connect timeout")
    command_timeout: Duration = Field(300.0, description="Per-command timeout (RFC 5321 §4.5.3.2)")
    mx_tls: Literal["required", "opportunistic", "off"] = Field(
        "opportunistic", description="TLS towards MX hosts"
    )
    mta_sts: bool = Field(
        True, description="Honour the recipient domain's MTA-STS policy (RFC 8461) on "
        "MX-routed delivery: in enforce mode only the policy's MX hosts, only over "
        "STARTTLS with a verified certificate, else 451 4.7.5 and retry; testing mode "
        "is logged. Routes to smtp:// next hops keep their own tls="
    )
    dane: bool = Field(
        True, description="DANE for SMTP (RFC 7672) on MX-routed delivery: when the "
        "domain's MX records and an MX host's addresses are DNSSEC-validated (the AD bit "
        "of dns.nameservers, which must then be a validating resolver on loopback, e.g. "
        "unbound) and the host publishes TLSA records, STARTTLS is mandatory and the "
        "certificate must match a DANE-EE/DANE-TA record, else 451 4.7.5 and the next MX "
        "host; takes precedence over MTA-STS and mx_tls. Without a validating resolver "
        "no answer is secure and it never applies"
    )
    mta_sts_timeout: Duration = Field(
        10.0, gt=0, description="Time limit for fetching one MTA-STS policy over HTTPS "
        "(RFC 8461 §3.3)"
    )
    tls_rpt: TlsRptConfig = Field(
        default_factory=TlsRptConfig, description="SMTP TLS Reporting (RFC 8460)"
    )
    ca_file: Path | None = Field(
        None, description="PEM CA certificates that verify next hops (tls=required, "
        "smtps://, MTA-STS MX hosts) and MTA-STS policy hosts, relative to data_dir; "
        "default: the system trust store"
    )


class DnsConfig(_Model):
    nameservers: list[str] = Field(
        default_factory=list, description="host or host:port; empty: /etc/resolv.conf"
    )
    timeout: Duration = Field(5.0, description="DNS lifetime per query")


class MetricsConfig(_Model):
    address: str | None = Field(
        "127.0.0.1:9025", description="Prometheus /metrics on this loopback address; null: off"
    )


class LogConfig(_Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level")
    format: Literal["json", "text"] = Field("json", description="One JSON object per line")
    file: Path | None = Field(None, description="Log file (default: standard error)")


JOURNAL_SOURCE_KEYWORDS = ("trusted_networks", "authenticated")


class JournalConfig(_Model):
    """Journaling: mail servers send a copy of every message (internal mail too) to a
    journal address; Coffer archives it with its true envelope and delivers nothing."""

    addresses: list[str] = Field(
        default_factory=list, description="Journal addresses: mail to them is archived "
        "(an Exchange/Microsoft 365 envelope journal report as the original it carries, "
        "anything else as is) and never delivered; empty: no journaling"
    )
    sources: list[str] = Field(
        default_factory=lambda: list(JOURNAL_SOURCE_KEYWORDS),
        description="Who may send to a journal address: trusted_networks "
        "(relay.trusted_networks), authenticated (SMTP AUTH) and/or CIDRs; anyone else "
        "gets 550 5.7.1 at RCPT TO",
    )
    retention: str | None = Field(
        None, description="Retention period of journaled messages (e.g. 7y, 18mo, 90d, "
        "forever); the policy does not run for them. Default: kept until a retention is set",
    )

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return [_address(a).lower() for a in value]

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: list[str]) -> list[str]:
        for src in value:
            if src in JOURNAL_SOURCE_KEYWORDS:
                continue
            try:
                ipaddress.ip_network(src, strict=False)
            except ValueError:
                raise ValueError(f"{src!r} is neither trusted_networks, authenticated "
                                 "nor a CIDR") from None
        return value

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str | None) -> str | None:
        if value is not None and value != "forever" and not re.fullmatch(
                r"\d+(y|mo|w|d)", value.strip().lower()):
            raise ValueError(f"{value!r} is not a retention period (use e.g. 7y, 18mo, "
                             "90d, forever)")
        return value

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(s, strict=False) for s in self.sources
                if s not in JOURNAL_SOURCE_KEYWORDS]


class ArchiveConfig(_Model):
    """Where the archive's metadata and full-text index live (the store: ``s3:``)."""

    database: str | None = Field(
        None, description="Metadata database, an SQLAlchemy URL; postgresql://HOST/DB is "
        "shared by every node (password: ~/.pgpass or PGPASSWORD, not the URL); default: "
        "SQLite DATA_DIR/archive/meta.db",
    )
    index: Literal["fts5", "whoosh", "pg"] | None = Field(
        None, description="Full-text engine; default: pg with PostgreSQL, else fts5",
    )
    node: str | None = Field(
        None, description="This node's name in a cluster, unique per node: names its ledger "
        "chain (default: hostname)",
    )
    ledger_seal: Duration = Field(
        60.0, gt=0, description="How often this node signs and closes its ledger segment and "
        "copies it to the S3 bucket under Object Lock (with s3:)",
    )
    health_probe: Duration = Field(
        5.0, gt=0, description="While the archive backend is down, how often it is probed",
    )
    rejected: bool = Field(
        True, description="Archive messages rejected after DATA (policy, spam, check 5xx) "
        'with state "rejected" and the reply, before the reply is sent; if that write '
        "fails the client gets 451 4.3.0 instead"
    )
    journal: JournalConfig = Field(
        default_factory=JournalConfig,
        description="Archiving internal mail by journaling (README: Archiving internal mail)",
    )

    @field_validator("database")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        # A configuration file is copied, diffed and printed: the password stays in
        # libpq's own places (~/.pgpass, PGPASSFILE, a ?passfile= parameter, PGPASSWORD).
        if value is not None and re.match(r"^[a-z0-9+]+://[^/@]*:[^/@]*@", value):
            raise ValueError("no password in the database URL: put it in ~/.pgpass, a "
                             "?passfile=FILE parameter or PGPASSWORD")
        return value

    @field_validator("node")
    @classmethod
    def _node_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
            raise ValueError(f"{value!r}: a node name is 1-63 of A-Z a-z 0-9 . _ -")
        return value


class Config(_Model):
    hostname: str = Field("localhost", description="Name in the banner, EHLO and Received")
    data_dir: Path = Field(Path("."), description="Root of spool, archive, maildirs (rel. to file)")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="Event loop of `coffer serve`: uvloop (libuv, less CPU per "
        "message; asyncio's if uvloop is not installed) or asyncio's own. Read at start, "
        "not on reload; the environment variable COFFER_EVENT_LOOP overrides it",
    )
    relay: RelayConfig = Field(default_factory=RelayConfig)
    listeners: list[ListenerConfig] = Field(default_factory=_default_listeners)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    rate_limits: list[RateLimitRule] = Field(
        default_factory=_default_rate_limits,
        description="Sending rate limits (Postfix anvil's smtpd_client_message_rate_limit "
        "and smtpd_client_recipient_rate_limit, per user, IP or sender domain); default: "
        "500 messages and 2000 recipients an hour per authenticated user on submission "
        "listeners; [] turns them off",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    dns: DnsConfig = Field(default_factory=DnsConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)
    spam: SpamConfig = Field(default_factory=SpamConfig)
    crypto: CryptoConfig = Field(default_factory=CryptoConfig)
    s3: S3Config | None = Field(
        None, description="S3 object storage with Object Lock for archive blobs and ledger "
        "segments (default: local files)",
    )
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig)
    imap: ImapSection = Field(default_factory=ImapSection)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    policy: Path | None = Field(None, description="Policy file (relative to data_dir)")

    source: str = Field("<defaults>", exclude=True, description="File this was loaded from")

    def path(self, p: Path | str) -> Path:
        """A configured path, resolved against data_dir."""
        p = Path(p)
        return p if p.is_absolute() else self.data_dir / p

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def node_name(self) -> str:
        """This node's name in a cluster (``archive.node``, else ``hostname``)."""
        return self.archive.node or self.hostname


def _check_semantics(cfg: Config, loc: yamlsource.Locator) -> None:
    for i, lst in enumerate(cfg.listeners):
        try:
            lst.host_port  # noqa: B018 - validates the address
        except ValueError as exc:
            raise loc.error(["listeners", i, "address"], str(exc)) from None
        if lst.tls != "none" and not (cfg.tls.cert and cfg.tls.key):
            raise loc.error(
                ["listeners", i, "tls"],
                f"listener {lst.name!r} offers TLS ({lst.tls}) but tls.cert and tls.key are "
                "not set: set them (coffer init writes a self-signed pair) or set tls: none",
            )
    names = [lst.name for lst in cfg.listeners]
    if len(set(names)) != len(names):
        raise loc.error(["listeners"], "listener names must be unique")
    for i, net in enumerate(cfg.relay.trusted_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise loc.error(["relay", "trusted_networks", i], f"{net!r} is not a CIDR") from None
    _check_rate_limits(cfg, loc)
    if cfg.delivery.ca_file is not None and not cfg.path(cfg.delivery.ca_file).is_file():
        raise loc.error(["delivery", "ca_file"],
                        f"{cfg.path(cfg.delivery.ca_file)}: no such file")
    from gateway.deliver.routes import RouteError, parse_route

    for dom, spec in cfg.delivery.routes.items():
        try:
            parse_route(spec)
        except RouteError as exc:
            raise loc.error(["delivery", "routes", dom], str(exc)) from None


def _check_rate_limits(cfg: Config, loc: yamlsource.Locator) -> None:
    listener_names = {lst.name for lst in cfg.listeners}
    seen: set[str] = set()
    for i, rule in enumerate(cfg.rate_limits):
        if rule.messages is None and rule.recipients is None:
            raise loc.error(["rate_limits", i], "a rate limit needs messages, recipients or "
                            "both (e.g. messages: 500/1h)")
        if rule.rule_name in seen:
            raise loc.error(["rate_limits", i, "name"], f"two rules are named "
                            f"{rule.rule_name!r}: give each rule on the same key a name")
        seen.add(rule.rule_name)
        for j, name in enumerate(rule.listeners):
            if name not in listener_names:
                raise loc.error(["rate_limits", i, "listeners", j],
                                f"no listener is named {name!r}")
        for j, net in enumerate(rule.exempt_networks):
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise loc.error(["rate_limits", i, "exempt_networks", j],
                                f"{net!r} is not a CIDR") from None


def from_data(data: Any, loc: yamlsource.Locator, base: Path) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise loc.error([], "the configuration must be a mapping of keys")
    try:
        cfg = Config.model_validate({**data, "source": loc.file})
    except ValidationError as exc:
        err = exc.errors()[0]
        path = [p for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        more = len(exc.errors()) - 1
        if more:
            msg += f" (and {more} more error{'s' if more > 1 else ''})"
        raise loc.error(path, msg) from None
    data_dir = cfg.data_dir if cfg.data_dir.is_absolute() else (base / cfg.data_dir)
    cfg = cfg.model_copy(update={"data_dir": data_dir.resolve()})
    _check_semantics(cfg, loc)
    return cfg


def load(path: Path | str) -> Config:
    path = Path(path)
    data, loc = yamlsource.load(path)
    return from_data(data, loc, path.resolve().parent)


def find_config(arg: str | None) -> Path:
    """--config, else $COFFER_CONFIG, else ./coffer.yaml."""
    value = arg or os.environ.get("COFFER_CONFIG") or "coffer.yaml"
    return Path(value)


def defaults(data_dir: Path) -> Config:
    return Config(data_dir=data_dir.resolve())


__all__ = ["Config", "ConfigError", "load", "parse_duration", "parse_size"]
