"""MTA-STS (RFC 8461) policy discovery and its cache: DNS, HTTPS and a file.

:class:`PolicySource` answers "which policy applies to mail for this domain?"
(:meth:`PolicySource.policy_for`): it reads the ``_mta-sts`` TXT record with the
MX resolver (the same ``dns.nameservers``), fetches
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` when the record's id is new
(§3.3, stdlib asyncio streams and ssl), and keeps what it fetched until the
policy's max_age (§5.1) in memory and in ``DATA_DIR/mta-sts.json``, written
atomically, so that a restart does not drop a domain's enforcement: forgetting
a policy is exactly the downgrade an attacker who strips the TXT record wants.

Parsing and the cache decisions are in ``gateway/deliver/mta_sts.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from gateway import log
from gateway.deliver.mta_sts import (
    CachedPolicy,
    Policy,
    PolicyError,
    choose,
    dump_cache,
    load_cache,
    parse_policy,
    parse_txt,
)
from gateway.deliver.mx import MxResolver
from gateway.deliver.tlsrpt import policy_failure
from gateway.metrics import MTA_STS_FETCHES

WELL_KNOWN = "/.well-known/mta-sts.txt"
# RFC 8461 §3.3: "senders MAY impose a limit on the response size ... 64 KB".
MAX_POLICY_BYTES = 64 * 1024
_MAX_HEADER_BYTES = 16 * 1024
# After a failed fetch, the same domain is not fetched again for this long (a dead
# policy host must not cost every message to the domain a timeout).
FETCH_RETRY = 300.0
CACHE_FILE = "mta-sts.json"
# RFC 8461 §5.1: refresh a cached policy that expires within a day, checked hourly.
REFRESH_WITHIN = 86400.0
REFRESH_EVERY = 3600.0


class FetchError(PolicyError):
    """The policy could not be fetched (network, TLS, HTTP status or format)."""


def parse_http_response(raw: bytes) -> str:
    """The policy text of an HTTP/1.x response to the policy GET.

    RFC 8461 §3.3: only a 200 counts (redirects are not followed), the media
    type must be text/plain, and the body is bounded by :data:`MAX_POLICY_BYTES`.
    """
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise FetchError("incomplete HTTP response (no end of header)")
    lines = head.decode("iso-8859-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/1."):
        raise FetchError(f"not an HTTP response: {lines[0][:60]!r}")
    if status[1] != "200":
        # §3.3: "HTTP 3xx redirects MUST NOT be followed".
        raise FetchError(f"HTTP status {' '.join(status[1:])[:80]} (only 200 is accepted)")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "text/plain":
        raise FetchError(f"Content-Type {media or 'missing'!r}, not text/plain")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise FetchError("bad Content-Length") from None
        if len(body) < length:
            raise FetchError("response body shorter than its Content-Length")
        body = body[:length]
    if len(body) > MAX_POLICY_BYTES:
        raise FetchError(f"policy larger than {MAX_POLICY_BYTES} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise FetchError("policy is not UTF-8 text") from None


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, sep, body = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise FetchError("bad chunked encoding") from None
        if not sep or size > MAX_POLICY_BYTES or len(body) < size + 2:
            raise FetchError("bad or oversized chunked encoding")
        if size == 0:
            return bytes(out)
        out += body[:size]
        body = body[size + 2:]


async def fetch_policy_text(
    host: str, addresses: tuple[str, ...], *, context: ssl.SSLContext, port: int = 443,
    timeout: float = 10.0,
) -> str:
    """GET the policy from ``host`` (tried at each address in turn).

    RFC 8461 §3.3: HTTPS with a certificate valid for ``host`` (``context`` checks
    the host name), no redirects, no HTTP caching, a bounded size and time.
    """
    if not addresses:
        raise FetchError(f"{host} has no address")
    request = (f"GET {WELL_KNOWN} HTTP/1.1\r\nHost: {host}\r\nAccept: text/plain\r\n"
               "Cache-Control: no-cache\r\nConnection: close\r\n\r\n").encode("ascii")
    errors: list[str] = []
    for addr in addresses:
        try:
            async with asyncio.timeout(timeout):
                raw = await https_exchange(addr, port, host, request, context)
        except (OSError, ssl.SSLError, TimeoutError, FetchError) as exc:
            errors.append(f"{addr}: {type(exc).__name__}: {exc}".rstrip(": "))
            continue
        return parse_http_response(raw)
    raise FetchError("; ".join(errors))


async def https_exchange(addr: str, port: int, host: str, request: bytes,
                    context: ssl.SSLContext) -> bytes:
    """Send ``request`` over HTTPS to ``addr`` (certificate checked for ``host``) and
    read the response, bounded in size (also the TLS report POST, RFC 8460 §5.4)."""
    reader, writer = await asyncio.open_connection(addr, port, ssl=context,
                                                   server_hostname=host)
    try:
        writer.write(request)
        await writer.drain()
        raw = bytearray()
        while chunk := await reader.read(16384):
            raw += chunk
            if len(raw) > MAX_POLICY_BYTES + _MAX_HEADER_BYTES:
                raise FetchError(f"response larger than {MAX_POLICY_BYTES} bytes")
        return bytes(raw)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


class PolicySource:
    """The MTA-STS policy of recipient domains, discovered and cached (RFC 8461 §3, §5.1)."""

    def __init__(
        self, resolver: MxResolver, cache_dir: Path, *, context: ssl.SSLContext,
        port: int = 443, timeout: float = 10.0, clock: Callable[[], float] = time.time,
    ) -> None:
        """``port`` is 443 but for tests on loopback; ``context`` verifies the policy
        host's certificate (system trust store, or ``delivery.ca_file``)."""
        self.resolver = resolver
        self.path = cache_dir / CACHE_FILE
        self.context = context
        self.port = port
        self.timeout = timeout
        self.clock = clock
        self._cache: dict[str, CachedPolicy] = _read(self.path)
        self._failed: dict[str, float] = {}  # domain -> when its last fetch failed
        self._locks: dict[str, asyncio.Lock] = {}
        # Told (domain, RFC 8460 result type) when a policy fetch fails: TLS reporting.
        self.on_fetch_failed: Callable[[str, str], None] | None = None

    async def policy_for(self, domain: str) -> Policy | None:
        """The policy to apply to mail for ``domain``; None: deliver as without MTA-STS."""
        try:
            # The policy host's name goes into DNS, SNI and the Host header: A-labels.
            domain = domain.lower().rstrip(".").encode("idna").decode("ascii")
        except UnicodeError:
            return None  # not a name DNS can carry: MX delivery fails on it anyway
        # One discovery per domain at a time: the messages waiting behind it use its result.
        return await self._locked(domain, refresh=False)

    def _reread(self, domain: str) -> CachedPolicy | None:
        """``domain``'s entry as the cache file has it now (kept in memory if found)."""
        entry = _read(self.path).get(domain)
        if entry is not None:
            self._cache[domain] = entry
        return entry

    def refresh_due(self, within: float) -> list[str]:
        """The cached domains whose policy expires less than ``within`` seconds from now."""
        now = self.clock()
        return sorted(d for d, e in self._cache.items()
                      if not e.expired(now) and e.fetched + e.policy.max_age - now < within)

    async def refresh(self, domain: str) -> Policy | None:
        """Fetch ``domain``'s policy again although the cached one is still valid.

        RFC 8461 §5.1: senders should refresh a cached policy before it expires, so
        that a domain mail goes to rarely does not lose its protection in between.
        The TXT record is looked up first: without one, the cached policy is kept
        (until its max_age, as on delivery)."""
        return await self._locked(domain, refresh=True)

    async def _locked(self, domain: str, *, refresh: bool) -> Policy | None:
        lock = self._locks.setdefault(domain, asyncio.Lock())
        try:
            async with lock:
                return await self._discover(domain, refresh=refresh)
        finally:
            if not lock.locked() and self._locks.get(domain) is lock:
                del self._locks[domain]  # a lock per domain ever seen would only grow

    async def _discover(self, domain: str, *, refresh: bool = False) -> Policy | None:
        records = await self.resolver.txt(f"_mta-sts.{domain}")
        txt_id = parse_txt(records) if records is not None else None
        now = self.clock()
        cached = self._cache.get(domain)
        if cached is not None and cached.expired(now):
            # Worker 0 refreshes policies before they expire (§5.1) and writes them to
            # the file: another worker takes the refreshed copy from there.
            cached = await asyncio.to_thread(self._reread, domain)
        action = choose(txt_id, cached, now)
        if refresh and txt_id is not None:
            action = "fetch"
        if action == "cached" and cached is not None:
            return cached.policy
        if action == "none" or txt_id is None:
            return None
        failed_at = self._failed.pop(domain, None)
        if failed_at is not None and now < failed_at + FETCH_RETRY:
            self._failed[domain] = failed_at
            return _unexpired(cached, now)
        host = f"mta-sts.{domain}"
        try:
            text = await fetch_policy_text(
                host, await self.resolver.addresses(host), context=self.context,
                port=self.port, timeout=self.timeout)
            policy = parse_policy(text)
        except PolicyError as exc:
            # §3.3: no policy fetched and none cached: deliver as if the domain had none;
            # §5.1: with an unexpired cached policy, keep applying it.
            self._failed[domain] = now
            MTA_STS_FETCHES.labels("failed").inc()
            if self.on_fetch_failed is not None:
                self.on_fetch_failed(domain, policy_failure(
                    str(exc), fetched=not isinstance(exc, FetchError)))
            usable = _unexpired(cached, now)
            log.event("mta_sts_fetch_failed", domain=domain, id=txt_id, error=str(exc),
                      cached_mode=usable.mode if usable else None)
            return usable
        MTA_STS_FETCHES.labels("ok").inc()
        entry = CachedPolicy(txt_id, policy, now)
        # An expired policy is as good as none (§5.1): drop those while here.
        self._cache = {d: e for d, e in self._cache.items() if not e.expired(now)}
        self._cache[domain] = entry
        log.event("mta_sts_policy", domain=domain, id=txt_id, mode=policy.mode,
                  mx=list(policy.mx), max_age=policy.max_age,
                  change="refreshed" if refresh else
                  "updated" if cached is not None else "fetched")
        try:
            await asyncio.to_thread(_store, self.path, domain, entry, now)
        except OSError as exc:
            # Applied from memory all the same; only a restart would forget it.
            log.event("mta_sts_cache_write_failed", path=str(self.path), error=str(exc))
        return policy


