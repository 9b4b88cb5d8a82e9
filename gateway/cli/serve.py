"""``coffer serve [--config FILE]``: run the gateway in the foreground.

SIGTERM or SIGINT drains (stop accepting, finish in-flight transactions and
deliveries up to --drain-timeout, leave the rest queued, exit 0); SIGHUP reloads
the configuration (a bad file keeps the running one and logs why).  See
gateway.service.
"""

from __future__ import annotations

import argparse
from typing import Any

from gateway import config


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="run the gateway (SMTP listeners, queue, delivery, metrics)",
        description="Run the gateway in the foreground. SIGTERM/SIGINT drain and exit 0; "
        "SIGHUP reloads the configuration file.",
    )
    p.add_argument("--config", metavar="FILE",
                   help="configuration file (default: $COFFER_CONFIG, else ./coffer.yaml)")
    p.add_argument("--drain-timeout", type=float, default=None, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight work may take (default 30)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so `coffer --help` and the other commands do not pay for the
    # SMTP server, the delivery stack and the event loop.
    from gateway.service import run as run_service

    kwargs = {} if args.drain_timeout is None else {"drain_timeout": args.drain_timeout}
    return run_service(config.find_config(args.config), **kwargs)
