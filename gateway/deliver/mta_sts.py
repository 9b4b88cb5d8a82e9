"""MTA-STS (RFC 8461): the recipient domain's outbound TLS policy, as pure logic.

What is here reads and judges, and does no I/O:

- :func:`parse_txt` reads the ``_mta-sts.<domain>`` TXT records (§3.1);
- :func:`parse_policy` reads the policy file served over HTTPS (§3.2);
- :func:`mx_matches` / :meth:`Policy.allows` match an MX host against the policy's
  ``mx`` patterns (§4.1);
- :class:`CachedPolicy` and :func:`choose` decide between the cached policy and a
  fresh fetch (§5.1), and :func:`load_cache` / :func:`dump_cache` turn the cache
  into the JSON that ``gateway/deliver/mta_sts_fetch.py`` keeps on disk.

Fetching (DNS, HTTPS, the file) lives in ``gateway/deliver/mta_sts_fetch.py``;
enforcement (which MX hosts, TLS required) in ``gateway/deliver/deliverer.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gateway.errors import CofferError

Mode = Literal["enforce", "testing", "none"]

# RFC 8461 §3.2: "max_age ... maximum value of 31557600" (one year).
MAX_AGE_LIMIT = 31557600
# RFC 8461 §3.1: sts-id = 1*32(ALPHA / DIGIT)
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
# RFC 8461 §3.1: sts-version, then sts-field-delim (*WSP ";" *WSP).
_TXT_VERSION = re.compile(r"v=STSv1[ \t]*;")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_FIELD_KEY = re.compile(r"[A-Za-z0-9_.-]{1,32}")
# RFC 8461 §3.2: an mx pattern is a domain name, optionally with "*." as its first label.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MX_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?")


class PolicyError(CofferError):
    """A TXT record or policy file that does not follow RFC 8461 (the text says why)."""


@dataclass(frozen=True, slots=True)
class Policy:
    mode: Mode
    mx: tuple[str, ...]  # patterns, lower-case, without a trailing dot
    max_age: int  # seconds

    def allows(self, host: str) -> bool:
        """Whether an MX host name matches one of the policy's ``mx`` patterns (§4.1)."""
        return any(mx_matches(pattern, host) for pattern in self.mx)


def parse_txt(records: Iterable[str]) -> str | None:
    """The policy id of a domain's ``_mta-sts`` TXT records, or None if it has no
    usable record.

    RFC 8461 §3.1: records that do not begin with ``v=STSv1;`` are discarded; if
    not exactly one remains, or it is invalid, the domain has no available policy.
    """
    sts = [r for r in records if _TXT_VERSION.match(r)]
    if len(sts) != 1:
        return None
    fields: dict[str, str] = {}
    for part in sts[0].split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq:
            return None
        # §3.1: other fields are ignored; the first of a repeated one counts.
        fields.setdefault(key.strip(" \t"), value.strip(" \t"))
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def parse_policy(text: str) -> Policy:
    """The policy of an ``mta-sts.txt`` body; :class:`PolicyError` says what is wrong.

    RFC 8461 §3.2: ``key: value`` lines ended by CRLF or LF; unknown keys are
    ignored; ``mx`` may repeat.  Of a repeated other key the first counts: reading
    a policy rather than refusing it keeps the domain's protection (§3.2 does not
    say which wins).
    """
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        line = raw.strip(" \t")
        if not line:
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(" \t"), value.strip(" \t")
        if not colon or not _FIELD_KEY.fullmatch(key):
            raise PolicyError(f"line {number}: expected 'key: value', got {raw[:60]!r}")
        if key == "mx":
            if not _MX_PATTERN.fullmatch(value):
                raise PolicyError(f"line {number}: {value[:60]!r} is not an mx pattern")
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    return _policy(fields, mx)


def _policy(fields: Mapping[str, str], mx: list[str]) -> Policy:
    if fields.get("version") != "STSv1":
        raise PolicyError(f"version must be STSv1, got {fields.get('version')!r}")
    mode = fields.get("mode")
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"mode must be enforce, testing or none, got {mode!r}")
    max_age = fields.get("max_age", "")
    if not _MAX_AGE.fullmatch(max_age):
        raise PolicyError(f"max_age must be a number of seconds, got {max_age!r}")
    if not mx and mode != "none":
        # §3.2: a policy that is to be applied names its MX hosts.
        raise PolicyError(f"mode {mode} without any mx pattern")
    # §3.2: at most a year; a longer one is read as a year rather than thrown away.
    return Policy(mode, tuple(mx), min(int(max_age), MAX_AGE_LIMIT))  # type: ignore[arg-type]


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: a pattern matches the host name exactly (case-insensitively),
    or ``*.example.com`` matches exactly one more label on the left: it matches
    ``mx1.example.com`` but neither ``example.com`` nor ``a.b.example.com``."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


# -- the cache (RFC 8461 §5.1) --------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CachedPolicy:
    policy_id: str  # the TXT id the policy was fetched under
    policy: Policy
    fetched: float  # when (UNIX time)

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.policy.max_age


Choice = Literal["cached", "fetch", "none"]


def choose(txt_id: str | None, cached: CachedPolicy | None, now: float) -> Choice:
    """What to do for one delivery, given the TXT id found (None: no usable record,
    or the lookup failed) and the cache entry for the domain.

    RFC 8461 §5.1: an unexpired cached policy is used as long as the TXT id is the
    one it was fetched under, and also when there is no TXT record (removing it does
    not withdraw a policy before its max_age: that is what stops an attacker who
    strips the record).  A new id means a new policy: fetch it.
    """
    live = cached is not None and not cached.expired(now)
    if txt_id is None:
        return "cached" if live else "none"
    if live and cached is not None and cached.policy_id == txt_id:
        return "cached"
    return "fetch"


CACHE_VERSION = 1


def dump_cache(entries: Mapping[str, CachedPolicy]) -> dict[str, Any]:
    """The cache as JSON-ready data (one object per domain)."""
    return {
        "version": CACHE_VERSION,
        "policies": {
            domain: {"id": e.policy_id, "fetched": e.fetched, "mode": e.policy.mode,
                     "mx": list(e.policy.mx), "max_age": e.policy.max_age}
            for domain, e in sorted(entries.items())
        },
    }


def load_cache(data: Any) -> dict[str, CachedPolicy]:
    """The cache from :func:`dump_cache`'s data; an entry that does not read is skipped
    (a damaged entry must not cost the other domains their protection)."""
    out: dict[str, CachedPolicy] = {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return out
    policies = data.get("policies")
    if not isinstance(policies, dict):
        return out
    for domain, e in policies.items():
        try:
            policy = _policy(
                {"version": "STSv1", "mode": e["mode"], "max_age": str(e["max_age"])},
                [str(p) for p in e["mx"]])
            out[str(domain)] = CachedPolicy(str(e["id"]), policy, float(e["fetched"]))
        except (PolicyError, KeyError, TypeError, ValueError):
            continue
    return out
