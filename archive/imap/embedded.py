"""The IMAP server inside ``coffer serve``: the ``imap:`` section, over the running archive.

``coffer serve`` starts it after the SMTP listeners (in worker 0 only when
``queue.workers`` > 1: one IMAP port per node) and closes it while draining.  It
reads through the archive stage's own :class:`archive.facade.Archive` and
:class:`archive.metadata.Metadata` rather than opening them a second time: a
second ``Archive.open`` would run the ledger and store recovery under a writer
that is already appending.  It opens only what is its own: the account database
and a reader of the full-text index.  ``coffer imap serve`` is the stand-alone
equivalent (its own process, for a node that does not relay).
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from archive.facade import Archive
from archive.imap.accounts import Accounts
from archive.imap.archive_backend import ArchiveBackend, ledger_audit_hook
from archive.imap.errors import UpstreamError
from archive.imap.server import ImapServer
from archive.index import Index
from archive.location import location_from_config
from archive.metadata import Metadata
from gateway import log
from gateway.config import Config
from gateway.errors import ConfigError

__all__ = ["EmbeddedImap", "tls_context"]


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """A server context from the gateway's ``tls.cert``/``tls.key``; None when unset."""
    if not (cfg.tls.cert and cfg.tls.key):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cfg.path(cfg.tls.cert)), str(cfg.path(cfg.tls.key)))
    except (OSError, ssl.SSLError) as exc:  # preflight loaded it; the file changed since
        raise ConfigError(f"cannot load the TLS certificate/key: {exc}", file=cfg.source,
                          key="tls.cert") from None
    return ctx


class EmbeddedImap:
    """``await EmbeddedImap.start(cfg, archive, meta)`` ... ``await embedded.close()``."""

    def __init__(self, server: ImapServer, backend: ArchiveBackend, accounts: Accounts,
                 index: Index) -> None:
        self.server = server
        self.backend = backend
        self.accounts = accounts
        self.index = index

    @classmethod
    async def start(cls, cfg: Config, archive: Archive, meta: Metadata) -> EmbeddedImap:
        """Open the accounts and the index, listen; on any failure close what was opened."""
        section = cfg.imap
        tls = tls_context(cfg) if section.tls != "none" else None
        if section.tls == "implicit" and tls is None:
            raise ConfigError("implicit TLS needs tls.cert and tls.key", file=cfg.source,
                              key="imap.tls")
        if section.tls == "starttls" and tls is None:
            log.event("imap_tls_unavailable", level=logging.WARNING,
                      detail="tls.cert/tls.key are not set: STARTTLS is not offered and "
                      "LOGIN is refused except as allow_plaintext_loopback permits")
        try:
            accounts = section.open_accounts(Path(cfg.data_dir), cfg.path)
        except UpstreamError as exc:
            raise ConfigError(str(exc), file=cfg.source, key="imap.upstream") from None
        index: Index | None = None
        backend: ArchiveBackend | None = None
        try:
            index = location_from_config(cfg).open_index(meta)
            domains = (section.domains if section.domains is not None
                       else cfg.relay.local_domains)
            backend = ArchiveBackend(meta, archive, accounts, index, domains,
                                     audit_hooks=[ledger_audit_hook(archive)],
                                     by_year=section.folders_by_year)
            server = ImapServer(backend, section.server_config(tls), section.throttle())
            await server.start()
        except BaseException:
            if backend is not None:
                backend.close()
            if index is not None:
                index.close()
            accounts.close()
            raise
        host, _ = section.host_port
        log.event("imap_listening", address=f"{host}:{server.port}", tls=section.tls,
                  starttls=tls is not None and section.tls == "starttls",
                  plaintext_loopback=section.allow_plaintext_loopback)
        return cls(server, backend, accounts, index)

    async def close(self) -> None:
        """Stop listening, end the sessions, stop the poller; the archive is the caller's."""
        await self.server.close()
        self.backend.close()
        self.index.close()
        self.accounts.close()
