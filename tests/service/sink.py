"""A next-hop SMTP sink for the service tests, run as its own process.

    python sink.py PORT OUT_FILE [--defer-prefix PREFIX] [--accept-file PATH]

Every accepted (message, recipient) pair is appended to OUT_FILE as one JSON line
``{"rcpt", "mail_from", "token", "subject", "auth_results", "external"}`` (an
O_APPEND write, so it is in the file before the 250 goes out).  ``token`` is the
message's ``X-Token`` header.  A recipient whose local part starts with PREFIX gets ``450 4.2.0`` at
RCPT TO until the file ACCEPT_FILE exists.  Prints ``ready`` once listening and
runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


class Recorder:
    def __init__(self, out: Path, defer_prefix: str | None, accept_file: Path | None) -> None:
        self.fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.defer_prefix = defer_prefix
        self.accept_file = accept_file

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        deferring = self.accept_file is None or not self.accept_file.exists()
        if self.defer_prefix and address.startswith(self.defer_prefix) and deferring:
            return "450 4.2.0 Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            envelope.original_content or envelope.content
        )
        lines = b"".join(
            json.dumps({"rcpt": rcpt, "mail_from": envelope.mail_from,
                        "token": msg.get("X-Token", ""), "subject": msg.get("Subject", ""),
                        "auth_results": msg.get("Authentication-Results", ""),
                        "external": msg.get("X-Coffer-External", "")}
                       ).encode() + b"\n"
            for rcpt in envelope.rcpt_tos
        )
        os.write(self.fd, lines)
        return "250 2.0.0 OK stored"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("out", type=Path)
    ap.add_argument("--defer-prefix")
    ap.add_argument("--accept-file", type=Path)
    args = ap.parse_args()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    controller = Controller(
        Recorder(args.out, args.defer_prefix, args.accept_file), hostname="127.0.0.1",
        port=args.port, decode_data=False, data_size_limit=0,
    )
    controller.start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
