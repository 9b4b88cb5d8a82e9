"""The rule language, version 1: the document model and its validation.

A policy is a YAML mapping::

    version: 1                          # required
    description: ...                    # optional
    allow_archive_exemption: false      # only then may a rule say `archive: false`
    regex_timeout: 0.25                 # seconds one regex may run on one message
    lists:                              # named lists: addresses, domains, keywords
      trusted-partners: [partner.example, "*.partner.example"]
      phi-terms: {file: lists/phi.txt}  # one entry a line, beside the policy
    retention_classes:
      financial: {period: 6y, immutable: true}
    rules:                              # evaluated in order
      - name: ...                       # required, unique
        description: ...
        when: {condition}               # default: always
        unless: {condition}             # exceptions
        then: [action, ...]
        stop: false                     # true: no later rule is evaluated
        override: false                 # true: this rule's terminal action replaces an earlier one
        mode: enforce                   # audit: record what would happen, change nothing
        on_error: ignore                # defer: tempfail when a condition cannot be evaluated
        active_from: 2025-01-01
        active_until: 2025-12-31        # a date is inclusive
      - include: other-rules.yaml       # that file's rules, spliced here

Validation is by hand rather than with pydantic because the condition language
is keyed by name (``sender.domain: x``) and every error must point at the
exact key, line and column (policies.loader supplies the locator).  The full
vocabulary is documented in docs/policy.md.
"""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import regex

from gateway.config import parse_size
from gateway.yamlsource import Locator
from policies import conditions as c
from policies.actions import ActionContext, PolicyAction, Retention, parse_action
from policies.errors import PolicyError, PolicyReferenceError, PolicySchemaError

VERSION = 1
DEFAULT_REGEX_TIMEOUT = 0.25

Path_ = list[str | int]
TOP_KEYS = ("version", "description", "allow_archive_exemption", "regex_timeout", "lists",
            "retention_classes", "rules")
RULE_KEYS = ("name", "description", "when", "unless", "then", "stop", "override", "mode",
             "on_error", "active_from", "active_until")


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    then: tuple[PolicyAction, ...]
    when: c.Condition | None = None
    unless: c.Condition | None = None
    description: str = ""
    stop: bool = False
    override: bool = False
    mode: str = "enforce"  # or "audit"
    on_error: str = "ignore"  # or "defer": a condition that could not be evaluated defers
    active_from: datetime | None = None
    active_until: datetime | None = None  # exclusive instant
    file: str = ""
    line: int | None = None
    column: int | None = None

    @property
    def unconditional(self) -> bool:
        return (self.when is None and self.unless is None and self.active_from is None
                and self.active_until is None)


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    version: int = VERSION
    description: str = ""
    lists: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    retention_classes: Mapping[str, Retention] = field(default_factory=dict)
    allow_archive_exemption: bool = False
    regex_timeout: float = DEFAULT_REGEX_TIMEOUT
    source: str = "<policy>"
    files: tuple[str, ...] = ()
    digest: str = ""  # sha256 of every file read: which policy decided, for the archive


RegexCompiler = Callable[[str, bool], "c.SafePattern"]  # (source, case_sensitive); ValueError


@dataclass(slots=True)
class ParseContext:
    loc: Locator
    lists: Mapping[str, tuple[str, ...]]
    retention_classes: Mapping[str, Retention]
    allow_archive_exemption: bool
    compile_regex: Callable[[str, bool], c.SafePattern]
    regex_timeout: float = DEFAULT_REGEX_TIMEOUT

    def fail(self, path: Path_, message: str,
             cls: type[PolicyError] = PolicySchemaError) -> PolicyError:
        return located(self.loc, path, message, cls)

    def actions(self) -> ActionContext:
        return ActionContext(self.fail, self.retention_classes, self.allow_archive_exemption)

    def regex(self, source: Any, path: Path_, case_sensitive: bool) -> c.SafePattern:
        from policies.errors import UnsafeRegexError

        if not isinstance(source, str) or not source:
            raise self.fail(path, "a regex must be a non-empty string")
        try:
            return self.compile_regex(source, case_sensitive)
        except ValueError as exc:
            raise self.fail(path, str(exc), UnsafeRegexError) from None