async def refresh_policies(sts: PolicySource, *, within: float = REFRESH_WITHIN) -> list[str]:
    """RFC 8461 §5.1: fetch again every cached policy that expires within ``within``
    seconds (its TXT record first), so that it does not lapse for a domain mail goes
    to rarely.  The domains refreshed."""
    due = sts.refresh_due(within)
    for domain in due:
        await sts.refresh(domain)
    return due


async def refresh_loop(sts: PolicySource, every: float = REFRESH_EVERY) -> None:
    while True:
        try:
            await refresh_policies(sts)
        except Exception as exc:  # a bug must not end the refreshes for good
            log.event("mta_sts_refresh_error", logging.ERROR,
                      error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(every)


def _unexpired(cached: CachedPolicy | None, now: float) -> Policy | None:
    return cached.policy if cached is not None and not cached.expired(now) else None


def _read(path: Path) -> dict[str, CachedPolicy]:
    try:
        return load_cache(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.event("mta_sts_cache_unreadable", path=str(path), error=str(exc))
        return {}


def _store(path: Path, domain: str, entry: CachedPolicy, now: float) -> None:
    """Add one domain's policy to the cache file, dropping expired ones: read, update,
    write a temporary file, fsync, rename over, fsync the directory.  Under a lock so
    that worker processes sharing the data directory do not lose each other's entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = {d: e for d, e in _read(path).items() if not e.expired(now)}
        entries[domain] = entry
        tmp = path.with_suffix(f".tmp.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dump_cache(entries), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
