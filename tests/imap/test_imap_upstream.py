"""Logins checked by an upstream server: Dovecot (../shared/peers/dovecot-imap) and Coffer's
own server over TLS as upstream IMAP, a private slapd as upstream LDAP.  Roles and
addresses come from the account database; an outage answers NO [UNAVAILABLE]."""

from __future__ import annotations

import imaplib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import slapd
from argon2 import PasswordHasher
from imap_helpers import RunningServer, Tls, free_port

from archive.facade import Archive
from archive.imap.accounts import Accounts, Provisioning
from archive.imap.archive_backend import ArchiveBackend
from archive.imap.config import ImapSection
from archive.imap.errors import UpstreamError, UpstreamUnavailable
from archive.imap.server import ImapConfig, LoginThrottle
from archive.imap.upstream import ImapUpstream, LdapUpstream, Upstream
from archive.metadata import AuditEvent, Metadata

CHEAP = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
PEER = Path(__file__).resolve().parents[2].parent / "shared" / "peers" / "dovecot-imap"
PEOPLE_DN = f"uid={{user}},ou=people,{slapd.SUFFIX}"


@dataclass
class Dovecot:
    port: int
    root: Path

    def stop(self) -> None:
        subprocess.run([str(PEER), "stop", str(self.root / "dovecot")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                time.sleep(0.1)
            except OSError:
                return


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """Dovecot with one account, carl / carl-upstream-pw (plain IMAP on loopback)."""
    if shutil.which("dovecot") is None or not PEER.exists():
        pytest.skip("Dovecot (dovecot-imapd) or ../shared/peers/dovecot-imap not available")
    root = Path(tempfile.mkdtemp(prefix="coffer-upstream-"))
    os.chmod(root, 0o755)
    d = Dovecot(free_port(), root)
    with open(root / "start.log", "wb") as log:  # Dovecot daemonises: no pipes
        subprocess.run([str(PEER), "start", str(root / "dovecot"), str(d.port), "carl",
                        "carl-upstream-pw", str(root / "mail")], check=True, stdout=log,
                       stderr=log, timeout=60)
    yield d
    d.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ldap(tmp_path: Path) -> Iterator[slapd.Slapd]:
    missing = slapd.available()
    if missing:
        pytest.skip(f"needs {missing}")
    server = slapd.start(tmp_path / "slapd", {"alice": "alice-ldap-pw", "bob": "bob-ldap-pw"})
    yield server
    server.resume()
    server.stop()


def _accounts(tmp_path: Path, upstream: Upstream,
              provisioning: Provisioning | None = None) -> Accounts:
    return Accounts(f"sqlite:///{tmp_path / 'accounts.db'}", CHEAP, upstream=upstream,
                    provisioning=provisioning)


def _dovecot_upstream(d: Dovecot, timeout: float = 5.0) -> ImapUpstream:
    return ImapUpstream("127.0.0.1", d.port, "none", timeout, allow_plaintext_loopback=True)


# -- upstream IMAP ------------------------------------------------------------------------


def test_dovecot_checks_the_password_and_the_local_account_gives_role_and_addresses(
        dovecot: Dovecot, tmp_path: Path) -> None:
    accounts = _accounts(tmp_path, _dovecot_upstream(dovecot))
    accounts.add("carl", "officer", "carl-local-pw", ["carl@corp.example"])
    p = accounts.authenticate("carl", "carl-upstream-pw")
    assert p is not None and p.role == "officer" and p.addresses == {"carl@corp.example"}
    assert accounts.authenticate("carl", "carl-local-pw") is not None  # local passdb first
    assert accounts.authenticate("carl", "wrong") is None
    assert accounts.authenticate("carl", "") is None
    accounts.set_disabled("carl")
    assert accounts.authenticate("carl", "carl-upstream-pw") is None
    accounts.close()


def test_an_upstream_name_without_local_account_is_refused_unless_provisioned(
        dovecot: Dovecot, tmp_path: Path) -> None:
    accounts = _accounts(tmp_path, _dovecot_upstream(dovecot))
    assert accounts.authenticate("carl", "carl-upstream-pw") is None
    assert accounts.all() == []
    accounts.close()
    accounts = _accounts(tmp_path, _dovecot_upstream(dovecot),
                         Provisioning("{user}@corp.example"))
    assert accounts.authenticate("carl", "wrong") is None
    assert accounts.all() == []  # nothing is created for a refused password
    p = accounts.authenticate("carl", "carl-upstream-pw")
    assert p is not None and p.role == "user" and p.addresses == {"carl@corp.example"}
    assert [a.to_json() for a in accounts.all()] == [
        {"name": "carl", "role": "user", "addresses": ["carl@corp.example"],
         "disabled": False}]
    # The provisioned account has no local password: only the upstream lets it in.
    assert accounts.authenticate("carl", "carl-upstream-pw") is not None
    accounts.close()
    local_only = Accounts(f"sqlite:///{tmp_path / 'accounts.db'}", CHEAP)
    assert local_only.authenticate("carl", "carl-upstream-pw") is None
    local_only.close()


def test_an_upstream_outage_is_unavailable_never_a_login(dovecot: Dovecot,
                                                          tmp_path: Path) -> None:
    accounts = _accounts(tmp_path, _dovecot_upstream(dovecot, timeout=2.0))
    accounts.add("carl", "user", "carl-local-pw", ["carl@corp.example"])
    dovecot.stop()
    for password in ("carl-upstream-pw", "wrong"):
        with pytest.raises(UpstreamUnavailable):
            accounts.authenticate("carl", password)
    # The local password still works: it does not need the upstream.
    assert accounts.authenticate("carl", "carl-local-pw") is not None
    accounts.close()


def test_coffer_over_starttls_and_implicit_tls_as_upstream(server: RunningServer, tls: Tls,
                                                           tmp_path: Path) -> None:
    # The test server (MemoryBackend: alice / alice-pw) offers STARTTLS; its certificate
    # is verified against the test CA, and fails without it.
    up = ImapUpstream("127.0.0.1", server.port, "starttls", 5.0, str(tls.ca_file))
    assert up.check("alice", "alice-pw") is True
    assert up.check("alice", "nope") is False
    with pytest.raises(UpstreamUnavailable):
        ImapUpstream("127.0.0.1", server.port, "starttls", 5.0).check("alice", "alice-pw")
    implicit = RunningServer(server.backend, ImapConfig(port=0, tls=tls.server,
                                                        implicit_tls=True))
    try:
        up = ImapUpstream("127.0.0.1", implicit.port, "implicit", 5.0, str(tls.ca_file))
        assert up.check("alice", "alice-pw") is True
        assert up.check("bob", "alice-pw") is False
    finally:
        implicit.stop()


def test_an_upstream_that_hangs_times_out_as_unavailable(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts, never greets
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        up = ImapUpstream("127.0.0.1", listener.getsockname()[1], "none", 0.5,
                          allow_plaintext_loopback=True)
        with pytest.raises(UpstreamUnavailable):
            up.check("carl", "pw")


def test_plain_upstream_imap_is_refused_off_loopback_or_without_the_setting() -> None:
    with pytest.raises(UpstreamError):
        ImapUpstream("127.0.0.1", 143, "none")
    with pytest.raises(UpstreamError):
        ImapUpstream("192.0.2.1", 143, "none", allow_plaintext_loopback=True)
    with pytest.raises(ValueError, match="loopback"):
        ImapSection.model_validate({"upstream": {"kind": "imap", "address": "192.0.2.1:143",
                                                 "tls": "none",
                                                 "allow_plaintext_loopback": True}})


# -- upstream LDAP -----------------------------------------------------------------------


def test_ldap_bind_dn_template(ldap: slapd.Slapd, tmp_path: Path) -> None:
    up = LdapUpstream(ldap.url, bind_dn=PEOPLE_DN, allow_plaintext_loopback=True, timeout=5)
    assert up.check("alice", "alice-ldap-pw") is True
    assert up.check("alice", "bob-ldap-pw") is False
    assert up.check("alice", "") is False  # not an unauthenticated bind
    assert up.check("nobody", "alice-ldap-pw") is False
    # The name is escaped as an RDN value: it cannot pick another entry.
    assert up.check(f"alice,ou=people,{slapd.SUFFIX}", "alice-ldap-pw") is False
    accounts = _accounts(tmp_path, up)
    accounts.add("alice", "officer", "alice-local-pw", ["alice@corp.example"])
    p = accounts.authenticate("alice", "alice-ldap-pw")
    assert p is not None and p.role == "officer"
    assert accounts.authenticate("bob", "bob-ldap-pw") is None  # no local account
    accounts.close()


def test_ldap_search_for_the_dn(ldap: slapd.Slapd, tmp_path: Path) -> None:
    pw_file = tmp_path / "search.pw"
    pw_file.write_text(slapd.ADMIN_PW + "\n")
    section = ImapSection.model_validate({"upstream": {
        "kind": "ldap", "url": ldap.url, "search_base": f"ou=people,{slapd.SUFFIX}",
        "search_filter": "(&(objectClass=inetOrgPerson)(uid={user}))",
        "search_bind_dn": slapd.ADMIN_DN, "search_bind_password_file": str(pw_file),
        "allow_plaintext_loopback": True, "timeout": "5s",
        "provision_address": "{user}@corp.example"}})
    accounts = section.open_accounts(tmp_path)
    assert accounts.authenticate("bob", "alice-ldap-pw") is None
    p = accounts.authenticate("bob", "bob-ldap-pw")
    assert p is not None and p.role == "user" and p.addresses == {"bob@corp.example"}
    # Filter metacharacters are escaped (RFC 4515): "*" matches no one, not everyone.
    assert accounts.authenticate("*", "bob-ldap-pw") is None
    assert accounts.authenticate("b*", "bob-ldap-pw") is None
    accounts.close()


def test_ldap_outage_and_hang_are_unavailable(ldap: slapd.Slapd, tmp_path: Path) -> None:
    up = LdapUpstream(ldap.url, bind_dn=PEOPLE_DN, allow_plaintext_loopback=True, timeout=1)
    assert up.check("alice", "alice-ldap-pw") is True
    ldap.pause()
    with pytest.raises(UpstreamUnavailable):
        up.check("alice", "alice-ldap-pw")
    ldap.resume()
    ldap.stop()
    with pytest.raises(UpstreamUnavailable):
        up.check("alice", "wrong")


def test_ldap_needs_tls_off_loopback() -> None:
    with pytest.raises(UpstreamError):
        LdapUpstream("ldap://192.0.2.1", bind_dn=PEOPLE_DN, allow_plaintext_loopback=True)
    with pytest.raises(UpstreamError):
        LdapUpstream("ldap://127.0.0.1", bind_dn=PEOPLE_DN)
    LdapUpstream("ldaps://192.0.2.1", bind_dn=PEOPLE_DN)  # no connection is made here
    LdapUpstream("ldap://192.0.2.1", bind_dn=PEOPLE_DN, starttls=True)
    with pytest.raises(UpstreamError):
        LdapUpstream("ldaps://192.0.2.1", bind_dn="cn=fixed")


# -- through the IMAP server --------------------------------------------------------------


def test_imap_login_through_ldap_is_rate_limited_audited_and_unavailable_when_down(
        ldap: slapd.Slapd, tmp_path: Path) -> None:
    archive = Archive.open(tmp_path / "data")
    meta = Metadata.for_data_dir(tmp_path / "data")
    meta.migrate()
    up = LdapUpstream(ldap.url, bind_dn=PEOPLE_DN, allow_plaintext_loopback=True, timeout=2)
    accounts = _accounts(tmp_path, up)
    accounts.add("alice", "officer", "alice-local-pw")
    backend = ArchiveBackend(meta, archive, accounts)
    srv = RunningServer(backend, ImapConfig(port=0, allow_plaintext_loopback=True),
                        LoginThrottle(per_account=2, per_ip=100))
    try:
        with imaplib.IMAP4("127.0.0.1", srv.port) as c:
            c.login("alice", "alice-ldap-pw")
            c.select('"All Mail"', readonly=True)
        with meta.session() as s:
            events = [(e.who, e.action) for e in s.query(AuditEvent)]
        assert ("alice", "imap_select") in events
        for _ in range(2):
            with imaplib.IMAP4("127.0.0.1", srv.port) as c, \
                    pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                c.login("alice", "wrong")
        with imaplib.IMAP4("127.0.0.1", srv.port) as c, \
                pytest.raises(imaplib.IMAP4.error, match=r"UNAVAILABLE.*Too many"):
            c.login("alice", "alice-ldap-pw")  # throttled before the directory is asked
        ldap.stop()
        with imaplib.IMAP4("127.0.0.1", srv.port) as c, \
                pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\] Authentication"):
            c.login("bob", "bob-ldap-pw")
    finally:
        srv.stop()
        backend.close()
        accounts.close()
        archive.close()
        meta.close()
