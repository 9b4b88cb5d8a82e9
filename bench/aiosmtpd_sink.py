"""A bare aiosmtpd sink: accepts every message and forgets it.

The ceiling for any SMTP server written on aiosmtpd (as Coffer's receive side is): the same
protocol code with nothing behind it.  Run by bench/relay.py in its own process:

    python bench/aiosmtpd_sink.py PORT

Listens on 127.0.0.1:PORT only, prints "ready" once listening, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session


class _Sink:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Ok"


async def _main(port: int) -> None:
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        # The limits aiosmtpd would apply by default, and a data size large enough for the
        # benchmark's biggest message.
        return SMTP(_Sink(), hostname="sink.localdomain", data_size_limit=64 * 1024 * 1024)

    server = await loop.create_server(factory, host="127.0.0.1", port=port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: aiosmtpd_sink.py PORT", file=sys.stderr)
        return 2
    asyncio.run(_main(int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