def located(loc: Locator, path: Sequence[str | int], message: str,
            cls: type[PolicyError] = PolicySchemaError) -> PolicyError:
    line, column = loc.find(path)
    key = ".".join(str(p) for p in path) or None
    return cls(message, file=loc.file, line=line, column=column, key=key)


def _type(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false",
            int: "a number", float: "a number", type(None): "empty"}.get(type(value),
                                                                            type(value).__name__)


# ---------------------------------------------------------------------------
# Top level


@dataclass(slots=True)
class Header:
    description: str = ""
    allow_archive_exemption: bool = False
    regex_timeout: float = DEFAULT_REGEX_TIMEOUT


def check_document(data: Any, loc: Locator, *, top: bool) -> Header:
    """Validate the keys of one policy file (the rules themselves come later)."""
    if not isinstance(data, Mapping):
        raise located(loc, [], f"a policy must be a mapping with version and rules, "
                      f"not {_type(data)}")
    for key in data:
        if key not in TOP_KEYS:
            raise located(loc, [str(key)], f"unknown key {key!r} (allowed: {', '.join(TOP_KEYS)})")
    if "version" not in data:
        raise located(loc, [], "missing 'version: 1'")
    if data["version"] != VERSION or isinstance(data["version"], bool):
        raise located(loc, ["version"], f"unsupported policy version {data['version']!r}; "
                      f"this Coffer reads version {VERSION}")
    head = Header()
    if "description" in data:
        if not isinstance(data["description"], str):
            raise located(loc, ["description"], "description must be a string")
        head.description = data["description"]
    for key in ("allow_archive_exemption", "regex_timeout"):
        if key in data and not top:
            raise located(loc, [key], f"{key} may only be set in the top-level policy file")
    if "allow_archive_exemption" in data:
        if not isinstance(data["allow_archive_exemption"], bool):
            raise located(loc, ["allow_archive_exemption"], "must be true or false")
        head.allow_archive_exemption = data["allow_archive_exemption"]
    if "regex_timeout" in data:
        t = data["regex_timeout"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 10:
            raise located(loc, ["regex_timeout"], "regex_timeout must be seconds, 0 < t <= 10")
        head.regex_timeout = float(t)
    if "rules" in data and not isinstance(data["rules"], list):
        raise located(loc, ["rules"], f"rules must be a list, not {_type(data['rules'])}")
    if top and "rules" not in data:
        raise located(loc, [], "missing 'rules:' (a list of rules)")
    for key in ("lists", "retention_classes"):
        if key in data and not isinstance(data[key], Mapping):
            raise located(loc, [key], f"{key} must be a mapping of names")
    return head


def parse_retention_class(raw: Any, path: Path_, loc: Locator, name: str) -> Retention:
    from policies.actions import parse_retention_period

    immutable = False
    period = raw
    if isinstance(raw, Mapping):
        for key in raw:
            if key not in ("period", "immutable"):
                raise located(loc, [*path, str(key)], f"unknown key {key!r} (period, immutable)")
        if "period" not in raw:
            raise located(loc, path, "a retention class needs a period")
        period = raw["period"]
        immutable = raw.get("immutable", False)
        if not isinstance(immutable, bool):
            raise located(loc, [*path, "immutable"], "immutable must be true or false")
        path = [*path, "period"]
    try:
        label, days = parse_retention_period(period)
    except ValueError as exc:
        raise located(loc, path, str(exc)) from None
    return Retention(label, days, name, immutable)


# ---------------------------------------------------------------------------
# Rules


def _when(value: Any, path: Path_, ctx: ParseContext) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value, time(), UTC)
    if isinstance(value, str):
        try:
            return _when(datetime.fromisoformat(value), path, ctx)
        except ValueError:
            pass
    raise ctx.fail(path, f"{value!r} is not a date (use 2025-01-31 or 2025-01-31T09:00:00Z)")


