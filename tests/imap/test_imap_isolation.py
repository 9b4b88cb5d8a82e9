"""Isolation and audit: a user cannot reach another user's mail by any command, UID or
sequence trick; an officer's every SELECT, body FETCH and SEARCH is audited."""

from __future__ import annotations

from imap_helpers import RunningServer
from test_imap_clients import Raw

from archive.imap.backend import MemoryBackend

SECRET_MARK = b"xyzzy"


def _session(server: RunningServer, user: str) -> Raw:
    raw = Raw(server.port)
    assert raw.cmd(b"l", b"LOGIN %s %s-pw" % (user.encode(), user.encode()))[-1].startswith(
        b"l OK")
    return raw


def test_user_cannot_reach_another_users_mail(server: RunningServer) -> None:
    raw = _session(server, "alice")
    seen: list[bytes] = []

    def cmd(text: bytes) -> bytes:
        lines = raw.cmd(b"t", text)
        seen.extend(lines)
        return lines[-1]

    for name in (b"mallory/INBOX", b"../mallory/INBOX", b'"Other Users/mallory"',
                 b"#shared/mallory", b'"All Mail"', b"~mallory", b"MALLORY"):
        assert cmd(b"SELECT " + name).startswith(b"t NO [NONEXISTENT]"), name
        assert cmd(b"STATUS " + name + b" (MESSAGES)").startswith(b"t NO"), name
        assert cmd(b"EXAMINE " + name).startswith(b"t NO"), name
    cmd(b'LIST "" "*"')
    cmd(b'LIST "mallory" "*"')
    cmd(b'LSUB "" "*"')
    assert not any(b"mallory" in ln.lower() or b"All Mail" in ln for ln in seen
                   if ln.startswith(b"* LIST") or ln.startswith(b"* LSUB"))
    assert cmd(b"EXAMINE INBOX").startswith(b"t OK")
    # UIDs and sequence numbers beyond the folder, and sets with "*", give nothing else.
    for text in (b"UID FETCH 1:* (BODY.PEEK[])", b"UID FETCH 3:4294967295 (BODY.PEEK[])",
                 b"UID FETCH 4 (BODY.PEEK[])", b"FETCH 1:* (BODY.PEEK[])",
                 b"FETCH *:1 (RFC822)", b"FETCH 3 (BODY.PEEK[])", b"FETCH 4:* (FLAGS)",
                 b"UID SEARCH TEXT xyzzy", b"SEARCH BODY xyzzy", b"SEARCH FROM mallory",
                 b"UID SEARCH UID 1:*", b"UID STORE 4 +FLAGS (\\Seen)",
                 b"COPY 1:* INBOX"):
        cmd(text)
    assert not any(SECRET_MARK in ln for ln in seen)
    assert b"* SEARCH" in seen  # the searches answered, with no results
    fetched_uids = {ln.split(b"UID ")[1].split(b" ")[0] for ln in seen
                    if ln.startswith(b"* ") and b"FETCH (UID" in ln}
    assert fetched_uids <= {b"1", b"2"}
    raw.close()


def test_officer_reads_are_audited_and_user_reads_are_not(server: RunningServer,
                                                          mem_backend: MemoryBackend) -> None:
    raw = _session(server, "olga")
    assert raw.cmd(b"a", b'SELECT "All Mail"')[-1].startswith(b"a OK")
    raw.cmd(b"b", b"FETCH 1:* (FLAGS ENVELOPE)")  # no body: not a read of content
    raw.cmd(b"c", b"UID FETCH 3 (BODY.PEEK[TEXT])")
    raw.cmd(b"d", b"SEARCH TEXT xyzzy")
    raw.close()
    user = _session(server, "alice")
    user.cmd(b"a", b"EXAMINE INBOX")
    user.cmd(b"b", b"FETCH 1 (BODY.PEEK[])")
    user.close()
    log = mem_backend.audit_log
    assert [(who, action) for who, action, _ in log] == [
        ("olga", "imap_select"), ("olga", "imap_fetch"), ("olga", "imap_search")]
    assert log[1][2]["uids"] == [3]
    assert log[2][2]["count"] == 1 and "xyzzy" in str(log[2][2]["query"])
