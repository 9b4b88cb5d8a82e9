"""The shape of the queue, as Postfix's qshape shows it (pure logic).

Rows are recipient domains (or sender domains, or the last deferral reason), columns
are age buckets since the message was received, plus counts by state.  A message is
counted once in each row it belongs to: a message with pending recipients in two
domains appears in both domain rows, once in TOTAL (which counts messages, so the
rows may add up to more than TOTAL).  ``coffer queue summary`` prints it;
``--json`` gives :func:`to_json`, whose field names are kept stable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.queue.select import STATES, Entry, domain_of

# Upper bounds of the age buckets in minutes; the last bucket is open (160m+).
BUCKET_MINUTES = (5, 10, 20, 40, 80, 160)
BUCKETS = ("<5m", "5-10m", "10-20m", "20-40m", "40-80m", "80-160m", "160m+")
GROUPINGS = ("domain", "sender", "reason")
NULL_SENDER = "<>"
NO_REASON = "(no attempt yet)"
REASON_TEXT_CHARS = 40

# RFC 5321 §4.2: a reply is a three-digit code then text; RFC 3463 §2: the enhanced
# code class.subject.detail leads the text when the server offers ENHANCEDSTATUSCODES.
_REPLY = re.compile(r"^(\d{3})[ -](?:([245]\.\d{1,3}\.\d{1,3})\s*)?(.*)$", re.DOTALL)


def bucket_of(age_s: float) -> int:
    """The index in BUCKETS of a message this many seconds old."""
    minutes = age_s / 60.0
    for i, upper in enumerate(BUCKET_MINUTES):
        if minutes < upper:
            return i
    return len(BUCKET_MINUTES)


def reason_of(e: Entry) -> str:
    """The row of a message by reason: enhanced code (else the reply code) and the start of
    the text of its last deferral; held and quarantined messages by why they wait."""
    if e.state == "quarantined":
        return "quarantined"
    if e.state == "held":
        return f"held at {e.held_stage or '?'}"
    text = " ".join(e.last_error.split())
    if not text:
        return NO_REASON
    m = _REPLY.match(text)
    if m:
        code, enhanced, rest = m.groups()
        text = f"{enhanced or code} {rest}".strip()
    return text if len(text) <= REASON_TEXT_CHARS else text[:REASON_TEXT_CHARS - 1] + "…"


def keys_of(e: Entry, by: str) -> list[str]:
    """The rows a message is counted in."""
    if by == "sender":
        return [domain_of(e.sender) or NULL_SENDER]
    if by == "reason":
        return [reason_of(e)]
    return sorted({domain_of(r) or "(no domain)" for r in e.pending})


@dataclass(slots=True)
class Row:
    key: str
    total: int = 0
    ages: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))

    def add(self, e: Entry) -> None:
        self.total += 1
        self.ages[bucket_of(e.age_s)] += 1
        self.states[e.state] = self.states.get(e.state, 0) + 1


@dataclass(slots=True)
class Shape:
    by: str
    rows: list[Row]  # the top rows, largest first
    total: Row
    more_rows: int  # rows left out by ``top``


def summarize(entries: Iterable[Entry], *, by: str = "domain", top: int = 20) -> Shape:
    """Count messages per row and age bucket; keep the ``top`` largest rows (ties by key)."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r} (use {', '.join(GROUPINGS)})")
    rows: dict[str, Row] = {}
    total = Row("TOTAL")
    for e in entries:
        total.add(e)
        for key in keys_of(e, by):
            rows.setdefault(key, Row(key)).add(e)
    ordered = sorted(rows.values(), key=lambda r: (-r.total, r.key))
    kept = ordered[:max(top, 0)]
    return Shape(by=by, rows=kept, total=total, more_rows=len(ordered) - len(kept))


def _row_json(r: Row) -> dict[str, object]:
    return {"key": r.key, "total": r.total, "ages": dict(zip(BUCKETS, r.ages, strict=True)),
            "states": dict(r.states)}


def to_json(shape: Shape) -> dict[str, object]:
    """One object: ``by``, ``buckets`` (the age column names, in order), ``rows`` (each
    ``key``, ``total``, ``ages`` {bucket: count}, ``states`` {state: count}), ``total``
    (the same for every message) and ``more_rows`` (rows left out by ``--top``)."""
    return {"by": shape.by, "buckets": list(BUCKETS), "rows": [_row_json(r) for r in shape.rows],
            "total": _row_json(shape.total), "more_rows": shape.more_rows}


def render(shape: Shape) -> list[str]:
    """The table: one line per row, TOTAL first as qshape prints it."""
    title = {"domain": "RECIPIENT DOMAIN", "sender": "SENDER DOMAIN",
             "reason": "LAST DEFERRAL"}[shape.by]
    width = max([len(title), 5, *(len(r.key) for r in shape.rows)])
    head = (f"{title:<{width}} {'total':>6} " + " ".join(f"{b:>7}" for b in BUCKETS)
            + "  " + " ".join(f"{s:>11}" for s in STATES))
    lines = [head]
    for r in (shape.total, *shape.rows):
        lines.append(f"{r.key:<{width}} {r.total:>6} " + " ".join(f"{n:>7}" for n in r.ages)
                     + "  " + " ".join(f"{r.states[s]:>11}" for s in STATES))
    if shape.more_rows:
        lines.append(f"({shape.more_rows} more row(s); see --top)")
    return lines
