"""SMTP TLS Reporting (RFC 8460), as pure logic: what a session counts as, the
``_smtp._tls`` record, the JSON report and the message that carries it.

- :func:`result_type` turns the reason the deliverer gives for a failed MTA-STS or
  DANE session into the §4.3 result type;
- :func:`parse_txt` reads the domain's ``_smtp._tls`` TXT records (§3);
- :func:`build_report` makes the §4.4 JSON report from one day's counts;
- :func:`build_message` makes the §5.3 ``multipart/report`` message for a
  ``mailto:`` address, :func:`report_filename` names its attachment.

Recording the counts is ``gateway/deliver/tlsrpt_store.py``; sending the reports
``gateway/deliver/tlsrpt_send.py``.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
from typing import Any, Literal
from urllib.parse import unquote

PolicyType = Literal["sts", "tlsa", "no-policy-found"]
SUCCESS = "success"

# RFC 8460 §4.3.1 (negotiation failures) and §4.3.2 (policy failures).
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"

# RFC 8460 §5.3: the media type of a gzipped report (mailto: part and https: POST).
MEDIA_TYPE_GZIP = "application/tlsrpt+gzip"
_TXT_VERSION = re.compile(r"v=TLSRPTv1[ \t]*;")


@dataclass(frozen=True, slots=True, order=True)
class SessionKey:
    """What one counted session is filed under (the §4.4 policy and failure-details
    fields); ``result`` is :data:`SUCCESS` or a §4.3 result type."""

    policy_domain: str
    policy_type: str
    policy_string: tuple[str, ...]
    mx_host: tuple[str, ...]
    result: str
    receiving_mx: str = ""
    receiving_ip: str = ""
    sending_ip: str = ""


def result_type(reason: str, *, dane: bool) -> str:
    """The §4.3 result type of a session that failed for ``reason`` (the text after
    ``451 4.7.10`` from the SMTP client, or the deliverer's own reason)."""
    low = reason.lower()
    if "starttls" in low and ("not offer" in low or "refused" in low):
        return STARTTLS_NOT_SUPPORTED  # §4.3.1
    if "tlsa lookup" in low:
        # §4.3.2.1: the TLSA records could not be had with a DNSSEC-valid answer.
        return DNSSEC_INVALID
    if "tlsa" in low:
        # RFC 7672 §3: no record matched the certificate (§4.3.1 validation-failure).
        return VALIDATION_FAILURE
    if "expired" in low:
        return CERTIFICATE_EXPIRED
    if "hostname mismatch" in low or "doesn't match" in low or "not valid for" in low:
        return CERTIFICATE_HOST_MISMATCH
    if "mx pattern" in low:
        # RFC 8461 §4.1: the MX host is not one the policy names.
        return VALIDATION_FAILURE
    if dane and ("chain broken" in low or "is not a ca" in low or "not yet valid" in low):
        # §4.3.1 "certificate chain errors": below a matched DANE-TA trust anchor, a
        # signature that does not verify, an issuer that is no CA, or a certificate
        # not valid yet (what OpenSSL's PKIX check reports as not trusted too).
        return CERTIFICATE_NOT_TRUSTED
    if not dane and ("certificate verify failed" in low or "self-signed" in low
                     or "unable to get local issuer" in low):
        # §4.3.1: no chain to a trusted root (for MTA-STS, the Web PKI of §4.2).
        return CERTIFICATE_NOT_TRUSTED
    return VALIDATION_FAILURE


def policy_failure(error: str, *, fetched: bool) -> str:
    """The §4.3.2.2 result type of a failed MTA-STS policy discovery: the policy host's
    certificate failed PKIX validation (``sts-webpki-invalid``), the policy could not
    be fetched (``sts-policy-fetch-error``), or what was ``fetched`` is no policy
    (``sts-policy-invalid``)."""
    if fetched:
        return STS_POLICY_INVALID
    # The fetch's error names the exception that stopped it at each address tried.
    if "SSLCertVerificationError" in error or "CertificateError" in error:
        return STS_WEBPKI_INVALID
    return STS_POLICY_FETCH_ERROR


def parse_txt(records: Iterable[str]) -> tuple[str, ...] | None:
    """The ``rua`` URIs of a domain's ``_smtp._tls`` TXT records, or None if it asks
    for no report.

    RFC 8460 §3: records not beginning with ``v=TLSRPTv1;`` are discarded; with
    not exactly one left, no report is sent.  ``rua`` is a comma-separated list of
    ``mailto:`` and ``https:`` URIs (others are ignored).
    """
    found = [r for r in records if _TXT_VERSION.match(r)]
    if len(found) != 1:
        return None
    fields: dict[str, str] = {}
    for part in found[0].split(";"):
        key, eq, value = part.strip(" \t").partition("=")
        if eq:
            fields.setdefault(key.strip(" \t"), value.strip(" \t"))
    uris = tuple(u.strip(" \t") for u in fields.get("rua", "").split(","))
    usable = tuple(u for u in uris if u.lower().startswith(("mailto:", "https:")))
    return usable or None


def day_range(day: date) -> tuple[datetime, datetime]:
    """The report's period: one UTC day, start inclusive, end exclusive."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")  # RFC 3339, as §4.4's examples


def report_id(day: date, domain: str, submitter: str) -> str:
    return f"{day.isoformat()}_{domain}@{submitter}"


def build_report(
    day: date, domain: str, counts: Sequence[tuple[SessionKey, int]], *,
    organization: str, contact: str, submitter: str,
) -> dict[str, Any]:
    """The §4.4 report of one policy domain for one UTC day, from its counted sessions."""
    start, end = day_range(day)
    policies: dict[tuple[str, tuple[str, ...], tuple[str, ...]], dict[str, Any]] = {}
    for key, n in sorted(counts):
        if key.policy_domain != domain:
            continue
        ident = (key.policy_type, key.policy_string, key.mx_host)
        entry = policies.setdefault(ident, _policy_entry(key))
        summary = entry["summary"]
        if key.result == SUCCESS:
            summary["total-successful-session-count"] += n
            continue
        summary["total-failure-session-count"] += n
        detail: dict[str, Any] = {"result-type": key.result}
        if key.sending_ip:
            detail["sending-mta-ip"] = key.sending_ip
        if key.receiving_mx:
            detail["receiving-mx-hostname"] = key.receiving_mx
        if key.receiving_ip:
            detail["receiving-ip"] = key.receiving_ip
        detail["failed-session-count"] = n
        entry["failure-details"].append(detail)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _stamp(start),
                       "end-datetime": _stamp(end - timedelta(seconds=1))},
        "contact-info": contact,
        "report-id": report_id(day, domain, submitter),
        "policies": list(policies.values()),
    }


def _policy_entry(key: SessionKey) -> dict[str, Any]:
    policy: dict[str, Any] = {"policy-type": key.policy_type,
                              "policy-string": list(key.policy_string),
                              "policy-domain": key.policy_domain}
    if key.mx_host:
        policy["mx-host"] = list(key.mx_host)
    return {"policy": policy,
            "summary": {"total-successful-session-count": 0,
                        "total-failure-session-count": 0},
            "failure-details": []}


def compress(report: dict[str, Any]) -> bytes:
    """The report as gzipped JSON (§5.1: reports are sent compressed).  ``mtime=0``:
    the same report gives the same bytes."""
    return gzip.compress(json.dumps(report, indent=1).encode("utf-8"), mtime=0)


def report_filename(submitter: str, domain: str, day: date) -> str:
    """§5.3: ``sender "!" policy-domain "!" begin-timestamp "!" end-timestamp
    ".json.gz"``, the timestamps in seconds since the epoch."""
    start, end = day_range(day)
    return f"{submitter}!{domain}!{int(start.timestamp())}!{int(end.timestamp())}.json.gz"


def build_message(
    report: dict[str, Any], gz: bytes, *, domain: str, day: date, submitter: str,
    sender: str, to: Sequence[str], now: datetime,
) -> bytes:
    """The §5.3 message for ``mailto:`` addresses: ``multipart/report;
    report-type="tlsrpt"``, a human-readable part, then the gzipped JSON."""
    rid = report["report-id"]
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=submitter)
    # §5.3: the subject SHOULD say domain, submitter and report id.
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{rid}>"
    # §5.3: TLS-Report-Domain and TLS-Report-Submitter header fields are required.
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg.set_content(
        f"This is an aggregate TLS report (RFC 8460) from {submitter} about mail sent "
        f"to {domain} on {day.isoformat()} (UTC).\n")
    msg.add_attachment(gz, maintype="application", subtype="tlsrpt+gzip",
                       filename=report_filename(submitter, domain, day))
    msg.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"')
    msg.set_boundary(f"tlsrpt-{rid}".replace("@", "."))
    return msg.as_bytes()


def mailto_address(uri: str) -> str:
    """The address of a ``mailto:`` URI (RFC 6068: %-escapes, no header fields kept)."""
    return unquote(uri[len("mailto:"):].split("?", 1)[0])


def sts_policy_string(mode: str, mx: Sequence[str], max_age: int) -> tuple[str, ...]:
    """§4.4: the policy-string of an MTA-STS policy: its lines, as the policy file says."""
    return ("version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx),
            f"max_age: {max_age}")
