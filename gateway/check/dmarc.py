"""DMARC (RFC 7489): record discovery, identifier alignment, and the disposition.

The organizational domain comes from the Public Suffix List shipped in the
``publicsuffixlist`` package (RFC 7489 §3.2): nothing is downloaded at run time.

SPF counts for DMARC only on the MAIL FROM identity, never on HELO: using HELO
let a sender with a null MAIL FROM pass DMARC for any domain whose HELO it
controlled (CVE-2019-20790, OpenDMARC).

The verdict carries the disposition the domain asked for (p=, or sp= for a
subdomain, after pct=); what Coffer does with it is the policy's choice.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from publicsuffixlist import PublicSuffixList

from gateway.check import headers
from gateway.check.dns import DnsTempError, Resolver
from gateway.check.verdicts import (
    Disposition,
    DkimVerdict,
    DmarcVerdict,
    Result,
    SpfVerdict,
)

Alignment = Literal["r", "s"]
_POLICIES: tuple[Disposition, ...] = ("none", "quarantine", "reject")


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def preload() -> None:
    """Parse the Public Suffix List now (about 50 ms of CPU, 0.7 s under cProfile),
    at start-up, so that the first message checked does not wait for it."""
    _psl()


@functools.lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """RFC 7489 §3.2: the registered domain, one label below its public suffix.

    Remembered: the same domains come back message after message, and the list
    does not change while the process runs."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(a: str, b: str, mode: Alignment) -> bool:
    """RFC 7489 §3.1: strict needs the same name; relaxed the same org domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if mode == "s" else org_domain(a) == org_domain(b)


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    p: Disposition
    sp: Disposition | None = None
    pct: int = 100
    adkim: Alignment = "r"
    aspf: Alignment = "r"


class RecordError(ValueError):
    """Not a usable DMARC record (the reason says why)."""


def parse_record(text: str) -> DmarcRecord:
    """RFC 7489 §6.3 tag list.  Unknown tags are ignored (§6.3); a bad p= is p=none
    when rua= is there (§6.6.3 step 6), otherwise the record is unusable."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise RecordError(f"malformed tag {part.strip()!r}")
        tags.setdefault(name.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1":
        raise RecordError("not v=DMARC1")
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower() or None
    if p not in _POLICIES or (sp is not None and sp not in _POLICIES):
        if "rua" in tags and "mailto:" in tags["rua"].lower():
            return DmarcRecord("none")
        raise RecordError(f"invalid policy p={tags.get('p', '')!r}")
    try:
        pct = int(tags.get("pct", "100"))
        if not 0 <= pct <= 100:
            pct = 100
    except ValueError:
        pct = 100  # an invalid optional tag is ignored, not fatal
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return DmarcRecord(
        p,
        sp,
        pct,
        "s" if adkim == "s" else "r",
        "s" if aspf == "s" else "r",
    )


def _records_at(resolver: Resolver, domain: str) -> list[bytes]:
    # RFC 7489 §6.6.3 step 2: keep only records that begin with v=DMARC1
    return [t for t in resolver.txt(f"_dmarc.{domain}")
            if re.match(rb"v\s*=\s*DMARC1\s*(;|$)", t)]


def discover(resolver: Resolver, domain: str) -> tuple[DmarcRecord | None, str, str]:
    """-> (record or None, where found, why none).  Raises DnsTempError.

    Remembered while the answers it read stay cached (Resolver.remember): the same
    author domains come back message after message."""
    key = ("dmarc", domain)
    found: tuple[DmarcRecord | None, str, str] | None = resolver.recall(key)
    if found is not None:
        return found
    return resolver.remember(key, functools.partial(_discover, resolver, domain))


def _discover(resolver: Resolver, domain: str) -> tuple[DmarcRecord | None, str, str]:
    candidates = [domain]
    org = org_domain(domain)
    if org != domain:
        # RFC 7489 §6.6.3 step 3: fall back to the organizational domain
        candidates.append(org)
    for where in candidates:
        records = _records_at(resolver, where)
        if not records:
            continue
        if len(records) > 1:
            # §6.6.3 step 4: several records - no DMARC processing, and no fallback
            return None, where, f"{len(records)} DMARC records at _dmarc.{where}"
        try:
            return parse_record(records[0].decode("ascii", "replace")), where, ""
        except RecordError as exc:
            return None, where, f"unusable record at _dmarc.{where}: {exc}"
    return None, "", "no DMARC record"


def from_fields(data: bytes) -> list[str]:
    """The unfolded value of each RFC5322.From header field."""
    return headers.values(data, "from")


def from_domains(value: str) -> list[str]:
    """The domain of each address in one From field ("" for an address without one)."""
    addrs = [a for _, a in headers.addresses([value]) if a]
    return [a.rpartition("@")[2].lower().rstrip(".") if "@" in a else "" for a in addrs]


def _downgrade(p: Disposition) -> Disposition:
    # RFC 7489 §6.6.4: a message not sampled by pct= gets the next less strict policy
    return {"reject": "quarantine", "quarantine": "none", "none": "none"}[p]  # type: ignore[return-value]


def evaluate_sync(
    resolver: Resolver,
    data: bytes,
    spf: SpfVerdict,
    dkim: Sequence[DkimVerdict],
    *,
    multiple_from: Literal["fail", "reject"] = "fail",
    rng: random.Random | None = None,
) -> DmarcVerdict:
    """The DMARC verdict for one message (blocking: it looks up the record)."""
    # RFC 7489 §6.6.1: DMARC needs exactly one author domain.  A message with no
    # From, several From fields, or addresses in several domains is a failure
    # (and a rejection, if so configured), as OpenDMARC's RejectMultiValueFrom.
    values = from_fields(data)
    domains = from_domains(values[0]) if len(values) == 1 else []
    distinct = sorted(set(domains))
    why = ""
    if not values:
        why = "no From header field"
    elif len(values) > 1:
        why = f"{len(values)} From header fields"
    elif not domains or "" in distinct:
        why = "From has no address with a domain"
    elif len(distinct) > 1:
        why = f"From has addresses in {len(distinct)} domains"
    if why:
        return DmarcVerdict("fail", ",".join(d for d in distinct if d), "",
                            "reject" if multiple_from == "reject" else "none", why)
    domain = distinct[0]
    try:
        record, where, why = discover(resolver, domain)
    except DnsTempError as exc:
        return DmarcVerdict("temperror", domain, "", "none", f"record lookup: {exc}")
    if record is None:
        return DmarcVerdict("none", domain, "", "none", why, where)
    # §6.3 sp=: the policy for subdomains, when the record came from the org domain
    policy: Disposition = record.sp if (where != domain and record.sp) else record.p
    # CVE-2019-20790: only the MAIL FROM identity can align, never HELO
    spf_ok = (spf.identity == "mailfrom" and spf.result == "pass"
              and aligned(spf.domain, domain, record.aspf))
    dkim_ok = [d for d in dkim if d.result == "pass" and aligned(d.domain, domain, record.adkim)]
    if spf_ok or dkim_ok:
        how = "spf" if spf_ok else f"dkim d={dkim_ok[0].domain}"
        return DmarcVerdict("pass", domain, policy, "none", f"aligned {how}", where)
    # A transient error on an *aligned* identifier may hide a pass: report
    # temperror rather than apply a failing policy (as rspamd does).  Only aligned
    # ones count, or a sender could escape p=reject with a DNS-broken d= of its own.
    transient = (
        (spf.identity == "mailfrom" and spf.result == "temperror"
         and aligned(spf.domain, domain, record.aspf))
        or any(d.result == "temperror" and aligned(d.domain, domain, record.adkim)
               for d in dkim)
    )
    if transient:
        return DmarcVerdict("temperror", domain, policy, "none",
                            "an aligned identifier had a DNS error", where)
    disposition = policy
    reason = "no aligned SPF or DKIM pass"
    if record.pct < 100 and (rng or random).random() * 100 >= record.pct:
        disposition = _downgrade(policy)
        reason += f"; not sampled by pct={record.pct}"
    return DmarcVerdict("fail", domain, policy, disposition, reason, where)


async def evaluate(
    resolver: Resolver, data: bytes, spf: SpfVerdict, dkim: Sequence[DkimVerdict], *,
    multiple_from: Literal["fail", "reject"] = "fail", rng: random.Random | None = None,
) -> DmarcVerdict:
    return await resolver.run(evaluate_sync, resolver, data, spf, dkim,
                                   multiple_from=multiple_from, rng=rng)


RESULTS: tuple[Result, ...] = ("pass", "fail", "none", "temperror", "permerror")
