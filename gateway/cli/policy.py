"""``coffer policy check|test|diff``: validate a policy, dry-run it, compare two.

``check FILE``        every problem, one line each (file:line:column: [key] message);
                      exit 1 when there is any.
``test MESSAGE.eml``  the decision and the trace of every rule, for one message and
                      the envelope given on the command line; ``--json`` prints
                      {"decision", "actions", "retention", "holds", "rules"}.
``diff OLD NEW``      runs both policies over every file under ``--corpus`` and lists
                      the messages whose outcome changes; exit 1 when any does.

The policy is ``--policy FILE``, else the configuration's ``policy:`` key.  The
local domains (which decide the direction) come from the configuration when one
is found, or from ``--local-domain``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from gateway import config, mailparse
from gateway.check.headers import addresses
from gateway.cli import config_options
from gateway.envelope import Envelope, TlsInfo
from gateway.errors import ConfigError
from policies.conditions import DIRECTIONS
from policies.engine import Decision, evaluate
from policies.errors import PolicyError
from policies.loader import check_policy, load_policy
from policies.schema import Policy

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
MAX_MESSAGE = 64 * 1024 * 1024


def register(sub: Any) -> None:
    common = config_options()
    common.add_argument("--local-domain", action="append", default=[], metavar="DOMAIN",
                        help="a local domain (default: relay.local_domains of the config)")

    p = sub.add_parser("policy", help="check, test and compare policies",
                       description="Validate a policy, dry-run it on a message, or compare two "
                       "policies over a corpus.")
    psub = p.add_subparsers(dest="policy_command", metavar="POLICY_COMMAND")
    psub.required = True

    check = psub.add_parser("check", parents=[common], help="validate a policy file",
                            description="Report every problem with file, line and column.")
    check.add_argument("file", metavar="FILE", type=Path)
    check.set_defaults(func=cmd_check)

    test = psub.add_parser("test", parents=[common], help="dry-run a policy on one message",
                           description="Print the decision and why each rule matched or not.")
    test.add_argument("message", metavar="MESSAGE.eml", type=Path,
                      help="the message file, or - for standard input")
    test.add_argument("--policy", metavar="FILE", type=Path,
                      help="policy file (default: the configuration's policy:)")
    test.add_argument("--from", dest="sender", metavar="ADDR", required=True,
                      help="envelope sender (MAIL FROM); '' or '<>' for a bounce")
    test.add_argument("--to", dest="recipients", metavar="ADDR", nargs="+", action="extend",
                      required=True, help="envelope recipients (RCPT TO)")
    test.add_argument("--ip", default="", help="client IP address")
    test.add_argument("--direction", choices=DIRECTIONS,
                      help="override the direction derived from the local domains")
    test.add_argument("--auth-user", default=None, help="the client authenticated as this user")
    test.add_argument("--tls", action="store_true", help="the message arrived over TLS")
    test.add_argument("--facts", metavar="FILE.json", type=Path,
                      help="earlier stages' facts, e.g. {\"check\": {\"dmarc\": {\"result\": "
                      "\"fail\"}}, \"spam\": {\"score\": 7.5}}")
    test.add_argument("--at", metavar="TIME",
                      help="evaluate as if received at this ISO time (default: now)")
    test.set_defaults(func=cmd_test)

    diff = psub.add_parser("diff", parents=[common], help="compare two policies over a corpus",
                           description="List the messages whose decision, actions, retention "
                           "or holds change between OLD and NEW.")
    diff.add_argument("old", metavar="OLD", type=Path)
    diff.add_argument("new", metavar="NEW", type=Path)
    diff.add_argument("--corpus", metavar="DIR", type=Path, required=True)
    diff.add_argument("--from", dest="sender", metavar="ADDR",
                      help="envelope sender for every message (default: its From:)")
    diff.add_argument("--to", dest="recipients", metavar="ADDR", nargs="+", action="extend",
                      help="envelope recipients for every message (default: its To:/Cc:)")
    diff.add_argument("--progress", action="store_true", help="show progress on stderr")
    diff.set_defaults(func=cmd_diff)


def _problem_dict(err: PolicyError) -> dict[str, Any]:
    return {"file": err.file, "line": err.line, "column": err.column, "key": err.key,
            "kind": type(err).__name__, "message": err.message}


def cmd_check(args: argparse.Namespace) -> int:
    problems = check_policy(args.file)
    for err in problems:
        if args.json:
            print(json.dumps({"ok": False, **_problem_dict(err)}, ensure_ascii=False))
        else:
            print(str(err), file=sys.stderr)
    if problems:
        if not args.json:
            n = len(problems)
            print(f"{args.file}: {n} problem{'s' if n > 1 else ''}", file=sys.stderr)
        return EXIT_PROBLEM
    policy = load_policy(args.file)
    if args.json:
        print(json.dumps({"ok": True, "file": str(args.file), "rules": len(policy.rules),
                          "files": list(policy.files), "digest": policy.digest}))
    else:
        print(f"{args.file}: OK, {len(policy.rules)} rules in {len(policy.files)} file"
              f"{'s' if len(policy.files) != 1 else ''} (sha256 {policy.digest[:16]})")
    return EXIT_OK


def _config(args: argparse.Namespace, required: bool) -> config.Config | None:
    path = config.find_config(args.config)
    if not required and args.config is None and not path.exists():
        return None
    return config.load(path)


def _policy_and_domains(args: argparse.Namespace) -> tuple[Policy, list[str]]:
    cfg = _config(args, required=args.policy is None)
    if args.policy is not None:
        policy_path = args.policy
    else:
        assert cfg is not None
        if cfg.policy is None:
            raise ConfigError("no policy configured: set policy: in the configuration or "
                              "pass --policy FILE", file=cfg.source, key="policy")
        policy_path = cfg.path(cfg.policy)
    domains = list(args.local_domain) or (list(cfg.relay.local_domains) if cfg else [])
    return load_policy(policy_path), domains


def _read_message(path: Path) -> bytes:
    if str(path) == "-":
        return sys.stdin.buffer.read(MAX_MESSAGE)
    try:
        with path.open("rb") as fh:
            return fh.read(MAX_MESSAGE)
    except OSError as exc:
        raise ConfigError(f"cannot read message: {exc.strerror}", file=str(path)) from None


def cmd_test(args: argparse.Namespace) -> int:
    policy, domains = _policy_and_domains(args)
    raw = _read_message(args.message)
    facts: dict[str, Any] = {}
    if args.facts:
        try:
            loaded = json.loads(args.facts.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read facts: {exc}", file=str(args.facts)) from None
        if not isinstance(loaded, dict):
            raise ConfigError("facts must be a JSON object", file=str(args.facts))
        facts = loaded
    now = None
    if args.at:
        try:
            now = datetime.fromisoformat(args.at)
        except ValueError:
            raise ConfigError(f"--at {args.at!r} is not an ISO time") from None
    sender = "" if args.sender.strip() in ("", "<>") else args.sender.strip()
    env = Envelope(
        mail_from=sender, rcpt_to=list(args.recipients), client_ip=args.ip,
        tls=TlsInfo("TLSv1.3", "unknown") if args.tls else None, auth_user=args.auth_user,
        received_at=(now or datetime.now(UTC)).timestamp(),
    )
    decision = evaluate(policy, env, raw, facts, local_domains=domains,
                        direction=args.direction, now=now)
    if args.json:
        print(json.dumps(decision.to_json(), ensure_ascii=False))
    else:
        _print_decision(decision)
    return EXIT_OK


def _print_decision(d: Decision) -> None:
    by = f" (rule {d.decided_by!r})" if d.decided_by else ""
    print(f"decision:  {d.decision}{by}")
    if d.reply:
        print(f"reply:     {d.reply}")
    print(f"direction: {d.direction}")
    for a in d.actions:
        args = ", ".join(f"{k}={v}" for k, v in a.items() if k not in ("action", "rule"))
        print(f"action:    {a['action']}({args}) by {a['rule']!r}")
    if d.retention:
        lock = ", immutable" if d.retention.immutable else ""
        print(f"retention: {d.retention.label}{lock} (rule {d.retention_rule!r})")
    else:
        print("retention: (none)")
    for case in d.holds:
        print(f"hold:      {case} (overrides retention)")
    if not d.archive:
        print("archive:   exempt")
    for err in d.errors:
        print(f"error:     {err}")
    print("rules:")
    for r in d.rules:
        mark = "HIT " if r.matched else "miss"
        print(f"  {mark} {r.name}: {r.summary}")


def _outcome(d: Decision) -> dict[str, Any]:
    return {
        "decision": d.decision,
        "actions": [{k: v for k, v in a.items() if k != "rule"} for a in d.actions],
        "retention": d.retention.label if d.retention else None,
        "holds": list(d.holds),
    }


def _envelope_from_headers(raw: bytes) -> tuple[str, list[str]]:
    try:
        headers = BytesHeaderParser(policy=compat32).parsebytes(mailparse.header_block(raw))
        frm = [a for _, a in addresses([str(v) for v in headers.get_all("From", [])]) if a]
        to = [a for _, a in addresses(
            [str(v) for v in headers.get_all("To", []) + headers.get_all("Cc", [])]) if a]
    except Exception:
        frm, to = [], []
    return (frm[0] if frm else "sender@invalid"), (to or ["recipient@invalid"])


def cmd_diff(args: argparse.Namespace) -> int:
    cfg = _config(args, required=False)
    domains = list(args.local_domain) or (list(cfg.relay.local_domains) if cfg else [])
    old, new = load_policy(args.old), load_policy(args.new)
    if not args.corpus.is_dir():
        raise ConfigError("not a directory", file=str(args.corpus))
    files = sorted(p for p in args.corpus.rglob("*") if p.is_file())
    progress = args.progress or sys.stderr.isatty()
    changed = 0
    for i, path in enumerate(files, 1):
        if progress:
            print(f"\r{i}/{len(files)} messages, {changed} changed", end="", file=sys.stderr)
        raw = _read_message(path)
        sender, rcpts = _envelope_from_headers(raw)
        env = Envelope(mail_from=args.sender if args.sender is not None else sender,
                       rcpt_to=list(args.recipients or rcpts))
        now = datetime.now(UTC)
        a = _outcome(evaluate(old, env, raw, {}, local_domains=domains, now=now))
        b = _outcome(evaluate(new, env, raw, {}, local_domains=domains, now=now))
        fields = [k for k in a if a[k] != b[k]]
        if not fields:
            continue
        changed += 1
        rel = str(path.relative_to(args.corpus))
        if args.json:
            print(json.dumps({"message": rel, "changed": fields, "old": a, "new": b},
                             ensure_ascii=False))
        else:
            parts = [f"{k} {_short(a[k])} -> {_short(b[k])}" for k in fields]
            print(f"{rel}: " + "; ".join(parts))
    if progress:
        print(file=sys.stderr)
    print(f"{len(files)} messages, {changed} changed", file=sys.stderr)
    return EXIT_PROBLEM if changed else EXIT_OK


def _short(value: Any) -> str:
    if isinstance(value, list):
        if value and isinstance(value[0], dict):
            return "[" + ", ".join(str(v.get("action")) for v in value) + "]"
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


__all__ = ["register"]
