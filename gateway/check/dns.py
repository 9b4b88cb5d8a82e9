"""The DNS port of the check stage: one small resolver that every check uses.

SPF (pyspf), DKIM and ARC (dkimpy) and DMARC all look things up through a
:class:`Resolver` built from ``dns:`` in coffer.yaml, never through the system
resolver behind our back: pyspf's module-level ``DNSLookup`` and dkimpy's
``dnsfunc`` are given the adapters at the bottom of this file.

Outcomes are reduced to the three that the authentication RFCs distinguish:

* records found: a tuple of rdata;
* no records (NXDOMAIN or NODATA): an empty tuple, which the checks report as
  ``none`` (RFC 7208 §4.3, RFC 7489 §6.6.3);
* no answer (timeout, SERVFAIL, REFUSED, no usable server): :class:`DnsTempError`,
  which the checks report as ``temperror`` (RFC 7208 §5, RFC 6376 §6.1.2) - never
  pass or fail.

The lookups are blocking (pyspf and dkimpy are synchronous libraries); callers
on the event loop run them with :meth:`Resolver.run`: inline when the cache
answers every lookup, else in the resolver's own thread pool (so slow DNS
cannot starve the loop's default executor).  A :class:`TtlCache`
shared by the threads keeps answers for their TTL (and "no records" for a short
negative TTL, RFC 2308 §5), so a warm cache costs no network round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, ParamSpec, TypeVar

import dkim
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
import spf

from gateway.errors import CofferError
from gateway.mailparse import ValueMemo

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_PORT = 53
NEGATIVE_TTL = 60.0  # RFC 2308 §5: cache "no such name/data", but not for long
MAX_TTL = 3600.0


class DnsTempError(CofferError):
    """A lookup got no usable answer (timeout, SERVFAIL): a temporary error."""

    def __init__(self, name: str, rdtype: str, cause: str) -> None:
        self.name = name
        self.rdtype = rdtype
        self.cause = cause
        super().__init__(f"DNS {rdtype} {name}: {cause}")


def parse_nameserver(value: str) -> tuple[str, int]:
    """'127.0.0.1', '127.0.0.1:5353', '[::1]:5353' or '::1' -> (host, port)."""
    from gateway.config import parse_hostport  # gateway.config imports check.config

    return parse_hostport(value, DEFAULT_PORT)


class _CacheMiss(BaseException):
    """Resolver.run's inline attempt needs a name the cache does not hold.

    A BaseException, so that the checks' ``except Exception`` handlers (which turn
    DNS trouble into temperror) let it through to Resolver.run.
    """


class Missed:
    """What Resolver.cached returns when the cache could not answer every lookup."""

    __slots__ = ()


MISSED = Missed()

# Set (to the list of names missed) while Resolver.cached tries a check inline.
_CACHE_ONLY: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "coffer_dns_cache_only", default=None)


# Set (to a list of (key, records)) while Resolver.remember evaluates: every lookup
# made, with the very object it returned, or _UNUSABLE when its answer was not the
# cache's (an error, a malformed name, a cache-only miss).
_RECORDING: contextvars.ContextVar[list[tuple[tuple[str, str], Any]] | None] = (
    contextvars.ContextVar("coffer_dns_recording", default=None))
_UNUSABLE = object()
MEMO_ENTRIES = 4096


class TtlCache:
    """A bounded, thread-safe map whose entries expire (clock injected for tests)."""

    def __init__(
        self, max_entries: int = 10000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[tuple[str, str], tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> Any | None:
        with self._lock:
            item = self._data.get(key)
            if item is None or item[0] <= self.clock():
                if item is not None:
                    del self._data[key]
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[1]

    def put(self, key: tuple[str, str], value: Any, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            self._data[key] = (self.clock() + ttl, value)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)  # least recently used

    def holds(self, key: tuple[str, str], value: Any) -> bool:
        """Whether ``key`` is cached, unexpired, as this very ``value`` (the object
        a lookup returned): what :meth:`Resolver.recall` checks a memo against.
        Neither a hit nor a miss (the memo's lookups are not made), but the entry is
        moved to the end as a hit's would be: it is still in use."""
        with self._lock:
            item = self._data.get(key)
            if item is None or item[1] is not value or item[0] <= self.clock():
                return False
            self._data.move_to_end(key)
            return True

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class Resolver:
    """Blocking DNS lookups against the configured nameservers, with a TTL cache."""

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        timeout: float = 5.0,
        cache: TtlCache | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.nameservers = [parse_nameserver(n) for n in nameservers]
        self.timeout = timeout
        self.cache = cache
        self.executor = executor  # None: the event loop's default executor
        if self.nameservers:
            res = dns.resolver.Resolver(configure=False)
            res.nameservers = [
                dns.nameserver.Do53Nameserver(host, port) for host, port in self.nameservers
            ]
        else:  # Config.dns: "empty: /etc/resolv.conf"
            res = dns.resolver.Resolver(configure=True)
        res.lifetime = timeout
        res.timeout = timeout
        res.retry_servfail = False  # SERVFAIL is an answer: temperror, not a retry loop
        res.cache = None  # ours, below, is the one that counts
        self._res = res
        # Results derived from DNS answers (Resolver.remember): key -> (result, the
        # lookups it was computed from).  Only with a cache, which it is checked on.
        self._memo: ValueMemo[Any, tuple[Any, tuple[tuple[tuple[str, str], Any], ...]]] = (
            ValueMemo(MEMO_ENTRIES))

    @classmethod
    def from_config(cls, dns_config: Any, cache: TtlCache | None = None) -> Resolver:
        """From a gateway.config.DnsConfig (nameservers, timeout)."""
        return cls(list(dns_config.nameservers), float(dns_config.timeout), cache)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)``: inline if the cache answers every lookup it makes,
        else in a worker thread, with this context's variables.

        A check whose names are all cached is CPU work only (well under a
        millisecond), and a thread hop would cost a good part of that again.  So it
        is first run on the loop with lookups limited to the cache (:meth:`cached`)
        and, if a name is missing, again from the start in a thread with the
        network (:meth:`in_thread`).  ``fn`` must have no effect but its result
        (the checks are pure apart from DNS).
        """
        result = self.cached(fn, *args, **kwargs)
        if not isinstance(result, Missed):
            return result
        return await self.in_thread(fn, *args, **kwargs)

    def cached(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | Missed:
        """``fn(*args, **kwargs)`` run here with lookups limited to the cache, or
        :data:`MISSED` if it needed a name the cache does not hold (or there is no
        cache).  The first missing name abandons the attempt (:class:`_CacheMiss`,
        noted even if a library swallows the exception, as pyspf's bare
        ``except:`` does)."""
        if self.cache is None:
            return MISSED
        missed: list[tuple[str, str]] = []
        token = _CACHE_ONLY.set(missed)
        try:
            result = fn(*args, **kwargs)
        except _CacheMiss:
            return MISSED
        except Exception:
            if not missed:
                raise
            return MISSED
        finally:
            _CACHE_ONLY.reset(token)
        return MISSED if missed else result

    async def in_thread(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in the resolver's executor, with this context's
        variables (lookups go to the network for names not cached)."""
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    def recall(self, key: Any) -> Any | None:
        """The result :meth:`remember` kept under ``key``, if every lookup it was
        computed from is still cached with the same answer (same object, unexpired):
        the same evaluation input, so a pure function of it gives the same result.
        None otherwise."""
        cache = self.cache
        if cache is None:
            return None
        item = self._memo.get(key)
        if item is None:
            return None
        result, lookups = item
        for name, records in lookups:
            if not cache.holds(name, records):
                return None
        outer = _RECORDING.get()
        if outer is not None:  # a result remembered inside another depends on these too
            outer.extend(lookups)
        return result

    def remember(self, key: Any, fn: Callable[[], T],
                 usable: Callable[[T, Sequence[tuple[tuple[str, str], Any]]], bool]
                 = lambda result, lookups: True) -> T:
        """``fn()``, kept under ``key`` with the lookups it made, for :meth:`recall`.

        ``fn`` must be a pure function of its arguments (all in ``key``) and of the
        answers of the lookups it makes through this resolver.  Its result is not
        kept when a lookup was not answered from the cache (a DNS error, a malformed
        name, an inline attempt's miss), when there is no cache, or when ``usable``
        says so (e.g. a result that also depends on the clock)."""
        if self.cache is None:
            return fn()
        lookups: list[tuple[tuple[str, str], Any]] = []
        token = _RECORDING.set(lookups)
        try:
            result = fn()
        finally:
            _RECORDING.reset(token)
            outer = _RECORDING.get()
            if outer is not None:  # a result remembered inside another depends on these too
                outer.extend(lookups)
        if all(records is not _UNUSABLE for _, records in lookups) and usable(result, lookups):
            self._memo.keep(key, (result, tuple(lookups)))
        return result

    def query(self, name: str, rdtype: str) -> tuple[dns.rdata.Rdata, ...]:
        """The records of ``rdtype`` at ``name``; () for NXDOMAIN or NODATA.

        Raises DnsTempError when no server gave a usable answer.
        """
        recording = _RECORDING.get()
        if recording is None:
            return self._query(name, rdtype)
        key = (name.lower().rstrip("."), rdtype.upper())
        try:
            records = self._query(name, rdtype)
        except BaseException:
            recording.append((key, _UNUSABLE))
            raise
        # the very object the cache holds (tuple() of a tuple is itself), or a fresh
        # answer just put there (or not: then recall finds it is not held)
        recording.append((key, records))
        return records

    def _query(self, name: str, rdtype: str) -> tuple[dns.rdata.Rdata, ...]:
        key = (name.lower().rstrip("."), rdtype.upper())
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                return tuple(cached)
        missed = _CACHE_ONLY.get()
        if missed is not None:  # an inline attempt of run(): no network on the loop
            missed.append(key)
            raise _CacheMiss(key)
        try:
            qname = dns.name.from_text(key[0] or ".")
        except dns.exception.DNSException:
            # RFC 7208 §4.3: a malformed name is not a DNS failure; it has no records
            return ()
        try:
            answer = self._res.resolve(
                qname, key[1], raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN:
            records: tuple[dns.rdata.Rdata, ...] = ()
            ttl = NEGATIVE_TTL
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise DnsTempError(key[0], key[1], _short(exc)) from None
        except dns.resolver.YXDOMAIN:
            records, ttl = (), NEGATIVE_TTL
        except dns.exception.DNSException as exc:
            raise DnsTempError(key[0], key[1], _short(exc)) from None
        else:
            if answer.rrset is None:  # NODATA
                records, ttl = (), NEGATIVE_TTL
            else:
                records = tuple(answer.rrset)
                ttl = min(float(answer.rrset.ttl), MAX_TTL)
        if self.cache is not None:
            self.cache.put(key, records, ttl)
        return records

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record at ``name``, its strings concatenated (RFC 7208 §3.3)."""
        return [b"".join(r.strings) for r in self.query(name, "TXT")]  # type: ignore[attr-defined]


def _short(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "SERVFAIL or no server answered"
    return type(exc).__name__


# --- pyspf adapter -------------------------------------------------------------
#
# pyspf looks names up through its module-level ``spf.DNSLookup``.  We replace it
# once with a function that uses the Resolver set for the current context
# (set in the worker thread itself, by pyspf_resolver), so two
# checks with different resolvers never share one, and with none set pyspf gets
# a temperror rather than a silent query to the system resolver.

_SPF_RESOLVER: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar(
    "coffer_spf_resolver", default=None
)
_installed = False
_install_lock = threading.Lock()


def _pyspf_lookup(
    name: str, qtype: str, strict: Any = True, timeout: float = 30
) -> list[tuple[tuple[str, str], Any]]:
    """Same contract as pyspf's DNSLookup_dnspython, over our resolver."""
    resolver = _SPF_RESOLVER.get()
    if resolver is None:
        raise spf.TempError("DNS: no resolver configured for this check")
    try:
        records = resolver.query(name, qtype)
    except DnsTempError as exc:
        raise spf.TempError(f"DNS {exc.cause}") from None
    out: list[tuple[tuple[str, str], Any]] = []
    for r in records:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), r.address))  # type: ignore[attr-defined]
        elif qtype == "MX":
            out.append(((name, qtype), (r.preference, r.exchange)))  # type: ignore[attr-defined]
        elif qtype == "PTR":
            out.append(((name, qtype), r.target.to_text(True)))  # type: ignore[attr-defined]
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), r.strings))  # type: ignore[attr-defined]
    return out


