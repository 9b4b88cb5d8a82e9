"""``coffer report NAME --from DATE --to DATE``: compliance reports from the metadata database.

    retention  what expires when (by month and retention rule), what was expired,
               what a hold keeps from expiring, what is kept without an end
    holds      legal holds active in the period: case, query, who, items
    policy     messages by direction, policy decisions and actions, rule hits,
               quarantines, encryptions, top senders and recipients
    auth       SPF / DKIM / DMARC results by From domain, like a DMARC aggregate
               report (RFC 7489 §7.2) summed over the period
    audit      who searched, viewed, exported, recovered what

The period is whole UTC days, ``--to`` inclusive; messages are counted by the
time Coffer received them, holds when active, audit events when they happened,
retention by the retention end.  Building a report (:func:`build`) only reads;
:func:`render_report` also records who ran which report (audited).  HTML output
has inline SVG charts and no external resources; CSV has one block per table.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from markupsafe import Markup
from sqlalchemy import and_, func, or_, select

from archive.facade import Archive
from archive.metadata import (
    SECONDARY_COPIES,
    AuditEvent,
    Decision,
    Hold,
    HoldItem,
    Message,
    Metadata,
    Participant,
    RuleHit,
)
from reports.common import bar_chart, record_audit, utcnow
from reports.errors import ReportError

TOP = 10


@dataclass
class Table:
    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Report:
    name: str
    title: str
    start: datetime
    end: datetime  # exclusive
    summary: list[tuple[str, Any]] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    charts: list[tuple[str, str]] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        return dict(self.summary)

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)

    def to_json(self) -> dict[str, Any]:
        return {"report": self.name, "title": self.title, "from": self.start.isoformat(),
                "to": self.end.isoformat(), "summary": self.figures(),
                "tables": {t.name: [dict(zip(t.columns, r, strict=True)) for r in t.rows]
                           for t in self.tables}}


def parse_period(start: str, end: str) -> tuple[datetime, datetime]:
    """``--from 2024-01-01 --to 2024-03-31``: [Jan 1 00:00, Apr 1 00:00) UTC."""
    try:
        a = datetime.strptime(start, "%Y-%m-%d").replace(tzinfo=UTC)
        b = datetime.strptime(end, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1)
    except ValueError:
        raise ReportError(f"--from {start} --to {end}: dates are YYYY-MM-DD") from None
    if b <= a:
        raise ReportError(f"--to {end} is before --from {start}")
    return a, b


def _received(start: datetime, end: datetime) -> Any:
    """Messages received in [start, end), each once: a message archived as received
    and as sent is counted by its readable copy (archive.metadata.SECONDARY_COPIES)."""
    return and_(Message.received_at >= start, Message.received_at < end,
                Message.copy.not_in(sorted(SECONDARY_COPIES)))


def _counter_rows(c: Counter[str], top: int | None = None) -> list[list[Any]]:
    return [[k, v] for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]


def _chart(title: str, rows: list[list[Any]]) -> tuple[str, str]:
    return title, bar_chart([(str(r[0]), [int(r[1])]) for r in rows], title=title)


# -- the reports ----------------------------------------------------------------------

def retention(meta: Metadata, start: datetime, end: datetime) -> Report:
    rep = Report("retention", "Retention", start, end)
    expiring: Counter[str] = Counter()
    by_rule: Counter[str] = Counter()
    expired: Counter[str] = Counter()
    with meta.session() as s:
        held_ids = select(HoldItem.message_pk).join(Hold, Hold.id == HoldItem.hold_id).where(
            Hold.released_at.is_(None))
        rows = s.execute(
            select(Message.id, Message.retention_until, Message.expired_at, Decision.trace,
                   Message.id.in_(held_ids))
            .outerjoin(Decision, Decision.message_pk == Message.id)
            .where(or_(and_(Message.retention_until >= start, Message.retention_until < end),
                       and_(Message.expired_at >= start, Message.expired_at < end))))
        held = 0
        for _pk, until, expired_at, trace, is_held in rows:
            rule = _retention_rule(trace)
            if expired_at is not None and start <= expired_at < end:
                expired[rule] += 1
            elif expired_at is None and until is not None and start <= until < end:
                expiring[until.strftime("%Y-%m")] += 1
                by_rule[rule] += 1
                # A legal hold, or a hold the policy placed (archive.retention), keeps it.
                held += bool(is_held) or bool(isinstance(trace, dict) and trace.get("holds"))
        forever = int(s.scalar(select(func.count()).select_from(Message).where(
            _received(start, end), Message.retention_until.is_(None))) or 0)
    rep.summary = [("messages_expiring", sum(expiring.values())),
                   ("expiring_but_held", held), ("messages_expired", sum(expired.values())),
                   ("received_without_retention_end", forever)]
    months = [[k, v] for k, v in sorted(expiring.items())]
    rep.tables = [
        Table("expiring_by_month", "Retention ends in the period, by month",
              ["month", "messages"], months),
        Table("expiring_by_rule", "Retention ends in the period, by retention rule",
              ["rule", "messages"], _counter_rows(by_rule)),
        Table("expired_by_rule", "Expired (crypto-shredded) in the period, by rule",
              ["rule", "messages"], _counter_rows(expired)),
    ]
    rep.charts = [_chart("Retention ends by month", months)]
    return rep


def _retention_rule(trace: Any) -> str:
    if isinstance(trace, dict):
        detail = trace.get("retention_detail")
        if isinstance(detail, dict) and detail.get("rule"):
            return str(detail["rule"])
    return "(no rule recorded)"


def holds(meta: Metadata, start: datetime, end: datetime) -> Report:
    rep = Report("holds", "Legal holds", start, end)
    with meta.session() as s:
        counts: dict[int, int] = {int(h): int(n) for h, n in s.execute(
            select(HoldItem.hold_id, func.count()).group_by(HoldItem.hold_id))}
        found = list(s.scalars(select(Hold).where(
            Hold.created_at < end, or_(Hold.released_at.is_(None), Hold.released_at >= start))
            .order_by(Hold.created_at, Hold.id)))
    rows: list[list[Any]] = [[h.case, h.query, h.reason, h.created_at.isoformat(), h.created_by,
             h.released_at.isoformat() if h.released_at else "",
             h.released_by or "", counts.get(h.id, 0)] for h in found]
    rep.summary = [("holds_active", len(rows)),
                   ("holds_released_in_period", sum(1 for h in found if h.released_at)),
                   ("messages_held", sum(int(r[7]) for r in rows))]
    rep.tables = [Table("holds", "Holds active in the period",
                        ["case", "query", "reason", "created_at", "created_by", "released_at",
                         "released_by", "messages"], rows)]
    rep.charts = [_chart("Messages per hold", [[r[0], r[7]] for r in rows])]
    return rep


def policy(meta: Metadata, start: datetime, end: datetime) -> Report:
    rep = Report("policy", "Policy activity", start, end)
    directions: Counter[str] = Counter()
    decisions: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    senders: Counter[str] = Counter()
    quarantined = encrypted = total = 0
    with meta.session() as s:
        for _pk, direction, state, frm, trace, action in s.execute(
                select(Message.id, Message.direction, Message.state, Message.from_addr,
                       Decision.trace, Decision.action)
                .outerjoin(Decision, Decision.message_pk == Message.id)
                .where(_received(start, end))):
            total += 1
            directions[direction or "(unknown)"] += 1
            decision = str((trace or {}).get("decision") or action or "(none recorded)") \
                if isinstance(trace, dict) or trace is None else str(action)
            decisions[decision] += 1
            kinds = {str(a.get("action")) for a in (trace or {}).get("actions", [])
                     if isinstance(a, dict)} if isinstance(trace, dict) else set()
            actions.update(kinds)
            quarantined += decision == "quarantine" or state == "quarantined"
            encrypted += "encrypt" in kinds
            senders[frm or "(none)"] += 1
        hits = Counter(dict(s.execute(
            select(RuleHit.rule, func.count()).join(Message, Message.id == RuleHit.message_pk)
            .where(_received(start, end)).group_by(RuleHit.rule)).all()))
        rcpts = Counter(dict(s.execute(
            select(Participant.address, func.count()).join(
                Message, Message.id == Participant.message_pk)
            .where(_received(start, end), Participant.role == "envelope_to")
            .group_by(Participant.address)).all()))
    rep.summary = [("messages", total), ("quarantined", quarantined), ("encrypted", encrypted),
                   ("rule_hits", sum(hits.values()))]
    rep.tables = [
        Table("directions", "Messages by direction", ["direction", "messages"],
              _counter_rows(directions)),
        Table("decisions", "Policy decisions", ["decision", "messages"], _counter_rows(decisions)),
        Table("actions", "Actions taken", ["action", "messages"], _counter_rows(actions)),
        Table("rule_hits", "Rule hits", ["rule", "messages"], _counter_rows(hits)),
        Table("top_senders", f"Top {TOP} senders (From)", ["sender", "messages"],
              _counter_rows(senders, TOP)),
        Table("top_recipients", f"Top {TOP} recipients (envelope)", ["recipient", "messages"],
              _counter_rows(rcpts, TOP)),
    ]
    rep.charts = [_chart("Rule hits", rep.table("rule_hits").rows[:20]),
                  _chart("Actions taken", rep.table("actions").rows),
                  _chart("Top senders", rep.table("top_senders").rows)]
    return rep


def auth(meta: Metadata, start: datetime, end: datetime) -> Report:
    """Per From domain: messages, and pass/fail for each mechanism (RFC 7489 §7.2 style)."""
    rep = Report("auth", "Sender authentication (SPF, DKIM, DMARC)", start, end)
    per: dict[str, Counter[str]] = {}
    with meta.session() as s:
        for frm, spf, dkim, dmarc in s.execute(
                select(Message.from_addr, Message.spf, Message.dkim, Message.dmarc)
                .where(_received(start, end))):
            domain = frm.rpartition("@")[2].lower() if "@" in frm else "(no domain)"
            c = per.setdefault(domain, Counter())
            c["messages"] += 1
            for mech, result in (("spf", spf), ("dkim", dkim), ("dmarc", dmarc)):
                c[f"{mech}_{_bucket(result)}"] += 1
    cols = ["domain", "messages", "spf_pass", "spf_fail", "spf_other", "dkim_pass",
            "dkim_fail", "dkim_other", "dmarc_pass", "dmarc_fail", "dmarc_other"]
    rows: list[list[Any]] = [[d, *(c[k] for k in cols[1:])]
            for d, c in sorted(per.items(), key=lambda kv: (-kv[1]["messages"], kv[0]))]
    total = Counter[str]()
    for c in per.values():
        total.update(c)
    rep.summary = [("messages", total["messages"]), ("domains", len(per)),
                   ("spf_pass", total["spf_pass"]), ("dkim_pass", total["dkim_pass"]),
                   ("dmarc_pass", total["dmarc_pass"]), ("dmarc_fail", total["dmarc_fail"])]
    rep.tables = [Table("domains", "Results by From domain", cols, rows)]
    rep.charts = [("DMARC by From domain", bar_chart(
        [(str(r[0]), [int(r[8]), int(r[9]), int(r[10])]) for r in rows[:20]],
        ("pass", "fail", "none/other"), title="DMARC by From domain"))]
    return rep


def _bucket(result: str) -> str:
    """RFC 8601 result words: pass; fail (and softfail, permerror); other (none, neutral…)."""
    if result == "pass":
        return "pass"
    if result in ("fail", "softfail", "permerror"):
        return "fail"
    return "other"


def audit(meta: Metadata, start: datetime, end: datetime) -> Report:
    rep = Report("audit", "Audit log", start, end)
    with meta.session() as s:
        events = list(s.scalars(select(AuditEvent).where(
            AuditEvent.at >= start, AuditEvent.at < end).order_by(AuditEvent.id)))
    by_action = Counter(e.action for e in events)
    by_who = Counter(e.who for e in events)
    rep.summary = [("events", len(events)), ("officers", len(by_who)),
                   ("exports", by_action.get("export", 0)),
                   ("searches", by_action.get("search", 0))]
    rep.tables = [
        Table("by_officer", "Events by officer", ["officer", "events"], _counter_rows(by_who)),
        Table("by_action", "Events by action", ["action", "events"], _counter_rows(by_action)),
        Table("events", "Events", ["id", "at", "who", "action", "query", "results", "target"],
              [[e.id, e.at.isoformat(), e.who, e.action, e.query or "",
                "" if e.result_count is None else e.result_count, e.target or ""]
               for e in events]),
    ]
    rep.charts = [_chart("Events by action", rep.table("by_action").rows),
                  _chart("Events by officer", rep.table("by_officer").rows)]
    return rep


REPORTS: dict[str, Callable[[Metadata, datetime, datetime], Report]] = {
    "retention": retention, "holds": holds, "policy": policy, "auth": auth, "audit": audit}


def build(meta: Metadata, name: str, start: datetime, end: datetime) -> Report:
    try:
        return REPORTS[name](meta, start, end)
    except KeyError:
        raise ReportError(f"unknown report {name!r} ({', '.join(REPORTS)})") from None


def render(rep: Report, fmt: str, *, generated: datetime, generated_by: str) -> str:
    if fmt == "json":
        return json.dumps({**rep.to_json(), "generated": generated.isoformat(),
                           "generated_by": generated_by}, ensure_ascii=False) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["# report", rep.name, rep.start.date().isoformat(),
                    (rep.end - timedelta(days=1)).date().isoformat()])
        w.writerow(["# summary"])
        w.writerows([[k, v] for k, v in rep.summary])
        for t in rep.tables:
            w.writerow([])
            w.writerow([f"# {t.name}"])
            w.writerow(t.columns)
            w.writerows(t.rows)
        return buf.getvalue()
    if fmt == "html":
        from reports.export import templates

        return templates().get_template("report.html").render(
            rep=rep, last_day=(rep.end - timedelta(days=1)).date().isoformat(),
            generated=generated.isoformat(timespec="seconds"), generated_by=generated_by,
            charts=[(title, Markup(svg)) for title, svg in rep.charts])
    raise ReportError(f"unknown format {fmt!r} (html, csv, json)")


def render_report(meta: Metadata, archive: Archive | None, name: str, start: datetime,
                  end: datetime, fmt: str, *, officer: str,
                  clock: Callable[[], datetime] | None = None) -> str:
    now = (clock or utcnow)()
    rep = build(meta, name, start, end)
    text = render(rep, fmt, generated=now, generated_by=officer)
    record_audit(meta, archive, officer, "report", target=name, clock=lambda: now,
                 detail={"from": start.isoformat(), "to": end.isoformat(), "format": fmt})
    return text
