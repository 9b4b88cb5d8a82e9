"""The IMAP server driven by real clients on loopback: imaplib, IMAPClient, aioimaplib,
and a raw socket for what clients never send (malformed commands, half literals)."""

from __future__ import annotations

import asyncio
import base64
import imaplib
import socket
import ssl
import time
from datetime import UTC, datetime

import aioimaplib  # type: ignore[import-untyped]
import pytest
from imap_helpers import MSG1, MSG2, RunningServer, Tls, memory_backend
from imapclient import IMAPClient  # type: ignore[import-untyped]

from archive.imap.backend import MemoryBackend
from archive.imap.render import to_crlf
from archive.imap.server import ImapConfig, LoginThrottle


class Raw:
    """A line-oriented raw IMAP client for protocol edge cases."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock: socket.socket = tls.wrap_socket(sock, server_hostname="localhost") \
            if tls else sock
        self.buf = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def until(self, tag: bytes) -> list[bytes]:
        out = []
        while True:
            line = self.line()
            out.append(line)
            if line.startswith(tag + b" "):
                return out

    def cmd(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.until(tag)

    def close(self) -> None:
        self.sock.close()


def login(c: imaplib.IMAP4, user: str = "alice") -> None:
    c.login(user, f"{user}-pw")


# -- imaplib ----------------------------------------------------------------------------


def test_imaplib_reads_envelope_structure_and_exact_bytes(server: RunningServer) -> None:
    with imaplib.IMAP4("127.0.0.1", server.port) as c:
        login(c)
        typ, data = c.select("INBOX", readonly=True)
        assert (typ, data) == ("OK", [b"2"])
        typ, resp = c.fetch("1:2", "(RFC822.SIZE BODY.PEEK[] ENVELOPE)")
        assert typ == "OK"
        bodies = [item[1] for item in resp if isinstance(item, tuple)]
        assert bodies == [to_crlf(MSG1), to_crlf(MSG2)]
        head2, rest1 = resp[2][0], resp[1]  # type: ignore[index]
        assert isinstance(head2, bytes) and isinstance(rest1, bytes)
        assert b"RFC822.SIZE %d" % len(to_crlf(MSG2)) in head2
        assert b'"quarterly numbers"' in rest1


def test_imaplib_fetches_nested_message_parts(server: RunningServer) -> None:
    with imaplib.IMAP4("127.0.0.1", server.port) as c:
        login(c)
        with pytest.raises(c.readonly):  # imaplib's own check: SELECT answered READ-ONLY
            c.select("INBOX")
        c.select("INBOX", readonly=True)
        typ, resp = c.fetch("2", "(BODY.PEEK[2.HEADER] BODY.PEEK[2.TEXT] BODY.PEEK[1.MIME] "
                                 "BODY.PEEK[HEADER.FIELDS.NOT (To Date MIME-Version "
                                 "Content-Type)])")
        assert typ == "OK"
        parts = [item[1] for item in resp if isinstance(item, tuple)]
        assert parts == [b"From: carol@example.org\r\nSubject: inner\r\n\r\n",
                         b"inner body zebra",  # the CRLF belongs to the boundary
                         b"Content-Type: text/plain\r\n\r\n",
                         b"From: Bob <bob@example.com>\r\nSubject: re: quarterly numbers\r\n"
                         b"\r\n"]


def test_imaplib_search_with_charset_and_uid(server: RunningServer) -> None:
    with imaplib.IMAP4("127.0.0.1", server.port) as c:
        login(c)
        c.select("INBOX", readonly=True)
        assert c.search("UTF-8", "BODY", "zebra") == ("OK", [b"2"])
        assert c.search(None, "FROM", "alice", "NOT", "SUBJECT", "re:") == ("OK", [b"1"])
        assert c.uid("SEARCH", "SENTSINCE", "2-Jul-2024") == ("OK", [b"2"])
        assert c.search(None, "OR", "LARGER", "100000", "HEADER", "Message-ID", "one@") \
            == ("OK", [b"1"])
        typ, data = c.search("KOI8-R", "TEXT", "x")
        assert typ == "NO" and b"BADCHARSET" in data[0]


def test_imaplib_list_status_namespace(server: RunningServer) -> None:
    with imaplib.IMAP4("127.0.0.1", server.port) as c:
        login(c)
        typ, boxes = c.list()
        assert typ == "OK" and boxes == [b'() "/" "INBOX"', b'(\\Sent) "/" "Sent"']
        assert c.status("INBOX", "(MESSAGES UIDNEXT UNSEEN)") == (
            "OK", [b'"INBOX" (MESSAGES 2 UIDNEXT 3 UNSEEN 2)'])
        assert c.namespace() == ("OK", [b'(("" "/")) NIL NIL'])
        assert c.lsub()[0] == "OK"


def test_write_commands_answer_no_cannot(server: RunningServer) -> None:
    with imaplib.IMAP4("127.0.0.1", server.port) as c:
        login(c)
        for typ, data in (c.create("New"), c.delete("INBOX"), c.rename("Sent", "Old"),
                          c.append("INBOX", None, None, MSG1)):
            assert typ == "NO" and data[0].startswith(b"[CANNOT] The archive is read-only")
        c.select("INBOX", readonly=True)
        assert c.copy("1", "Sent")[0] == "NO"
        typ, data = c.expunge()
        assert typ == "NO" and b"[CANNOT]" in data[0]


# -- IMAPClient -------------------------------------------------------------------------


def test_imapclient_starttls_select_and_private_flags(tls: Tls) -> None:
    # imaplib (under IMAPClient) refuses [READ-ONLY] after SELECT: this site answers
    # [READ-WRITE]; the messages stay immutable, only private flags change.
    backend = memory_backend()
    srv = RunningServer(backend, ImapConfig(port=0, tls=tls.server, select_read_only=False))
    try:
        _private_flags(srv, tls, backend)
    finally:
        srv.stop()


def _private_flags(server: RunningServer, tls: Tls, mem_backend: MemoryBackend) -> None:
    with IMAPClient("127.0.0.1", port=server.port, ssl=False) as c:
        assert b"STARTTLS" in c.capabilities()
        c.starttls(tls.client)
        c.login("alice", "alice-pw")
        sel = c.select_folder("INBOX")
        assert sel[b"READ-WRITE"] is True and sel[b"EXISTS"] == 2
        assert sel[b"PERMANENTFLAGS"] == (b"\\Flagged", b"\\Seen")
        c.add_flags([1], [b"\\Flagged"])
        got = c.fetch([1, 2], ["FLAGS", "BODY[]"])  # not PEEK: sets \Seen
        assert got[1][b"FLAGS"] == (b"\\Flagged", b"\\Seen")
        assert got[2][b"BODY[]"] == to_crlf(MSG2)
        assert c.search(["UNFLAGGED"]) == [2]
        with pytest.raises(IMAPClient.Error, match="CANNOT"):
            c.add_flags([1], [b"\\Deleted"])
    # The flags are the user's private state, kept by the backend for the next session.
    with IMAPClient("127.0.0.1", port=server.port, ssl=False) as c:
        c.starttls(tls.client)
        c.login("alice", "alice-pw")
        c.select_folder("INBOX", readonly=True)
        assert c.get_flags([1, 2]) == {1: (b"\\Flagged", b"\\Seen"), 2: (b"\\Seen",)}
    assert mem_backend.messages(mem_backend.authenticate("bob", "bob-pw"),  # type: ignore[arg-type]
                                "INBOX") == []


def test_imapclient_implicit_tls_and_bodystructure(tls: Tls) -> None:
    srv = RunningServer(memory_backend(), ImapConfig(port=0, tls=tls.server, implicit_tls=True))
    try:
        with IMAPClient("127.0.0.1", port=srv.port, ssl=True, ssl_context=tls.client) as c:
            c.login("alice", "alice-pw")
            c.select_folder("INBOX", readonly=True)
            bs = c.fetch([2], ["BODYSTRUCTURE"])[2][b"BODYSTRUCTURE"]
            assert bs.is_multipart
            assert bs[1] == b"mixed"
    finally:
        srv.stop()


def test_login_refused_without_tls_when_plaintext_is_not_allowed(tls: Tls) -> None:
    srv = RunningServer(memory_backend(), ImapConfig(port=0, tls=tls.server))
    try:
        raw = Raw(srv.port)
        assert b"LOGINDISABLED" in raw.greeting and b"AUTH=PLAIN" not in raw.greeting
        assert raw.cmd(b"a", b"LOGIN alice alice-pw")[-1].startswith(b"a NO [PRIVACYREQUIRED]")
        raw.close()
        with IMAPClient("127.0.0.1", port=srv.port, ssl=False) as c:
            c.starttls(tls.client)
            assert b"AUTH=PLAIN" in c.capabilities()
            c.login("alice", "alice-pw")
    finally:
        srv.stop()


def test_imapclient_idle_sees_newly_archived_mail(server: RunningServer,
                                                  mem_backend: MemoryBackend) -> None:
    with IMAPClient("127.0.0.1", port=server.port, ssl=False) as c:
        c.login("alice", "alice-pw")
        c.select_folder("INBOX", readonly=True)
        c.idle()
        mem_backend.add_message("alice", "INBOX", MSG1, datetime(2024, 7, 5, tzinfo=UTC))
        responses = c.idle_check(timeout=10)
        c.idle_done()
        assert (3, b"EXISTS") in responses


# -- aioimaplib --------------------------------------------------------------------------


async def test_aioimaplib_selects_fetches_and_searches(server: RunningServer) -> None:
    client = aioimaplib.IMAP4(host="127.0.0.1", port=server.port, timeout=10)
    await client.wait_hello_from_server()
    assert (await client.login("alice", "alice-pw")).result == "OK"
    sel = await client.select("INBOX")
    assert sel.result == "OK"
    assert any(b"READ-ONLY" in line for line in sel.lines if isinstance(line, bytes))
    assert client.protocol.state == "SELECTED"  # aioimaplib enters it only on SELECT
    res = await client.uid("fetch", "1:*", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert res.result == "OK"
    assert b"Subject: quarterly numbers\r\n\r\n" in res.lines
    res = await client.search("TEXT", "zebra")
    assert res.result == "OK" and res.lines[0] == b"2"
    await client.logout()
    # aioimaplib never closes its transport itself.
    client.protocol.transport.close()
    await asyncio.sleep(0)


# -- AUTHENTICATE, pipelining, limits -------------------------------------------------


def test_authenticate_plain_with_and_without_initial_response(server: RunningServer) -> None:
    token = base64.b64encode(b"\0alice\0alice-pw")
    raw = Raw(server.port)
    assert raw.cmd(b"a", b"AUTHENTICATE PLAIN " + token)[-1].startswith(b"a OK")
    raw.close()
    raw = Raw(server.port)
    raw.send(b"b AUTHENTICATE PLAIN\r\n")
    assert raw.line() == b"+ "
    raw.send(token + b"\r\n")
    assert raw.until(b"b")[-1].startswith(b"b OK")
    raw.close()
    raw = Raw(server.port)
    bad = base64.b64encode(b"bob\0alice\0alice-pw")  # proxy authorisation is refused
    assert raw.cmd(b"c", b"AUTHENTICATE PLAIN " + bad)[-1].startswith(b"c NO")
    raw.send(b"d AUTHENTICATE PLAIN\r\n")
    raw.line()
    raw.send(b"*\r\n")
    assert raw.until(b"d")[-1].startswith(b"d BAD")
    raw.close()


def test_pipelined_commands_are_answered_in_order(server: RunningServer) -> None:
    raw = Raw(server.port)
    raw.send(b"a LOGIN alice alice-pw\r\nb EXAMINE INBOX\r\nc FETCH 1 (UID)\r\n"
             b"d NOOP\r\ne LOGOUT\r\n")
    lines = raw.until(b"e")
    tagged = [ln.split(b" ")[0] for ln in lines if not ln.startswith(b"*")]
    assert tagged == [b"a", b"b", b"c", b"d", b"e"]
    assert b"* 1 FETCH (UID 1)" in lines
    raw.close()


def test_literals_and_literal_plus_in_login(server: RunningServer) -> None:
    raw = Raw(server.port)
    raw.send(b"a LOGIN {5}\r\n")
    assert raw.line().startswith(b"+")
    raw.send(b"alice {8+}\r\nalice-pw\r\n")
    assert raw.until(b"a")[-1].startswith(b"a OK")
    raw.close()


def test_malformed_commands_get_bad_and_the_session_continues(server: RunningServer) -> None:
    raw = Raw(server.port)
    raw.cmd(b"a", b"LOGIN alice alice-pw")
    raw.cmd(b"b", b"EXAMINE INBOX")
    for text in (b"FETCH 1 (BODY[1.HEADER.FIELDS])", b"FETCH x FLAGS", b"FROB",
                 b"SEARCH (FROM", b"FETCH 99 FLAGS", b'LOGIN "unterminated'):
        assert raw.cmd(b"x", text)[-1].startswith(b"x BAD"), text
    assert raw.cmd(b"y", b"NOOP")[-1] == b"y OK NOOP completed"
    raw.send(b"\r\n")
    assert raw.line().startswith(b"* BAD")
    raw.close()


def test_oversized_literal_is_refused_and_overlong_line_ends_session(tls: Tls) -> None:
    srv = RunningServer(memory_backend(), ImapConfig(port=0, allow_plaintext_loopback=True,
                                                     max_literal=1000, max_line=2000))
    try:
        raw = Raw(srv.port)
        assert raw.cmd(b"a", b"LOGIN {5000}")[-1].startswith(b"a BAD [TOOBIG]")
        assert raw.cmd(b"b", b"NOOP")[-1].startswith(b"b OK")
        raw.send(b"c NOOP " + b"x" * 5000 + b"\r\n")
        assert raw.line().startswith(b"* BYE")
        raw.close()
    finally:
        srv.stop()


def test_disconnect_mid_literal_leaves_no_session_behind(server: RunningServer) -> None:
    for _ in range(5):
        raw = Raw(server.port)
        raw.send(b"a LOGIN {100}\r\n")
        raw.line()
        raw.send(b"only part of it")
        raw.close()
    deadline = time.monotonic() + 5
    while server.server.session_count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.server.session_count == 0


def test_idle_timeout_logs_out_a_silent_client() -> None:
    srv = RunningServer(memory_backend(), ImapConfig(port=0, allow_plaintext_loopback=True,
                                                     login_timeout=0.3))
    try:
        raw = Raw(srv.port)
        assert raw.line().startswith(b"* BYE Autologout")
        raw.close()
    finally:
        srv.stop()


def test_failed_logins_are_rate_limited_per_account_and_per_ip() -> None:
    now = [0.0]
    throttle = LoginThrottle(per_account=3, per_ip=5, window=60, clock=lambda: now[0])
    srv = RunningServer(memory_backend(), ImapConfig(port=0, allow_plaintext_loopback=True),
                        throttle)
    try:
        raw = Raw(srv.port)
        for _ in range(3):
            assert raw.cmd(b"a", b"LOGIN alice wrong")[-1].startswith(
                b"a NO [AUTHENTICATIONFAILED]")
        # The right password is refused too while the account is throttled.
        assert raw.cmd(b"b", b"LOGIN alice alice-pw")[-1].startswith(b"b NO [UNAVAILABLE]")
        # Other accounts from the same IP still work until the per-IP limit.
        for _ in range(2):
            raw.cmd(b"c", b"LOGIN bob wrong")
        assert raw.cmd(b"d", b"LOGIN olga olga-pw")[-1].startswith(b"d NO [UNAVAILABLE]")
        now[0] = 61.0  # the window has passed
        assert raw.cmd(b"e", b"LOGIN alice alice-pw")[-1].startswith(b"e OK")
        raw.close()
    finally:
        srv.stop()


def test_capabilities_advertise_only_what_is_implemented(server: RunningServer) -> None:
    raw = Raw(server.port)
    caps = set(raw.cmd(b"a", b"CAPABILITY")[0].split()[2:])
    assert caps == {b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID", b"ENABLE", b"IDLE",
                    b"NAMESPACE", b"UNSELECT", b"SPECIAL-USE", b"STARTTLS", b"AUTH=PLAIN"}
    assert raw.cmd(b"b", b'ID ("name" "test")')[0] == b'* ID ("name" "Coffer")'
    assert raw.cmd(b"c", b"ENABLE CONDSTORE")[-1].startswith(b"c BAD")  # RFC 5161: after login
    raw.cmd(b"d", b"LOGIN alice alice-pw")
    assert raw.cmd(b"e", b"ENABLE CONDSTORE")[0] == b"* ENABLED"  # nothing to enable
    raw.close()


def test_many_concurrent_sessions(server: RunningServer) -> None:
    clients = [Raw(server.port) for _ in range(50)]
    for c in clients:
        c.send(b"a LOGIN alice alice-pw\r\nb EXAMINE INBOX\r\nc FETCH 2 (RFC822.SIZE)\r\n")
    for c in clients:
        lines = c.until(b"c")
        assert b"* 2 FETCH (RFC822.SIZE %d)" % len(to_crlf(MSG2)) in lines
        c.close()


def test_starttls_with_pipelined_plaintext_is_refused(server: RunningServer) -> None:
    # CVE-2011-0411: commands sent in clear after STARTTLS must not run inside TLS.
    raw = Raw(server.port)
    raw.send(b"a STARTTLS\r\nb LOGIN alice alice-pw\r\n")
    assert raw.line().startswith(b"* BYE")
    raw.close()


def test_fetch_items_partials_and_implicit_seen(server: RunningServer) -> None:
    raw = Raw(server.port)
    raw.cmd(b"a", b"LOGIN alice alice-pw")
    raw.cmd(b"b", b"SELECT INBOX")
    lines = raw.cmd(b"c", b"FETCH 1 (INTERNALDATE BODY[]<10000.5> BODY.PEEK[HEADER]<0.6>)")
    assert lines[0] == (b'* 1 FETCH (INTERNALDATE " 1-Jul-2024 12:00:00 +0000" '
                        b"BODY[]<10000> {0}")
    assert lines[1] == b" BODY[HEADER]<0> {6}"
    assert lines[2] == b"From:  FLAGS (\\Seen))"  # a non-PEEK body fetch sets \Seen
    lines = raw.cmd(b"d", b"FETCH 2 (RFC822.HEADER)")
    header = to_crlf(MSG2)[:to_crlf(MSG2).index(b"\r\n\r\n") + 4]
    assert lines[0] == b"* 2 FETCH (RFC822.HEADER {%d}" % len(header)
    assert b"FLAGS" not in b"".join(lines[1:-1])  # RFC822.HEADER is a peek
    lines = raw.cmd(b"e", b"FETCH 2 (RFC822.TEXT)")
    assert b"FLAGS (\\Seen)" in b"".join(lines)
    assert raw.cmd(b"f", b"FETCH 1:2 (FLAGS)")[:2] == [b"* 1 FETCH (FLAGS (\\Seen))",
                                                     b"* 2 FETCH (FLAGS (\\Seen))"]
    assert raw.cmd(b"g", b"CHECK")[-1] == b"g OK CHECK completed"
    assert raw.cmd(b"h", b"UNSELECT")[-1] == b"h OK UNSELECT completed"
    assert raw.cmd(b"i", b"FETCH 1 FLAGS")[-1].startswith(b"i BAD")
    raw.cmd(b"j", b"EXAMINE INBOX")
    assert raw.cmd(b"k", b"STORE 1 -FLAGS (\\Seen)")[-1].startswith(b"k NO [READ-ONLY]")
    assert raw.cmd(b"l", b"CLOSE")[-1] == b"l OK CLOSE completed"
    raw.close()


def test_idle_done_and_bad_continuation(server: RunningServer) -> None:
    raw = Raw(server.port)
    raw.cmd(b"a", b"LOGIN alice alice-pw")
    raw.cmd(b"b", b"EXAMINE INBOX")
    raw.send(b"c IDLE\r\n")
    assert raw.line() == b"+ idling"
    raw.send(b"DONE\r\n")
    assert raw.line() == b"c OK IDLE terminated"
    raw.send(b"d IDLE\r\n")
    raw.line()
    raw.send(b"NOPE\r\n")
    assert raw.line().startswith(b"d BAD")
    assert raw.cmd(b"e", b"NOOP")[-1].startswith(b"e OK")
    raw.close()


def test_a_client_sending_only_garbage_is_disconnected(server: RunningServer) -> None:
    raw = Raw(server.port)
    for _ in range(20):
        assert raw.cmd(b"x", b"FROB")[-1].startswith(b"x BAD")
    raw.send(b"x FROB\r\n")
    assert raw.line() == b"* BYE Too many invalid IMAP commands"
    raw.close()


def test_search_charset_utf8_literal(server: RunningServer, mem_backend: MemoryBackend) -> None:
    raw_msg = ("From: =?utf-8?q?J=C3=BCrgen?= <j@example.de>\r\nSubject: Gr\u00fc\u00dfe\r\n"
               "\r\nK\u00f6ln\r\n").encode()
    mem_backend.add_message("alice", "INBOX", raw_msg)
    raw = Raw(server.port)
    raw.cmd(b"a", b"LOGIN alice alice-pw")
    raw.cmd(b"b", b"EXAMINE INBOX")
    name = "J\u00fcrgen".encode()
    raw.send(b"c SEARCH CHARSET UTF-8 FROM {%d}\r\n" % len(name))
    assert raw.line().startswith(b"+")
    raw.send(name + b"\r\n")
    assert raw.until(b"c")[0] == b"* SEARCH 3"
    word = "k\u00f6ln".encode()
    raw.send(b"d UID SEARCH CHARSET utf-8 BODY {%d+}\r\n%s\r\n" % (len(word), word))
    assert raw.until(b"d")[0] == b"* SEARCH 3"
    raw.close()
