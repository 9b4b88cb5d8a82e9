"""The IMAP server over the real archive: encrypted blob store, metadata (SQLite),
FTS5 index, accounts with argon2 hashes, audit events into the database and ledger."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from imap_helpers import RunningServer, Tls
from sqlalchemy import update
from test_imap_clients import Raw

from archive.extract import extract
from archive.facade import Archive
from archive.imap.accounts import Accounts
from archive.imap.archive_backend import ArchiveBackend, ledger_audit_hook
from archive.imap.render import to_crlf
from archive.imap.server import ImapConfig
from archive.index import Indexer, open_index
from archive.metadata import AuditEvent, Message, MessageRecord, Metadata

CHEAP = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)

OUT = (b"From: Alice <alice@corp.example>\r\nTo: Bob <bob@corp.example>\r\n"
       b"Subject: budget draft\r\nDate: Mon, 1 Jul 2024 10:00:00 +0000\r\n"
       b"Message-ID: <out@corp.example>\r\n\r\nSee the budget draft.\r\n")
IN = (b"From: Carol <carol@ext.example>\r\nTo: alice@corp.example\r\n"
      b"Subject: offer\r\nDate: Tue, 2 Jul 2024 10:00:00 +0000\r\n\r\n"
      b"Our offer includes a pineapple discount.\r\n")
PRIVATE = (b"From: mallory@corp.example\r\nTo: mallory@corp.example\r\n"
           b"Subject: private\r\n\r\nthe pineapple password is swordfish\r\n")
IMPORTED = (b"From: Dan <dan@ext.example>\nTo: bob@corp.example\nSubject: lf only\n\n"
            b"line one\nline two\n")
OLD_ALIAS = (b"From: dan@ext.example\r\nTo: billing@corp.example\r\nSubject: invoice\r\n\r\n"
             b"old invoice\r\n")


@dataclass
class Env:
    data: Path
    archive: Archive
    meta: Metadata
    accounts: Accounts
    backend: ArchiveBackend
    server: RunningServer
    ids: dict[str, int]


def _store(archive: Archive, meta: Metadata, raw: bytes, mail_from: str, rcpt: list[str],
           day: int) -> int:
    ref = archive.put(raw)
    rec = MessageRecord(hashlib.sha256(raw).hexdigest(), extract(raw),
                        datetime(2024, 7, day, 12, tzinfo=UTC), mail_from=mail_from,
                        rcpt_to=rcpt)
    assert rec.sha256 == ref.sha256
    return meta.add_message(rec).id


PG_URL = os.environ.get("COFFER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgresql"])
def databases(request: pytest.FixtureRequest, tmp_path: Path
              ) -> Iterator[tuple[Metadata, Accounts, str]]:
    """(metadata, accounts, full-text engine) on SQLite files, or in a PostgreSQL schema of
    their own (dropped at the end; skipped, saying why, when PostgreSQL is unreachable)."""
    if request.param == "sqlite":
        meta = Metadata.for_data_dir(tmp_path)
        meta.migrate()
        accounts = Accounts.for_data_dir(tmp_path, hasher=CHEAP)
        yield meta, accounts, "fts5"
        accounts.close()
        meta.close()
        return
    admin = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    schema = f"coffer_imap_{uuid.uuid4().hex[:10]}"
    try:
        with admin.begin() as c:
            c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL at {PG_URL} is not reachable: {exc}")
    meta = Metadata(PG_URL, schema=schema)
    accounts = Accounts(PG_URL, hasher=CHEAP, schema=schema)
    try:
        meta.migrate()
        yield meta, accounts, "pg"
    finally:
        accounts.close()
        meta.close()
        with admin.begin() as c:
            c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def env(tmp_path: Path, tls: Tls, databases: tuple[Metadata, Accounts, str]) -> Iterator[Env]:
    meta, accounts, engine = databases
    archive = Archive.open(tmp_path)
    index = open_index(engine, data_dir=tmp_path, meta=meta)
    ids = {
        "old_alias": _store(archive, meta, OLD_ALIAS, "dan@ext.example",
                            ["billing@corp.example"], 1),
        "out": _store(archive, meta, OUT, "alice@corp.example", ["bob@corp.example"], 2),
        "in": _store(archive, meta, IN, "carol@ext.example",
                     ["alice@corp.example", "dave@corp.example"], 3),  # dave: Bcc
        "private": _store(archive, meta, PRIVATE, "mallory@corp.example",
                          ["mallory@corp.example"], 4),
        "imported": _store(archive, meta, IMPORTED, "", ["bob@corp.example"], 5),
    }
    Indexer(meta, index, archive.get).run()
    meta.place_hold("C-1", "from:carol@ext.example", "olga", [ids["in"]],
                    datetime(2024, 8, 1, tzinfo=UTC))
    for name, role in (("alice", "user"), ("bob", "user"), ("dave", "user"),
                       ("mallory", "user"), ("olga", "officer")):
        addrs = [] if role == "officer" else [f"{name}@corp.example"]
        accounts.add(name, role, f"{name}-pw", addrs)
    accounts.save_search("carol", "from:carol@ext.example", "olga")
    backend = ArchiveBackend(meta, archive, accounts, index, domains=["corp.example"],
                             audit_hooks=[ledger_audit_hook(archive)],
                             poll_interval=0.1)
    server = RunningServer(backend, ImapConfig(port=0, tls=tls.server,
                                               allow_plaintext_loopback=True, idle_poll=60))
    e = Env(tmp_path, archive, meta, accounts, backend, server, ids)
    yield e
    server.stop()
    backend.close()
    index.close()
    archive.close()


def login(env: Env, user: str) -> Raw:
    raw = Raw(env.server.port)
    assert raw.cmd(b"l", f"LOGIN {user} {user}-pw".encode())[-1].startswith(b"l OK")
    return raw


def literals(lines: list[bytes]) -> str:
    return "\n".join(ln.decode("latin-1") for ln in lines)


def fetch_bodies(raw: Raw, tag: bytes, cmd: bytes) -> list[bytes]:
    """The literal payloads of a FETCH answer, in order."""
    raw.send(tag + b" " + cmd + b"\r\n")
    out = []
    while True:
        line = raw.line()
        m = re.search(rb"\{(\d+)\}$", line)
        if m:
            n = int(m.group(1))
            while len(raw.buf) < n:
                raw.buf += raw.sock.recv(65536)
            out.append(raw.buf[:n])
            raw.buf = raw.buf[n:]
            continue
        if line.startswith(tag + b" "):
            assert line.startswith(tag + b" OK"), line
            return out


def test_users_see_their_own_mail_byte_identical(env: Env) -> None:
    alice = login(env, "alice")
    listing = alice.cmd(b"a", b'LIST "" "*"')
    assert listing[:-1] == [b'* LIST () "/" "INBOX"', b'* LIST (\\Sent) "/" "Sent"']
    assert b"* 1 EXISTS" in alice.cmd(b"b", b"EXAMINE INBOX")
    assert fetch_bodies(alice, b"c", b"FETCH 1:* (BODY.PEEK[])") == [IN]
    alice.cmd(b"d", b"EXAMINE Sent")
    assert fetch_bodies(alice, b"e", b"UID FETCH 1:* (BODY.PEEK[])") == [OUT]
    alice.close()
    dave = login(env, "dave")  # a Bcc recipient: only the envelope names him
    dave.cmd(b"a", b"EXAMINE INBOX")
    assert fetch_bodies(dave, b"b", b"FETCH 1:* (BODY.PEEK[])") == [IN]
    dave.close()
    bob = login(env, "bob")
    bob.cmd(b"a", b"EXAMINE INBOX")
    lines = bob.cmd(b"b", b"FETCH 2 (RFC822.SIZE)")
    assert b"* 2 FETCH (RFC822.SIZE %d)" % len(to_crlf(IMPORTED)) in lines
    assert fetch_bodies(bob, b"c", b"FETCH 2 (BODY.PEEK[])") == [to_crlf(IMPORTED)]
    bob.close()


def test_a_user_cannot_reach_mail_they_took_no_part_in(env: Env) -> None:
    alice = login(env, "alice")
    seen: list[bytes] = []
    for text in (b'SELECT "All Mail"', b'STATUS "All Mail" (MESSAGES)',
                 b'EXAMINE "Holds/C-1"', b'EXAMINE "Domains/corp.example"',
                 b'EXAMINE "Searches/carol"', b"EXAMINE INBOX",
                 b"UID FETCH 1:* (BODY.PEEK[])", b"FETCH 1:* (BODY.PEEK[])",
                 b"UID FETCH %d (BODY.PEEK[])" % env.ids["private"],
                 b"UID FETCH 2:4294967295 (BODY.PEEK[])", b"SEARCH TEXT swordfish",
                 b"UID SEARCH BODY pineapple", b"SEARCH FROM mallory",
                 b"UID STORE 1:* +FLAGS (\\Seen)"):
        seen += alice.cmd(b"t", text)
    assert b"swordfish" not in b"\n".join(seen)
    # The full-text index knows mallory's message; the folder filter keeps it out.
    assert b"* SEARCH" in seen and b"* SEARCH 1" in seen  # pineapple: only Carol's offer
    assert sum(1 for ln in seen if ln.startswith(b"t NO [NONEXISTENT]")) == 5
    alice.close()


def test_officer_folders_uids_and_audit_trail(env: Env) -> None:
    olga = login(env, "olga")
    listing = olga.cmd(b"a", b'LIST "" "*"')
    names = [ln.split(b'"/" ')[1] for ln in listing[:-1]]
    assert set(names) == {b'"All Mail"', b'"Domains"', b'"Domains/corp.example"', b'"Holds"',
                          b'"Holds/C-1"', b'"Searches"', b'"Searches/carol"'}
    assert b'* LIST (\\All) "/" "All Mail"' in listing
    olga.cmd(b"b", b'SELECT "All Mail"')
    uids = olga.cmd(b"c", b"UID SEARCH ALL")[0]
    assert uids == b"* SEARCH " + b" ".join(str(i).encode() for i in sorted(env.ids.values()))
    bodies = fetch_bodies(olga, b"d", b"UID FETCH %d (BODY.PEEK[])" % env.ids["private"])
    assert bodies == [PRIVATE]
    assert olga.cmd(b"e", b"SEARCH BODY pineapple")[0] == b"* SEARCH 3 4"
    olga.cmd(b"f", b'EXAMINE "Holds/C-1"')
    assert fetch_bodies(olga, b"g", b"FETCH 1:* (BODY.PEEK[])") == [IN]
    olga.cmd(b"h", b'EXAMINE "Searches/carol"')
    assert fetch_bodies(olga, b"i", b"FETCH 1:* (BODY.PEEK[])") == [IN]
    olga.close()
    events: list[AuditEvent] = env.meta.audit_events()
    assert [(e.who, e.action, e.target) for e in events] == [
        ("olga", "imap_select", "All Mail"), ("olga", "imap_search", "All Mail"),
        ("olga", "imap_fetch", "All Mail"),
        ("olga", "imap_search", "All Mail"), ("olga", "imap_select", "Holds/C-1"),
        ("olga", "imap_fetch", "Holds/C-1"), ("olga", "imap_select", "Searches/carol"),
        ("olga", "imap_fetch", "Searches/carol")]
    assert events[3].result_count == 2 and "pineapple" in (events[3].query or "")
    # The ledger names each event by id, with hashes only; its encrypted document holds
    # the officer and the query in clear, for `coffer archive rebuild`.
    audits = [e for e in env.archive.ledger.entries() if e.kind == "audit"]
    assert [a.fields["event"] for a in audits] == [e.id for e in events]
    assert "olga" not in str([a.fields for a in audits])
    doc = json.loads(env.archive.get(audits[3].fields["document"]))
    assert (doc["who"], doc["query"]) == ("olga", events[3].query)


def test_uids_stay_stable_and_late_visible_mail_gets_a_higher_uid(env: Env) -> None:
    bob = login(env, "bob")
    bob.cmd(b"a", b"EXAMINE INBOX")
    first = bob.cmd(b"b", b"UID SEARCH ALL")[0]
    bob.close()
    assert first == b"* SEARCH 1 2"
    env.accounts.add_addresses("bob", ["billing@corp.example"])  # an older message appears
    bob = login(env, "bob")
    bob.cmd(b"a", b"EXAMINE INBOX")
    assert bob.cmd(b"b", b"UID SEARCH ALL")[0] == b"* SEARCH 1 2 3"
    assert fetch_bodies(bob, b"c", b"UID FETCH 3 (BODY.PEEK[])") == [OLD_ALIAS]
    bob.close()


def test_private_flags_and_expiry(env: Env) -> None:
    alice = login(env, "alice")
    alice.cmd(b"a", b"SELECT INBOX")
    assert alice.cmd(b"b", b"STORE 1 +FLAGS (\\Flagged)")[0] == \
        b"* 1 FETCH (FLAGS (\\Flagged))"
    alice.close()
    bob_view = env.accounts.flags("bob", "u/bob/INBOX")
    assert bob_view == {}
    alice = login(env, "alice")
    alice.cmd(b"a", b"SELECT INBOX")
    assert alice.cmd(b"b", b"FETCH 1 (FLAGS)")[0] == b"* 1 FETCH (FLAGS (\\Flagged))"
    with env.meta.session() as s:  # retention ended: the message leaves every folder
        s.execute(update(Message).where(Message.id == env.ids["in"])
                  .values(expired_at=datetime(2031, 1, 1, tzinfo=UTC)))
    assert alice.cmd(b"c", b"NOOP")[:2] == [b"* 1 EXPUNGE", b"* 0 EXISTS"]
    alice.close()


@pytest.mark.skipif(shutil.which("mbsync") is None, reason="mbsync (isync) not installed")
def test_mbsync_pulls_the_archive_byte_identical(env: Env, tls: Tls, tmp_path: Path) -> None:
    maildir = tmp_path / "sync"
    maildir.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"""IMAPAccount a
