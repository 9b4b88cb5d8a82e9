"""Which recipients of a local domain exist (pure: no I/O but reading the list file).

Coffer answers RCPT for its local domains before the mail store behind it has
seen the recipient.  Accepting ``nosuchuser@local`` and learning at delivery
that it does not exist means a bounce to the envelope sender, which is often
forged: backscatter.  Two checks, both off by default (``relay.recipients``),
refuse such a recipient at RCPT instead (``550 5.1.1``, RFC 3463 §3.2 X.1.1 "bad
destination mailbox address"):

* the **list** (``relay.recipients.file``, Postfix ``relay_recipient_maps``):
  one address a line, ``@domain`` for every address of a domain, ``#`` comments.
  Once a list is configured, a local-domain recipient it does not name is
  unknown, so a local domain missing from the list accepts nobody.
* **verification** (``relay.recipients.verify``, Postfix
  ``reject_unverified_recipient``): for a recipient whose route is an SMTP next
  hop, that hop is asked with ``MAIL FROM:<>`` / ``RCPT TO`` (VRFY, RFC 5321
  §3.5.2, is not used: mail stores disable it).  Its answer is a :class:`Verdict`
  kept for its time to live (:class:`VerifyCache` says how long); the probe and the
  verdicts file shared by the workers are :mod:`gateway.receive.recipient_probe` and
  :mod:`gateway.receive.verify_store`.

Both apply to every client sending to a local domain, authenticated and trusted
ones included (as Postfix does): an internal sender who mistypes a colleague's
address learns it at once instead of from a bounce.  Relayed mail (to other
domains) is never checked: Coffer is not the authority for those addresses.

Addresses are compared as the rest of Coffer compares them (maildir names,
policy rules): case-insensitively, the local part with its quoting undone and
the domain in A-label form.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from gateway.config import RecipientsConfig
from gateway.deliver.routes import Route, SmtpRoute, select_route
from gateway.deliver.smtp import Destination, ProbeResult
from gateway.errors import ConfigError
from gateway.receive.addresses import AddressError, Mailbox, domain_to_ascii, parse_path
from gateway.replies import Reply

# RFC 3463 §3.2: X.1.1 bad destination mailbox address.
UNKNOWN_RECIPIENT = Reply(550, "5.1.1", "{address}: Recipient address rejected: user unknown")
REJECTED_BY_NEXT_HOP = Reply(550, "5.1.1", "{address}: recipient rejected by next hop: {text}")
# Postfix's default for an unverified address (unverified_recipient_reject_code = 450).
UNVERIFIED = Reply(
    450, "4.1.1", "{address}: Recipient address rejected: unverified address, try again later"
)

# A comment starts a line or follows blank space ("#" is a valid local-part character).
_COMMENT = re.compile(r"(?:^|\s)#.*$")
MAX_HOP_TEXT = 200  # characters of the next hop's reply passed on to our client


class Verdict(enum.Enum):
    VALID = "valid"  # the next hop said 2xx to RCPT TO
    UNKNOWN = "unknown"  # it said 5xx
    UNDETERMINED = "undetermined"  # 4xx, no connection, timeout, or a refused MAIL FROM:<>


def recipient_key(mailbox: Mailbox) -> str:
    """The form recipients are compared and cached in: ``local@domain``, lower case."""
    return f"{mailbox.local_unquoted.lower()}@{mailbox.ascii_domain}"


def is_postmaster(mailbox: Mailbox) -> bool:
    # RFC 5321 §4.5.1: postmaster must be accepted; it is never checked.
    return mailbox.local_unquoted.lower() == "postmaster"


@dataclass(frozen=True, slots=True)
class RecipientList:
    """The valid recipients of ``relay.recipients.file``."""

    addresses: frozenset[str] = frozenset()  # recipient_key() form
    domains: frozenset[str] = frozenset()  # A-labels, lower case: every address accepted

    def accepts(self, mailbox: Mailbox) -> bool:
        return mailbox.ascii_domain in self.domains or recipient_key(mailbox) in self.addresses


def parse_recipient_list(text: str, file: str) -> RecipientList:
    """One address (``user@domain``) or ``@domain`` a line; ``#`` comments, blank lines.

    A line that is neither is a ConfigError naming ``file`` and its line."""
    addresses: set[str] = set()
    domains: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        try:
            kind, value = address_or_domain(line)
            (domains if kind == "domain" else addresses).add(value)
        except AddressError as exc:
            raise ConfigError(f"{line!r} is not an address or @domain: {exc}", file=file,
                              line=lineno) from None
    return RecipientList(frozenset(addresses), frozenset(domains))


def address_or_domain(text: str) -> tuple[Literal["address", "domain"], str]:
    """``user@domain`` as ("address", its recipient_key()) or ``@domain`` as ("domain",
    its A-label); AddressError if it is neither (or an address literal, a source route)."""
    if text.startswith("@"):
        return "domain", domain_to_ascii(_plain_domain(text[1:]))
    mailbox = parse_path(f"<{text}>")
    if mailbox.is_literal or mailbox.route:
        raise AddressError("an address literal or source route is not a recipient")
    return "address", recipient_key(mailbox)


def _plain_domain(domain: str) -> str:
    mailbox = parse_path(f"<x@{domain}>")  # the same domain syntax as a recipient's
    if mailbox.is_literal:
        raise AddressError(f"{domain!r} is an address literal, not a domain")
    return mailbox.domain


def load_recipient_list(path: Path) -> RecipientList:
    """Read and parse the list file; ConfigError (file, line) if it cannot be used."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the recipient list: {exc}", file=str(path)) from None
    return parse_recipient_list(text, str(path))