def parse_rule(raw: Any, path: Path_, ctx: ParseContext) -> Rule:
    if not isinstance(raw, Mapping):
        raise ctx.fail(path, f"a rule must be a mapping with name and then, not {_type(raw)}")
    for key in raw:
        if key not in RULE_KEYS:
            hint = " (did you mean then?)" if key in ("actions", "do", "action") else ""
            raise ctx.fail([*path, str(key)], f"unknown rule key {key!r}{hint} "
                           f"(allowed: {', '.join(RULE_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ctx.fail([*path, "name"] if "name" in raw else path, "a rule needs a name")
    if "then" not in raw:
        raise ctx.fail(path, f"rule {name!r} has no 'then:' (its actions)")
    then_raw = raw["then"]
    items = then_raw if isinstance(then_raw, list) else [then_raw]
    actx = ctx.actions()
    then = tuple(
        parse_action(item, [*path, "then", i] if isinstance(then_raw, list) else [*path, "then"],
                     actx)
        for i, item in enumerate(items)
    )
    flags = {}
    for key in ("stop", "override"):
        flags[key] = raw.get(key, False)
        if not isinstance(flags[key], bool):
            raise ctx.fail([*path, key], f"{key} must be true or false")
    mode = raw.get("mode", "enforce")
    if mode not in ("enforce", "audit"):
        raise ctx.fail([*path, "mode"], "mode must be enforce or audit")
    on_error = raw.get("on_error", "ignore")
    if on_error not in ("ignore", "defer"):
        raise ctx.fail([*path, "on_error"], "on_error must be ignore or defer")
    desc = raw.get("description", "")
    if not isinstance(desc, str):
        raise ctx.fail([*path, "description"], "description must be a string")
    start = _when(raw["active_from"], [*path, "active_from"], ctx) if "active_from" in raw else None
    end = None
    if "active_until" in raw:
        v = raw["active_until"]
        end = _when(v, [*path, "active_until"], ctx)
        if isinstance(v, date) and not isinstance(v, datetime):
            end += timedelta(days=1)  # a date means "through the end of that day"
    if start and end and end <= start:
        raise ctx.fail([*path, "active_until"], "active_until is before active_from")
    when = parse_condition(raw["when"], [*path, "when"], ctx) if "when" in raw else None
    unless = parse_condition(raw["unless"], [*path, "unless"], ctx) if "unless" in raw else None
    line, column = ctx.loc.find([*path, "name"])
    return Rule(
        name=name, then=then, when=when, unless=unless, description=desc, stop=flags["stop"],
        override=flags["override"], mode=mode, on_error=on_error, active_from=start,
        active_until=end,
        file=ctx.loc.file, line=line, column=column,
    )


# ---------------------------------------------------------------------------
# Conditions

_ADDRESS_FIELDS = ("sender", "recipient", "all_recipients", "from")
_ADDRESS_PARTS = ("address", "domain", "local")
_VERDICTS = {
    # RFC 7208 §2.6 (SPF), RFC 8601 §2.7.1 (DKIM), RFC 7489 §11.2 (DMARC), RFC 8617 §4.4 (ARC)
    "spf": frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"}),
    "dkim": frozenset({"pass", "fail", "neutral", "none", "policy", "temperror", "permerror"}),
    "dmarc": frozenset({"pass", "fail", "none", "temperror", "permerror"}),
    "arc": frozenset({"pass", "fail", "none"}),
}
_DISPOSITIONS = frozenset({"none", "quarantine", "reject"})
_ATTACHMENT_PROPS = ("name", "extension", "declared_type", "detected_type", "size", "depth",
                     "encrypted", "unscannable")
CONDITION_KEYS = (
    "all", "any", "not", "direction",
    *(f for f in _ADDRESS_FIELDS),
    *(f"{f}.{p}" for f in _ADDRESS_FIELDS for p in _ADDRESS_PARTS),
    "recipients.count", "header", "header.<Name>", "subject", "body",
    "attachment", "attachment.<property>",
    "attachments.count", "attachments.depth", "size", "client_ip", "tls", "authenticated",
    "auth_user", "spf", "dkim", "dmarc", "arc", "spam.score", "spam.verdict", "spam.symbol",
    "dlp", "time", "date",
)


def parse_condition(raw: Any, path: Path_, ctx: ParseContext) -> c.Condition:
    if raw is None or raw is True:
        return c.Always()
    if isinstance(raw, list):
        return c.AllOf(tuple(parse_condition(x, [*path, i], ctx) for i, x in enumerate(raw)))
    if not isinstance(raw, Mapping):
        raise ctx.fail(path, f"a condition must be a mapping (key: value), not {_type(raw)}")
    parts = [_one(str(k), v, [*path, str(k)], ctx) for k, v in raw.items()]
    if not parts:
        return c.Always()
    return parts[0] if len(parts) == 1 else c.AllOf(tuple(parts))


def _one(key: str, value: Any, path: Path_, ctx: ParseContext) -> c.Condition:
    if key in ("all", "any"):
        if not isinstance(value, list) or not value:
            raise ctx.fail(path, f"{key} takes a non-empty list of conditions")
        kids = tuple(parse_condition(x, [*path, i], ctx) for i, x in enumerate(value))
        return c.AllOf(kids) if key == "all" else c.AnyOf(kids)
    if key == "not":
        return c.Not(parse_condition(value, path, ctx))
    if key == "direction":
        vals = _words(value, path, ctx, c.DIRECTIONS, "direction")
        return c.Direction(vals)
    head, _, tail = key.partition(".")
    if head in _ADDRESS_FIELDS:
        part = tail or "address"
        if part not in _ADDRESS_PARTS:
            raise ctx.fail(path, f"unknown condition {key!r}: {head} takes .address, .domain "
                           "or .local")
        return c.AddressField(head, part, parse_matcher(value, path, ctx, address=True))
    if key == "recipients.count":
        return c.RecipientCount(parse_compare(value, path, ctx))
    if key == "header" or head == "header":
        return _header(tail, value, path, ctx)
    if key in ("subject", "body"):
        return c.Text(key, parse_matcher(value, path, ctx))
    if key == "attachment":
        if not isinstance(value, Mapping) or not value:
            raise ctx.fail(path, "attachment takes a mapping of properties: "
                           + ", ".join(_ATTACHMENT_PROPS))
        return _attachment(value, path, ctx)
    if head == "attachment":
        return _attachment({tail: value}, path, ctx, dotted=True)
    if key == "attachments.count":
        return c.AttachmentCount(parse_compare(value, path, ctx))
    if key == "attachments.depth":
        return c.NestingDepth(parse_compare(value, path, ctx))
    if key == "size":
        return c.Size(parse_compare(value, path, ctx, size=True))
    if key == "client_ip":
        return _client_ip(value, path, ctx)
    if key in ("tls", "authenticated"):
        if not isinstance(value, bool):
            raise ctx.fail(path, f"{key} must be true or false")
        return c.Flag(key, value)
    if key == "auth_user":
        return c.AuthUser(parse_matcher(value, path, ctx))
    if key in _VERDICTS:
        return _verdict(key, value, path, ctx)
    if key == "spam.score":
        return c.SpamScore(parse_compare(value, path, ctx))
    if key == "spam.verdict":
        return c.SpamVerdict(_words(value, path, ctx, ("spam", "ham"), "spam verdict"))
    if key == "spam.symbol":
        return c.SpamSymbol(parse_matcher(value, path, ctx, default_case=True))
    if key == "dlp":
        return _dlp(value, path, ctx)
    if key == "time":
        return _time(value, path, ctx)
    if key == "date":
        return _date(value, path, ctx)
    raise ctx.fail(path, f"unknown condition {key!r} (see docs/policy.md for the vocabulary)")


def _words(value: Any, path: Path_, ctx: ParseContext, allowed: Sequence[str],
           what: str) -> frozenset[str]:
    items = value if isinstance(value, list) else [value]
    out = set()
    for i, item in enumerate(items):
        p = [*path, i] if isinstance(value, list) else path
        if not isinstance(item, str) or item.lower() not in allowed:
            raise ctx.fail(p, f"{what} must be one of {', '.join(allowed)}, not {item!r}")
        out.add(item.lower())
    if not out:
        raise ctx.fail(path, f"{what} needs at least one value")
    return frozenset(out)


def _header(name: str, value: Any, path: Path_, ctx: ParseContext) -> c.Condition:
    if not name:
        if not isinstance(value, Mapping) or "name" not in value:
            raise ctx.fail(path, "header takes {name: ..., exists|equals|contains|regex|glob: "
                           "...}, or use header.Name: ...")
        name = value["name"]
        if not isinstance(name, str) or not re.fullmatch(r"[!-9;-~]+", name):
            raise ctx.fail([*path, "name"], f"{name!r} is not a header field name")
        value = {k: v for k, v in value.items() if k != "name"}
        if not value:
            value = {"exists": True}
    if isinstance(value, Mapping) and "exists" in value:
        if len(value) != 1 or not isinstance(value["exists"], bool):
            raise ctx.fail([*path, "exists"], "exists takes true or false, alone")
        return c.Header(name, value["exists"], None)
    return c.Header(name, None, parse_matcher(value, path, ctx))


def _attachment(value: Mapping[str, Any], path: Path_, ctx: ParseContext,
                dotted: bool = False) -> c.Condition:
    kw: dict[str, Any] = {}
    for key, v in value.items():
        p = path if dotted else [*path, str(key)]
        if key in ("name", "declared_type", "detected_type"):
            kw[key] = parse_matcher(v, p, ctx)
        elif key == "extension":
            if isinstance(v, str | list) and not isinstance(v, Mapping):
                vs = v if isinstance(v, list) else [v]
                if not all(isinstance(x, str) for x in vs):
                    raise ctx.fail(p, "extension takes names such as exe or [exe, js]")
                v = [str(x).lower().lstrip(".") for x in vs]
            kw[key] = parse_matcher(v, p, ctx)
        elif key in ("size", "depth"):
            kw[key] = parse_compare(v, p, ctx, size=key == "size")
        elif key in ("encrypted", "unscannable"):
            if not isinstance(v, bool):
                raise ctx.fail(p, f"{key} must be true or false")
            kw[key] = v
        else:
            raise ctx.fail(p, f"unknown attachment property {key!r} "
                           f"(allowed: {', '.join(_ATTACHMENT_PROPS)})")
    return c.AttachmentProps(**kw)


def _client_ip(value: Any, path: Path_, ctx: ParseContext) -> c.Condition:
    label = ""
    if isinstance(value, Mapping):
        if set(value) != {"in"}:
            raise ctx.fail(path, "client_ip takes a CIDR, a list of CIDRs or {in: list-name}")
        name = value["in"]
        items: list[Any] = list(_list_ref(name, [*path, "in"], ctx))
        label = f"list {name}"
        paths: list[Path_] = [[*path, "in"]] * len(items)
    else:
        items = value if isinstance(value, list) else [value]
        paths = [[*path, i] for i in range(len(items))] if isinstance(value, list) else [path]
    nets = []
    for item, p in zip(items, paths, strict=True):
        try:
            nets.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ctx.fail(p, f"{item!r} is not an IP address or CIDR") from None
    if not nets:
        raise ctx.fail(path, "client_ip needs at least one network")
    return c.ClientIp(tuple(nets), label or ", ".join(str(n) for n in nets[:3]))


def _verdict(key: str, value: Any, path: Path_, ctx: ParseContext) -> c.Condition:
    allowed = sorted(_VERDICTS[key])
    if isinstance(value, Mapping):
        extra = {"dkim": {"domain"}, "dmarc": {"disposition"}}.get(key, set())
        for k in value:
            if k != "result" and k not in extra:
                raise ctx.fail([*path, str(k)], f"unknown key {k!r} for {key} "
                               f"(allowed: result{', ' if extra else ''}{', '.join(extra)})")
        results = (_words(value["result"], [*path, "result"], ctx, allowed, f"{key} result")
                   if "result" in value else _VERDICTS[key])
        domain = parse_matcher(value["domain"], [*path, "domain"], ctx, address=True) \
            if "domain" in value else None
        disp = _words(value["disposition"], [*path, "disposition"], ctx,
                      sorted(_DISPOSITIONS), "dmarc disposition") if "disposition" in value \
            else None
        return c.AuthVerdict(key, results, domain, disp)
    return c.AuthVerdict(key, _words(value, path, ctx, allowed, f"{key} result"))


def _dlp(value: Any, path: Path_, ctx: ParseContext) -> c.Condition:
    if isinstance(value, str):
        value = {"detector": value}
    if not isinstance(value, Mapping):
        raise ctx.fail(path, "dlp takes {detector: credit_card|iban|us_ssn|keywords|regex, "
                       "min_count: N, scope: ...}")
    allowed = ("detector", "min_count", "scope", "unique", "list", "words", "pattern",
               "case_sensitive")
    for k in value:
        if k not in allowed:
            raise ctx.fail([*path, str(k)],
                           f"unknown dlp key {k!r} (allowed: {', '.join(allowed)})")
    det = value.get("detector")
    if det not in c.DETECTORS:
        raise ctx.fail([*path, "detector"] if "detector" in value else path,
                       f"dlp detector must be one of {', '.join(c.DETECTORS)}")
    n = value.get("min_count", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ctx.fail([*path, "min_count"], "min_count must be a whole number >= 1")
    scope = value.get("scope", "all")
    if scope not in c.SCOPES:
        raise ctx.fail([*path, "scope"], f"scope must be one of {', '.join(c.SCOPES)}")
    unique = value.get("unique", False)
    if not isinstance(unique, bool):
        raise ctx.fail([*path, "unique"], "unique must be true or false")
    case = value.get("case_sensitive", False)
    pattern = None
    label = ""
    if det == "keywords":
        if ("list" in value) == ("words" in value):
            raise ctx.fail(path, "dlp keywords takes list: NAME or words: [...]")
        if "list" in value:
            label = str(value["list"])
            words = _list_ref(value["list"], [*path, "list"], ctx)
        else:
            words = tuple(_strings(value["words"], [*path, "words"], ctx))
        pattern = _keyword_pattern(words, ctx, bool(case))
    elif det == "regex":
        if "pattern" not in value:
            raise ctx.fail(path, "dlp regex needs pattern: ...")
        label = str(value["pattern"])
        pattern = ctx.regex(value["pattern"], [*path, "pattern"], bool(case))
    elif any(k in value for k in ("list", "words", "pattern")):
        raise ctx.fail(path, f"dlp {det} is built in: it takes no list, words or pattern")
    return c.Dlp(det, n, scope, unique, pattern, label)


def _time(value: Any, path: Path_, ctx: ParseContext) -> c.Condition:
    if not isinstance(value, Mapping):
        raise ctx.fail(path, "time takes {between: '09:00-17:00', days: [mon, ...], tz: ...}")
    for k in value:
        if k not in ("between", "days", "tz"):
            raise ctx.fail([*path, str(k)], f"unknown key {k!r} (between, days, tz)")
    tz = _tz(value.get("tz", "UTC"), [*path, "tz"], ctx)
    start = end = None
    if "between" in value:
        m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*",
                         str(value["between"]))
        try:
            if not m:
                raise ValueError
            start = time(int(m.group(1)), int(m.group(2)))
            end = time(int(m.group(3)), int(m.group(4))) if m.group(3) != "24" else time.max
        except ValueError:
            raise ctx.fail([*path, "between"], "between takes 'HH:MM-HH:MM'") from None
    days = None
    if "days" in value:
        ws = _words(value["days"], [*path, "days"], ctx, c.WEEKDAYS, "day")
        days = frozenset(c.WEEKDAYS.index(w) for w in ws)
    if start is None and days is None:
        raise ctx.fail(path, "time needs between or days")
    return c.TimeOfDay(start, end, days, tz)


def _date(value: Any, path: Path_, ctx: ParseContext) -> c.Condition:
    if not isinstance(value, Mapping) or not value:
        raise ctx.fail(path, "date takes {from: 2025-01-01, until: 2025-12-31, tz: ...}")
    for k in value:
        if k not in ("from", "until", "tz"):
            raise ctx.fail([*path, str(k)], f"unknown key {k!r} (from, until, tz)")
    out: dict[str, date | None] = {"from": None, "until": None}
    for k in ("from", "until"):
        if k in value:
            v = value[k]
            if isinstance(v, str):
                with contextlib.suppress(ValueError):
                    v = date.fromisoformat(v)
            if not isinstance(v, date) or isinstance(v, datetime):
                raise ctx.fail([*path, k], f"{k} must be a date such as 2025-01-31")
            out[k] = v
    return c.DateRange(out["from"], out["until"], _tz(value.get("tz", "UTC"), [*path, "tz"], ctx))


def _tz(name: Any, path: Path_, ctx: ParseContext) -> ZoneInfo:
    try:
        return ZoneInfo(str(name))
    except (ZoneInfoNotFoundError, ValueError):
        raise ctx.fail(path, f"unknown time zone {name!r} (use e.g. UTC, Europe/Zurich)") from None


# ---------------------------------------------------------------------------
# Matchers and comparisons

_MATCHER_KEYS = ("equals", "contains", "in", "glob", "regex", "keywords", "case_sensitive",
                 "not")


def _strings(value: Any, path: Path_, ctx: ParseContext) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ctx.fail([*path, i] if isinstance(value, list) else path,
                           f"expected text, not {_type(item)}")
        out.append(str(item))
    return out


def _list_ref(name: Any, path: Path_, ctx: ParseContext) -> tuple[str, ...]:
    if not isinstance(name, str) or name not in ctx.lists:
        known = ", ".join(sorted(ctx.lists)) or "none defined"
        raise ctx.fail(path, f"unknown list {name!r} (known: {known})", PolicyReferenceError)
    return ctx.lists[name]


def _keyword_pattern(words: Sequence[str], ctx: ParseContext,
                     case_sensitive: bool) -> c.SafePattern | None:
    words = sorted({w.strip() for w in words if w.strip()}, key=len, reverse=True)
    if not words:
        return None
    # Literal alternatives inside word boundaries: no nested quantifiers, safe by construction.
    # Any run of white space (a folded line, a double space) separates a phrase's words.
    # \b where the word starts/ends with a word character (much faster than a
    # look-around), a look-around where it does not (e.g. "C++").
    alts = []
    for w in words:
        body = r"\s+".join(regex.escape(part) for part in w.split())
        head = r"\b" if (w[0].isalnum() or w[0] == "_") else r"(?<!\w)"
        tail = r"\b" if (w[-1].isalnum() or w[-1] == "_") else r"(?!\w)"
        alts.append(head + body + tail)
    source = "(?:" + "|".join(alts) + ")"
    flags = regex.V0 if case_sensitive else regex.V0 | regex.IGNORECASE
    # Each keyword's first word, for the scan that tries only where one starts.  A
    # case-insensitive list needs ASCII words for it (see c.KeywordPattern).
    firsts = tuple(sorted({w.split()[0] if case_sensitive else w.split()[0].lower()
                           for w in words}))
    if not case_sensitive and not all(f.isascii() for f in firsts):
        firsts = ()
    return c.KeywordPattern(source, regex.compile(source, flags), ctx.regex_timeout,
                            firsts=firsts, case_sensitive=case_sensitive)


def _glob(pattern: str, ctx: ParseContext, case_sensitive: bool) -> c.SafePattern:
    source = fnmatch.translate(pattern)
    flags = regex.V0 if case_sensitive else regex.V0 | regex.IGNORECASE
    return c.SafePattern(pattern, regex.compile(source, flags), ctx.regex_timeout)


def parse_matcher(raw: Any, path: Path_, ctx: ParseContext, *, address: bool = False,
                  default_case: bool = False) -> c.Matcher:
    """A string test: a value, a list of values, or {equals|contains|in|glob|regex|keywords}."""

    def norm(v: str, case: bool) -> str:
        if address:
            if v.strip() == "<>":
                v = ""  # the null reverse-path (RFC 5321 §4.5.5)
            v = c.unicode_domain(v)
        return v if case else v.lower()

    if not isinstance(raw, Mapping):
        vals = _strings(raw, path, ctx)
        return c.Matcher((c.Equals(frozenset(norm(v, default_case) for v in vals),
                                   default_case),))
    for k in raw:
        if k not in _MATCHER_KEYS:
            raise ctx.fail([*path, str(k)], f"unknown match {k!r} "
                           f"(allowed: {', '.join(_MATCHER_KEYS)})")
    case = raw.get("case_sensitive", default_case)
    if not isinstance(case, bool):
        raise ctx.fail([*path, "case_sensitive"], "case_sensitive must be true or false")
    negate = raw.get("not", False)
    if not isinstance(negate, bool):
        raise ctx.fail([*path, "not"], "not must be true or false")
    tests: list[c.Test] = []
    if "equals" in raw:
        vals = _strings(raw["equals"], [*path, "equals"], ctx)
        tests.append(c.Equals(frozenset(norm(v, case) for v in vals), case))
    if "contains" in raw:
        vals = _strings(raw["contains"], [*path, "contains"], ctx)
        tests.append(c.Contains(tuple(norm(v, case) for v in vals), case))
    if "in" in raw:
        ref = raw["in"]
        if isinstance(ref, list):
            name, items = "", tuple(_strings(ref, [*path, "in"], ctx))
        else:
            name, items = str(ref), _list_ref(ref, [*path, "in"], ctx)
        exact = frozenset(norm(v, case) for v in items if not any(ch in v for ch in "*?["))
        globs = tuple(_glob(v, ctx, case) for v in items if any(ch in v for ch in "*?["))
        tests.append(c.InList(name, exact, globs, case))
    if "glob" in raw:
        vals = _strings(raw["glob"], [*path, "glob"], ctx)
        tests.append(c.PatternTest("glob", tuple(_glob(v, ctx, case) for v in vals),
                                   tuple(vals)))
    if "regex" in raw:
        srcs = raw["regex"] if isinstance(raw["regex"], list) else [raw["regex"]]
        pats = tuple(
            ctx.regex(s, [*path, "regex", i] if isinstance(raw["regex"], list)
                      else [*path, "regex"], case)
            for i, s in enumerate(srcs)
        )
        tests.append(c.PatternTest("regex", pats, tuple(str(s) for s in srcs)))
    if "keywords" in raw:
        ref = raw["keywords"]
        if isinstance(ref, list):
            name, words = "", tuple(_strings(ref, [*path, "keywords"], ctx))
        else:
            name, words = str(ref), _list_ref(ref, [*path, "keywords"], ctx)
        tests.append(c.Keywords(name, _keyword_pattern(words, ctx, case)))
    if not tests:
        raise ctx.fail(path, "a match needs one of equals, contains, in, glob, regex, keywords")
    return c.Matcher(tuple(tests), negate)


_CMP_TEXT = re.compile(r"^\s*(>=|<=|==|>|<|=)?\s*(.+?)\s*$")
_CMP_OPS = {">": "gt", ">=": "ge", "<": "lt", "<=": "le", "=": "eq", "==": "eq", None: "eq"}


def parse_compare(raw: Any, path: Path_, ctx: ParseContext, *, size: bool = False) -> c.Compare:
    """{gt|ge|lt|le|eq: N}, '> 10M', '>= 5' or N (sizes accept 512k, 10M, 1G)."""

    def number(v: Any, p: Path_) -> float:
        try:
            if isinstance(v, bool):
                raise ValueError("not a number")
            if size:
                return float(parse_size(v))
            return float(v)
        except (TypeError, ValueError):
            what = "a size such as 512k or 10M" if size else "a number"
            raise ctx.fail(p, f"{v!r} is not {what}") from None

    if isinstance(raw, Mapping):
        ops = []
        for k, v in raw.items():
            if k not in ("gt", "ge", "lt", "le", "eq"):
                raise ctx.fail([*path, str(k)], f"unknown comparison {k!r} (gt, ge, lt, le, eq)")
            ops.append((str(k), number(v, [*path, str(k)])))
        if not ops:
            raise ctx.fail(path, "a comparison needs gt, ge, lt, le or eq")
        return c.Compare(tuple(ops), " bytes" if size else "")
    if isinstance(raw, str):
        m = _CMP_TEXT.match(raw)
        if m:
            return c.Compare(((_CMP_OPS[m.group(1)], number(m.group(2), path)),),
                             " bytes" if size else "")
    return c.Compare((("eq", number(raw, path)),), " bytes" if size else "")


ATTACHMENT_PROPERTIES = _ATTACHMENT_PROPS

__all__ = [
    "ATTACHMENT_PROPERTIES", "CONDITION_KEYS", "DEFAULT_REGEX_TIMEOUT", "VERSION",
    "Header", "ParseContext", "Policy", "Rule",
    "check_document", "located", "parse_compare", "parse_condition", "parse_matcher",
    "parse_retention_class", "parse_rule",
]
