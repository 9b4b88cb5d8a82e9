"""Pure predicates over one message: each answers (matched, why).

A condition is built once per policy load (by policies.schema, with its regexes
already compiled and vetted by policies.loader) and evaluated for every message
against an :class:`EvalContext` — the envelope, the parsed message view, the
facts of earlier stages and the clock.  Nothing here does I/O.

Every predicate returns the reason along with the answer, so the trace can say
"recipient.domain 'partner.example' equals 'partner.example'" or
"dmarc is pass, not fail" — the audit trail is built from these strings.
"""

from __future__ import annotations

import functools
import ipaddress
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import regex

from gateway.check.headers import addresses
from gateway.envelope import Envelope, domain_of, local_part_of
from policies.message import Attachment, MessageView

Result = tuple[bool, str]

DIRECTIONS = ("inbound", "outbound", "internal", "relay")


def derive_direction(envelope: Envelope, local_domains: Iterable[str]) -> str:
    """inbound, outbound, internal or relay, from the envelope and the local domains.

    outbound: the sender is local (or the client authenticated) and some
    recipient is not; internal: sender and every recipient local; inbound: the
    sender is not local and some recipient is; relay: nothing local at all.
    """
    local = (_local_set(local_domains) if isinstance(local_domains, tuple)
             else _normalise(local_domains))
    sender_local = domain_of(envelope.mail_from) in local
    rcpt_local = [domain_of(r) in local for r in envelope.rcpt_to]
    if (sender_local or envelope.auth_user) and not all(rcpt_local):
        return "outbound"
    if sender_local and rcpt_local and all(rcpt_local):
        return "internal"
    if any(rcpt_local):
        return "inbound"
    return "outbound" if sender_local or envelope.auth_user else "relay"


def _normalise(local_domains: Iterable[str]) -> frozenset[str]:
    return frozenset(d.lower().rstrip(".") for d in local_domains)


# The decide stage passes the same tuple for every message: normalise it once.
_local_set = functools.lru_cache(maxsize=16)(_normalise)


@dataclass(slots=True)
class EvalContext:
    envelope: Envelope
    message: MessageView
    facts: Mapping[str, Any]
    direction: str
    now: datetime  # timezone-aware
    errors: list[str] = field(default_factory=list)

    @property
    def check(self) -> Mapping[str, Any]:
        value = self.facts.get("check")
        # The facts are plain dicts: skip the (slower) ABC check for those.
        return value if type(value) is dict or isinstance(value, Mapping) else {}

    @property
    def spam(self) -> Mapping[str, Any]:
        value = self.facts.get("spam")
        return value if type(value) is dict or isinstance(value, Mapping) else {}


class Condition(Protocol):
    def evaluate(self, ctx: EvalContext) -> Result: ...


