"""Per-message queue state, folded from the append-only event log (pure logic).

The spool keeps, beside each message, a log of JSON events.  Folding the log
gives the current state; nothing is ever rewritten, so a crash can at worst
lose (or tear) the last event, which this fold ignores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class RcptStatus(StrEnum):
    PENDING = "pending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    # A stage (or the policy before the queue) decided not to deliver (Action.DISCARD):
    # final, but not a failure, so no DSN is sent for it.
    DISCARDED = "discarded"


FINAL_STATUSES = frozenset({RcptStatus.DELIVERED, RcptStatus.BOUNCED, RcptStatus.DISCARDED})


@dataclass(slots=True)
class RecipientState:
    address: str
    status: RcptStatus = RcptStatus.PENDING
    reply: str = ""
    updated_at: float = 0.0
    # A success notice the sender asked for (RFC 3461 NOTIFY=SUCCESS) and is owed:
    # "delivered" or "relayed" (RFC 3464 §2.3.3), with the host that answered.
    notice: str = ""
    remote: str = ""
    delay_warned: bool = False  # a "delayed" notice was sent (queue.delay_warning): once


class NoticeState(StrEnum):
    """Where a notice (DSN) about the message stands, by its own queue id.

    A notice is recorded ``spooling`` (with the queue id it will have) before it is
    written to the spool, and ``spooled`` or ``refused`` after: it counts as sent
    only once it is durable, and one the spool refused is made again.  A ``spooling``
    left by a crash is settled from the spool: still there, ``spooled``; gone, from
    the archive, which every spooled message passes before delivery: archived,
    ``spooled`` (sent); not archived, never written, so made again under the same
    queue id.  ``unconfirmed`` only when no archive can answer (none, or one that
    could not until ``queue.max_age``): never made again, as a lost notice is
    preferred to a duplicate (gateway.queue.worker.QueueWorker._settle_notices).
    """

    SPOOLING = "spooling"
    SPOOLED = "spooled"
    REFUSED = "refused"
    UNCONFIRMED = "unconfirmed"


@dataclass(slots=True)
class Notice:
    kind: str  # "failure", "success" or "delay"
    rcpts: list[str]
    state: NoticeState


@dataclass(slots=True)
class QueueState:
    recipients: dict[str, RecipientState]
    attempts: int = 0
    next_attempt_at: float = 0.0
    last_error: str = ""
    held: bool = False
    held_stage: str = ""
    held_error: str = ""
    stages_done: set[str] = field(default_factory=set)
    # Facts a completed once-stage reported; given back to later stages when it is skipped.
    stage_facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: bool = False
    # Why it is held: "error" (a stage failed), "quarantine" or "hold" (a decision);
    # "" for older or operator events.
    held_reason: str = ""
    # An operator released the message from a quarantine or hold decision: that
    # decision is not applied again, the message goes on to delivery.  (Releasing a
    # message held for a stage error only retries it: decisions still apply.)
    released: bool = False
    notices: dict[str, Notice] = field(default_factory=dict)  # by the notice's queue id

    @property
    def unsettled_notices(self) -> list[str]:
        """Notices recorded as being spooled, with no outcome: a crash in between."""
        return [q for q, n in self.notices.items() if n.state is NoticeState.SPOOLING]

    def notice_made(self, kind: str) -> bool:
        """Whether a notice of this kind was made (or may have been): not again."""
        return any(n.kind == kind and n.state is not NoticeState.REFUSED
                   for n in self.notices.values())

    @property
    def pending(self) -> list[str]:
        return [r.address for r in self.recipients.values() if r.status not in FINAL_STATUSES]

    @property
    def finished(self) -> bool:
        return not self.pending

    @property
    def status(self) -> str:
        if self.held:
            return "held"
        if self.finished:
            return "done"
        if self.attempts:
            return "deferred"
        return "active"


def fold(recipients: list[str], events: list[dict[str, Any]]) -> QueueState:
    """Apply events in order to the initial state of a message with these recipients."""
    st = QueueState(recipients={r: RecipientState(r) for r in recipients})
    for ev in events:
        kind = ev.get("ev")
        at = float(ev.get("at", 0.0))
        if kind == "rcpt":
            rs = st.recipients.get(ev["rcpt"])
            if rs is None or rs.status in FINAL_STATUSES:
                continue  # a final status is never revised: no double delivery
            rs.status = RcptStatus(ev["status"])
            rs.reply = ev.get("reply", "")
            rs.updated_at = at
            rs.notice = ev.get("notice", "")
            rs.remote = ev.get("remote", "")
        elif kind == "delay_notice":  # written before the notice records (older spools)
            for addr in ev.get("rcpts", []):
                if addr in st.recipients:
                    st.recipients[addr].delay_warned = True
        elif kind == "notice":
            _fold_notice(st, ev)
        elif kind == "attempt":
            st.attempts = int(ev.get("attempts", st.attempts + 1))
            st.next_attempt_at = float(ev.get("next_at", 0.0))
            st.last_error = ev.get("error", st.last_error)
        elif kind == "stage":
            st.stages_done.add(ev["stage"])
            if isinstance(ev.get("facts"), dict):
                st.stage_facts[ev["stage"]] = ev["facts"]
        elif kind == "held":
            st.held = True
            st.held_stage = ev.get("stage", "")
            st.held_error = ev.get("error", "")
            st.held_reason = ev.get("reason", "")
        elif kind == "released":
            st.released = st.released or (st.held and st.held_reason in ("quarantine", "hold"))
            st.held = False
        elif kind == "retry":
            st.next_attempt_at = 0.0
            st.held = False
        elif kind == "deleted":
            st.deleted = True
    for notice in st.notices.values():
        if notice.kind == "delay" and notice.state is not NoticeState.REFUSED:
            for addr in notice.rcpts:
                if addr in st.recipients:
                    st.recipients[addr].delay_warned = True
    return st


def _fold_notice(st: QueueState, ev: dict[str, Any]) -> None:
    dsn_qid = str(ev.get("dsn_qid", ""))
    try:
        state = NoticeState(ev.get("state", ""))
    except ValueError:
        return  # not a state this version knows: ignored like a torn line
    known = st.notices.get(dsn_qid)
    if known is None:
        st.notices[dsn_qid] = Notice(str(ev.get("kind", "")), list(ev.get("rcpts", [])), state)
    else:
        known.state = state


def parse_events(raw: bytes) -> list[dict[str, Any]]:
    """Parse the event log; a torn or corrupt line (crash mid-append) is skipped."""
    events: list[dict[str, Any]] = []
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            events.append(obj)
    return events
