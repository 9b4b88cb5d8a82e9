"""SPF (RFC 7208) through pyspf, over Coffer's resolver.

The identity checked is MAIL FROM; for the null reverse-path it is the HELO name,
as ``postmaster@HELO`` (RFC 7208 §2.3, §2.4).  pyspf is synchronous: the async
:func:`check` runs it in a worker thread so the event loop never waits on DNS.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import Any

import spf as pyspf

from gateway.check.dns import Resolver, pyspf_resolver
from gateway.check.verdicts import SpfVerdict, as_result
from gateway.envelope import domain_of

# RFC 7208 §4.6.4 limits lookups per check; pyspf enforces them.  This bounds the
# wall-clock time of one whole check (pyspf's own default is 20 s).
MAX_CHECK_SECONDS = 20.0


@functools.lru_cache(maxsize=1024)
def _is_ip(ip: str) -> bool:
    """Whether ``ip`` is an IP address (remembered: the same clients come back)."""
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


def _clock_free(verdict: SpfVerdict, lookups: Sequence[tuple[tuple[str, str], Any]]) -> bool:
    """Whether no TXT record consulted holds the %{t} macro (the current time,
    RFC 7208 §7.3): pyspf's answer is otherwise a function of the check's inputs and
    the DNS answers alone, and may be remembered (Resolver.remember).  A temperror
    is never kept (a DNS error is not cached anyway; this also covers any other
    transient cause)."""
    if verdict.result == "temperror":
        return False
    for (_name, rdtype), records in lookups:
        if rdtype == "TXT" or rdtype == "SPF":
            for r in records:
                if any(b"%{t" in s.lower() for s in r.strings):
                    return False
    return True


def memo_key(ip: str, mail_from: str, helo: str,
             default_explanation: str | None = None) -> tuple[str | None, ...]:
    """What check_sync's verdict is remembered under (Resolver.remember): all of its
    inputs but the resolver."""
    return ("spf", ip, mail_from, helo, default_explanation)


def check_sync(
    resolver: Resolver,
    ip: str,
    mail_from: str,
    helo: str,
    *,
    default_explanation: str | None = None,
) -> SpfVerdict:
    """Evaluate SPF for one SMTP transaction (blocking).

    The same client, MAIL FROM and HELO come back message after message; while
    every DNS answer the last evaluation read is still cached, unchanged, the
    evaluation input is the same and so is its verdict (pyspf is a pure function of
    them, but for %{t}: see _clock_free), which is then taken without building a
    pyspf query at all."""
    key = memo_key(ip, mail_from, helo, default_explanation)
    verdict: SpfVerdict | None = resolver.recall(key)
    if verdict is not None:
        return verdict
    return resolver.remember(key, functools.partial(
        _evaluate, resolver, ip, mail_from, helo, default_explanation), _clock_free)


def _evaluate(
    resolver: Resolver, ip: str, mail_from: str, helo: str, default_explanation: str | None,
) -> SpfVerdict:
    if mail_from:
        identity, address = "mailfrom", mail_from
        domain = domain_of(mail_from)
    else:
        # RFC 7208 §2.3: with a null MAIL FROM, the HELO identity is checked, and
        # §2.4 spells it as "postmaster@" + the HELO name.
        identity, address = "helo", f"postmaster@{helo}" if helo else ""
        domain = helo.lower().rstrip(".")
    if not _is_ip(ip):
        return SpfVerdict("none", domain, f"no client IP address to check ({ip!r})",
                          identity, address)  # type: ignore[arg-type]
    with pyspf_resolver(resolver):
        try:
            q = pyspf.query(i=ip, s=mail_from, h=helo, timeout=MAX_CHECK_SECONDS)
            if default_explanation is not None:
                q.set_default_explanation(default_explanation)
            result, _code, explanation = q.check()
        except pyspf.TempError as exc:
            result, explanation = "temperror", str(exc)
        except pyspf.PermError as exc:
            result, explanation = "permerror", str(exc)
    # pyspf still accepts pre-RFC 7208 spellings in some paths
    result = {"unknown": "permerror", "error": "temperror"}.get(result, result)
    return SpfVerdict(as_result(result), domain, str(explanation), identity,  # type: ignore[arg-type]
                      address)


async def check(resolver: Resolver, ip: str, mail_from: str, helo: str) -> SpfVerdict:
    """Evaluate SPF without blocking the event loop."""
    return await resolver.run(check_sync, resolver, ip, mail_from, helo)
