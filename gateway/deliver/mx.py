"""Where to deliver mail for a domain: MX lookup (RFC 5321 §5.1) with dnspython.

The resolver is asynchronous (``dns.asyncresolver``) and uses the nameservers
from ``dns.nameservers`` (``host`` or ``host:port``; IP addresses), or the
system's ``/etc/resolv.conf`` when none are configured.

Errors are :class:`gateway.errors.DeliveryError` with an SMTP-style reply so the
worker can record them like a next hop's answer: transient for DNS trouble that
may pass (timeouts, SERVFAIL), permanent for a domain that does not exist or
that publishes a null MX (RFC 7505).

For DANE (RFC 7672) the resolver says which answers were DNSSEC-validated.  Like
Postfix, Coffer does not validate signatures itself: it trusts the AD bit of the
configured resolver (RFC 6840 §5.7), which must therefore be a validating resolver
reached over a path nobody can tamper with (unbound on loopback).  With
``dnssec=True`` the queries carry AD and EDNS0 DO (RFC 3225 §3: DO asks for
DNSSEC data; some resolvers set AD only then); without a validating resolver no
answer has AD, every host is "insecure" and DANE simply never applies.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.resolver

from gateway.config import DnsConfig, parse_hostport
from gateway.deliver.dane import Tlsa, TlsaAnswer, tlsa_name
from gateway.errors import DeliveryError


@dataclass(frozen=True, slots=True)
class MxHost:
    name: str  # the exchange (or the domain itself for the implicit MX)
    preference: int
    addresses: tuple[str, ...]
    # RFC 7672 §2.2.1, §2.2.2: the MX RRset and this host's address records were all
    # DNSSEC-validated (AD), so its TLSA records are worth looking up.
    secure: bool = False
    # RFC 7672 §2.2.2: the name a CNAME chain led to from ``name`` to its address
    # records ("" when ``name`` is no alias).  The AD bit of the address answer
    # covers every CNAME of the chain: ``secure`` is False if one step was insecure.
    expanded: str = ""


@dataclass(frozen=True, slots=True)
class _Addresses:
    """What the address lookups of one name gave."""

    addresses: tuple[str, ...]
    temporary: bool  # a lookup failed temporarily
    secure: bool  # every address RRset found was DNSSEC-validated (and there was one)
    expanded: str  # the CNAME-expanded name, "" when the name is no alias


def _temp(reply: str, message: str) -> DeliveryError:
    return DeliveryError(message, transient=True, reply=reply)


def _perm(reply: str, message: str) -> DeliveryError:
    return DeliveryError(message, transient=False, reply=reply)


def address_literal(domain: str) -> str | None:
    """The IP address of an address literal (RFC 5321 §4.1.3: ``[192.0.2.1]``,
    ``[IPv6:2001:db8::1]``), or None for a domain name."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


