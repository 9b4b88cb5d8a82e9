"""``coffer recipients verify|cache``: ask the mail store about a recipient now, and see
or forget what Coffer remembers of its answers.

Both work on the verdicts file (``DATA_DIR/recipients.db``) that the running gateway's
workers share, so what ``verify`` stores and what ``forget`` removes counts from the
next RCPT on, with no signal (Postfix's ``address_verify_map``, with the inspection
Postfix leaves to ``postmap -q``).  ``forget`` is an operator action and is logged like
``coffer ratelimit reset``: one ``recipient_cache_forget`` line naming who did it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from typing import Any

from gateway import config, log
from gateway.cli import ago, config_options, operator_name, setup_log
from gateway.deliver.routes import parse_routes
from gateway.receive.addresses import AddressError, parse_path
from gateway.receive.recipient_probe import make_prober
from gateway.receive.recipients import Cached, RecipientRules, Verdict, address_or_domain
from gateway.receive.relay_control import RelayRules
from gateway.receive.verify_store import FILE_NAME, SharedVerifyCache, VerdictRow, VerdictStore
from gateway.shared_db import BUSY_TIMEOUT_MS

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


def register(sub: Any) -> None:
    common = config_options()

    p = sub.add_parser("recipients", help="recipient verification: probe an address, see or "
                       "forget the remembered answers",
                       description="Verify recipients of the local domains at their next hop "
                       "and manage the verdicts the gateway remembers (relay.recipients).")
    rsub = p.add_subparsers(dest="recipients_command", metavar="RECIPIENTS_COMMAND")
    rsub.required = True

    verify = rsub.add_parser("verify", parents=[common],
                             help="probe the next hop about ADDRESS now, print its reply and "
                             "remember the verdict (exit 1 unless it is valid)")
    verify.add_argument("address", metavar="ADDRESS", help="a recipient of a local domain")
    verify.set_defaults(func=cmd_verify)

    cache = rsub.add_parser("cache", help="the remembered verdicts",
                            description="The verdicts in DATA_DIR/recipients.db.")
    csub = cache.add_subparsers(dest="cache_command", metavar="CACHE_COMMAND")
    csub.required = True
    ls = csub.add_parser("list", parents=[common], help="every verdict still held, "
                         "with the next hop's reply")
    ls.add_argument("--unknown", action="store_true",
                    help="only the recipients the next hop refused")
    ls.set_defaults(func=cmd_list)
    forget = csub.add_parser("forget", parents=[common],
                             help="make the gateway ask again (e.g. about a user created "
                             "after the next hop refused it)")
    which = forget.add_mutually_exclusive_group(required=True)
    which.add_argument("target", nargs="?", metavar="ADDRESS|@DOMAIN",
                       help="one recipient, or every recipient of a domain")
    which.add_argument("--all", action="store_true", help="every verdict")
    forget.set_defaults(func=cmd_forget)


def _store(cfg: config.Config) -> VerdictStore | None:
    path = cfg.data_dir / FILE_NAME
    return VerdictStore(path, busy_timeout_ms=BUSY_TIMEOUT_MS) if path.exists() else None


def _unreadable(store: VerdictStore, exc: sqlite3.Error) -> int:
    print(f"coffer recipients: cannot use {store.path}: {exc}", file=sys.stderr)
    return EXIT_PROBLEM


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _record(address: str, answer: Cached) -> dict[str, object]:
    return {"address": address, "verdict": answer.verdict.value, "reply": answer.reply,
            "checked": _utc(answer.checked), "expires": _utc(answer.expires)}


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = config.load(config.find_config(args.config))
    try:
        mailbox = parse_path(f"<{args.address}>")
    except AddressError as exc:
        print(f"coffer recipients: {args.address!r} is not an address: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not RelayRules.from_config(cfg.relay, cfg.archive.journal).is_local(mailbox):
        print(f"coffer recipients: {mailbox.domain} is not in relay.local_domains: its "
              "recipients are never verified", file=sys.stderr)
        return EXIT_USAGE
    # verify: true here whatever the configuration says: an operator may try it first.
    rules = RecipientRules(verify=True, routes=parse_routes(cfg.delivery.routes, cfg.data_dir))
    dest = rules.probe_target(mailbox)
    if dest is None:
        print(f"coffer recipients: {mailbox.address} cannot be verified: postmaster, or no "
              "smtp:// or smtps:// route for its domain in delivery.routes", file=sys.stderr)
        return EXIT_PROBLEM
    setup_log(cfg)  # the probe logs recipient_verified as the gateway does
    prober = make_prober(cfg)

    async def probe() -> Cached:
        try:
            return await prober.probe(dest, mailbox)
        finally:
            await prober.aclose()

    answer = asyncio.run(probe())
    stored = isinstance(prober.cache, SharedVerifyCache) and prober.cache.store is not None
    if args.json:
        print(json.dumps({**_record(mailbox.address, answer), "next_hop": dest.label,
                          "stored": stored}, ensure_ascii=False))
    else:
        print(f"{mailbox.address}: {answer.verdict.value}")
        print(f"next hop {dest.label} answered: {answer.reply}")
        print(f"remembered until {_utc(answer.expires)}" if stored else
              "not remembered: relay.recipients.cache is off or its file is unusable")
    return EXIT_OK if answer.verdict is Verdict.VALID else EXIT_PROBLEM


def cmd_list(args: argparse.Namespace) -> int:
    cfg = config.load(config.find_config(args.config))
    store = _store(cfg)
    rows: list[VerdictRow] = []
    now = time.time()
    if store is not None:
        try:
            rows = store.rows(now)
        except sqlite3.Error as exc:
            return _unreadable(store, exc)
        finally:
            store.close()
    if args.unknown:
        rows = [r for r in rows if r.answer.verdict is Verdict.UNKNOWN]
    for r in rows:
        if args.json:
            print(json.dumps(_record(r.address, r.answer), ensure_ascii=False))
        else:
            print(f"{r.address:<40} {r.answer.verdict.value:<12} "
                  f"{ago(now - r.answer.checked) + ' ago':<9} {r.answer.reply}")
    if not rows and not args.json:
        print("no verdict is remembered")
    return EXIT_OK


def cmd_forget(args: argparse.Namespace) -> int:
    cfg = config.load(config.find_config(args.config))
    address = domain = None
    if not args.all:
        try:
            kind, value = address_or_domain(args.target)
        except AddressError as exc:
            print(f"coffer recipients: {args.target!r} is not an address or @domain: {exc}",
                  file=sys.stderr)
            return EXIT_USAGE
        address, domain = (value, None) if kind == "address" else (None, value)
    target = "all" if args.all else args.target
    store = _store(cfg)
    removed = 0
    if store is not None:
        try:
            removed = store.forget(address=address, domain=domain)
        except sqlite3.Error as exc:
            return _unreadable(store, exc)
        finally:
            store.close()
    if removed == 0:
        print(f"coffer recipients: no verdict remembered for {target}", file=sys.stderr)
        return EXIT_PROBLEM
    who = operator_name()
    setup_log(cfg)
    log.event("recipient_cache_forget", target=target, verdicts=removed, by=who)
    if args.json:
        print(json.dumps({"target": target, "action": "forget", "verdicts": removed}))
    else:
        print(f"{target}: {removed} verdict(s) forgotten; the next RCPT asks the next hop again")
    return EXIT_OK
