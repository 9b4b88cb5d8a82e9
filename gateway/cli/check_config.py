"""``coffer check-config [--config FILE] [--json]``: validate before you (re)start.

Exit 0 and a summary when the file would start a gateway; exit 2 and one line
``file:line:column: [key] message`` when it would not.  The checks are the ones
``coffer serve`` runs at start and on SIGHUP (gateway.config + gateway.preflight).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway import config
from gateway.preflight import preflight, summary

EXIT_OK = 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "check-config", help="validate the configuration file and print a summary",
        description="Load and check the configuration exactly as `coffer serve` would. "
        "Exit 0 with a summary, or exit 2 naming file, line and key of the first mistake.",
    )
    p.add_argument("--config", metavar="FILE",
                   help="configuration file (default: $COFFER_CONFIG, else ./coffer.yaml)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # A ConfigError propagates to gateway.cli.main: one line on stderr, exit 2.
    cfg = config.load(config.find_config(args.config))
    preflight(cfg)
    info = summary(cfg)
    if args.json:
        print(json.dumps({"ok": True, **info}, ensure_ascii=False))
        return EXIT_OK
    print(f"{info['file']}: OK")
    print(f"  hostname        {info['hostname']}")
    print(f"  data_dir        {info['data_dir']}")
    for lst in info["listeners"]:
        auth = ", AUTH required" if lst["auth_required"] else ""
        print(f"  listener        {lst['name']} ({lst['role']}) on {lst['address']}, "
              f"tls {lst['tls']}{auth}")
    print(f"  local domains   {', '.join(info['local_domains']) or '(none)'}")
    print(f"  trusted nets    {', '.join(info['trusted_networks']) or '(none)'}")
    print(f"  recipients      {_recipients(info['recipients'])}")
    for dom, route in info["routes"].items():
        print(f"  route           {dom} -> {route}")
    print(f"  workers         {info['workers']} (fsync {'on' if info['fsync'] else 'OFF'})")
    print(f"  metrics         {info['metrics'] or 'off'}")
    print(f"  policy          {info['policy'] or '(none)'}")
    log = info["log"]
    print(f"  log             {log['level']} {log['format']} to {log['file'] or 'stderr'}")
    return EXIT_OK


def _recipients(rcpt: dict[str, Any]) -> str:
    """How local recipients are checked at RCPT, in one line."""
    checks = []
    if rcpt["file"]:
        checks.append(f"listed in {rcpt['file']}")
    if rcpt["verify"]:
        checks.append(f"verified at the next hop ({rcpt['undetermined']} when no answer)")
    return ", ".join(checks) or "every address of a local domain accepted"
