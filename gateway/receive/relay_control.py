"""Relay control: may this client hand us mail for this recipient? (pure: no I/O)

Coffer is never an open relay.  A recipient is accepted from anyone only when
its domain is, exactly and case-insensitively, one of ``relay.local_domains``
and its local part carries no routing of its own; anything else needs an
authenticated client or one in ``relay.trusted_networks``.

Routing hidden in a local part is refused from untrusted clients, as Postfix
does with ``allow_untrusted_routing = no``: a next hop behind us (an old
sendmail, a mail store) may honour it and relay where we would not.

* ``"x@ext"@local`` and ``x%ext@local`` — the "percent hack" (RFC 1123 §5.2.16).
* ``ext!x@local`` — UUCP bang paths.
* ``<@local:x@ext>`` — source routes are ignored (RFC 5321 §4.1.1.3 and
  appendix C), so the mailbox ``x@ext`` is what is checked.
* ``x@[192.0.2.1]`` — an address literal is never a local domain.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway import replies
from gateway.config import RelayConfig
from gateway.receive.addresses import AddressError, Mailbox, domain_to_ascii
from gateway.replies import Reply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Characters that route mail when a next hop interprets the local part.
ROUTING_CHARACTERS = frozenset("@%!")

ROUTING_DENIED = replies.RELAY_DENIED.with_text(
    "Relay access denied: routing in the local part is not permitted"
)


@dataclass(frozen=True, slots=True)
class RelayRules:
    local_domains: frozenset[str]  # lower-case A-labels, no trailing dot
    trusted_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_config(cls, relay: RelayConfig) -> RelayRules:
        domains = set()
        for d in relay.local_domains:
            try:
                domains.add(domain_to_ascii(d.strip()))
            except AddressError:
                domains.add(d.strip().lower().rstrip("."))
        return cls(frozenset(domains), tuple(relay.networks()))

    def is_trusted(self, client_ip: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.trusted_networks)

    def is_local(self, mailbox: Mailbox) -> bool:
        if mailbox.is_literal:
            return False
        try:
            return mailbox.ascii_domain in self.local_domains
        except AddressError:
            return False


def check_recipient(rules: RelayRules, mailbox: Mailbox, *, may_relay: bool) -> Reply | None:
    """None if the recipient may be accepted, else the reply refusing it (550 5.7.1).

    ``may_relay`` is true for authenticated clients and trusted networks.
    """
    if may_relay:
        return None
    if not rules.is_local(mailbox):
        return replies.RELAY_DENIED
    if ROUTING_CHARACTERS.intersection(mailbox.local_unquoted):
        return ROUTING_DENIED
    return None