class MxResolver:
    def __init__(
        self, nameservers: Sequence[str] = (), timeout: float = 5.0, *,
        shuffle: Callable[[list[MxHost]], None] = random.shuffle, dnssec: bool = False,
    ) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            servers: list[str | dns.nameserver.Nameserver] = []
            for ns in nameservers:
                host, port = parse_hostport(ns, 53)
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            self._resolver.nameservers = servers
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout
        if dnssec:
            # RFC 6840 §5.7: AD in a query asks for AD in the answer; RFC 3225 §3: DO.
            self._resolver.use_edns(0, dns.flags.DO, 1232)
            self._resolver.flags = dns.flags.RD | dns.flags.AD
        self._shuffle = shuffle

    @classmethod
    def from_config(cls, cfg: DnsConfig, *, dnssec: bool = False) -> MxResolver:
        return cls(cfg.nameservers, cfg.timeout, dnssec=dnssec)

    async def tlsa(self, host: str, port: int) -> TlsaAnswer | None:
        """The TLSA records of ``host`` for SMTP on ``port`` (RFC 7672 §2.2.3); none
        when it has none; None when the lookup failed (SERVFAIL, timeout)."""
        try:
            answer = await self._resolver.resolve(tlsa_name(host, port), "TLSA", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return TlsaAnswer((), secure=False)
        except dns.exception.DNSException:
            return None
        records = tuple(Tlsa(r.usage, r.selector, r.mtype, r.cert) for r in answer)
        return TlsaAnswer(records, _secure(answer))

    async def txt(self, name: str) -> list[str] | None:
        """The TXT records at ``name``, each one's strings joined (RFC 7208 §3.3 does
        the same); [] when there are none, None when the lookup failed temporarily."""
        try:
            answer = await self._resolver.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException:
            return None
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]

    async def addresses(self, name: str) -> tuple[str, ...]:
        """The IPv4 then IPv6 addresses of ``name`` (none when the lookups fail)."""
        return (await self._addresses(name)).addresses

    async def _addresses(self, name: str) -> _Addresses:
        """The addresses of ``name``, IPv4 first, and what the lookups said of them."""
        out: list[str] = []
        temporary = False
        secure = True
        expanded = ""
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException:
                temporary = True
                continue
            secure = secure and _secure(answer)
            out.extend(r.address for r in answer)
            target = answer.canonical_name.to_text(omit_final_dot=True).lower()
            if target != name.rstrip(".").lower():
                expanded = target
        return _Addresses(tuple(out), temporary, secure and bool(out), expanded)

    async def lookup(self, domain: str) -> list[MxHost]:
        """The hosts to try for ``domain``, most preferred first, each with its addresses."""
        literal = address_literal(domain)
        if literal is not None:
            return [MxHost(domain, 0, (literal,))]
        domain = domain.rstrip(".").lower()
        try:
            answer = await self._resolver.resolve(domain, "MX", search=False)
            records = [(int(r.preference), r.exchange.to_text(omit_final_dot=True)) for r in answer]
            mx_secure = _secure(answer)
        except dns.resolver.NXDOMAIN:
            # RFC 5321 §5.1: a name that does not exist is a permanent failure.
            raise _perm(
                "550 5.1.2 Recipient domain does not exist", f"{domain}: NXDOMAIN"
            ) from None
        except dns.resolver.NoAnswer:
            records = []
            mx_secure = False
        except (dns.exception.SyntaxError, dns.name.NameTooLong, UnicodeError) as exc:
            # Not a name DNS can carry (empty or over-long label): no retry can help.
            raise _perm("550 5.1.2 Bad destination domain name",
                        f"{domain!r}: {exc}") from None
        except dns.exception.DNSException as exc:
            # NoNameservers (SERVFAIL/REFUSED everywhere), timeouts, anything else.
            raise _temp(
                "451 4.4.3 Temporary DNS failure looking up MX", f"{domain}: MX lookup: {exc}"
            ) from None

        if not records:
            # RFC 5321 §5.1: no MX records -> the domain itself is the implicit MX.
            # RFC 7672 §2.2.1: then the domain's own address records decide.
            found = await self._addresses(domain)
            if found.addresses:
                return [MxHost(domain, 0, found.addresses, found.secure, found.expanded)]
            if found.temporary:
                raise _temp("451 4.4.3 Temporary DNS failure looking up the domain's address",
                            f"{domain}: A/AAAA lookup failed")
            raise _perm("550 5.1.2 Recipient domain has no mail server (no MX, A or AAAA)",
                        f"{domain}: no MX and no address records")

        # RFC 7505 §3: a single MX of "." (the null MX) means "accepts no mail".
        if any(name in ("", ".") for _, name in records):
            raise _perm("556 5.1.10 Recipient domain does not accept mail (null MX)",
                        f"{domain}: null MX (RFC 7505)")

        # RFC 5321 §5.1: sort by preference; hosts of equal preference are tried in
        # random order to spread the load.
        hosts_by_pref: dict[int, list[str]] = {}
        for pref, name in records:
            hosts_by_pref.setdefault(pref, []).append(name)
        resolved = await asyncio.gather(
            *(self._addresses(name) for _, name in records)
        )
        addrs_of = {name: res for (_, name), res in zip(records, resolved, strict=True)}
        out: list[MxHost] = []
        any_temporary = False
        for pref in sorted(hosts_by_pref):
            group = []
            for name in dict.fromkeys(hosts_by_pref[pref]):
                found = addrs_of[name]
                any_temporary = any_temporary or found.temporary
                if found.addresses:
                    group.append(MxHost(name, pref, found.addresses,
                                        mx_secure and found.secure, found.expanded))
            self._shuffle(group)
            out.extend(group)
        if not out:
            # An MX pointing at names without addresses may be a transient DNS
            # problem on their side: retry rather than bounce.
            why = "temporary DNS failure" if any_temporary else "no address records"
            raise _temp(f"451 4.4.4 No usable mail exchanger for {domain} ({why})",
                        f"{domain}: MX hosts have no addresses ({why})")
        return out


def _secure(answer: dns.resolver.Answer) -> bool:
    """Whether the validating resolver vouched for the answer (AD, RFC 4035 §3.2.3)."""
    return bool(answer.response.flags & dns.flags.AD)
