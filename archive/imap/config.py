"""The ``imap:`` section of coffer.yaml (gateway.config.Config holds it as ``imap``).

    imap:
      enabled: true                     # coffer serve runs the IMAP server (worker 0)
      address: "127.0.0.1:1143"
      tls: starttls                     # starttls | implicit (993 role) | none
      allow_plaintext_loopback: false   # LOGIN without TLS from 127.0.0.1/::1 only
      select_read_only: true            # SELECT answers [READ-ONLY]
      accounts_database: null           # default: sqlite DATA_DIR/archive/imap.db
      domains: null                     # officers' Domains/ folders; default relay.local_domains
      idle_timeout: 30m
      upstream:                         # optional: passwords checked by another server
        kind: ldap                      # imap | ldap
        url: "ldaps://ldap.corp.example"
        bind_dn: "uid={user},ou=people,dc=corp,dc=example"
        provision_address: "{user}@corp.example"   # create unknown users (role user)
      ...

TLS uses the gateway's ``tls.cert`` / ``tls.key``.  With ``starttls`` and no
certificate configured, STARTTLS is simply not offered (and LOGIN stays disabled
unless ``allow_plaintext_loopback`` lets a loopback client in): credentials never
cross the network in clear.  ``implicit`` without a certificate is a configuration
error (gateway.preflight).

The model is pure settings; :meth:`ImapSection.server_config` maps it onto the
server's own :class:`archive.imap.server.ImapConfig` dataclass, which ``coffer imap
serve`` also builds from its command line.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from archive.imap.errors import UpstreamError
from archive.imap.server import ImapConfig, LoginThrottle

if TYPE_CHECKING:  # imported where used: gateway.config (every command) imports this module,
    # and the account store pulls in SQLAlchemy, the upstream clients ldap3.
    from archive.imap.accounts import Accounts
    from archive.imap.upstream import Upstream

__all__ = ["ImapSection", "UpstreamSection"]


# gateway.config imports this module, so its parsers are looked up when a value is
# validated, not when this module is imported.  The names matter:
# scripts/gen-config-doc.py recognises durations and sizes by them.
def parse_duration(value: Any) -> float:
    from gateway.config import parse_duration as parse

    return parse(value)


def parse_size(value: Any) -> int:
    from gateway.config import parse_size as parse

    return parse(value)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


class _Model(BaseModel):
    # the same rules as gateway.config._Model (not imported: gateway.config imports us)
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamSection(_Model):
    """Check IMAP passwords against an upstream IMAP server (LOGIN) or LDAP directory (simple
    bind). Roles and addresses still come from `coffer users`; an account's local password,
    when it has one, is tried first. An upstream outage answers NO [UNAVAILABLE], never a
    login."""

    kind: Literal["imap", "ldap"] = Field(description="imap (LOGIN) or ldap (simple bind)")
    address: str | None = Field(
        None, description="imap: host:port of the upstream server (default port 993, or 143 "
        "with starttls/none)",
    )
    tls: Literal["implicit", "starttls", "none"] = Field(
        "implicit", description="imap: implicit TLS, STARTTLS, or none (loopback only, with "
        "allow_plaintext_loopback)",
    )
    url: str | None = Field(None, description="ldap: ldaps://host[:port] or ldap://host[:port]")
    starttls: bool = Field(False, description="ldap: StartTLS on an ldap:// connection")
    bind_dn: str | None = Field(
        None, description="ldap: the user's DN, {user} replaced by the login name (escaped)"
    )
    search_base: str | None = Field(
        None, description="ldap: find the user's DN by a search under this base instead"
    )
    search_filter: str = Field(
        "(uid={user})", description="ldap: the search filter, {user} replaced (escaped)"
    )
    search_bind_dn: str | None = Field(
        None, description="ldap: the account the search binds as (default anonymous)"
    )
    search_bind_password_file: Path | None = Field(
        None, description="ldap: file holding that account's password (relative to data_dir)"
    )
    ca_file: Path | None = Field(
        None, description="CA certificates (PEM) to verify the upstream's certificate "
        "(default: the system's; relative to data_dir)",
    )
    timeout: Duration = Field(10.0, gt=0, description="Connect and answer timeout")
    allow_plaintext_loopback: bool = Field(
        False, description="Allow a server without TLS when it is on 127.0.0.1/::1 (tests)"
    )
    provision_address: str | None = Field(
        None, description="Create an upstream-authenticated name with no local account as a "
        "user with this address ({user} replaced, e.g. \"{user}@corp.example\"); unset: "
        "such names are refused",
    )

    @model_validator(mode="after")
    def _complete(self) -> UpstreamSection:
        if self.kind == "imap" and not self.address:
            raise ValueError("kind imap needs address")
        if self.kind == "ldap" and not self.url:
            raise ValueError("kind ldap needs url")
        if self.provision_address is not None and "@" not in self.provision_address:
            raise ValueError("provision_address must be an address template")
        try:
            self.build(secrets=False)  # the checkers' own rules (TLS, bind_dn, url)
        except UpstreamError as exc:
            raise ValueError(str(exc)) from None
        return self

    def build(self, resolve: Callable[[Path], Path] = Path, secrets: bool = True) -> Upstream:
        from archive.imap.upstream import ImapUpstream, LdapUpstream
        """The upstream checker; ``resolve`` makes configured paths absolute; without
        ``secrets`` the search password file is not read (validation)."""
        ca = str(resolve(self.ca_file)) if self.ca_file else None
        if self.kind == "imap":
            from gateway.config import parse_hostport

            assert self.address is not None
            host, port = parse_hostport(self.address, 993 if self.tls == "implicit" else 143)
            return ImapUpstream(host, port, self.tls, self.timeout, ca,
                                self.allow_plaintext_loopback)
        password = None
        if self.search_bind_password_file is not None and secrets:
            path = resolve(self.search_bind_password_file)
            try:
                password = path.read_text().strip("\r\n")
            except OSError as exc:
                raise UpstreamError(f"imap.upstream.search_bind_password_file: {exc}") \
                    from None
        assert self.url is not None
        return LdapUpstream(self.url, bind_dn=self.bind_dn, search_base=self.search_base,
                            search_filter=self.search_filter,
                            search_bind_dn=self.search_bind_dn,
                            search_bind_password=password, starttls=self.starttls,
                            timeout=self.timeout, ca_file=ca,
                            allow_plaintext_loopback=self.allow_plaintext_loopback)


class ImapSection(_Model):
    """Read-only IMAP4rev1 access to the archive (RFC 3501), run by `coffer serve` in worker 0.
    Accounts are managed with `coffer users`; TLS uses tls.cert and tls.key. A change needs
    a restart."""

    enabled: bool = Field(True, description="Serve the archive over IMAP from coffer serve")
    address: str = Field("127.0.0.1:1143", description="host:port to listen on")
    tls: Literal["starttls", "implicit", "none"] = Field(
        "starttls", description="STARTTLS offered (when tls.cert/key are set), implicit TLS "
        "(port 993 role) or none",
    )
    allow_plaintext_loopback: bool = Field(
        False, description="Allow LOGIN/AUTHENTICATE without TLS from 127.0.0.1/::1 only "
        "(coffer init sets it for local tools)",
    )
    select_read_only: bool = Field(
        True, description="SELECT answers [READ-ONLY]; false answers [READ-WRITE] for clients "
        "(Python imaplib) that refuse read-only folders (only private flags change)",
    )
    accounts_database: str | None = Field(
        None, description="SQLAlchemy URL of the account database (default: sqlite "
        "DATA_DIR/archive/imap.db); `coffer users` and `coffer imap` use it with --config",
    )
    upstream: UpstreamSection | None = Field(
        None, description="Check passwords against an upstream IMAP or LDAP server"
    )
    folders_by_year: bool = Field(
        False, description="Users also see INBOX/<year> and Sent/<year> (by archive date, "
        "UTC) beside INBOX and Sent",
    )
    domains: list[str] | None = Field(
        None, description="Domains/ folders shown to officers (default: relay.local_domains)"
    )
    idle_timeout: Duration = Field(
        1800.0, ge=1800, description="Autologout of an idle session (RFC 3501 §5.4: at "
        "least 30 minutes)",
    )
    login_timeout: Duration = Field(60.0, gt=0, description="Time to log in before BYE")
    idle_poll: Duration = Field(
        30.0, gt=0, description="IDLE re-checks the selected folder this often"
    )
    max_sessions: int = Field(1000, ge=1, description="Concurrent IMAP sessions")
    max_line: Size = Field(65536, ge=1024, description="Longest command line")
    max_literal: Size = Field(
        1048576, ge=1024, description="Largest literal (a larger one is refused, RFC 7888 §4)"
    )
    max_command: Size = Field(
        4194304, ge=1024, description="Largest command including its literals"
    )
    max_login_failures_per_account: int = Field(
        5, ge=1, description="Failed logins per account within login_failure_window"
    )
    max_login_failures_per_ip: int = Field(
        20, ge=1, description="Failed logins per client IP within login_failure_window"
    )
    login_failure_window: Duration = Field(
        300.0, gt=0, description="Sliding window of the failed-login limits"
    )

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        from gateway.config import parse_hostport

        parse_hostport(value, 1143)
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        from gateway.config import parse_hostport

        return parse_hostport(self.address, 1143)

    def server_config(self, tls: ssl.SSLContext | None) -> ImapConfig:
        """The server's settings; ``tls`` is the gateway's certificate, or None."""
        host, port = self.host_port
        return ImapConfig(
            host=host, port=port,
            tls=tls if self.tls != "none" else None,
            implicit_tls=self.tls == "implicit",
            allow_plaintext_loopback=self.allow_plaintext_loopback,
            max_line=self.max_line, max_literal=self.max_literal,
            max_command=self.max_command, idle_timeout=self.idle_timeout,
            login_timeout=self.login_timeout, idle_poll=self.idle_poll,
            max_sessions=self.max_sessions, select_read_only=self.select_read_only,
        )

    def open_accounts(self, data_dir: Path, resolve: Callable[[Path], Path] = Path,
                      with_upstream: bool = True) -> Accounts:
        """The account database this section names, with its upstream checker (not for
        account management: ``with_upstream=False`` reads no upstream secret)."""
        from archive.imap.accounts import Accounts, Provisioning

        up = self.upstream if with_upstream else None
        upstream = up.build(resolve) if up is not None else None
        provisioning = (Provisioning(up.provision_address)
                        if up is not None and up.provision_address else None)
        if self.accounts_database:
            return Accounts(self.accounts_database, upstream=upstream,
                            provisioning=provisioning)
        return Accounts.for_data_dir(data_dir, upstream=upstream, provisioning=provisioning)

    def throttle(self) -> LoginThrottle:
        return LoginThrottle(per_account=self.max_login_failures_per_account,
                             per_ip=self.max_login_failures_per_ip,
                             window=self.login_failure_window)
