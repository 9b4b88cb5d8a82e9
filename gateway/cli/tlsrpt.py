"""``coffer tlsrpt show``: the SMTP TLS reports (RFC 8460) a day's counts make.

It reads the counts file (``DATA_DIR/tlsrpt.db``) the running gateway's workers write
(each flushes its counts every minute) and prints, for each policy domain, the report
the daily job sends (or sent) for that UTC day: the operator's view of which domains'
MTA-STS or DANE failed, where and how often.  Nothing is looked up or sent.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from datetime import date
from typing import Any

from gateway import config
from gateway.cli import config_options
from gateway.deliver.tlsrpt_send import Submitter
from gateway.deliver.tlsrpt_send import preview as preview_reports
from gateway.deliver.tlsrpt_store import FILE_NAME, TlsReportStore, day_of

EXIT_OK = 0
EXIT_PROBLEM = 1


def register(sub: Any) -> None:
    p = sub.add_parser("tlsrpt", help="SMTP TLS reports (RFC 8460): what a day reports",
                       description="Inspect the SMTP TLS Reporting counts "
                       "(delivery.tls_rpt in coffer.yaml).")
    tsub = p.add_subparsers(dest="tlsrpt_command", metavar="TLSRPT_COMMAND")
    tsub.required = True
    show = tsub.add_parser("show", parents=[config_options(json=False)],
                           help="the report each domain gets for a day")
    show.add_argument("--date", metavar="YYYY-MM-DD", type=date.fromisoformat,
                      help="the UTC day (default: today, so far)")
    show.add_argument("--json", action="store_true",
                      help="each report as one JSON object per line, as it is sent")
    show.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> int:
    cfg = config.load(config.find_config(args.config))
    day: date = args.date or day_of(time.time())
    path = cfg.data_dir / FILE_NAME
    reports: list[dict[str, Any]] = []
    if path.exists():
        store = TlsReportStore(path)
        try:
            reports = preview_reports(store, day, Submitter.from_config(cfg))
        except sqlite3.Error as exc:
            print(f"coffer tlsrpt: cannot use {path}: {exc}", file=sys.stderr)
            return EXIT_PROBLEM
        finally:
            store.close()
    for report in reports:
        if args.json:
            print(json.dumps(report, ensure_ascii=False))
        else:
            _print(report)
    if not reports and not args.json:
        print(f"no TLS sessions counted for {day.isoformat()}")
    return EXIT_OK


def _print(report: dict[str, Any]) -> None:
    for entry in report["policies"]:
        policy, summary = entry["policy"], entry["summary"]
        print(f"{policy['policy-domain']}  {policy['policy-type']}  "
              f"ok {summary['total-successful-session-count']}  "
              f"failed {summary['total-failure-session-count']}")
        for d in entry["failure-details"]:
            where = " ".join(x for x in (d.get("receiving-mx-hostname", ""),
                                         d.get("receiving-ip", "")) if x)
            print(f"    {d['result-type']:<28} {d['failed-session-count']:>6}  {where}")
