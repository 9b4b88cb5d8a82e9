"""What a matching rule does: the action vocabulary, validated at load time.

An action is written either as a bare word (``quarantine``) or as a one-key
mapping (``reject: {code: 550, text: ...}``).  :func:`parse_action` turns it
into a :class:`PolicyAction` — a kind and JSON-ready parameters — or raises a
located :class:`~policies.errors.PolicySchemaError`.  The engine decides how
actions combine; the later stages (transform, archive, deliver) carry them out.

    terminal      accept, reject, tempfail, quarantine, discard
    headers       add_header, remove_header, rewrite_header, tag_subject
    routing       redirect, bcc, journal, notify
    crypto        encrypt, sign
    archive       retain, hold, archive: false
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.errors import PolicyError

TERMINAL = frozenset({"reject", "tempfail", "quarantine", "discard"})
# accept also settles the decision (an allow-list), but is not a refusal.
DECIDING = TERMINAL | {"accept"}
# Summarised in Decision.retention / holds / archive rather than in the action list.
ARCHIVAL = frozenset({"retain", "hold", "archive"})

ACTION_KINDS = (
    "accept", "reject", "tempfail", "quarantine", "discard",
    "add_header", "remove_header", "rewrite_header", "tag_subject",
    "redirect", "bcc", "journal", "notify",
    "encrypt", "sign",
    "retain", "hold", "archive",
)

_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 §2.2: printable ASCII except ':'
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")
_ENHANCED = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")  # RFC 3463 §2
_RETENTION = re.compile(r"^(\d+)\s*(y|mo|w|d)$")
_DAYS = {"y": 365, "mo": 30, "w": 7, "d": 1}


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the archive keeps a message; ``days is None`` means forever."""

    label: str  # as written: "7y", "90d", "forever"
    days: int | None
    retention_class: str | None = None
    immutable: bool = False  # WORM: no deletion or change before expiry (SEC 17a-4(f))

    def longer_than(self, other: Retention) -> bool:
        if self.days is None:
            return other.days is not None
        return other.days is not None and self.days > other.days

    def to_dict(self) -> dict[str, Any]:
        return {
            "period": self.label, "days": self.days, "class": self.retention_class,
            "immutable": self.immutable,
        }


