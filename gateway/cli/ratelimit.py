"""``coffer ratelimit list|reset``: who is sending near or over a rate limit, and lifting it.

Both work on the counters file (``DATA_DIR/ratelimit.db``) that the running gateway's
workers share, so a reset takes effect at the next MAIL or RCPT, with no signal.  A
reset is an operator action and is logged like ``coffer queue hold|release|delete``:
one ``ratelimit_reset`` line naming who lifted which key.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from typing import Any

from gateway import config, log
from gateway.cli import config_options, operator_name, setup_log
from gateway.receive.rate_limits import client_key, span
from gateway.receive.rate_store import FILE_NAME, CounterRow, RateStore
from gateway.shared_db import BUSY_TIMEOUT_MS

EXIT_OK = 0
EXIT_PROBLEM = 1
NEAR = 0.8  # `list` shows counters at this share of their limit or above


def register(sub: Any) -> None:
    common = config_options()

    p = sub.add_parser("ratelimit", help="sending rate limits: who is near one, lift one",
                       description="Inspect and reset the sending rate-limit counters "
                       "(rate_limits in coffer.yaml).")
    rsub = p.add_subparsers(dest="ratelimit_command", metavar="RATELIMIT_COMMAND")
    rsub.required = True

    ls = rsub.add_parser("list", parents=[common],
                         help=f"keys over or near (≥ {NEAR * 100:.0f}%% of) a limit, "
                         "with their counts")
    ls.add_argument("--all", action="store_true", help="every key counted in its window")
    ls.set_defaults(func=cmd_list)

    reset = rsub.add_parser("reset", parents=[common],
                            help="lift a block: forget the counts of KEY (e.g. after the "
                            "account's password was changed)")
    reset.add_argument("key", metavar="KEY",
                       help="a user name, client address (IPv6: any address of the /64) or "
                       "sender domain, as `list` shows it")
    reset.add_argument("--rule", metavar="NAME", help="only this rule's counters")
    reset.set_defaults(func=cmd_reset)


def _store(args: argparse.Namespace) -> tuple[config.Config, RateStore | None]:
    cfg = config.load(config.find_config(args.config))
    path = cfg.data_dir / FILE_NAME
    return cfg, RateStore(path, busy_timeout_ms=BUSY_TIMEOUT_MS) if path.exists() else None


def _state(row: CounterRow) -> str:
    return "over" if row.count + 1 > row.limit else "near"


def _unreadable(store: RateStore, exc: sqlite3.Error) -> int:
    print(f"coffer ratelimit: cannot use {store.path}: {exc}", file=sys.stderr)
    return EXIT_PROBLEM


def cmd_list(args: argparse.Namespace) -> int:
    _cfg, store = _store(args)
    rows: list[CounterRow] = []
    if store is not None:
        try:
            rows = store.counters(time.time())
        except sqlite3.Error as exc:
            return _unreadable(store, exc)
    if not args.all:
        rows = [r for r in rows if r.count >= NEAR * r.limit]
    rows.sort(key=lambda r: r.count / r.limit, reverse=True)
    for r in rows:
        if args.json:
            print(json.dumps({"rule": r.rule, "kind": r.kind, "key_type": r.key_type,
                              "key": r.key, "count": round(r.count, 1), "limit": r.limit,
                              "window": r.window, "state": _state(r)}, ensure_ascii=False))
        else:
            print(f"{r.rule:<16} {r.kind:<10} {r.key:<32} {r.count:8.1f} / {r.limit:<6} "
                  f"per {span(r.window):<4} {_state(r)}")
    if not rows and not args.json:
        print("no key is near a rate limit" if not args.all else "no key is counted")
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    cfg, store = _store(args)
    key = client_key(args.key) if ":" in args.key else args.key  # an IPv6 address: its /64
    removed = 0
    if store is not None:
        try:
            removed = store.reset(key, args.rule)
        except sqlite3.Error as exc:
            return _unreadable(store, exc)
    if removed == 0:
        print(f"coffer ratelimit: no counter for {key!r}", file=sys.stderr)
        return EXIT_PROBLEM
    who = operator_name()
    setup_log(cfg)
    log.event("ratelimit_reset", key=key, rule=args.rule, counters=removed, by=who)
    if args.json:
        print(json.dumps({"key": key, "action": "reset", "counters": removed}))
    else:
        print(f"{key}: {removed} counter(s) reset; it may send again")
    return EXIT_OK
