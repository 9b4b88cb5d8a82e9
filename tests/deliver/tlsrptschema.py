"""RFC 8460 §4.4's field list, as a check: the report JSON a receiver must be able to read."""

from __future__ import annotations

import re
from typing import Any

_DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
# §4.3 result types.
RESULT_TYPES = {
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
}


def problems(report: Any) -> list[str]:
    """What in ``report`` does not follow §4.4 (empty: it does)."""
    out: list[str] = []

    def need(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            out.append(f"{where}: missing {key}")
            return None
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            out.append(f"{where}.{key}: not {kind}")
        return obj[key]

    need(report, "organization-name", str, "report")
    need(report, "contact-info", str, "report")
    need(report, "report-id", str, "report")
    dr = need(report, "date-range", dict, "report")
    for key in ("start-datetime", "end-datetime"):
        value = need(dr, key, str, "date-range")
        if isinstance(value, str) and not _DATETIME.fullmatch(value):
            out.append(f"date-range.{key}: {value!r} is not an RFC 3339 date-time")
    for i, entry in enumerate(need(report, "policies", list, "report") or []):
        where = f"policies[{i}]"
        policy = need(entry, "policy", dict, where)
        ptype = need(policy, "policy-type", str, where)
        if ptype not in ("sts", "tlsa", "no-policy-found"):
            out.append(f"{where}.policy-type: {ptype!r}")
        need(policy, "policy-domain", str, where)
        for s in need(policy, "policy-string", list, where) or []:
            if not isinstance(s, str):
                out.append(f"{where}.policy-string: {s!r} is not a string")
        summary = need(entry, "summary", dict, where)
        need(summary, "total-successful-session-count", int, where)
        need(summary, "total-failure-session-count", int, where)
        failed = 0
        for j, d in enumerate(need(entry, "failure-details", list, where) or []):
            dwhere = f"{where}.failure-details[{j}]"
            if need(d, "result-type", str, dwhere) not in RESULT_TYPES:
                out.append(f"{dwhere}: unknown result-type {d.get('result-type')!r}")
            failed += need(d, "failed-session-count", int, dwhere) or 0
            for key in ("sending-mta-ip", "receiving-ip", "receiving-mx-hostname"):
                if key in d and not isinstance(d[key], str):
                    out.append(f"{dwhere}.{key}: not a string")
        if isinstance(summary, dict) and summary.get("total-failure-session-count") != failed:
            out.append(f"{where}: failure count {summary.get('total-failure-session-count')} "
                       f"!= sum of failure-details {failed}")
    return out