def parse_retention_period(value: Any) -> tuple[str, int | None]:
    """'7y', '18mo', '6w', '90d' or 'forever' -> (label, days); ValueError otherwise.

    Days only order periods (a year counts 365, a month 30); the archive
    computes the real expiry date from the label on the calendar.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("expected a period such as 7y, 18mo, 90d or forever")
    text = str(value).strip().lower()
    if text == "forever":
        return "forever", None
    m = _RETENTION.match(text)
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"{value!r} is not a retention period (use e.g. 7y, 18mo, 90d, forever)")
    return f"{int(m.group(1))}{m.group(2)}", int(m.group(1)) * _DAYS[m.group(2)]


@dataclass(frozen=True, slots=True)
class PolicyAction:
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    retention: Retention | None = None  # for kind == "retain"
    # What makes two actions duplicates (the engine keeps one); fixed at load, so
    # not rebuilt for every message that matches.
    dedupe_key: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "dedupe_key", repr(sorted(self.to_dict().items())))

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.kind, **self.params}

    def describe(self) -> str:
        if not self.params:
            return self.kind
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind}({args})"


@dataclass(slots=True)
class ActionContext:
    """What action parsing needs from the policy: its classes, flags and error maker."""

    fail: Callable[[list[str | int], str], PolicyError]
    retention_classes: Mapping[str, Retention]
    allow_archive_exemption: bool


def _mapping(raw: Any, path: list[str | int], kind: str, ctx: ActionContext,
             allowed: set[str], required: frozenset[str] | set[str] = frozenset(),
             ) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ctx.fail(path, f"{kind} takes a mapping of {', '.join(sorted(allowed))}")
    for key in raw:
        if key not in allowed:
            raise ctx.fail([*path, str(key)], f"unknown key {key!r} for {kind} "
                           f"(allowed: {', '.join(sorted(allowed))})")
    for key in sorted(required):
        if key not in raw:
            raise ctx.fail(path, f"{kind} needs {key!r}")
    return dict(raw)


def _string(value: Any, path: list[str | int], what: str, ctx: ActionContext) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ctx.fail(path, f"{what} must be a non-empty string")
    if "\r" in value or "\n" in value:
        raise ctx.fail(path, f"{what} must be one line")
    return value


def _addresses(value: Any, path: list[str | int], kind: str, ctx: ActionContext) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        p = [*path, i] if isinstance(value, list) else path
        if not isinstance(item, str) or not _ADDRESS.match(item.strip()):
            raise ctx.fail(p, f"{kind} needs an email address, got {item!r}")
        out.append(item.strip())
    if not out:
        raise ctx.fail(path, f"{kind} needs at least one address")
    return out


def _header_name(value: Any, path: list[str | int], ctx: ActionContext) -> str:
    if not isinstance(value, str) or not _HEADER_NAME.match(value):
        raise ctx.fail(path, f"{value!r} is not a header field name (RFC 5322 §2.2)")
    return value


def _reply(kind: str, raw: Any, path: list[str | int], ctx: ActionContext) -> dict[str, Any]:
    first = "5" if kind == "reject" else "4"
    defaults = {
        "reject": (550, "5.7.1", "Message rejected by policy"),
        "tempfail": (451, "4.7.1", "Message deferred by policy"),
    }[kind]
    d = _mapping(raw, path, kind, ctx, {"code", "enhanced", "text"})
    code = d.get("code", defaults[0])
    if isinstance(code, bool) or not isinstance(code, int) or not (
        str(code).startswith(first) and 400 <= code <= 599
    ):
        raise ctx.fail([*path, "code"],
                       f"{kind} code must be a {first}xx reply code (RFC 5321 §4.2)")
    enhanced = d.get("enhanced", f"{first}.7.1" if code != defaults[0] else defaults[1])
    m = _ENHANCED.match(str(enhanced))
    if not m or m.group(1) != first:
        raise ctx.fail([*path, "enhanced"],
                       f"enhanced status must look like {first}.7.1 (RFC 3463 §2)")
    text = _string(d.get("text", defaults[2]), [*path, "text"], f"{kind} text", ctx)
    if not text.isascii():
        raise ctx.fail([*path, "text"], "reply text must be ASCII (RFC 5321 §4.2)")
    return {"code": code, "enhanced": str(enhanced), "text": text}


def parse_action(raw: Any, path: list[str | int], ctx: ActionContext) -> PolicyAction:
    """One entry of a rule's ``then`` list."""
    if isinstance(raw, str):
        kind, arg, apath = raw, None, path
    elif isinstance(raw, Mapping) and len(raw) == 1:
        kind, arg = next(iter(raw.items()))
        apath = [*path, str(kind)]
    else:
        raise ctx.fail(path, "an action is a word (quarantine) or a one-key mapping "
                       "(reject: {text: ...})")
    if kind not in ACTION_KINDS:
        raise ctx.fail(apath, f"unknown action {kind!r} (known: {', '.join(ACTION_KINDS)})")
    kind = str(kind)

    if kind in ("accept", "discard"):
        if arg is not None:
            raise ctx.fail(apath, f"{kind} takes no arguments")
        return PolicyAction(kind)
    if kind == "quarantine":
        d = _mapping(arg, apath, kind, ctx, {"reason"})
        if "reason" in d:
            return PolicyAction(kind, {"reason": _string(d["reason"], [*apath, "reason"],
                                                          "reason", ctx)})
        return PolicyAction(kind)
    if kind in ("reject", "tempfail"):
        return PolicyAction(kind, _reply(kind, arg, apath, ctx))
    if kind == "add_header":
        d = _mapping(arg, apath, kind, ctx, {"name", "value"}, {"name", "value"})
        name = _header_name(d["name"], [*apath, "name"], ctx)
        value = d["value"]
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ctx.fail([*apath, "value"], "header value must be a string")
        return PolicyAction(kind, {"name": name, "value": _string(str(value), [*apath, "value"],
                                                                    "header value", ctx)})
    if kind == "remove_header":
        return PolicyAction(kind, {"name": _header_name(arg, apath, ctx)})
    if kind == "rewrite_header":
        d = _mapping(arg, apath, kind, ctx, {"name", "value", "pattern", "replace"}, {"name"})
        name = _header_name(d["name"], [*apath, "name"], ctx)
        if "value" in d and ("pattern" in d or "replace" in d):
            raise ctx.fail(apath, "rewrite_header takes either value, or pattern and replace")
        if "value" in d:
            return PolicyAction(kind, {"name": name, "value": _string(
                str(d["value"]), [*apath, "value"], "value", ctx)})
        if "pattern" not in d or "replace" not in d:
            raise ctx.fail(apath, "rewrite_header needs value, or pattern and replace")
        pattern = _string(d["pattern"], [*apath, "pattern"], "pattern", ctx)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ctx.fail([*apath, "pattern"], f"bad regex: {exc}") from None
        replace = d["replace"]
        if not isinstance(replace, str):
            raise ctx.fail([*apath, "replace"], "replace must be a string")
        return PolicyAction(kind, {"name": name, "pattern": pattern, "replace": replace})
    if kind == "tag_subject":
        return PolicyAction(kind, {"prefix": _string(arg, apath, "tag_subject prefix", ctx)})
    if kind in ("redirect", "bcc", "journal"):
        return PolicyAction(kind, {"to": _addresses(arg, apath, kind, ctx)})
    if kind == "notify":
        if isinstance(arg, str | list):
            arg = {"to": arg}
        d = _mapping(arg, apath, kind, ctx, {"to", "subject", "text"}, {"to"})
        params: dict[str, Any] = {"to": _addresses(d["to"], [*apath, "to"], kind, ctx)}
        for key in ("subject", "text"):
            if key in d:
                params[key] = _string(d[key], [*apath, key], key, ctx)
        return PolicyAction(kind, params)
    if kind == "encrypt":
        d = _mapping(arg, apath, kind, ctx, {"method", "require"})
        method = d.get("method", "auto")
        if method not in ("pgp", "smime", "auto"):
            raise ctx.fail([*apath, "method"], "encrypt method must be pgp, smime or auto")
        require = d.get("require", False)
        if not isinstance(require, bool):
            raise ctx.fail([*apath, "require"], "require must be true or false")
        return PolicyAction(kind, {"method": method, "require": require})
    if kind == "sign":
        d = _mapping(arg, apath, kind, ctx, {"method"})
        method = d.get("method", "auto")
        if method not in ("pgp", "smime", "auto"):
            raise ctx.fail([*apath, "method"], "sign method must be pgp, smime or auto")
        return PolicyAction(kind, {"method": method})
    if kind == "retain":
        return _retain(arg, apath, ctx)
    if kind == "hold":
        if isinstance(arg, str):
            arg = {"case": arg}
        d = _mapping(arg, apath, kind, ctx, {"case"}, {"case"})
        return PolicyAction(kind, {"case": _string(d["case"], [*apath, "case"], "case", ctx)})
    # kind == "archive"
    if arg is not False:
        raise ctx.fail(apath, "archive only takes false (every message is archived by default)")
    if not ctx.allow_archive_exemption:
        raise ctx.fail(apath, "archive: false needs allow_archive_exemption: true at the top "
                       "of the policy")
    return PolicyAction(kind, {"archive": False})


