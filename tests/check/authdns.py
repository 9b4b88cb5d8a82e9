"""A real DNS server on loopback for the check-stage tests (dnslib's server).

The zones are written in the tests (or loaded from the RFC 7208 suite's
``zonedata``).  The server answers over UDP and TCP on the same random port; UDP
answers over 512 bytes are truncated, so the resolver's TCP fallback is exercised.

Besides records, a name can be made to time out (no answer at all) or to answer
SERVFAIL, for the temperror paths.  Run as a script (``python authdns.py ZONE.json
ADDRESS PORT``) it serves a zone saved with :meth:`Zone.to_json` until killed; the
OpenDKIM round trip uses that inside a private network namespace.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSLabel, DNSRecord
from dnslib.dns import DNSError
from dnslib.server import DNSHandler, DNSLogger, DNSServer

TIMEOUT = "TIMEOUT"


def _chunks(value: str | bytes | list[Any]) -> list[bytes]:
    if isinstance(value, list):
        return [v.encode() if isinstance(v, str) else bytes(v) for v in value]
    raw = value.encode() if isinstance(value, str) else value
    # RFC 1035 §3.3.14: a TXT record is character-strings of at most 255 octets each
    return [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]


class Zone:
    """Names -> ordered entries ``(type, value)`` or ``("TIMEOUT", None)``.

    Lookup follows the RFC 7208 suite's convention: an entry TIMEOUT makes every
    type not listed *before* it time out; a name that is absent is NXDOMAIN; a
    name present without the asked type is NODATA.
    """

    def __init__(self) -> None:
        self.entries: dict[str, list[tuple[str, Any]]] = {}
        self.servfail: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".")

    def add(self, name: str, rtype: str, value: Any) -> Zone:
        self.entries.setdefault(self._key(name), []).append((rtype.upper(), value))
        return self

    def txt(self, name: str, value: str | bytes | list[Any]) -> Zone:
        return self.add(name, "TXT", value)

    def timeout(self, name: str) -> Zone:
        self.entries.setdefault(self._key(name), []).append((TIMEOUT, None))
        return self

    def fail(self, name: str) -> Zone:
        """Answer SERVFAIL for every query of ``name``."""
        self.servfail.add(self._key(name))
        return self

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.servfail.clear()
            self.queries.clear()

    def load_spf_suite(self, zonedata: dict[str, list[Any]]) -> Zone:
        """The RFC 7208 suite's zonedata: SPF entries also serve as TXT unless the
        name lists TXT itself (the suite's "auto-magic duplication"); ``TXT: NONE``
        means no TXT record."""
        for name, items in zonedata.items():
            gen_txt = not any(isinstance(i, dict) and "TXT" in i for i in items)
            spf_values: list[Any] = []
            for item in items:
                if item == TIMEOUT:
                    self.timeout(name)
                    continue
                ((rtype, value),) = item.items()
                if rtype == "SPF":
                    spf_values.append(value)
                if value == "NONE":
                    self.entries.setdefault(self._key(name), [])
                    continue
                self.add(name, rtype, value)
            if gen_txt:
                for v in spf_values:
                    if v != "NONE":
                        self.add(name, "TXT", v)
        return self

    def to_json(self) -> str:
        return json.dumps({"entries": self.entries, "servfail": sorted(self.servfail)})

    @classmethod
    def from_json(cls, text: str) -> Zone:
        data = json.loads(text)
        z = cls()
        z.entries = {k: [tuple(e) for e in v] for k, v in data["entries"].items()}
        z.servfail = set(data["servfail"])
        return z

    # -- answering --

    def lookup(self, name: str, qtype: str, owner: Any = None) -> tuple[str, list[RR]]:
        """-> ("ok" | "nxdomain" | "timeout" | "servfail", answer records)."""
        answers: list[RR] = []
        seen: set[str] = set()
        for _ in range(8):  # CNAME chain limit
            key = self._key(name)
            if key in self.servfail:
                return "servfail", []
            entries = self.entries.get(key)
            if entries is None:
                return ("nxdomain" if not answers else "ok"), answers
            cname = [v for t, v in entries if t == "CNAME"]
            if cname and qtype != "CNAME":
                if key in seen:  # a loop: answer the chain so far, as BIND does
                    return "ok", answers
                seen.add(key)
                answers.append(RR(owner or name, QTYPE.CNAME, ttl=300, rdata=CNAME(cname[0])))
                name, owner = cname[0], None
                continue
            for rtype, value in entries:
                if rtype == TIMEOUT:
                    if not any(r.rtype == getattr(QTYPE, qtype, -1) for r in answers):
                        return "timeout", []
                    break
                if rtype != qtype:
                    continue
                if value == TIMEOUT:
                    return "timeout", []
                answers.append(RR(owner or name, getattr(QTYPE, rtype), ttl=300,
                                  rdata=_rdata(rtype, value)))
            return "ok", answers
        return "servfail", []

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        # the raw labels: str(qname) escapes spaces and other bytes in zone-file style
        qname = ".".join(lb.decode("utf-8", "replace") for lb in request.q.qname.label)
        qtype = QTYPE.get(request.q.qtype)
        with self._lock:
            self.queries.append((self._key(qname), qtype))
        status, answers = self.lookup(qname, qtype, request.q.qname)
        if status == "timeout":
            raise DNSError("simulated timeout: no answer")  # the handler sends nothing
        reply = request.reply()
        if status == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
        elif status == "nxdomain":
            reply.header.rcode = RCODE.NXDOMAIN
        for rr in answers:
            reply.add_answer(rr)
        return reply


def _rdata(rtype: str, value: Any) -> Any:
    if rtype in ("TXT", "SPF"):
        return TXT(_chunks(value))
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "MX":
        pref, host = value
        return MX(DNSLabel(host) if host else DNSLabel([]), int(pref))
    if rtype == "PTR":
        return PTR(value)
    if rtype == "CNAME":
        return CNAME(value)
    raise ValueError(f"unsupported record type {rtype}")


class _Handler(DNSHandler):
    """RFC 1035 §4.2.1: a UDP answer over 512 bytes is sent empty with TC set, so the
    client retries over TCP (dnslib's own truncate() drops the question section,
    which resolvers rightly refuse)."""

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        packed: bytes = reply.pack()
        if self.protocol == "udp" and len(packed) > 512:
            empty = request.reply()
            empty.header.tc = 1
            packed = empty.pack()
        return packed


class DnsTestServer:
    """dnslib's server on ADDRESS, UDP and TCP on one port, in background threads."""

    def __init__(self, zone: Zone, address: str = "127.0.0.1", port: int = 0) -> None:
        self.zone = zone
        self.address = address
        logger = DNSLogger("none", prefix=False)
        for _ in range(20):
            udp = DNSServer(zone, address=address, port=port, logger=logger, handler=_Handler)
            chosen = udp.server.server_address[1]
            try:
                tcp = DNSServer(zone, address=address, port=chosen, tcp=True, logger=logger,
                                handler=_Handler)
            except OSError:
                udp.server.server_close()
                if port:
                    raise
                continue
            break
        else:  # pragma: no cover
            raise OSError("no free port for UDP and TCP together")
        self.port = chosen
        self._servers = [udp, tcp]

    @property
    def hostport(self) -> str:
        return f"{self.address}:{self.port}"

    def start(self) -> DnsTestServer:
        for s in self._servers:
            s.start_thread()
        return self

    def stop(self) -> None:
        for s in self._servers:
            s.stop()
            s.server.server_close()
            s.thread.join(5)


def main(argv: list[str]) -> int:
    zone_file, address, port = argv[1], argv[2], int(argv[3])
    with open(zone_file, encoding="utf-8") as f:
        zone = Zone.from_json(f.read())
    server = DnsTestServer(zone, address, port).start()
    print("ready", flush=True)
    try:
        threading.Event().wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
