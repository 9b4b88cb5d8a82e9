"""Loading a policy: files, includes, named lists, regex vetting, whole-policy checks.

:func:`load_policy` either returns a complete :class:`~policies.schema.Policy`
or raises a located :class:`~policies.errors.PolicyError` — never a partial
policy — so a reload (SIGHUP, file change) can keep the running policy when
the new one has any mistake.  :func:`check_policy` returns every problem
instead of the first, for ``coffer policy check``.

Files a policy refers to (``include:`` and list files) are resolved relative
to the file that names them and must stay inside the top-level policy's
directory: a policy is a self-contained folder that can be reviewed and
versioned as one.

Regexes are compiled once per load with the ``regex`` module.  Patterns with a
nested unbounded quantifier — ``(a+)+``, ``(\\w*\\s?)*`` — are refused at load
(exponential backtracking); every match also runs under the policy's
``regex_timeout``, because no static check catches every slow pattern.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from gateway import yamlsource
from gateway.errors import ConfigError
from gateway.yamlsource import Locator
from policies import schema
from policies.actions import Retention
from policies.conditions import SafePattern
from policies.errors import (
    PolicyError,
    PolicyErrors,
    PolicyReferenceError,
    PolicySchemaError,
    PolicySyntaxError,
    UnreachableRuleError,
)

MAX_INCLUDE_DEPTH = 16

_sre: Any = importlib.import_module("re._parser")  # the stdlib's own regex parser
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT"}  # POSSESSIVE_REPEAT cannot backtrack


def catastrophic(source: str) -> str | None:
    """Why ``source`` could backtrack exponentially, or None.

    The classic shape is a quantifier whose body can itself repeat without
    bound — star height above one, as in ``(a+)+`` or ``(x*y?)*``: a failing
    match tries every way of splitting the input between the two loops.
    Possessive quantifiers and atomic groups never backtrack and are allowed.
    Patterns the stdlib parser does not know (``regex``-only syntax) are left
    to the match-time timeout.
    """
    try:
        tree = _sre.parse(source)
    except Exception:
        return None

    def unbounded_inside(items: Any) -> bool:
        for op, av in items:
            name = str(op)
            if name in _REPEATS and (av[1] == _sre.MAXREPEAT or av[1] > 16):
                return True
            if name in _REPEATS:
                if unbounded_inside(av[2]):
                    return True
            elif name == "SUBPATTERN":
                if unbounded_inside(av[3]):
                    return True
            elif name == "BRANCH":
                if any(unbounded_inside(b) for b in av[1]):
                    return True
            elif name in ("ASSERT", "ASSERT_NOT") and unbounded_inside(av[1]):
                return True
        return False

    def walk(items: Any) -> str | None:
        for op, av in items:
            name = str(op)
            if name in _REPEATS:
                outer_unbounded = av[1] == _sre.MAXREPEAT or av[1] > 16
                if outer_unbounded and unbounded_inside(av[2]):
                    return ("nested quantifiers (a repeated group that itself repeats, like "
                            "(a+)+) can backtrack exponentially; use a possessive quantifier "
                            "(a++) or an atomic group (?>...)")
                found = walk(av[2])
            elif name == "SUBPATTERN":
                found = walk(av[3])
            elif name == "BRANCH":
                found = next((r for b in av[1] if (r := walk(b))), None)
            elif name in ("ASSERT", "ASSERT_NOT"):
                found = walk(av[1])
            elif name == "ATOMIC_GROUP":
                found = None
            else:
                found = None
            if found:
                return found
        return None

    return walk(tree)


def make_compiler(timeout: float) -> schema.RegexCompiler:
    def compile_regex(source: str, case_sensitive: bool) -> SafePattern:
        why = catastrophic(source)
        if why:
            raise ValueError(f"unsafe regex {source!r}: {why}")
        flags = regex.V0 if case_sensitive else regex.V0 | regex.IGNORECASE
        try:
            compiled = regex.compile(source, flags)
        except regex.error as exc:
            raise ValueError(f"bad regex {source!r}: {exc}") from None
        return SafePattern(source, compiled, timeout)

    return compile_regex


@dataclass(slots=True)
class _Load:
    root: Path
    errors: list[PolicyError] = field(default_factory=list)
    lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    list_origin: dict[str, str] = field(default_factory=dict)
    classes: dict[str, Retention] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)
    entries: list[tuple[Any, Locator, list[str | int]]] = field(default_factory=list)

    def inside(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.root)
            return True
        except ValueError:
            return False

    def read(self, path: Path) -> tuple[Any, Locator]:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise PolicyReferenceError("file not found", file=str(path)) from None
        except OSError as exc:
            raise PolicyReferenceError(f"cannot read file: {exc.strerror}", file=str(path)) \
                from None
        self.files.append(str(path))
        self.digest.update(str(path.relative_to(self.root)).encode() + b"\0" + raw + b"\0")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicySyntaxError(f"not UTF-8 text: {exc.reason} at byte {exc.start}",
                                    file=str(path)) from None
        try:
            return yamlsource.loads(text, str(path))
        except ConfigError as exc:
            raise PolicySyntaxError(exc.message, file=exc.file, line=exc.line,
                                    column=exc.column, key=exc.key) from None


def _reference(loc: Locator, path: list[str | int], message: str) -> PolicyError:
    return schema.located(loc, path, message, PolicyReferenceError)


def _resolve(state: _Load, base: Path, name: Any, loc: Locator,
             path: list[str | int]) -> Path:
    if not isinstance(name, str) or not name.strip():
        raise schema.located(loc, path, "expected a file name")
    target = (base.parent / name).resolve()
    if Path(name).is_absolute() or not state.inside(target):
        raise _reference(loc, path, f"{name!r} is outside the policy's directory "
                         f"{state.root}; keep included files and lists beside the policy")
    return target


def _read_list(state: _Load, file: Path, loc: Locator, path: list[str | int]) -> tuple[str, ...]:
    if not file.is_file():
        raise _reference(loc, path, f"list file {str(file)!r} not found")
    if file.suffix in (".yaml", ".yml"):
        data, floc = state.read(file)
        if not isinstance(data, list) or not all(
            isinstance(x, str | int) and not isinstance(x, bool) for x in data
        ):
            raise schema.located(floc, [], "a list file must be a YAML list of strings")
        return tuple(str(x).strip() for x in data)
    try:
        raw = file.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _reference(loc, path, f"cannot read list file: {exc}") from None
    state.files.append(str(file))
    state.digest.update(str(file.relative_to(state.root)).encode() + b"\0" + raw + b"\0")
    out = []
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            out.append(entry)
    return tuple(out)


def _collect(state: _Load, file: Path, data: Any, loc: Locator, stack: list[Path],
             top: bool) -> schema.Header:
    """Register this file's lists and classes, and queue its rules (splicing includes)."""
    head = schema.check_document(data, loc, top=top)
    lists = data.get("lists") or {}
    for name, spec in lists.items():
        p: list[str | int] = ["lists", str(name)]
        try:
            if isinstance(spec, Mapping):
                if set(spec) != {"file"}:
                    raise schema.located(loc, p, "a list is [items] or {file: name}")
                items = _read_list(state, _resolve(state, file, spec["file"], loc,
                                                   [*p, "file"]), loc, [*p, "file"])
            elif isinstance(spec, list):
                bad = [i for i, x in enumerate(spec)
                       if isinstance(x, bool) or not isinstance(x, str | int | float)]
                if bad:
                    raise schema.located(loc, [*p, bad[0]], "list items must be text")
                items = tuple(str(x).strip() for x in spec)
            else:
                raise schema.located(loc, p, "a list is [items] or {file: name}")
            if name in state.lists and state.lists[name] != items:
                raise schema.located(loc, p, f"list {name!r} is already defined differently "
                                     f"in {state.list_origin[name]}")
            state.lists[str(name)] = items
            state.list_origin[str(name)] = str(file)
        except PolicyError as exc:
            state.errors.append(exc)
    classes = data.get("retention_classes") or {}
    for name, spec in classes.items():
        try:
            ret = schema.parse_retention_class(spec, ["retention_classes", str(name)], loc,
                                               str(name))
            if name in state.classes and state.classes[name] != ret:
                raise schema.located(loc, ["retention_classes", str(name)],
                                     f"retention class {name!r} is already defined differently")
            state.classes[str(name)] = ret
        except PolicyError as exc:
            state.errors.append(exc)
    for i, raw in enumerate(data.get("rules") or []):
        p = ["rules", i]
        if isinstance(raw, Mapping) and "include" in raw:
            try:
                if len(raw) != 1:
                    raise schema.located(loc, p, "an include entry has only the include key")
                target = _resolve(state, file, raw["include"], loc, [*p, "include"])
                if target in stack:
                    chain = " -> ".join(s.name for s in [*stack, target])
                    raise _reference(loc, [*p, "include"], f"include cycle: {chain}")
                if len(stack) >= MAX_INCLUDE_DEPTH:
                    raise _reference(loc, [*p, "include"], "includes nested too deeply")
                if not target.is_file():
                    raise _reference(loc, [*p, "include"], f"included file {str(target)!r} "
                                     "not found")
                sub, subloc = state.read(target)
                _collect(state, target, sub, subloc, [*stack, target], top=False)
            except PolicyError as exc:
                state.errors.append(exc)
            continue
        state.entries.append((raw, loc, p))
    return head