def _retain(arg: Any, path: list[str | int], ctx: ActionContext) -> PolicyAction:
    if isinstance(arg, Mapping):
        d = _mapping(arg, path, "retain", ctx, {"period", "class", "immutable"})
        if ("period" in d) == ("class" in d):
            raise ctx.fail(path, "retain takes either period or class")
        immutable = d.get("immutable", False)
        if not isinstance(immutable, bool):
            raise ctx.fail([*path, "immutable"], "immutable must be true or false")
        if "class" in d:
            base = _retention_class(d["class"], [*path, "class"], ctx)
            ret = Retention(base.label, base.days, base.retention_class,
                            base.immutable or immutable)
        else:
            try:
                label, days = parse_retention_period(d["period"])
            except ValueError as exc:
                raise ctx.fail([*path, "period"], str(exc)) from None
            ret = Retention(label, days, None, immutable)
    else:
        try:
            label, days = parse_retention_period(arg)
            ret = Retention(label, days)
        except ValueError:
            if not isinstance(arg, str):
                raise ctx.fail(path, "retain takes a period (7y, 90d, forever) or a class "
                               "name") from None
            ret = _retention_class(arg, path, ctx)
    params: dict[str, Any] = {"period": ret.label}
    if ret.retention_class:
        params["class"] = ret.retention_class
    if ret.immutable:
        params["immutable"] = True
    return PolicyAction("retain", params, ret)


def _retention_class(name: Any, path: list[str | int], ctx: ActionContext) -> Retention:
    if isinstance(name, str) and name in ctx.retention_classes:
        return ctx.retention_classes[name]
    known = ", ".join(sorted(ctx.retention_classes)) or "none defined"
    raise ctx.fail(path, f"unknown retention class {name!r} (known: {known}); "
                   "a period looks like 7y, 18mo, 90d or forever")


__all__ = [
    "ACTION_KINDS", "ARCHIVAL", "DECIDING", "TERMINAL",
    "ActionContext", "PolicyAction", "Retention", "parse_action", "parse_retention_period",
]