def verdict_of(result: ProbeResult) -> Verdict:
    """RFC 5321 §4.2.1 applied to the answer to RCPT TO: 2yz valid, 5yz unknown.

    Anything else, and any reply that is not the answer to RCPT TO (a refused
    connection, greeting, TLS or ``MAIL FROM:<>``), says nothing about the
    recipient: undetermined."""
    if not result.answered:
        return Verdict.UNDETERMINED
    first = result.reply[:1]
    if first == "2":
        return Verdict.VALID
    if first == "5":
        return Verdict.UNKNOWN
    return Verdict.UNDETERMINED


def hop_text(reply: str) -> str:
    """The text of a next hop's reply without its codes, on one line and bounded,
    so that it can be passed on inside our own reply."""
    words = " ".join(reply.split()).split(" ")
    if words and words[0][:3].isdigit():
        words = words[1:]
    if words and _is_enhanced(words[0]):
        words = words[1:]
    text = "".join(c for c in " ".join(words) if c.isprintable())
    return text[:MAX_HOP_TEXT] or "no reason given"


def _is_enhanced(word: str) -> bool:
    parts = word.split(".")
    return len(parts) == 3 and all(p.isdigit() for p in parts)


@dataclass(frozen=True, slots=True)
class RecipientRules:
    """What ``relay.recipients`` asks of a local-domain recipient."""

    listed: RecipientList | None = None  # None: no list configured
    verify: bool = False
    accept_undetermined: bool = False
    routes: dict[str, Route] = field(default_factory=dict)

    @classmethod
    def from_config(cls, recipients: RecipientsConfig, listed: RecipientList | None,
                    routes: dict[str, Route]) -> RecipientRules:
        return cls(listed, recipients.verify, recipients.undetermined == "accept", routes)

    def unlisted(self, mailbox: Mailbox) -> Reply | None:
        """The 550 5.1.1 for a recipient the list does not name; None if listed (or no list)."""
        if self.listed is None or self.listed.accepts(mailbox) or is_postmaster(mailbox):
            return None
        return _format(UNKNOWN_RECIPIENT, mailbox.address)

    def probe_target(self, mailbox: Mailbox) -> Destination | None:
        """Where to verify the recipient; None when it is not verified.

        Only ``smtp://``/``smtps://`` routes are probed, with the route's TLS
        rules: a ``maildir:`` route is Coffer itself, and an ``mx`` route for
        a local domain points back at Coffer."""
        if not self.verify or is_postmaster(mailbox):
            return None
        route = select_route(self.routes, mailbox.ascii_domain)
        if not isinstance(route, SmtpRoute):
            return None
        return Destination(route.host, route.port, route.tls, route.host)

    def unverifiable(self, local_domains: list[str]) -> list[str]:
        """The local domains verification cannot cover (no smtp:// route): for a warning."""
        if not self.verify:
            return []
        return [d for d in local_domains
                if not isinstance(select_route(self.routes, d), SmtpRoute)]

    def reply_for(self, verdict: Verdict, mailbox: Mailbox, hop_reply: str) -> Reply | None:
        """The refusal a verdict calls for; None to accept the recipient."""
        if verdict is Verdict.VALID:
            return None
        if verdict is Verdict.UNKNOWN:
            return _format(REJECTED_BY_NEXT_HOP, mailbox.address, hop_text(hop_reply))
        return None if self.accept_undetermined else _format(UNVERIFIED, mailbox.address)