def _load(path: Path | str) -> tuple[schema.Policy | None, list[PolicyError]]:
    file = Path(path).resolve()
    state = _Load(root=file.parent)
    try:
        data, loc = state.read(file)
        head = _collect(state, file, data, loc, [file], top=True)
    except PolicyError as exc:
        return None, [*state.errors, exc]
    compile_regex = make_compiler(head.regex_timeout)
    rules: list[schema.Rule] = []
    seen: dict[str, schema.Rule] = {}
    for raw, rloc, p in state.entries:
        ctx = schema.ParseContext(
            loc=rloc, lists=state.lists, retention_classes=state.classes,
            allow_archive_exemption=head.allow_archive_exemption,
            compile_regex=compile_regex, regex_timeout=head.regex_timeout,
        )
        try:
            rule = schema.parse_rule(raw, p, ctx)
        except PolicyError as exc:
            state.errors.append(exc)
            continue
        if rule.name in seen:
            first = seen[rule.name]
            state.errors.append(PolicySchemaError(
                f"duplicate rule name {rule.name!r} (first at {first.file}:{first.line})",
                file=rule.file, line=rule.line, column=rule.column, key=f"rules.{p[1]}.name"))
            continue
        seen[rule.name] = rule
        rules.append(rule)
    # A rule after an unconditional, enforced stop can never run: almost always a mistake
    # in ordering (the catch-all was meant to be last).
    for i, rule in enumerate(rules):
        if rule.stop and rule.mode == "enforce" and rule.unconditional:
            for later in rules[i + 1 :]:
                state.errors.append(UnreachableRuleError(
                    f"rule {later.name!r} is unreachable: rule {rule.name!r} "
                    f"({rule.file}:{rule.line}) always stops evaluation",
                    file=later.file, line=later.line, column=later.column, key="name"))
            break
    if state.errors:
        return None, state.errors
    policy = schema.Policy(
        rules=tuple(rules), description=head.description, lists=dict(state.lists),
        retention_classes=dict(state.classes),
        allow_archive_exemption=head.allow_archive_exemption,
        regex_timeout=head.regex_timeout, source=str(file), files=tuple(state.files),
        digest=state.digest.hexdigest(),
    )
    return policy, []


def check_policy(path: Path | str) -> list[PolicyError]:
    """Every problem in the policy at ``path`` (empty: it is valid)."""
    return _load(path)[1]


def load_policy(path: Path | str) -> schema.Policy:
    """The complete policy at ``path``, or a located PolicyError — never a partial policy."""
    policy, errors = _load(path)
    if errors:
        raise errors[0] if len(errors) == 1 else PolicyErrors(errors)
    assert policy is not None
    return policy


__all__ = ["catastrophic", "check_policy", "load_policy", "make_compiler"]
