"""The verdicts of the check stage: typed records, stored as facts.

The policy stage reads them (``spf``, ``dkim``, ``dmarc``, ``arc`` conditions) and
the archive stores them with the message, in the shape of :meth:`Verdicts.to_facts`::

    {"spf":   {"result", "domain", "reason"},
     "dkim":  [{"result", "domain", "selector", "reason", "unsigned_bytes"}, ...],
     "dmarc": {"result", "domain", "policy", "disposition"},
     "arc":   {"result"}}

Results are spelled as in RFC 8601 §2.7 (pass, fail, softfail, neutral, none,
temperror, permerror, policy).  ``unsigned_bytes`` (0 normally) is the number of
body bytes a signature's ``l=`` left unsigned (RFC 6376 §8.2), so a policy can
treat such a signature as a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

Result = Literal[
    "pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"
]
Disposition = Literal["none", "quarantine", "reject"]
RESULTS: frozenset[str] = frozenset(
    ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"]
)


def as_result(value: str) -> Result:
    v = value.lower()
    if v not in RESULTS:
        raise ValueError(f"{value!r} is not an RFC 8601 result")
    return cast(Result, v)


@dataclass(frozen=True, slots=True)
class SpfVerdict:
    result: Result = "none"
    domain: str = ""  # the domain checked: of MAIL FROM, or the HELO name
    reason: str = ""
    identity: Literal["mailfrom", "helo"] = "mailfrom"  # RFC 7208 §2.3 / §2.4
    address: str = ""  # the identity as checked (postmaster@HELO for the null sender)

    def to_facts(self) -> dict[str, Any]:
        return {"result": self.result, "domain": self.domain, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class DkimVerdict:
    result: Result = "none"
    domain: str = ""  # d=
    selector: str = ""  # s=
    reason: str = ""
    unsigned_bytes: int = 0  # body bytes after l= (RFC 6376 §8.2)
    header_b: str = ""  # first characters of b=, to tell signatures apart (RFC 6008)
    algorithm: str = ""  # a=

    def to_facts(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "domain": self.domain,
            "selector": self.selector,
            "reason": self.reason,
            "unsigned_bytes": self.unsigned_bytes,
        }


@dataclass(frozen=True, slots=True)
class DmarcVerdict:
    result: Result = "none"
    domain: str = ""  # the RFC5322.From domain
    policy: Disposition | Literal[""] = ""  # p= (or sp=) the domain published
    disposition: Disposition = "none"  # what the domain asks for this message (after pct)
    reason: str = ""
    record_domain: str = ""  # where the record was found (the org domain on fallback)

    def to_facts(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "domain": self.domain,
            "policy": self.policy,
            "disposition": self.disposition,
        }


@dataclass(frozen=True, slots=True)
class ArcVerdict:
    result: Result = "none"  # the chain validation status cv= (RFC 8617 §4.4)
    reason: str = ""

    def to_facts(self) -> dict[str, Any]:
        return {"result": self.result}


@dataclass(frozen=True, slots=True)
class Verdicts:
    spf: SpfVerdict = field(default_factory=SpfVerdict)
    dkim: tuple[DkimVerdict, ...] = ()
    dmarc: DmarcVerdict = field(default_factory=DmarcVerdict)
    arc: ArcVerdict = field(default_factory=ArcVerdict)

    def to_facts(self) -> dict[str, Any]:
        return {
            "spf": self.spf.to_facts(),
            "dkim": [d.to_facts() for d in self.dkim],
            "dmarc": self.dmarc.to_facts(),
            "arc": self.arc.to_facts(),
        }

    @classmethod
    def from_facts(cls, facts: dict[str, Any]) -> Verdicts:
        """Back from stored facts (the archive's copy), for the policy and reports."""
        spf = facts.get("spf") or {}
        dmarc = facts.get("dmarc") or {}
        return cls(
            spf=SpfVerdict(
                as_result(spf.get("result", "none")), spf.get("domain", ""),
                spf.get("reason", ""),
            ),
            dkim=tuple(
                DkimVerdict(
                    as_result(d.get("result", "none")), d.get("domain", ""),
                    d.get("selector", ""), d.get("reason", ""), int(d.get("unsigned_bytes", 0)),
                )
                for d in facts.get("dkim") or []
            ),
            dmarc=DmarcVerdict(
                as_result(dmarc.get("result", "none")), dmarc.get("domain", ""),
                dmarc.get("policy", ""), dmarc.get("disposition", "none"),
            ),
            arc=ArcVerdict(as_result((facts.get("arc") or {}).get("result", "none"))),
        )
