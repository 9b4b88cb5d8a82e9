"""Journal copies before the queue: which recipients are journal addresses (pure).

A journal address (``archive.journal.addresses``) receives copies of mail other
servers delivered themselves (internal mail): Coffer archives them and delivers
nothing.  The runner (gateway.runner) spools a message's journal recipients as a
message of their own, before the check and decide stages run, marked with:

* ``facts["journal"]``: the journal addresses and the transaction's other
  recipients (a BCC-style journal copy is archived with those);
* ``facts["runner"]["action"] = "discard"``: the worker runs the archive stage
  only, then records the journal address ``discarded`` (nothing is delivered,
  no DSN), exactly like a message a policy discarded.

Why before check and decide: a journal copy is evidence of what was sent, not
mail to deliver.  Spam scoring, the policy's reject, quarantine, redirect or
encryption must not change or drop it (the copy a spam filter would have
quarantined is exactly what an investigation may need).  Who may send one is
decided at RCPT TO (gateway.receive.relay_control.check_journal).  The other
recipients of the same transaction go through every stage as usual.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

from gateway.envelope import Envelope

STAGE = "journal"
REASON = "journal copy: archived, never delivered"


def journal_recipients(envelope: Envelope, addresses: Collection[str]) -> list[str]:
    """The envelope's recipients that are journal addresses (``addresses`` lower-cased)."""
    if not addresses:
        return []
    return [r for r in envelope.rcpt_to if r.lower() in addresses]


def is_journal_copy(facts: dict[str, Any]) -> bool:
    return isinstance(facts.get(STAGE), dict)


def journal_copy(envelope: Envelope, journal: list[str], retention: str | None = None
                 ) -> tuple[Envelope, dict[str, Any]]:
    """The envelope and facts of the spooled journal copy of a transaction
    (``retention``: archive.journal.retention, recorded now so a reload later does
    not change what this copy was accepted under)."""
    options = envelope.options_by_recipient()
    wanted = set(journal)
    others = [r for r in envelope.rcpt_to if r not in wanted]
    copy = dataclasses.replace(envelope, rcpt_to=list(journal),
                               rcpt_options=[list(options.get(r, [])) for r in journal])
    facts: dict[str, Any] = {
        STAGE: {"addresses": list(journal), "recipients": others, "retention": retention},
        "runner": {"action": "discard"},
        "trace": [{"stage": STAGE, "action": "discard", "reason": REASON}],
    }
    return copy, facts


def without_journal(envelope: Envelope, journal: list[str]) -> Envelope:
    """The transaction's envelope for its other recipients."""
    options = envelope.options_by_recipient()
    wanted = set(journal)
    rest = [r for r in envelope.rcpt_to if r not in wanted]
    return dataclasses.replace(envelope, rcpt_to=rest,
                               rcpt_options=[list(options.get(r, [])) for r in rest])