Host 127.0.0.1
Port {env.server.port}
User bob
Pass bob-pw
SSLType STARTTLS
CertificateFile {tls.ca_file}

IMAPStore r
Account a

MaildirStore l
Path {maildir}/
Inbox {maildir}/INBOX

Channel c
Far :r:
Near :l:
Patterns *
Create Near
Sync Pull
SyncState *
""")
    res = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    files = sorted((maildir / "INBOX" / "new").iterdir()) + sorted(
        (maildir / "INBOX" / "cur").iterdir())
    got = sorted(re.sub(rb"^X-TUID: \S+\n", b"", p.read_bytes(), count=1, flags=re.M)
                 for p in files)
    # mbsync stores LF line ends and its X-TUID line (see test_imap_mbsync).
    assert got == sorted([OUT.replace(b"\r\n", b"\n"), IMPORTED])


def test_idle_sees_newly_archived_mail(env: Env) -> None:
    alice = login(env, "alice")
    alice.cmd(b"a", b"EXAMINE INBOX")
    alice.send(b"b IDLE\r\n")
    assert alice.line() == b"+ idling"
    raw = (b"From: erin@ext.example\r\nTo: alice@corp.example\r\nSubject: new\r\n\r\n"
           b"fresh\r\n")
    _store(env.archive, env.meta, raw, "erin@ext.example", ["alice@corp.example"], 9)
    assert alice.line() == b"* 2 EXISTS"  # the archive poller woke the session
    alice.send(b"DONE\r\n")
    assert alice.line() == b"b OK IDLE terminated"
    assert fetch_bodies(alice, b"c", b"FETCH 2 (BODY.PEEK[])") == [raw]
    alice.close()


def test_pipelined_body_fetches_are_answered_in_order_with_exact_bytes(env: Env) -> None:
    # mbsync pipelines one UID FETCH per message: the server reads the queued commands
    # ahead and their bodies in one worker-thread hop; a malformed command and a UID
    # outside the folder in the middle of the run still get their own answers, in order.
    raw = Raw(env.server.port)
    raw.cmd(b"a", b"LOGIN olga olga-pw")
    raw.cmd(b"b", b"EXAMINE \"All Mail\"")
    order = ["old_alias", "out", "in", "private", "imported"]
    cmds = [b"f%d UID FETCH %d (BODY.PEEK[])\r\n" % (i, env.ids[k]) for i, k in enumerate(order)]
    cmds.insert(2, b"x1 UID FETCH 1:2 (BODY.PEEK[\r\n")
    cmds.insert(4, b"x2 UID FETCH 99999 (BODY.PEEK[])\r\n")
    raw.send(b"".join(cmds) + b"z LOGOUT\r\n")
    data = raw.buf
    while b"\r\nz OK" not in data:
        chunk = raw.sock.recv(65536)
        assert chunk, data
        data += chunk
    tags = re.findall(rb"(?:^|\r\n)(f\d|x\d|z) (OK|NO|BAD)", data)
    assert [t for t, _ in tags] == [b"f0", b"f1", b"x1", b"f2", b"x2", b"f3", b"f4", b"z"]
    assert dict(tags)[b"x1"] == b"BAD" and dict(tags)[b"x2"] == b"OK"
    pos = 0
    for name, msg in zip(order, (OLD_ALIAS, OUT, IN, PRIVATE, IMPORTED), strict=True):
        body = to_crlf(msg)
        want = b"UID %d BODY[] {%d}\r\n" % (env.ids[name], len(body)) + body
        found = data.find(want, pos)
        assert found > pos, name
        pos = found
    assert b"UID 99999" not in data
    raw.close()


def _store_at(archive: Archive, meta: Metadata, raw: bytes, mail_from: str, rcpt: list[str],
              when: datetime) -> int:
    rec = MessageRecord(archive.put(raw).sha256, extract(raw), when, mail_from=mail_from,
                        rcpt_to=rcpt)
    return meta.add_message(rec).id


def test_folders_by_year_split_inbox_and_sent_with_stable_uids(tmp_path: Path) -> None:
    import imaplib

    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    archive = Archive.open(tmp_path)
    accounts = Accounts.for_data_dir(tmp_path, hasher=CHEAP)
    accounts.add("alice", "user", "alice-pw", ["alice@corp.example"])
    accounts.add("bob", "user", "bob-pw", ["bob@corp.example"])
    _store_at(archive, meta, IN, "carol@ext.example", ["alice@corp.example"],
              datetime(2023, 12, 31, 23, 30, tzinfo=UTC))
    _store_at(archive, meta, OUT, "alice@corp.example", ["bob@corp.example"],
              datetime(2024, 1, 1, 0, 30, tzinfo=UTC))
    _store_at(archive, meta, OLD_ALIAS, "dan@ext.example", ["alice@corp.example"],
              datetime(2024, 3, 1, tzinfo=UTC))
    backend = ArchiveBackend(meta, archive, accounts, by_year=True, poll_interval=0)
    server = RunningServer(backend, ImapConfig(port=0, allow_plaintext_loopback=True))

    def folders(c: imaplib.IMAP4) -> list[str]:
        return sorted(line.decode().rsplit(' "/" ', 1)[1].strip('"')
                      for line in c.list()[1] if isinstance(line, bytes))

    def uids(c: imaplib.IMAP4, box: str) -> tuple[int, list[int], list[bytes]]:
        typ, _ = c.select(f'"{box}"', readonly=True)
        assert typ == "OK", box
        validity = int(c.response("UIDVALIDITY")[1][0] or 0)
        _, data = c.uid("FETCH", "1:*", "(BODY.PEEK[])")
        bodies = [d[1] for d in data if isinstance(d, tuple)]
        _, found = c.uid("SEARCH", "ALL")
        return validity, [int(x) for x in found[0].split()], bodies

    try:
        with imaplib.IMAP4("127.0.0.1", server.port) as c:
            c.login("alice", "alice-pw")
            assert folders(c) == ["INBOX", "INBOX/2023", "INBOX/2024", "Sent", "Sent/2024"]
            v23, u23, b23 = uids(c, "INBOX/2023")
            v24, u24, b24 = uids(c, "INBOX/2024")
            vin, uin, _ = uids(c, "INBOX")
            assert b23 == [to_crlf(IN)] and b24 == [to_crlf(OLD_ALIAS)]
            assert uids(c, "Sent/2024")[2] == [to_crlf(OUT)]
            assert len(uin) == 2 and len({v23, v24, vin}) == 3
            assert c.select('"Sent/2023"')[0] == "NO"
        # A new message in 2025 makes a new folder; the old ones keep UIDVALIDITY and UIDs.
        _store_at(archive, meta, PRIVATE, "mallory@corp.example", ["alice@corp.example"],
                  datetime(2025, 2, 1, tzinfo=UTC))
        with imaplib.IMAP4("127.0.0.1", server.port) as c:
            c.login("alice", "alice-pw")
            assert "INBOX/2025" in folders(c)
            assert uids(c, "INBOX/2023")[:2] == (v23, u23)
            assert uids(c, "INBOX/2024")[:2] == (v24, u24)
            assert uids(c, "INBOX")[0] == vin and uids(c, "INBOX")[1][:2] == uin
            status = c.status('"INBOX/2025"', "(MESSAGES UIDVALIDITY)")
            assert status[0] == "OK" and b"MESSAGES 1" in status[1][0]  # type: ignore[operator]
        with imaplib.IMAP4("127.0.0.1", server.port) as c:
            c.login("bob", "bob-pw")
            assert folders(c) == ["INBOX", "INBOX/2024", "Sent"]
            assert c.select('"INBOX/2023"')[0] == "NO"  # alice's year is not bob's
    finally:
        server.stop()
        backend.close()
        accounts.close()
        archive.close()
        meta.close()


def test_a_message_archived_as_received_and_as_sent_is_listed_once_as_received(
        env: Env) -> None:
    signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=corp.example; b=abc\r\n" + OUT.replace(
        b"<out@corp.example>", b"<twice@corp.example>")
    plain = signed.split(b"\r\n", 1)[1]
    recs = []
    for raw, copy, link in ((plain, "received", signed), (signed, "sent", plain)):
        env.archive.put(raw)
        recs.append(MessageRecord(
            hashlib.sha256(raw).hexdigest(), extract(raw), datetime(2024, 7, 6, tzinfo=UTC),
            mail_from="alice@corp.example", rcpt_to=["bob@corp.example"], copy=copy,
            link_sha256=hashlib.sha256(link).hexdigest()))
    env.meta.add_messages(recs)
    alice = login(env, "alice")
    alice.cmd(b"a", b"EXAMINE Sent")
    assert fetch_bodies(alice, b"b", b"FETCH 1:* (BODY.PEEK[])") == [OUT, plain]
    alice.close()
    olga = login(env, "olga")
    olga.cmd(b"a", b'EXAMINE "All Mail"')
    bodies = fetch_bodies(olga, b"b", b"FETCH 1:* (BODY.PEEK[])")
    assert plain in bodies and signed not in bodies
    olga.close()
