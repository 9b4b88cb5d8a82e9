"""A scripted loopback SMTP server for the pipelining tests (``GroupServer``): it decides
exactly when and how its replies arrive (see tests/deliver/test_smtp_pipelining.py)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from nexthop import DROP


@dataclass
class GroupServer:
    """A raw SMTP server: ``answer(command line) -> reply`` (or DROP); ``final`` after
    the content.  ``groups`` records the commands that arrived before each batch of
    replies, ``contents`` each message's content as it came (dot-stuffed)."""

    answer: Callable[[bytes], str]
    pipelining: bool = True
    final: str = "250 2.0.0 queued"
    trickle: bool = False  # send the replies one byte at a time
    stall: float = 0.0  # seconds of silence before the reply to the content
    groups: list[list[bytes]] = field(default_factory=list)
    contents: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if self.trickle:
            for i in range(len(data)):
                writer.write(data[i:i + 1])
                await writer.drain()
                await asyncio.sleep(0)
        else:
            writer.write(data)
            await writer.drain()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(b"220 scripted ESMTP\r\n")
            await reader.readline()  # EHLO
            ext = b"250-PIPELINING\r\n" if self.pipelining else b""
            writer.write(b"250-scripted\r\n" + ext + b"250 8BITMIME\r\n")
            pending: list[bytes] = []
            while line := await reader.readline():
                pending.append(line.rstrip(b"\r\n"))
                verb = line[:4].upper()
                # RFC 2920 §3.2: a server may hold its replies until the group ends.
                if self.pipelining and verb in (b"MAIL", b"RCPT"):
                    continue
                self.groups.append(pending)
                out = b""
                dropped = False
                for cmd in pending:
                    reply = self.answer(cmd)
                    if reply == DROP:
                        dropped = True
                        break
                    out += reply.encode() + b"\r\n"
                pending = []
                await self._send(writer, out)
                if dropped or verb == b"QUIT":
                    break
                if verb == b"DATA" and out.split(b"\r\n")[-2][:3] == b"354":
                    content = b""
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        content += chunk
                    self.contents.append(content)
                    await asyncio.sleep(self.stall)
                    await self._send(writer, self.final.encode() + b"\r\n")
        except ConnectionError:
            pass  # the client gave up (a timeout test)
        finally:
            writer.close()


def answers(**by_rcpt: str) -> Callable[[bytes], str]:
    """MAIL 250, RCPT by address (default 250), DATA 354 (override with data=...)."""
    def answer(cmd: bytes) -> str:
        verb = cmd[:4].upper()
        if verb == b"MAIL":
            return by_rcpt.get("mail", "250 2.1.0 ok")
        if verb == b"RCPT":
            addr = re.search(rb"<(.*)>", cmd)
            assert addr is not None
            return by_rcpt.get(addr.group(1).decode().split("@")[0], "250 2.1.5 ok")
        if verb == b"DATA":
            return by_rcpt.get("data", "354 go ahead")
        return "250 2.0.0 ok"  # RSET, NOOP
    return answer
