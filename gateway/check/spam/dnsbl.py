"""DNS blocklists: the client's IP address and the domains of the message's links.

RFC 5782 §2.1: an IPv4 address is listed in ZONE when ``d.c.b.a.ZONE`` has an A
record (for a.b.c.d); §2.4: an IPv6 address is looked up as its 32 nibbles,
reversed.  §3: a domain is listed when ``DOMAIN.ZONE`` has one.  The answer's
address (in 127.0.0.0/8, §2.3) says why; zones map codes to weights.

Answers outside 127.0.0.0/8, and Spamhaus' 127.255.255.x "query refused" codes
(an open resolver, or over quota), are not listings: they are ignored, or a
public resolver would list every message.  A lookup that gets no answer is not
a listing either (the message is scored without it), and is reported as the
zero-weight symbol ``DNSBL_TEMPFAIL`` so the operator can see it.

Link domains are looked up by their registered domain (the org domain, RFC 7489
§3.2, as URI blocklists list them), at most ``max_uris`` of them; IP literals by
the IP rules.  The lookups run concurrently in the resolver's threads.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

from gateway.check.dns import DnsTempError, Resolver
from gateway.check.spam.config import DnsblConfig, DnsblZone
from gateway.check.spam.heuristics import _org, is_ip_literal


@dataclass(frozen=True, slots=True)
class Listing:
    zone: DnsblZone
    subject: str  # the address or domain that is listed
    codes: tuple[str, ...]  # the A records answered
    weight: float


def reverse_name(ip: str) -> str | None:
    """The query label for ``ip`` (RFC 5782 §2.1, §2.4); None if not an address."""
    try:
        addr = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def is_public(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return False
    return addr.is_global


def _weight(zone: DnsblZone, codes: tuple[str, ...]) -> float | None:
    valid = [c for c in codes if c.startswith("127.") and not c.startswith("127.255.255.")]
    if not valid:
        return None
    if zone.codes:
        mapped = [zone.codes[c] for c in valid if c in zone.codes]
        return max(mapped) if mapped else zone.weight
    return zone.weight


def _lookup(resolver: Resolver, name: str) -> tuple[str, ...]:
    return tuple(str(r.address) for r in resolver.query(name, "A"))  # type: ignore[attr-defined]


async def _one(resolver: Resolver, zone: DnsblZone, subject: str, label: str
               ) -> Listing | str | None:
    try:
        codes = await resolver.run(_lookup, resolver, f"{label}.{zone.zone}")
    except DnsTempError as exc:
        return f"{zone.zone}: {exc.cause}"
    weight = _weight(zone, codes)
    if weight is None:
        return None
    return Listing(zone, subject, codes, weight)


async def check(resolver: Resolver, cfg: DnsblConfig, client_ip: str, domains: list[str],
                *, allow_private: bool = False) -> tuple[list[Listing], list[str]]:
    """(listings, temporary errors) for the client address and the link domains.

    Private and loopback client addresses are not looked up (they cannot be
    listed) unless ``allow_private`` (the tests' loopback zones).
    """
    jobs = []
    label = reverse_name(client_ip) if client_ip else None
    if label and (allow_private or is_public(client_ip)):
        for zone in cfg.ip_zones:
            jobs.append(_one(resolver, zone, client_ip, label))
    seen: list[str] = []
    for host in domains:
        if is_ip_literal(host):
            continue
        org = _org(host)
        if org and org not in seen:
            seen.append(org)
        if len(seen) >= cfg.max_uris:
            break
    for dom in seen:
        for zone in cfg.uri_zones:
            jobs.append(_one(resolver, zone, dom, dom))
    listings: list[Listing] = []
    errors: list[str] = []
    for res in await asyncio.gather(*jobs):
        if isinstance(res, Listing):
            listings.append(res)
        elif isinstance(res, str):
            errors.append(res)
    return listings, errors