def _format(reply: Reply, address: str, text: str = "") -> Reply:
    return reply.with_text(reply.text.format(address=f"<{address}>", text=text))


@dataclass(frozen=True, slots=True)
class Cached:
    verdict: Verdict
    reply: str  # the next hop's reply (or why there was none)
    expires: float  # clock time (wall clock: verdicts outlive the process)
    checked: float = 0.0  # when the next hop was asked


class VerdictCache(Protocol):
    """Where probe answers are kept: :class:`VerifyCache` (memory, one process) or the
    file the workers share (:class:`gateway.receive.verify_store.SharedVerifyCache`)."""

    def get(self, key: str) -> Cached | None: ...

    def put(self, key: str, verdict: Verdict, reply: str) -> Cached: ...


@dataclass(slots=True)
class VerifyCache:
    """Probe answers, per recipient, each kept for its verdict's time to live.

    This one is in memory, for one process: the verdicts when ``relay.recipients.cache``
    is off or the shared file cannot be used.  It also says what an answer's entry is
    (:meth:`entry`) for the shared file."""

    positive_ttl: float
    negative_ttl: float
    undetermined_ttl: float
    clock: Callable[[], float] = time.time
    max_entries: int = 100_000  # bounded: addresses come from the Internet
    _entries: dict[str, Cached] = field(default_factory=dict)

    @classmethod
    def from_config(cls, recipients: RecipientsConfig,
                    clock: Callable[[], float] = time.time) -> VerifyCache:
        return cls(recipients.positive_ttl, recipients.negative_ttl,
                   recipients.undetermined_ttl, clock)

    def ttl(self, verdict: Verdict) -> float:
        return {Verdict.VALID: self.positive_ttl, Verdict.UNKNOWN: self.negative_ttl,
                Verdict.UNDETERMINED: self.undetermined_ttl}[verdict]

    def entry(self, verdict: Verdict, reply: str) -> Cached:
        """The answer as remembered from now, until its verdict's time to live ends."""
        now = self.clock()
        return Cached(verdict, reply, now + self.ttl(verdict), now)

    def get(self, key: str) -> Cached | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() >= entry.expires:
            del self._entries[key]
            return None
        return entry

    def put(self, key: str, verdict: Verdict, reply: str) -> Cached:
        if len(self._entries) >= self.max_entries and key not in self._entries:
            self._evict()
        entry = self._entries[key] = self.entry(verdict, reply)
        return entry

    def _evict(self) -> None:
        now = self.clock()
        expired = [k for k, e in self._entries.items() if e.expires <= now]
        for k in expired or list(self._entries)[: max(1, self.max_entries // 10)]:
            del self._entries[k]

    def __len__(self) -> int:
        return len(self._entries)
