"""Sending rate limits: which counters a MAIL or RCPT charges, and the sliding window.

Pure except for :class:`RateLimiter`, which asks a :class:`CounterStore` (the SQLite
file shared by the worker processes, :mod:`gateway.receive.rate_store`) to charge the
counters in one transaction, and logs a key's first refusal in a window.

Like Postfix's anvil (``smtpd_client_message_rate_limit`` counts MAIL FROM requests
"regardless of whether or not Postfix actually accepts those messages"), a message is
counted at MAIL FROM and a recipient at RCPT TO: the check and the count are one step,
so the limit is exact however many sessions and processes send at once, and a client
over it is refused before anything is accepted that would then have to be bounced.

The window is a sliding one, estimated from two fixed windows: the count of the current
window plus the count of the previous one weighted by how much of it the sliding window
still covers.  Two integers per counter, no list of timestamps; a client that reaches
the limit gets room back gradually, all of it once a whole window has passed without
sending.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from gateway import log
from gateway.config import RateLimitRule
from gateway.receive.addresses import AddressError, domain_to_ascii
from gateway.replies import RATE_LIMITED, Reply

Kind = Literal["messages", "recipients"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_KEY_WORDS = {"auth_user": "user", "client_ip": "client", "sender_domain": "sender domain"}


@dataclass(frozen=True, slots=True)
class Window:
    """The state of one counter: fixed window ``start``, its count and the previous one's.

    ``warned`` is the start of the window in which a refusal was last logged (so that it
    is logged once per window)."""

    start: float = 0.0
    current: int = 0
    previous: int = 0
    warned: float = -1.0


def advance(w: Window, now: float, length: float) -> Window:
    """``w`` moved to the fixed window that holds ``now``."""
    start = math.floor(now / length) * length
    if start == w.start:
        return w
    if start == w.start + length:
        return replace(w, start=start, current=0, previous=w.current)
    return replace(w, start=start, current=0, previous=0)


def estimate(w: Window, now: float, length: float) -> float:
    """The count in the sliding window of ``length`` seconds ending at ``now``
    (``w`` already advanced to ``now``)."""
    covered = 1.0 - (now - w.start) / length
    return w.current + w.previous * max(covered, 0.0)


@dataclass(frozen=True, slots=True)
class Charge:
    """``amount`` taken from counter (rule, kind, key), which allows ``limit`` per ``window``."""

    rule: str
    kind: Kind
    key_type: str
    key: str
    limit: int
    window: float
    amount: int = 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """What charging one counter did: its new state, and whether it was over the limit."""

    window: Window
    count: float
    over: bool
    first_refusal: bool


def charge(w: Window, c: Charge, now: float) -> Outcome:
    """Charge ``c`` against ``w``; over the limit, nothing is added."""
    w = advance(w, now, c.window)
    count = estimate(w, now, c.window)
    if count + c.amount > c.limit:
        first = w.warned != w.start
        return Outcome(replace(w, warned=w.start), count, True, first)
    return Outcome(replace(w, current=w.current + c.amount), count + c.amount, False, False)


def add(w: Window, c: Charge, now: float) -> Window:
    """``c`` added to ``w`` whatever the limit: a charge that was let through while the
    file was locked (:mod:`gateway.receive.rate_store`), counted afterwards."""
    w = advance(w, now, c.window)
    return replace(w, current=w.current + c.amount)


def client_key(ip: str) -> str:
    """The client_ip key: the address, an IPv6 client by its /64 (one site, one end user:
    RFC 6177 §2 assigns at least a /64 to a subscriber, who may use any address in it)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass(frozen=True, slots=True)
