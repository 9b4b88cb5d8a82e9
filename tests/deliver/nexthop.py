"""Loopback servers for the delivery tests: a next-hop SMTP server and a DNS server.

``NextHop`` is a real aiosmtpd server on 127.0.0.1 (random port) that can be told,
per recipient, to answer 250, a 4xx or a 5xx, or to drop the connection; it
records every message it accepted and every connection and MAIL command it saw.

``DnsZone`` is a real DNS server (dnslib) on 127.0.0.1 (random UDP port) answering
from a small in-test zone.  It can play a validating resolver for DANE: answers
for the names in ``secure`` carry the AD bit (RFC 4035 §3.2.3), and it serves TLSA
records.

Both the tests under tests/deliver and tests/queue use these (the queue's
conftest loads this file by path).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, TLSA, TXT, A, DNSLabel, DNSRecord
from dnslib.server import DNSHandler, DNSLogger, DNSServer

DROP = "drop"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    helo: str = ""  # the name the client gave in EHLO


@dataclass
class NextHop:
    """Answers per recipient; ``rules`` maps a lower-cased address to a reply or DROP."""

    rules: dict[str, str] = field(default_factory=dict)
    mail_reply: str = "250 2.1.0 Sender ok"  # or DROP
    data_reply: str = "250 2.0.0 Ok: queued"
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    mail_commands: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    tls_context: ssl.SSLContext | None = None  # offered with STARTTLS
    implicit_tls: ssl.SSLContext | None = None  # TLS from the first byte (smtps)
    smtputf8: bool = True  # advertise SMTPUTF8 (RFC 6531)
    # Advertise PIPELINING (RFC 2920).  aiosmtpd reads commands in order from its
    # stream, so it serves a pipelined client correctly; it just never says so.
    pipelining: bool = False
    # Advertise DSN (RFC 3461) and accept its parameters (aiosmtpd knows none of them:
    # they are taken off the command before aiosmtpd parses it).
    dsn: bool = False
    # Every MAIL FROM / RCPT TO argument as received, parameters included.
    mail_args: list[str] = field(default_factory=list)
    rcpt_args: list[str] = field(default_factory=list)
    # Set: the end of DATA waits for it before answering (a delivery caught in
    # flight); ``in_data`` is set once a message's data has arrived.
    data_gate: asyncio.Event | None = None
    in_data: asyncio.Event = field(default_factory=asyncio.Event)
    # Seconds to wait before answering MAIL, or RCPT for a (lower-cased) address: a
    # slow mail store.  aiosmtpd answers one command at a time, so a delay holds up
    # the replies behind it, as a real server's would.
    mail_delay: float = 0.0
    delays: dict[str, float] = field(default_factory=dict)
    rset_commands: int = 0

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        if self.dsn:
            responses.insert(1, "250-DSN")
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:
        self.mail_commands += 1
        if self.mail_delay:
            await asyncio.sleep(self.mail_delay)
        if self.mail_reply == DROP:
            assert server.transport is not None
            server.transport.close()
            return "421 4.4.2 dropping the connection"
        if not self.mail_reply.startswith("2"):
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        delay = self.delays.get(address.lower())
        if delay:
            await asyncio.sleep(delay)
        rule = self.rules.get(address.lower(), "250 2.1.5 Recipient ok")
        if rule == DROP:
            assert server.transport is not None
            server.transport.close()
            return "421 4.4.2 dropping the connection"
        if rule.startswith("2"):
            envelope.rcpt_tos.append(address)
        return rule

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_gate is not None:
            self.in_data.set()
            await self.data_gate.wait()
        if self.data_reply == DROP:
            assert server.transport is not None
            server.transport.close()
            return "421 4.4.2 dropping the connection"
        if self.data_reply.startswith("2"):
            raw = envelope.original_content or b""
            sender = envelope.mail_from or ""
            self.received.append(Received(
                "" if sender == "<>" else sender, list(envelope.rcpt_tos), raw,
                session.ssl is not None or self.implicit_tls is not None,
                session.host_name or "",
            ))
        return self.data_reply

    def delivered_to(self, rcpt: str) -> int:
        return sum(rcpt in m.rcpt_tos for m in self.received)

    async def start(self) -> None:
        hop = self

        class CountingSMTP(SMTP):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if not getattr(self, "_counted", False):
                    hop.connections += 1
                    self._counted = True
                super().connection_made(transport)

            async def smtp_MAIL(self, arg: str) -> None:
                hop.mail_args.append(arg)
                await super().smtp_MAIL(_strip(arg, ("RET", "ENVID")) if hop.dsn else arg)

            async def smtp_RCPT(self, arg: str) -> None:
                hop.rcpt_args.append(arg)
                await super().smtp_RCPT(_strip(arg, ("NOTIFY", "ORCPT")) if hop.dsn else arg)

            async def smtp_RSET(self, arg: str) -> None:
                hop.rset_commands += 1
                await super().smtp_RSET(arg)

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: CountingSMTP(self, hostname="nexthop.test", decode_data=False,
                                 tls_context=self.tls_context, require_starttls=False,
                                 enable_SMTPUTF8=self.smtputf8),
            "127.0.0.1", 0, ssl=self.implicit_tls,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _strip(arg: str, keys: tuple[str, ...]) -> str:
    """A MAIL/RCPT argument without the named parameters."""
    if not arg:
        return arg
    words = arg.split(" ")
    return " ".join(w for w in words if w.partition("=")[0].upper() not in keys)


# -- TLS: a throwaway CA and a certificate for the next hop -------------------------

@dataclass
class TlsPair:
    server: ssl.SSLContext
    client: ssl.SSLContext  # trusts the test CA, verifies host names


def make_tls(tmp: Path, name: str = "nexthop.test") -> TlsPair:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Coffer test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_pem = tmp / "nexthop.pem"
    key_pem = tmp / "nexthop.key"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return TlsPair(server, client)


# -- DNS ------------------------------------------------------------------------------

class _ZoneResolver:
    def __init__(self, records: list[RR]) -> None:
        self.records = records
        self.servfail: set[str] = set()
        self.secure: set[str] = set()  # names whose answers are "validated" (AD)

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        qname = request.q.qname
        qtype = request.q.qtype
        if str(qname).lower().rstrip(".") in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        # dnslib's reply() copies the query's flags, AD included: only "validated"
        # names may keep it.  Through CNAMEs (answered with the chain, as a resolver
        # does), every name of the chain must be "validated" (RFC 4035 §3.2.3).
        secure = True
        for _ in range(8):
            secure = secure and str(qname).lower().rstrip(".") in self.secure
            alias = next((rr for rr in self.records if rr.rname == qname
                          and rr.rtype == QTYPE.CNAME and qtype != QTYPE.CNAME), None)
            if alias is None:
                break
            reply.add_answer(alias)
            qname = alias.rdata.label
        reply.header.ad = int(secure)
        names = {str(rr.rname).lower() for rr in self.records}
        matched = False
        for rr in self.records:
            if rr.rname == qname:
                matched = True
                if rr.rtype == qtype:
                    reply.add_answer(rr)
        if not matched and str(qname).lower() not in names:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class DnsZone:
    """A loopback DNS server; add records with :meth:`mx`, :meth:`a`, :meth:`aaaa`, :meth:`txt`."""

    def __init__(self) -> None:
        self.resolver = _ZoneResolver([])
        self._server = DNSServer(self.resolver, address="127.0.0.1", port=0,
                                 logger=DNSLogger("-request,-reply,-truncated,-error,"
                                                  "-recv,-send,-data", prefix=False))
        self.port: int = self._server.server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, rr: Any) -> None:
        self.resolver.records.append(rr)

    def mx(self, domain: str, pref: int, host: str) -> None:
        self.add(RR(DNSLabel(domain), QTYPE.MX, rdata=MX(host, pref), ttl=60))

    def a(self, name: str, addr: str) -> None:
        self.add(RR(DNSLabel(name), QTYPE.A, rdata=A(addr), ttl=60))

    def aaaa(self, name: str, addr: str) -> None:
        self.add(RR(DNSLabel(name), QTYPE.AAAA, rdata=AAAA(addr), ttl=60))

    def cname(self, name: str, target: str) -> None:
        """``name`` an alias of ``target`` (answers for it follow the chain)."""
        self.add(RR(DNSLabel(name), QTYPE.CNAME, rdata=CNAME(target), ttl=60))

    def tlsa(self, name: str, usage: int, selector: int, mtype: int, data: bytes) -> None:
        self.add(RR(DNSLabel(name), QTYPE.TLSA, rdata=TLSA(usage, selector, mtype, data),
                    ttl=60))

    def secure(self, *names: str) -> None:
        """Answer for ``names`` with the AD bit, as a validating resolver would for
        DNSSEC-signed data."""
        self.resolver.secure.update(n.lower().rstrip(".") for n in names)

    def txt(self, name: str, *texts: str) -> None:
        """Replace the TXT records at ``name`` (none given: remove them)."""
        label = DNSLabel(name)
        self.resolver.records = [rr for rr in self.resolver.records
                                 if not (rr.rname == label and rr.rtype == QTYPE.TXT)]
        for text in texts:
            self.add(RR(label, QTYPE.TXT, rdata=TXT(text), ttl=60))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.server.shutdown()
        self._server.server.server_close()
        if self._thread is not None:
            self._thread.join(5)