def show(value: object, limit: int = 60) -> str:
    text = str(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return repr(text)


def show_many(values: Sequence[str], limit: int = 3) -> str:
    if not values:
        return "(none)"
    shown = ", ".join(show(v, 40) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


# ---------------------------------------------------------------------------
# Regexes with a match-time guard


class RegexTimeout(Exception):
    """A regex ran longer than the policy's regex_timeout on this input."""


@dataclass(frozen=True, slots=True)
class SafePattern:
    """A compiled regex that gives up after ``timeout`` seconds.

    Static vetting (policies.loader) refuses the classic catastrophic shapes,
    but no static check catches every super-linear pattern; the ``regex``
    module's ``timeout`` bounds the worst case per message, which the stdlib
    ``re`` cannot do.
    """

    source: str
    compiled: regex.Pattern[str]
    timeout: float

    def search(self, text: str) -> bool:
        try:
            return self.compiled.search(text, timeout=self.timeout) is not None
        except TimeoutError:
            raise RegexTimeout(f"regex {show(self.source)} timed out") from None

    def matches(self, text: str) -> list[str]:
        try:
            return [m.group(0) for m in self.compiled.finditer(text, timeout=self.timeout)]
        except TimeoutError:
            raise RegexTimeout(f"regex {show(self.source)} timed out") from None


_ASCII_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


@dataclass(frozen=True, slots=True)
class KeywordPattern(SafePattern):
    """A keyword list's alternation (policies.schema), tried only where a keyword can start.

    Every match begins with its keyword's first word, literally: the positions where
    one occurs are found with ``str.find`` and the pattern is tried at those alone, in
    order, skipping any inside the previous match, which is what ``finditer`` and
    ``search`` find by trying every position (a regex run over the whole text costs
    far more than the finds).  A case-insensitive list is searched this way only in
    ASCII text and when the list is ASCII (``firsts`` is empty otherwise), where lower
    case is exactly the regex's case folding; other text, and text with too many
    candidate positions, is scanned as by :class:`SafePattern`.
    """

    firsts: tuple[str, ...] = ()  # each keyword's first word; lower case unless case_sensitive
    case_sensitive: bool = False

    def _starts(self, text: str) -> list[int] | None:
        if not self.firsts:
            return None
        if self.case_sensitive:
            hay = text
        elif text.isascii():
            hay = text.lower()
        else:
            return None
        # Past this many tries a scan of the whole text is the cheaper way.
        limit = len(text) // 16 + 16
        starts: set[int] = set()
        word = _ASCII_WORD
        for first in self.firsts:
            # A keyword starting with an ASCII character starts at a word boundary (\b
            # before a word character, (?<!\w) before any other): never right after an
            # ASCII word character.  (Other cases the regex decides: Unicode's \w, and
            # \b before a character Python calls alphanumeric and the regex does not.)
            bounded = first[0].isascii()
            i = hay.find(first)
            while i >= 0:
                if not bounded or i == 0 or hay[i - 1] not in word:
                    starts.add(i)
                    if len(starts) > limit:
                        return None
                i = hay.find(first, i + 1)
        return sorted(starts)

    def search(self, text: str) -> bool:
        starts = self._starts(text)
        if starts is None:
            return SafePattern.search(self, text)
        match = self.compiled.match
        try:
            return any(match(text, i, timeout=self.timeout) is not None for i in starts)
        except TimeoutError:
            raise RegexTimeout(f"regex {show(self.source)} timed out") from None

    def matches(self, text: str) -> list[str]:
        starts = self._starts(text)
        if starts is None:
            return SafePattern.matches(self, text)
        match = self.compiled.match
        out = []
        end = 0
        try:
            for i in starts:
                if i < end:
                    continue
                m = match(text, i, timeout=self.timeout)
                if m is not None:
                    out.append(m.group(0))
                    end = m.end()
        except TimeoutError:
            raise RegexTimeout(f"regex {show(self.source)} timed out") from None
        return out


# ---------------------------------------------------------------------------
# String matchers (used by sender, recipient, header, subject, body, ...)


class Test(Protocol):
    def test(self, value: str) -> bool: ...
    def describe(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Equals:
    values: frozenset[str]
    case_sensitive: bool = False

    def test(self, value: str) -> bool:
        return (value if self.case_sensitive else value.lower()) in self.values

    def describe(self) -> str:
        vals = sorted(self.values)
        return f"equals {show(vals[0])}" if len(vals) == 1 else f"is one of {show_many(vals)}"


@dataclass(frozen=True, slots=True)
class Contains:
    needles: tuple[str, ...]
    case_sensitive: bool = False

    def test(self, value: str) -> bool:
        hay = value if self.case_sensitive else value.lower()
        return any(n in hay for n in self.needles)

    def describe(self) -> str:
        if len(self.needles) == 1:
            return f"contains {show(self.needles[0])}"
        return f"contains one of {show_many(list(self.needles))}"


@dataclass(frozen=True, slots=True)
class PatternTest:
    kind: str  # "glob" or "regex" (globs are translated to regexes at load)
    patterns: tuple[SafePattern, ...]
    labels: tuple[str, ...]

    def test(self, value: str) -> bool:
        return any(p.search(value) for p in self.patterns)

    def describe(self) -> str:
        if len(self.labels) == 1:
            return f"matches {self.kind} {show(self.labels[0])}"
        return f"matches one of {self.kind}s {show_many(list(self.labels))}"


@dataclass(frozen=True, slots=True)
class InList:
    name: str  # "" for an inline list
    exact: frozenset[str]
    globs: tuple[SafePattern, ...] = ()
    case_sensitive: bool = False

    def test(self, value: str) -> bool:
        v = value if self.case_sensitive else value.lower()
        return v in self.exact or any(g.search(value) for g in self.globs)

    def describe(self) -> str:
        return f"is in list {self.name}" if self.name else "is in the given list"


@dataclass(frozen=True, slots=True)
class Keywords:
    """Whole words or phrases from a dictionary, case-insensitive."""

    name: str
    pattern: SafePattern | None  # None: the dictionary is empty

    def test(self, value: str) -> bool:
        return self.pattern is not None and self.pattern.search(value)

    def describe(self) -> str:
        return f"contains a keyword from {self.name or 'the given words'}"


@dataclass(frozen=True, slots=True)
class Matcher:
    """All of its tests must pass (``{contains: x, regex: y}`` means both)."""

    tests: tuple[Test, ...]
    negate: bool = False
    # The trace texts are fixed per matcher: built once at load, not per message.
    _hit: str = field(init=False, repr=False, compare=False, default="")
    _miss: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        text = " and ".join(t.describe() for t in self.tests)
        if self.negate:
            hit, miss = f"does not satisfy ({text})", text
        elif len(self.tests) == 1:
            hit, miss = text, negate_phrase(text)
        else:
            hit, miss = text, f"does not satisfy ({text})"
        object.__setattr__(self, "_hit", hit)
        object.__setattr__(self, "_miss", miss)

    def test(self, value: str) -> bool:
        if len(self.tests) == 1:
            return self.tests[0].test(value) != self.negate
        return all(t.test(value) for t in self.tests) != self.negate

    def describe(self) -> str:
        return self._hit

    def describe_miss(self) -> str:
        """The description for a value that failed the test, in plain English."""
        return self._miss


_NEGATIONS = (
    ("equals ", "does not equal "), ("is one of ", "is not one of "),
    ("contains ", "does not contain "), ("matches ", "does not match "),
    ("is in ", "is not in "),
)


def negate_phrase(phrase: str) -> str:
    for pos, neg in _NEGATIONS:
        if phrase.startswith(pos):
            return neg + phrase[len(pos):]
    return f"does not satisfy ({phrase})"


# ---------------------------------------------------------------------------
# Numbers


@dataclass(frozen=True, slots=True)
class Compare:
    ops: tuple[tuple[str, float], ...]  # ("gt", 10.0), ...
    unit: str = ""
    _desc: str = field(init=False, repr=False, compare=False, default="")
    # The operators looked up once, at load.
    _tests: tuple[tuple[Callable[[float, float], bool], float], ...] = field(
        init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        desc = " and ".join(f"{_SYMBOL[op]} {_num(b)}{self.unit}" for op, b in self.ops)
        object.__setattr__(self, "_desc", desc)
        object.__setattr__(self, "_tests", tuple((_OPS[op], bound) for op, bound in self.ops))

    def test(self, value: float) -> bool:
        # A loop, not all() over a generator: no generator per test, and most have one.
        for op, bound in self._tests:  # noqa: SIM110
            if not op(value, bound):
                return False
        return True

    def describe(self) -> str:
        return self._desc


_SYMBOL = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "eq": "=="}
_OPS = {"gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le,
        "eq": operator.eq}


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# ---------------------------------------------------------------------------
# Combinators


@dataclass(frozen=True, slots=True)
class Always:
    def evaluate(self, ctx: EvalContext) -> Result:
        return True, "always"


@dataclass(frozen=True, slots=True)
class AllOf:
    children: tuple[Condition, ...]

    def evaluate(self, ctx: EvalContext) -> Result:
        whys = []
        for child in self.children:
            # guarded(child, ctx), inlined: this runs for every message.
            try:
                ok, why = child.evaluate(ctx)
            except Exception as exc:
                ok, why = failed(exc, ctx)
            if not ok:
                return False, why
            whys.append(why)
        return True, "; ".join(whys) if whys else "always"


@dataclass(frozen=True, slots=True)
class AnyOf:
    children: tuple[Condition, ...]

    def evaluate(self, ctx: EvalContext) -> Result:
        whys = []
        for child in self.children:
            try:
                ok, why = child.evaluate(ctx)
            except Exception as exc:
                ok, why = failed(exc, ctx)
            if ok:
                return True, why
            whys.append(why)
        return False, "none of: " + " | ".join(whys) if whys else "empty any"


@dataclass(frozen=True, slots=True)
class Not:
    child: Condition

    def evaluate(self, ctx: EvalContext) -> Result:
        ok, why = guarded(self.child, ctx)
        return (not ok), f"not ({why})"


def guarded(cond: Condition, ctx: EvalContext) -> Result:
    """Evaluate, turning any failure into a miss with its reason (evaluation never raises)."""
    try:
        return cond.evaluate(ctx)
    except Exception as exc:
        return failed(exc, ctx)


def failed(exc: Exception, ctx: EvalContext) -> Result:
    """The miss a condition that raised ``exc`` counts as; the error is recorded."""
    if isinstance(exc, RegexTimeout):
        ctx.errors.append(str(exc))
        return False, f"error: {exc}"
    msg = f"{type(exc).__name__}: {exc}"
    ctx.errors.append(msg)
    return False, f"error: {msg}"


# ---------------------------------------------------------------------------
# Envelope, connection, direction


@dataclass(frozen=True, slots=True)
class Direction:
    values: frozenset[str]
    _want: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_want", "/".join(sorted(self.values)))

    def evaluate(self, ctx: EvalContext) -> Result:
        if ctx.direction in self.values:
            return True, f"direction is {ctx.direction}"
        return False, f"direction is {ctx.direction}, not {self._want}"


def unicode_domain(text: str) -> str:
    """A domain (or an address's domain) with A-labels as U-labels, so that a rule
    written as münchen.example matches mail for xn--mnchen-3ya.example (RFC 5890 §2.3.2.1).
    """
    if "xn--" not in text.lower():
        return text
    local, at, domain = text.rpartition("@")
    try:
        decoded = domain.encode("ascii").decode("idna")
    except (UnicodeError, ValueError):
        return text
    return f"{local}{at}{decoded}"


def _address_parts(address: str, part: str) -> str:
    address = address.strip().strip("<>")
    if part == "domain":
        return unicode_domain(domain_of(address))
    if part == "local":
        return local_part_of(address) if "@" in address else ""
    return unicode_domain(address)


@dataclass(frozen=True, slots=True)
class AddressField:
    """sender / recipient / all_recipients / from, each as address, domain or local part."""

    field: str  # "sender", "recipient", "all_recipients", "from"
    part: str  # "address", "domain", "local"
    matcher: Matcher

    def values(self, ctx: EvalContext) -> list[str]:
        if self.field == "sender":
            addrs = [ctx.envelope.mail_from or ""]
        elif self.field == "from":
            cached = ctx.message.cache.get("from")
            if not isinstance(cached, list):
                # read as DMARC reads it (gateway.check.headers.addresses)
                cached = [a for _, a in addresses(ctx.message.header_values("from")) if a]
                ctx.message.cache["from"] = cached
            addrs = cached
        else:
            addrs = list(ctx.envelope.rcpt_to)
        return [_address_parts(str(a), self.part) for a in addrs]

    def evaluate(self, ctx: EvalContext) -> Result:
        label = self.field + ("" if self.part == "address" else f".{self.part}")
        values = self.values(ctx)
        desc = self.matcher.describe()
        if self.field == "all_recipients":
            label = label.replace("all_recipients", "recipient")
            bad = [v for v in values if not self.matcher.test(v)]
            if values and not bad:
                return True, f"every {label} {desc} ({show_many(values)})"
            if not bad:
                return False, "no recipients"
            return False, f"{label} {show(bad[0])} {self.matcher.describe_miss()} (all must)"
        for v in values:
            if self.matcher.test(v):
                return True, f"{label} {show(v)} {desc}"
        if len(values) == 1:
            return False, f"{label} {show(values[0])} {self.matcher.describe_miss()}"
        return False, f"no {label} of {show_many(values)} {desc}"


@dataclass(frozen=True, slots=True)
class RecipientCount:
    compare: Compare

    def evaluate(self, ctx: EvalContext) -> Result:
        n = len(ctx.envelope.rcpt_to)
        ok = self.compare.test(n)
        return ok, f"{n} recipients" + ("" if ok else f", not {self.compare.describe()}")


@dataclass(frozen=True, slots=True)
class ClientIp:
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    label: str

    def evaluate(self, ctx: EvalContext) -> Result:
        raw = ctx.envelope.client_ip
        key = f"client_ip:{raw}"
        ip = ctx.message.cache.get(key)
        if ip is None:
            try:
                ip = ipaddress.ip_address(raw.strip("[]"))
            except ValueError:
                ip = False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            ctx.message.cache[key] = ip
        if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False, f"client IP {show(raw)} is not an address"
        for net in self.networks:
            if ip.version == net.version and ip in net:
                return True, f"client IP {ip} is in {net}"
        return False, f"client IP {ip} is not in {self.label}"


@dataclass(frozen=True, slots=True)
class Flag:
    """tls / authenticated: a yes-or-no fact of the connection."""

    name: str
    want: bool

    def evaluate(self, ctx: EvalContext) -> Result:
        if self.name == "tls":
            have = ctx.envelope.tls is not None
            text = "TLS was used" if have else "TLS was not used"
        else:
            have = bool(ctx.envelope.auth_user)
            text = "client authenticated" if have else "client did not authenticate"
        return have == self.want, text


@dataclass(frozen=True, slots=True)
class AuthUser:
    matcher: Matcher

    def evaluate(self, ctx: EvalContext) -> Result:
        user = ctx.envelope.auth_user
        if not user:
            return False, "client did not authenticate"
        ok = self.matcher.test(user)
        desc = self.matcher.describe() if ok else self.matcher.describe_miss()
        return ok, f"auth user {show(user)} {desc}"


# ---------------------------------------------------------------------------
# Headers and content


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    exists: bool | None  # None: a matcher decides
    matcher: Matcher | None

    def evaluate(self, ctx: EvalContext) -> Result:
        values = ctx.message.header_values(self.name)
        if self.matcher is None:
            want = True if self.exists is None else self.exists
            have = bool(values)
            return have == want, f"header {self.name} {'exists' if have else 'is absent'}"
        desc = self.matcher.describe()
        for v in values:
            if self.matcher.test(v):
                return True, f"header {self.name} {show(v)} {desc}"
        if not values:
            return False, f"header {self.name} is absent"
        return False, f"header {self.name} {show_many(values)} {self.matcher.describe_miss()}"


@dataclass(frozen=True, slots=True)
class Text:
    """subject or body (plain text plus the text of HTML parts)."""

    field: str
    matcher: Matcher

    def evaluate(self, ctx: EvalContext) -> Result:
        value = ctx.message.subject if self.field == "subject" else ctx.message.body_text
        ok = self.matcher.test(value)
        shown = show(value) if self.field == "subject" else f"({len(value)} chars)"
        desc = self.matcher.describe() if ok else self.matcher.describe_miss()
        return ok, f"{self.field} {shown} {desc}"


@dataclass(frozen=True, slots=True)
class Size:
    compare: Compare

    def evaluate(self, ctx: EvalContext) -> Result:
        n = ctx.message.size
        ok = self.compare.test(n)
        return ok, f"size {n} bytes" + ("" if ok else f", not {self.compare.describe()}")


# ---------------------------------------------------------------------------
# Attachments


@dataclass(frozen=True, slots=True)
class AttachmentProps:
    """Some attachment has every listed property."""

    name: Matcher | None = None
    extension: Matcher | None = None
    declared_type: Matcher | None = None
    detected_type: Matcher | None = None
    size: Compare | None = None
    depth: Compare | None = None
    encrypted: bool | None = None
    unscannable: bool | None = None
    _desc: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_desc", self._describe())

    def describe(self) -> str:
        return self._desc

    def _fits(self, a: Attachment) -> bool:
        checks = (
            (self.name, a.name), (self.extension, a.extension),
            (self.declared_type, a.declared_type), (self.detected_type, a.detected_type),
        )
        for matcher, value in checks:
            if matcher is not None and not matcher.test(value):
                return False
        if self.size is not None and not self.size.test(a.size):
            return False
        if self.depth is not None and not self.depth.test(a.depth):
            return False
        if self.encrypted is not None and a.encrypted != self.encrypted:
            return False
        return self.unscannable is None or a.unscannable == self.unscannable

    def _describe(self) -> str:
        parts = []
        for key in ("name", "extension", "declared_type", "detected_type"):
            m = getattr(self, key)
            if m is not None:
                parts.append(f"{key} {m.describe()}")
        for key in ("size", "depth"):
            c = getattr(self, key)
            if c is not None:
                parts.append(f"{key} {c.describe()}")
        for key in ("encrypted", "unscannable"):
            b = getattr(self, key)
            if b is not None:
                parts.append(key if b else f"not {key}")
        return ", ".join(parts) or "any attachment"

    def evaluate(self, ctx: EvalContext) -> Result:
        # Attachment properties never include the extracted text: don't extract it.
        attachments = ctx.message.attachment_meta
        for a in attachments:
            if self._fits(a):
                label = show(a.name) if a.name else f"({a.declared_type})"
                extra = f" [{a.reason}]" if a.reason else ""
                return True, f"attachment {label} at depth {a.depth}{extra}: {self._desc}"
        return False, f"no attachment of {len(attachments)} with {self._desc}"


@dataclass(frozen=True, slots=True)
class AttachmentCount:
    compare: Compare

    def evaluate(self, ctx: EvalContext) -> Result:
        n = len(ctx.message.attachment_meta)
        ok = self.compare.test(n)
        return ok, f"{n} attachments" + ("" if ok else f", not {self.compare.describe()}")


@dataclass(frozen=True, slots=True)
class NestingDepth:
    compare: Compare

    def evaluate(self, ctx: EvalContext) -> Result:
        n = max(ctx.message.max_depth, 0)
        ok = self.compare.test(n)
        return ok, f"nesting depth {n}" + ("" if ok else f", not {self.compare.describe()}")


# ---------------------------------------------------------------------------
# Verdicts of the check stage


def _result_of(value: Any) -> str:
    if type(value) is dict or isinstance(value, Mapping):
        value = value.get("result")
    return str(value).lower() if isinstance(value, str) and value else "none"


@dataclass(frozen=True, slots=True)
class AuthVerdict:
    """spf / dkim / dmarc / arc result, read from facts["check"]."""

    method: str
    results: frozenset[str]
    domain: Matcher | None = None  # dkim: the signing domain (d=)
    disposition: frozenset[str] | None = None  # dmarc: what the policy asked for
    _want: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_want", "/".join(sorted(self.results)))

    def evaluate(self, ctx: EvalContext) -> Result:
        want = self._want
        raw = ctx.check.get(self.method)
        if self.method == "dkim":
            sigs = [s for s in raw if isinstance(s, Mapping)] if isinstance(raw, list) else []
            if not sigs:
                ok = "none" in self.results and self.domain is None
                return ok, "dkim is none (no signature)" + ("" if ok else f", not {want}")
            seen = []
            for sig in sigs:
                res = _result_of(sig)
                dom = str(sig.get("domain") or "")
                seen.append(f"{res}({dom})" if dom else res)
                if res in self.results and (self.domain is None or self.domain.test(dom)):
                    return True, f"dkim is {res}" + (f" for {dom}" if dom else "")
            return False, f"dkim is {', '.join(seen)}, not {want}" + (
                f" for a domain that {self.domain.describe()}" if self.domain else "")
        res = _result_of(raw)
        if res not in self.results:
            return False, f"{self.method} is {res}, not {want}"
        if self.disposition is not None:
            disp = str(raw.get("disposition") or "none").lower() if isinstance(
                raw, Mapping) else "none"
            if disp not in self.disposition:
                want_disp = "/".join(sorted(self.disposition))
                return False, f"dmarc disposition is {disp}, not {want_disp}"
            return True, f"dmarc is {res} with disposition {disp}"
        return True, f"{self.method} is {res}"


@dataclass(frozen=True, slots=True)
class SpamScore:
    compare: Compare

    def evaluate(self, ctx: EvalContext) -> Result:
        score = ctx.spam.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            return False, "no spam score"
        value = float(score)
        if self.compare.test(value):
            return True, f"spam score {_num(value)}"
        return False, f"spam score {_num(value)}, not {self.compare._desc}"


@dataclass(frozen=True, slots=True)
class SpamVerdict:
    values: frozenset[str]
    _want: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_want", "/".join(sorted(self.values)))

    def evaluate(self, ctx: EvalContext) -> Result:
        verdict = ctx.spam.get("verdict")
        v = str(verdict).lower() if isinstance(verdict, str) else "none"
        if v in self.values:
            return True, f"spam verdict is {v}"
        return False, f"spam verdict is {v}, not {self._want}"


@dataclass(frozen=True, slots=True)
class SpamSymbol:
    matcher: Matcher

    def evaluate(self, ctx: EvalContext) -> Result:
        symbols = ctx.spam.get("symbols")
        names = [str(k) for k in symbols] if isinstance(symbols, Mapping | list) else []
        for name in names:
            if self.matcher.test(name):
                return True, f"spam symbol {name} {self.matcher.describe()}"
        return False, f"no spam symbol {self.matcher.describe()}"


# ---------------------------------------------------------------------------
# Data-loss prevention

# Candidate shapes; each candidate is then validated, so these stay simple and
# linear (no nested quantifiers).  They use the stdlib engine: they are ours.
# The "not preceded by" look-behind comes after the first character, not before
# it: the engine then only tries positions that start with the right class,
# which makes the scan three to five times faster.
_CARD = re.compile(r"\d(?<!\d\d)(?:[ -]?\d){12,18}(?!\d)")
_IBAN = re.compile(r"[A-Z](?<![A-Z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Z0-9])")
_SSN = re.compile(r"\d(?<![\d-]\d)\d\d(?:(-)\d\d-|( )\d\d )\d{4}(?![\d-])")

# ISO 13616 registry: IBAN length per country.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def luhn_ok(digits: str) -> bool:
    """ISO/IEC 7812-1 Annex B check digit (the Luhn algorithm)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_brand_ok(d: str) -> bool:
    """Issuer prefixes in use (ISO/IEC 7812 IINs): keeps random Luhn-valid numbers out."""
    n = len(d)
    if d[0] == "4":
        return n in (13, 16, 19)  # Visa
    two, four, six = int(d[:2]), int(d[:4]), int(d[:6])
    if 51 <= two <= 55 or 222100 <= six <= 272099:
        return n == 16  # Mastercard
    if two in (34, 37):
        return n == 15  # American Express
    if d.startswith("6011") or two == 65 or 644 <= int(d[:3]) <= 649 or 622126 <= six <= 622925:
        return 16 <= n <= 19  # Discover
    if 3528 <= four <= 3589:
        return 16 <= n <= 19  # JCB
    if two in (36, 38, 39) or 300 <= int(d[:3]) <= 305:
        return 14 <= n <= 19  # Diners Club
    if two == 62:
        return 16 <= n <= 19  # UnionPay
    return bool(d[:4] in ("5018", "5020", "5038", "6304", "6759", "6761", "6763")) and n >= 12


def find_cards(text: str) -> list[str]:
    out = []
    for m in _CARD.finditer(text):
        d = m.group(0).replace(" ", "").replace("-", "")
        if 13 <= len(d) <= 19 and len(set(d)) > 1 and _card_brand_ok(d) and luhn_ok(d):
            out.append(d)
    return out


def iban_ok(iban: str) -> bool:
    """ISO 13616-1 / ISO 7064 MOD 97-10: the rearranged number mod 97 is 1."""
    if len(iban) != IBAN_LENGTHS.get(iban[:2], -1) or not iban.isalnum():
        return False
    moved = iban[4:] + iban[:4]
    try:
        return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1
    except ValueError:
        return False


def find_ibans(text: str) -> list[str]:
    out = []
    for m in _IBAN.finditer(text):
        compact = m.group(0).replace(" ", "")
        length = IBAN_LENGTHS.get(compact[:2])
        # The candidate may run into following words; the registry length cuts it.
        if length and len(compact) >= length and iban_ok(compact[:length]):
            out.append(compact[:length])
    return out


_SSN_NEVER_ISSUED = frozenset({"078051120", "219099999", "123456789"})


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """SSA rules: area not 000, 666 or 900-999; group not 00; serial not 0000."""
    a = int(area)
    if a == 0 or a == 666 or a >= 900 or group == "00" or serial == "0000":
        return False
    return area + group + serial not in _SSN_NEVER_ISSUED


def find_ssns(text: str) -> list[str]:
    out = []
    for m in _SSN.finditer(text):
        v = m.group(0)
        area, group, serial = v[:3], v[4:6], v[7:]
        if ssn_ok(area, group, serial):
            out.append(f"{area}-{group}-{serial}")
    return out


DETECTORS = ("credit_card", "iban", "us_ssn", "keywords", "regex")
SCOPES = ("subject", "body", "attachments", "all")


@dataclass(frozen=True, slots=True)
class Dlp:
    detector: str
    min_count: int
    scope: str
    unique: bool = False
    pattern: SafePattern | None = None  # keywords (built from the list) or regex
    label: str = ""  # list name or the regex source

    def _text(self, msg: MessageView) -> str:
        if self.scope == "subject":
            return msg.subject
        if self.scope == "body":
            return msg.body_text
        if self.scope == "attachments":
            return msg.attachment_text
        return "\n".join((msg.subject, msg.body_text, msg.attachment_text))

    def found(self, msg: MessageView) -> list[str]:
        key = f"dlp:{self.detector}:{self.scope}:{self.label}"
        cached = msg.cache.get(key)
        if isinstance(cached, list):
            return cached
        text = self._text(msg)
        if self.detector == "credit_card":
            hits = find_cards(text)
        elif self.detector == "iban":
            hits = find_ibans(text)
        elif self.detector == "us_ssn":
            hits = find_ssns(text)
        elif self.pattern is not None:
            hits = self.pattern.matches(text)
            if self.detector == "keywords":
                hits = [h.lower() for h in hits]
        else:
            hits = []
        msg.cache[key] = hits
        return hits

    def evaluate(self, ctx: EvalContext) -> Result:
        hits = self.found(ctx.message)
        n = len(set(hits)) if self.unique else len(hits)
        what = self.detector + (f" {show(self.label)}" if self.label else "")
        kind = "distinct " if self.unique else ""
        ok = n >= self.min_count
        # Never echo the sensitive values themselves into the trace.
        return ok, f"dlp {what}: {n} {kind}match{'es' if n != 1 else ''} in {self.scope}" + (
            "" if ok else f", fewer than {self.min_count}")


# ---------------------------------------------------------------------------
# Time


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class TimeOfDay:
    start: time | None
    end: time | None
    days: frozenset[int] | None  # 0 = Monday
    tz: ZoneInfo

    def evaluate(self, ctx: EvalContext) -> Result:
        local = ctx.now.astimezone(self.tz)
        day = WEEKDAYS[local.weekday()]
        if self.days is not None and local.weekday() not in self.days:
            return False, f"day is {day}, not {'/'.join(WEEKDAYS[d] for d in sorted(self.days))}"
        if self.start is not None and self.end is not None:
            t = local.time().replace(tzinfo=None)
            if self.start <= self.end:
                inside = self.start <= t < self.end
            else:  # an overnight window such as 22:00-06:00
                inside = t >= self.start or t < self.end
            span = f"{self.start:%H:%M}-{self.end:%H:%M} {self.tz.key}"
            return inside, f"time {t:%H:%M} {day} is {'inside' if inside else 'outside'} {span}"
        return True, f"day is {day}"


@dataclass(frozen=True, slots=True)
class DateRange:
    start: date | None
    end: date | None  # inclusive
    tz: ZoneInfo

    def evaluate(self, ctx: EvalContext) -> Result:
        today = ctx.now.astimezone(self.tz).date()
        if self.start is not None and today < self.start:
            return False, f"date {today} is before {self.start}"
        if self.end is not None and today > self.end:
            return False, f"date {today} is after {self.end}"
        return True, f"date {today} is in range"


__all__ = [
    "DETECTORS", "DIRECTIONS", "SCOPES", "WEEKDAYS",
    "AddressField", "AllOf", "Always", "AnyOf", "AttachmentCount", "AttachmentProps",
    "AuthUser", "AuthVerdict", "ClientIp", "Compare", "Condition", "Contains", "DateRange",
    "Direction", "Dlp", "Equals", "EvalContext", "Flag", "Header", "InList", "KeywordPattern",
    "Keywords",
    "Matcher", "NestingDepth", "Not", "PatternTest", "RecipientCount", "RegexTimeout",
    "SafePattern", "Size", "SpamScore", "SpamSymbol", "SpamVerdict", "Text", "TimeOfDay",
    "derive_direction", "failed", "find_cards", "find_ibans", "find_ssns", "guarded", "iban_ok",
    "luhn_ok", "ssn_ok", "unicode_domain",
]