class Client:
    """What the rules look at in a session."""

    listener: str
    role: str
    ip: str
    auth_user: str | None
    trusted: bool


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    key: str
    rates: dict[Kind, tuple[int, float]]
    roles: frozenset[str]
    listeners: frozenset[str]
    exempt: tuple[IPNetwork, ...]
    exempt_trusted: bool

    def applies(self, client: Client) -> bool:
        if client.role not in self.roles:
            return False
        if self.listeners and client.listener not in self.listeners:
            return False
        if self.exempt_trusted and client.trusted:
            return False
        if not self.exempt:
            return True
        try:
            ip = ipaddress.ip_address(client.ip)
        except ValueError:
            return True
        return not any(ip in net for net in self.exempt)

    def key_value(self, client: Client, sender: str) -> str | None:
        if self.key == "auth_user":
            return client.auth_user
        if self.key == "client_ip":
            return client_key(client.ip)
        # sender_domain: only where the client vouches for the sender (AUTH or a
        # trusted network); from anyone else the domain is whatever they claim.
        if not (client.auth_user or client.trusted) or "@" not in sender:
            return None
        domain = sender.rpartition("@")[2]
        try:
            return domain_to_ascii(domain)  # one counter for a U-label and its A-label
        except AddressError:
            return domain.lower()


class RateRules:
    """The configured rules, compiled: the charges one MAIL or RCPT makes."""

    def __init__(self, rules: list[RateLimitRule]) -> None:
        self._rules: list[_Rule] = []
        for r in rules:
            rates: dict[Kind, tuple[int, float]] = {}
            if r.message_rate is not None:
                rates["messages"] = r.message_rate
            if r.recipient_rate is not None:
                rates["recipients"] = r.recipient_rate
            self._rules.append(_Rule(
                r.rule_name, r.key, rates, frozenset(r.roles), frozenset(r.listeners),
                tuple(ipaddress.ip_network(n, strict=False) for n in r.exempt_networks),
                r.exempt_trusted,
            ))

    def __bool__(self) -> bool:
        return bool(self._rules)

    def charges(self, client: Client, kind: Kind, sender: str) -> list[Charge]:
        out = []
        for rule in self._rules:
            rate = rule.rates.get(kind)
            if rate is None or not rule.applies(client):
                continue
            key = rule.key_value(client, sender)
            if key is not None:
                out.append(Charge(rule.name, kind, rule.key, key, rate[0], rate[1]))
        return out


def refusal(c: Charge) -> Reply:
    """The 450 4.7.1 for a client over ``c``'s limit."""
    return RATE_LIMITED.with_text(
        f"Sending rate limit exceeded for {_KEY_WORDS.get(c.key_type, c.key_type)} {c.key} "
        f"({c.limit} {c.kind} per {span(c.window)}); try again later")


def span(seconds: float) -> str:
    """3600.0 -> '1h', 90.0 -> '90s': a window as an operator writes it."""
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{int(seconds // n)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class Refused:
    """The store's answer when a charge is over its limit (the others were not charged)."""

    charge: Charge
    count: float
    first_refusal: bool


class CounterStore(Protocol):
    def take(self, now: float, charges: list[Charge]) -> Refused | None:
        """Charge all of ``charges`` atomically, or none if one is over its limit."""
        ...


class RateLimiter:
    """The rules and the shared counters, for the SMTP session."""

    def __init__(self, rules: RateRules, store: CounterStore,
                 clock: Callable[[], float]) -> None:
        self.rules = rules
        self.store = store
        self.clock = clock

    def check(self, client: Client, kind: Kind, sender: str) -> Reply | None:
        """None if the MAIL (kind messages) or RCPT (recipients) may go on, else the 450."""
        charges = self.rules.charges(client, kind, sender)
        if not charges:
            return None
        refused = self.store.take(self.clock(), charges)
        if refused is None:
            return None
        c = refused.charge
        if refused.first_refusal:
            # Once per window and key, whichever worker refused first: an operator wants
            # to know an account is sending like mad, not read a line per RCPT.
            log.event("rate_limit_exceeded", logging.WARNING, rule=c.rule, kind=c.kind,
                      key_type=c.key_type, key=c.key, limit=c.limit, window=c.window,
                      count=round(refused.count, 1), client=client.ip,
                      listener=client.listener)
        return refusal(c)
