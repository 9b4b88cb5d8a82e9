"""Passwords checked by an upstream IMAP or LDAP server (``imap.upstream`` in coffer.yaml).

Only the password is checked upstream: who a user is in Coffer (role, addresses)
still comes from the account database (archive.imap.accounts), which maps the
upstream-authenticated name to a local account or, when configured, creates one.

Each check answers True (the upstream accepted the password), False (it refused
it) or raises :class:`UpstreamUnavailable` (it could not be asked: refused
connection, timeout, TLS failure, a server answering ``NO [UNAVAILABLE]``).  An
outage is never taken as a yes; the IMAP server answers it ``NO [UNAVAILABLE]``
(RFC 5530 §3) so clients retry instead of asking the user for a new password.

* IMAP: LOGIN (RFC 3501 §6.2.3) over implicit TLS or STARTTLS, certificate and host
  name verified; plain only for a loopback server and only when the configuration
  says so (tests against a local Dovecot).
* LDAP: a simple bind (RFC 4513 §5.1.3) as the user's DN, built from a template
  (``uid={user},ou=people,dc=corp,dc=example``, the name escaped as an RDN value,
  RFC 4514 §2.4) or found by a search under a service account (the name escaped in
  the filter, RFC 4515 §3).  An empty password is refused before asking: a simple
  bind with a DN and no password is an *unauthenticated* bind that directories
  answer with success (RFC 4513 §5.1.2).  ldap3 (pure Python) rather than Debian's
  ``ldapwhoami``: no process per login, the password never on a command line or in a
  temporary file, and result codes rather than parsed messages.
"""

from __future__ import annotations

import contextlib
import imaplib
import ipaddress
import math
import re
import ssl
import warnings
from typing import Any, Literal, Protocol

from archive.imap.errors import UpstreamError, UpstreamUnavailable

__all__ = ["ImapUpstream", "LdapUpstream", "Upstream", "UpstreamUnavailable"]


class Upstream(Protocol):
    """Checks a name and password; blocking (the IMAP server calls it in a thread)."""

    def check(self, name: str, password: str) -> bool: ...


