"""Which queued messages an operator means: selectors over the queue listing (pure logic).

``coffer queue list|retry|hold|release|delete|summary`` read the spool once, into one
:class:`Entry` per message (gateway.cli.queue builds them from the same rows ``list``
prints), and keep those a :class:`Selector` matches.  Every criterion given must hold
(AND); a criterion that may be repeated (``--to-domain``, ``--state``) matches any of
its values (OR).  No I/O here: the tests build entries by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The disjoint states an operator selects and counts by.  "held" is any hold but a
# quarantine (a stage failure, a policy ``hold``, an operator's hold).
STATES = ("active", "deferred", "held", "quarantined")


def domain_of(address: str) -> str:
    """The domain of an address, lower-cased (RFC 5321 §2.4: domains are
    case-insensitive); "" for the null sender or an address without one."""
    at = address.rfind("@")
    return address[at + 1:].lower() if at >= 0 else ""


@dataclass(frozen=True, slots=True)
class Entry:
    """What the selectors and the summary need to know of one queued message."""

    qid: str
    age_s: float
    sender: str
    pending: tuple[str, ...]  # recipients not yet delivered, bounced or discarded
    state: str  # one of STATES
    last_error: str = ""  # the last delivery attempt's first failing reply
    held_stage: str = ""
    held_reason: str = ""  # "error" (a stage failed), "quarantine", "hold", "operator"...

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Entry:
        """An entry from a ``coffer queue list --json`` row (not a corrupt one)."""
        state = str(row["status"])
        if state == "held" and row.get("held_reason") == "quarantine":
            state = "quarantined"
        return cls(qid=str(row["qid"]), age_s=float(row.get("age_s") or 0.0),
                   sender=str(row.get("sender") or ""),
                   pending=tuple(row.get("pending_recipients") or ()), state=state,
                   last_error=str(row.get("last_error") or ""),
                   held_stage=str(row.get("held_stage") or ""),
                   held_reason=str(row.get("held_reason") or ""))


@dataclass(frozen=True, slots=True)
class Selector:
    """The criteria given on the command line; an empty selector matches everything."""

    to_domains: frozenset[str] = field(default_factory=frozenset)  # lower-case
    sender: str = ""  # an address, or "@domain" for any sender in that domain
    older_than: float | None = None  # seconds
    younger_than: float | None = None
    error: str = ""  # a substring of the last deferral reply (case-insensitive)
    states: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def build(cls, *, to_domains: Iterable[str] = (), sender: str = "",
              older_than: float | None = None, younger_than: float | None = None,
              error: str = "", states: Iterable[str] = ()) -> Selector:
        """A selector with the domains and the sender normalised (case-insensitive)."""
        return cls(to_domains=frozenset(d.lower().lstrip("@") for d in to_domains),
                   sender=sender.lower(), older_than=older_than, younger_than=younger_than,
                   error=error.lower(), states=frozenset(states))

    @property
    def empty(self) -> bool:
        return not (self.to_domains or self.sender or self.error or self.states
                    or self.older_than is not None or self.younger_than is not None)

    def matches(self, e: Entry) -> bool:
        if self.states and e.state not in self.states:
            return False
        if self.to_domains and not any(domain_of(r) in self.to_domains for r in e.pending):
            return False
        if self.sender and not self._sender_matches(e.sender):
            return False
        if self.older_than is not None and not e.age_s > self.older_than:
            return False
        if self.younger_than is not None and not e.age_s < self.younger_than:
            return False
        return not self.error or self.error in e.last_error.lower()

    def _sender_matches(self, sender: str) -> bool:
        if self.sender.startswith("@"):
            return domain_of(sender) == self.sender[1:]
        # RFC 5321 §2.4: the local part may be case-sensitive, but no real mailbox
        # relies on it, and an operator typing a spammer's address should not miss it.
        return sender.lower() == self.sender

    def describe(self) -> str:
        """The criteria in words, for the confirmation prompt and the audit log."""
        parts = [f"to-domain {' or '.join(sorted(self.to_domains))}"] if self.to_domains else []
        if self.sender:
            parts.append(f"from {self.sender}")
        if self.older_than is not None:
            parts.append(f"older than {self.older_than:g}s")
        if self.younger_than is not None:
            parts.append(f"younger than {self.younger_than:g}s")
        if self.error:
            parts.append(f"error contains {self.error!r}")
        if self.states:
            parts.append(f"state {' or '.join(sorted(self.states))}")
        return ", ".join(parts) or "every message"


def select(entries: Iterable[Entry], selector: Selector) -> list[Entry]:
    return [e for e in entries if selector.matches(e)]
