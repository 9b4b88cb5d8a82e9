"""A loopback DNS stub that answers every query at once with NXDOMAIN.

bench/relay.py points Coffer's resolver here (``dns.nameservers``) so that the benchmark's
SPF/DKIM/DMARC/PTR lookups for the reserved test names (RFC 2606 ``*.example``, for which
NXDOMAIN is the true answer) never leave the machine and cost only a loopback round trip:
the lower bound of DNS cost, the same in every run.

    python bench/dns_stub.py PORT

Serves UDP and TCP on 127.0.0.1:PORT, prints "ready", stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import struct
import sys
from typing import cast

NXDOMAIN = 3


def answer(query: bytes) -> bytes | None:
    """The NXDOMAIN response to a query (RFC 1035 §4.1), or None if it is not a query."""
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:  # a response, or not the one question we support
        return None
    # RFC 1035 §4.1.2: the question is QNAME (labels up to a zero octet), QTYPE, QCLASS.
    i = 12
    while i < len(query) and query[i] != 0:
        if query[i] & 0xC0:
            return None  # no compression pointers in a question
        i += 1 + query[i]
    end = i + 5
    if end > len(query):
        return None
    opcode = (flags >> 11) & 0xF
    rd = flags & 0x0100
    # QR=1, the query's opcode, AA=1 (we speak for these names), RD copied, RA=1, RCODE=3.
    out_flags = 0x8000 | (opcode << 11) | 0x0400 | rd | 0x0080 | NXDOMAIN
    return struct.pack("!HHHHHH", qid, out_flags, 1, 0, 0, 0) + query[12:end]


class _Udp(asyncio.DatagramProtocol):
    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = answer(data)
        if reply is not None:
            self.transport.sendto(reply, addr)


async def _tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # RFC 1035 §4.2.2: each message is preceded by a two-octet length.
    try:
        while True:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            reply = answer(await reader.readexactly(length))
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _main(port: int) -> None:
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(_Udp, local_addr=("127.0.0.1", port))
    tcp = await asyncio.start_server(_tcp, "127.0.0.1", port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    udp.close()
    tcp.close()
    await tcp.wait_closed()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: dns_stub.py PORT", file=sys.stderr)
        return 2
    asyncio.run(_main(int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
