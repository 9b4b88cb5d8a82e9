"""Optional external scanners: rspamd over HTTP (``/checkv2``) and SpamAssassin's spamd.

Each client sends the message, waits at most its timeout, and returns the
scanner's score, its threshold and the names (and, for rspamd, the weights) of
the rules that fired.  Any failure - refused connection, timeout, a reply we
cannot parse - is a :class:`ScannerError`; what happens then is the stage's
``spam.external.on_error`` (tempfail the message, or score it without the
scanner), never a crash.

spamd's protocol (SPAMC/1.5, documented in SpamAssassin's ``spamd/PROTOCOL``)::

    SYMBOLS SPAMC/1.5            SPAMD/1.1 0 EX_OK
    Content-length: 1234         Content-length: 27
    User: alice                  Spam: True ; 15.3 / 5.0

    <message>                    GTUBE,MISSING_DATE,NO_RECEIVED

rspamd's (https://rspamd.com/doc/developers/protocol.html): ``POST /checkv2`` with
the message as body and the envelope in headers (IP, Helo, From, Rcpt,
Queue-Id); the reply is JSON ``{"score", "required_score", "action",
"symbols": {NAME: {"score", ...}}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from gateway.check.spam.config import RspamdConfig, SpamdConfig
from gateway.config import parse_hostport
from gateway.envelope import Envelope
from gateway.errors import CofferError

MAX_REPLY = 4 * 1024 * 1024


class ScannerError(CofferError):
    """An external scanner did not give a usable answer."""

    def __init__(self, scanner: str, cause: str) -> None:
        self.scanner = scanner
        self.cause = cause
        super().__init__(f"{scanner}: {cause}")


@dataclass(frozen=True, slots=True)
class ScanReport:
    scanner: str  # "rspamd" | "spamd"
    score: float
    required: float
    is_spam: bool
    symbols: dict[str, float] = field(default_factory=dict)  # spamd: weight 0 (not given)
    action: str = ""

    def to_facts(self) -> dict[str, Any]:
        return {"score": self.score, "required": self.required, "is_spam": self.is_spam,
                "action": self.action, "symbols": self.symbols}


async def _exchange(scanner: str, host: str, port: int, request: bytes,
                    timeout: float) -> bytes:
    """Connect, send ``request``, read the reply to EOF; all within ``timeout``."""
    async def go() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            await writer.drain()
            chunks: list[bytes] = []
            size = 0
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_REPLY:
                    raise ScannerError(scanner, "reply too large")
            return b"".join(chunks)
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    try:
        return await asyncio.wait_for(go(), timeout)
    except TimeoutError:
        raise ScannerError(scanner, f"no answer within {timeout:g}s") from None
    except OSError as exc:
        raise ScannerError(scanner, exc.strerror or type(exc).__name__) from None


# -- spamd -----------------------------------------------------------------------

_SPAMD_STATUS = re.compile(rb"^SPAMD/(\d+\.\d+) (\d+) (\S+)")
_SPAM_LINE = re.compile(
    rb"^Spam:\s*(True|False|Yes|No)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)",
    re.IGNORECASE | re.MULTILINE,
)


def spamd_request(data: bytes, user: str | None = None) -> bytes:
    head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(data)}\r\n"
    if user:
        head += f"User: {user}\r\n"
    return head.encode() + b"\r\n" + data


def parse_spamd_reply(raw: bytes) -> ScanReport:
    m = _SPAMD_STATUS.match(raw)
    if not m:
        raise ScannerError("spamd", f"not a SPAMD reply: {raw[:60]!r}")
    if m.group(2) != b"0":
        raise ScannerError("spamd", f"error {m.group(2).decode()} {m.group(3).decode()}")
    head, _, body = raw.partition(b"\r\n\r\n")
    s = _SPAM_LINE.search(head)
    if not s:
        raise ScannerError("spamd", "reply without a Spam: line")
    names = [n.strip() for n in body.decode("ascii", "replace").split(",") if n.strip()]
    return ScanReport("spamd", float(s.group(2)), float(s.group(3)),
                      s.group(1).lower() in (b"true", b"yes"), dict.fromkeys(names, 0.0))


async def spamd_scan(cfg: SpamdConfig, data: bytes) -> ScanReport:
    host, port = parse_hostport(cfg.address, 783)
    raw = await _exchange("spamd", host, port, spamd_request(data, cfg.user), cfg.timeout)
    return parse_spamd_reply(raw)


# -- rspamd ----------------------------------------------------------------------


def rspamd_request(cfg: RspamdConfig, data: bytes, envelope: Envelope | None,
                   qid: str = "") -> tuple[str, int, bytes]:
    u = urlsplit(cfg.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    path = (u.path or "").rstrip("/") + "/checkv2"
    lines = [f"POST {path} HTTP/1.1", f"Host: {u.netloc}", "Connection: close",
             f"Content-Length: {len(data)}"]
    if envelope is not None:
        if envelope.client_ip:
            lines.append(f"IP: {envelope.client_ip}")
        if envelope.helo:
            lines.append(f"Helo: {envelope.helo}")
        lines.append(f"From: <{envelope.mail_from}>")
        lines.extend(f"Rcpt: <{r}>" for r in envelope.rcpt_to[:100])
        if envelope.auth_user:
            lines.append(f"User: {envelope.auth_user}")
    if qid:
        lines.append(f"Queue-Id: {qid}")
    if cfg.password:
        lines.append(f"Password: {cfg.password}")
    head = "\r\n".join(_clean(x) for x in lines) + "\r\n\r\n"
    return host, port, head.encode("utf-8") + data


def _clean(line: str) -> str:
    return line.replace("\r", " ").replace("\n", " ")  # no header injection


def _http_body(raw: bytes) -> tuple[int, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ScannerError("rspamd", "truncated HTTP reply")
    lines = head.split(b"\r\n")
    m = re.match(rb"HTTP/\d\.\d (\d{3})", lines[0])
    if not m:
        raise ScannerError("rspamd", f"not an HTTP reply: {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    elif b"content-length" in headers:
        body = body[: int(headers[b"content-length"])]
    return int(m.group(1)), body


def parse_rspamd_reply(raw: bytes) -> ScanReport:
    status, body = _http_body(raw)
    if status != 200:
        raise ScannerError("rspamd", f"HTTP {status}: {body[:100]!r}")
    try:
        # is_skipped: rspamd stopped early (GTUBE, a pre-filter); score and action still hold
        obj = json.loads(body)
        symbols = {str(k): float(v.get("score", 0.0)) if isinstance(v, dict) else 0.0
                   for k, v in (obj.get("symbols") or {}).items()}
        score = float(obj["score"])
        required = float(obj.get("required_score", 0.0))
        action = str(obj.get("action", ""))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ScannerError("rspamd", f"unreadable reply: {exc}") from None
    return ScanReport("rspamd", score, required,
                      action in ("reject", "add header", "rewrite subject"), symbols, action)


async def rspamd_scan(cfg: RspamdConfig, data: bytes, envelope: Envelope | None = None,
                      qid: str = "") -> ScanReport:
    host, port, request = rspamd_request(cfg, data, envelope, qid)
    raw = await _exchange("rspamd", host, port, request, cfg.timeout)
    return parse_rspamd_reply(raw)