def _install_pyspf_adapter() -> None:
    global _installed
    if _installed:  # every SPF check passes here: no lock once it is done
        return
    with _install_lock:
        if not _installed:
            spf.DNSLookup = _pyspf_lookup
            _installed = True


@contextlib.contextmanager
def pyspf_resolver(resolver: Resolver) -> Iterator[None]:
    """Within this block (and this context), pyspf resolves through ``resolver``."""
    _install_pyspf_adapter()
    token = _SPF_RESOLVER.set(resolver)
    try:
        yield
    finally:
        _SPF_RESOLVER.reset(token)


# --- dkimpy adapter ------------------------------------------------------------


class DkimDnsFunc:
    """dkimpy's ``dnsfunc(name, timeout=...)`` over our resolver.

    dkimpy turns every key-lookup problem into a plain ``False``; this adapter
    remembers what happened so the caller can report temperror (no answer,
    RFC 6376 §6.1.2 TEMPFAIL) or permerror (no key record, PERMFAIL) instead of
    a misleading ``fail``.
    """

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.temperror: str | None = None
        self.missing: list[str] = []

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            self.missing.append(repr(name))
            return None
        try:
            records = self.resolver.txt(text)
        except DnsTempError as exc:
            self.temperror = str(exc)
            raise dkim.DnsTimeoutError(str(exc)) from None
        if not records:
            self.missing.append(text.rstrip("."))
            return None
        # RFC 6376 §3.6.2.2: several TXT records give undefined results; use the first
        return records[0]