def _ldap3() -> Any:
    """ldap3, imported on first use (only LDAP sites need it).  ldap3 2.9 uses names that
    pyasn1 >= 0.6 deprecates; the warning is about ldap3's source, not our use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=r"(tagMap|typeMap) is deprecated")
        import ldap3
        import ldap3.utils.conv
        import ldap3.utils.dn

    return ldap3


def _close(conn: Any) -> None:
    """Unbind, and close the socket ldap3 leaves open when its connect() failed."""
    with contextlib.suppress(Exception):
        conn.unbind()
    sock = getattr(conn, "socket", None)
    if sock is not None:
        sock.close()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _client_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


_UNAVAILABLE = re.compile(rb"\[(UNAVAILABLE|SERVERBUG|INUSE|LIMIT)\]", re.IGNORECASE)


class ImapUpstream:
    """LOGIN against an upstream IMAP server; one connection per check, then LOGOUT."""

    def __init__(self, host: str, port: int,
                 tls: Literal["implicit", "starttls", "none"] = "implicit",
                 timeout: float = 10.0, ca_file: str | None = None,
                 allow_plaintext_loopback: bool = False) -> None:
        if tls == "none" and not (allow_plaintext_loopback and is_loopback(host)):
            raise UpstreamError(
                "an upstream IMAP server without TLS is only allowed on loopback with "
                "allow_plaintext_loopback")
        self.host, self.port, self.tls, self.timeout = host, port, tls, timeout
        self.context = _client_context(ca_file) if tls != "none" else None

    def _connect(self) -> imaplib.IMAP4:
        if self.tls == "implicit":
            return imaplib.IMAP4_SSL(self.host, self.port, ssl_context=self.context,
                                     timeout=self.timeout)
        conn = imaplib.IMAP4(self.host, self.port, timeout=self.timeout)
        if self.tls == "starttls":
            conn.starttls(self.context)
        return conn

    def check(self, name: str, password: str) -> bool:
        if not password:
            return False
        try:
            conn = self._connect()
        except (OSError, ssl.SSLError, imaplib.IMAP4.error) as exc:
            raise UpstreamUnavailable(f"upstream IMAP {self.host}:{self.port}: {exc}") \
                from None
        try:
            if "LOGINDISABLED" in conn.capabilities:
                raise UpstreamUnavailable(f"upstream IMAP {self.host}:{self.port} refuses "
                                          "LOGIN on this connection (LOGINDISABLED)")
            try:
                conn.login(name, password)
            except imaplib.IMAP4.abort as exc:
                raise UpstreamUnavailable(f"upstream IMAP: {exc}") from None
            except imaplib.IMAP4.error as exc:
                # NO [AUTHENTICATIONFAILED] is a wrong password; NO [UNAVAILABLE] and its
                # kin (RFC 5530) are the upstream's own trouble, not an answer.
                if _UNAVAILABLE.search(str(exc).encode()):
                    raise UpstreamUnavailable(f"upstream IMAP: {exc}") from None
                return False
            return True
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamUnavailable(f"upstream IMAP {self.host}:{self.port}: {exc}") \
                from None
        finally:
            with contextlib.suppress(OSError, imaplib.IMAP4.error):
                conn.logout()


class LdapUpstream:
    """A simple bind as the user's DN (from ``bind_dn`` or found by a search)."""

    def __init__(self, url: str, *, bind_dn: str | None = None,
                 search_base: str | None = None, search_filter: str = "(uid={user})",
                 search_bind_dn: str | None = None, search_bind_password: str | None = None,
                 starttls: bool = False, timeout: float = 10.0, ca_file: str | None = None,
                 allow_plaintext_loopback: bool = False) -> None:
        ldap3 = _ldap3()
        if (bind_dn is None) == (search_base is None):
            raise UpstreamError("upstream LDAP: give bind_dn or search_base (one)")
        if bind_dn is not None and "{user}" not in bind_dn:
            raise UpstreamError("upstream LDAP: bind_dn must contain {user}")
        if "{user}" not in search_filter:
            raise UpstreamError("upstream LDAP: search_filter must contain {user}")
        m = re.fullmatch(r"(ldaps?)://(\[[^\]]+\]|[^:/]+)(?::(\d+))?/?", url)
        if m is None:
            raise UpstreamError(f"upstream LDAP: bad url {url!r} "
                                      "(ldap://HOST[:PORT] or ldaps://HOST[:PORT])")
        secure = m.group(1) == "ldaps"
        host = m.group(2).strip("[]")
        if not secure and not starttls and not (allow_plaintext_loopback and is_loopback(host)):
            raise UpstreamError(
                "an upstream LDAP server without TLS (ldaps:// or starttls) is only allowed "
                "on loopback with allow_plaintext_loopback")
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file,
                        version=ssl.PROTOCOL_TLS_CLIENT) if secure or starttls else None
        self.server = ldap3.Server(host, port=int(m.group(3)) if m.group(3) else None,
                                   use_ssl=secure, tls=tls, connect_timeout=timeout,
                                   get_info=ldap3.NONE)
        self.url, self.starttls, self.timeout = url, starttls, timeout
        self.bind_dn, self.search_base, self.search_filter = bind_dn, search_base, search_filter
        self.search_bind_dn, self.search_bind_password = search_bind_dn, search_bind_password

    def _bind(self, dn: str | None, password: str | None) -> tuple[bool, object]:
        """(bound, connection); raises UpstreamUnavailable when the server cannot say."""
        ldap3 = _ldap3()
        # ldap3 packs the receive timeout into SO_RCVTIMEO as whole seconds.
        conn = ldap3.Connection(self.server, user=dn, password=password,
                                receive_timeout=max(1, math.ceil(self.timeout)),
                                raise_exceptions=False, auto_referrals=False)
        try:
            conn.open()
            if self.starttls and not conn.start_tls():
                raise UpstreamUnavailable(f"upstream LDAP {self.url}: StartTLS failed "
                                          f"({conn.result})")
            ok = bool(conn.bind())
        except UpstreamUnavailable:
            _close(conn)
            raise
        except Exception as exc:  # whatever fails, fail closed: no login
            _close(conn)
            raise UpstreamUnavailable(f"upstream LDAP {self.url}: {exc}") from None
        if not ok:
            code = (conn.result or {}).get("result")
            conn.unbind()
            # 49 invalidCredentials (RFC 4511 §4.1.9) is the only "no"; 50-53 (busy,
            # unavailable, unwilling) and the rest are the directory's trouble.
            if code == 49:
                return False, None
            raise UpstreamUnavailable(f"upstream LDAP {self.url}: bind answered {code} "
                                      f"{(conn.result or {}).get('description')}")
        return True, conn

    def _find_dn(self, name: str) -> str | None:
        ldap3 = _ldap3()
        ok, conn = self._bind(self.search_bind_dn, self.search_bind_password)
        if not ok:
            raise UpstreamUnavailable(f"upstream LDAP {self.url}: the search account's "
                                      "bind was refused")
        assert self.search_base is not None
        try:
            query = self.search_filter.replace(
                "{user}", ldap3.utils.conv.escape_filter_chars(name))
            found = conn.search(self.search_base, query,  # type: ignore[attr-defined]
                                attributes=[], size_limit=2,
                                time_limit=max(1, math.ceil(self.timeout)))
            entries = list(conn.response or []) if found else []  # type: ignore[attr-defined]
        except ldap3.core.exceptions.LDAPException as exc:
            raise UpstreamUnavailable(f"upstream LDAP {self.url}: {exc}") from None
        finally:
            conn.unbind()  # type: ignore[attr-defined]
        dns = [e["dn"] for e in entries if e.get("type") == "searchResEntry"]
        return dns[0] if len(dns) == 1 else None  # none or ambiguous: not this user

    def check(self, name: str, password: str) -> bool:
        if not password:
            return False  # an empty password would be an unauthenticated bind
        if self.bind_dn is not None:
            dn: str | None = self.bind_dn.replace("{user}", _ldap3().utils.dn.escape_rdn(name))
        else:
            dn = self._find_dn(name)
            if dn is None:
                return False
        ok, conn = self._bind(dn, password)
        if ok:
            conn.unbind()  # type: ignore[attr-defined]
        return ok
