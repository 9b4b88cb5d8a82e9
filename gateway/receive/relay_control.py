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

Journal addresses (``archive.journal``) take mail only from the configured sources
(trusted networks, authenticated clients, listed CIDRs): a journal copy is archived
as evidence of what was sent, so anyone else is refused at RCPT TO with 550 5.7.1
(forged evidence never enters the archive).  A journal address is never relayed,
so relay control does not apply to it: its domain need not be a local domain, and
a source listed only in ``archive.journal.sources`` may send to it and nowhere else.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway import replies
from gateway.config import JournalConfig, RelayConfig
from gateway.receive.addresses import AddressError, Mailbox, domain_to_ascii
from gateway.replies import Reply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Characters that route mail when a next hop interprets the local part.
ROUTING_CHARACTERS = frozenset("@%!")

ROUTING_DENIED = replies.RELAY_DENIED.with_text(
    "Relay access denied: routing in the local part is not permitted"
)
JOURNAL_DENIED = replies.RELAY_DENIED.with_text(
    "Journal address: not accepted from this client"
)


@dataclass(frozen=True, slots=True)
class RelayRules:
    local_domains: frozenset[str]  # lower-case A-labels, no trailing dot
    trusted_networks: tuple[IPNetwork, ...] = ()
    journal_addresses: frozenset[str] = frozenset()  # lower-cased
    journal_networks: tuple[IPNetwork, ...] = ()  # archive.journal.sources' CIDRs
    journal_from_trusted: bool = True  # sources: trusted_networks
    journal_from_authenticated: bool = True  # sources: authenticated

    @classmethod
    def from_config(cls, relay: RelayConfig, journal: JournalConfig | None = None
                    ) -> RelayRules:
        domains = set()
        for d in relay.local_domains:
            try:
                domains.add(domain_to_ascii(d.strip()))
            except AddressError:
                domains.add(d.strip().lower().rstrip("."))
        journal = journal or JournalConfig()
        return cls(frozenset(domains), tuple(relay.networks()),
                   frozenset(a.lower() for a in journal.addresses), tuple(journal.networks()),
                   "trusted_networks" in journal.sources, "authenticated" in journal.sources)

    def is_trusted(self, client_ip: str) -> bool:
        return _in_networks(client_ip, self.trusted_networks)

    def is_journal(self, mailbox: Mailbox) -> bool:
        return bool(self.journal_addresses) and mailbox.address.lower() in self.journal_addresses

    def may_journal(self, client_ip: str, *, authenticated: bool) -> bool:
        """Whether this client may send to a journal address (archive.journal.sources)."""
        if authenticated and self.journal_from_authenticated:
            return True
        if self.journal_from_trusted and self.is_trusted(client_ip):
            return True
        return _in_networks(client_ip, self.journal_networks)

    def is_local(self, mailbox: Mailbox) -> bool:
        if mailbox.is_literal:
            return False
        try:
            return mailbox.ascii_domain in self.local_domains
        except AddressError:
            return False


def _in_networks(client_ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def check_journal(rules: RelayRules, mailbox: Mailbox, client_ip: str, *,
                  authenticated: bool) -> Reply | None:
    """None unless ``mailbox`` is a journal address this client may not send to."""
    if rules.is_journal(mailbox) and not rules.may_journal(client_ip,
                                                           authenticated=authenticated):
        return JOURNAL_DENIED
    return None


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
