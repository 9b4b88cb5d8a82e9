"""``coffer imap``: serve the archive over IMAP; officers' saved searches.

    coffer imap serve [--data-dir DIR | --config FILE] [--listen HOST:PORT]
                      [--tls-cert PEM --tls-key PEM] [--implicit-tls]
                      [--allow-plaintext-loopback] [--domain DOMAIN]...
    coffer imap search-save NAME QUERY...   (a virtual folder "Searches/NAME")
    coffer imap search-list [--json] | search-delete NAME

``serve`` defaults: 127.0.0.1:1143, STARTTLS with the gateway's ``tls.cert``/``tls.key``
when a configuration gives them, the configuration's ``relay.local_domains`` as
officers' Domains/ folders.  Plain LOGIN without TLS only from loopback and only with
``--allow-plaintext-loopback``.  Officers' reads are audited to the metadata database
and the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from archive.cli_common import add_location_arguments
from archive.errors import ArchiveError

EXIT_OK = 0


def register(sub: Any) -> None:
    imap = sub.add_parser("imap", help="IMAP access to the archive",
                          description="Serve the archive over IMAP (read-only).")
    imap_sub = imap.add_subparsers(dest="imap_command", metavar="COMMAND")
    imap_sub.required = True

    p = imap_sub.add_parser("serve", help="run the IMAP server")
    add_location_arguments(p)
    p.add_argument("--listen", default=None, metavar="HOST:PORT",
                   help="default: imap.address of the configuration, else 127.0.0.1:1143")
    p.add_argument("--tls-cert", metavar="PEM")
    p.add_argument("--tls-key", metavar="PEM")
    p.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte (993)")
    p.add_argument("--allow-plaintext-loopback", action="store_true",
                   help="allow LOGIN without TLS from 127.0.0.1/::1 (tests, local tools)")
    p.add_argument("--domain", action="append", default=None, metavar="DOMAIN",
                   help="a Domains/ folder for officers (default: relay.local_domains)")
    p.add_argument("--database", metavar="URL", help="archive metadata database URL")
    p.add_argument("--accounts-database", metavar="URL",
                   help="account database URL (default: imap.accounts_database of the "
                   "configuration, else DATA_DIR/archive/imap.db)")
    p.add_argument("--index", choices=("fts5", "whoosh", "pg"), default=None)
    p.set_defaults(func=run_serve)

    p = imap_sub.add_parser("search-save", help="save a search as a virtual folder")
    p.add_argument("name")
    p.add_argument("query", nargs="+")
    p.add_argument("--officer", metavar="NAME")
    add_location_arguments(p)
    p.add_argument("--accounts-database", metavar="URL")
    p.set_defaults(func=run_search_save)

    p = imap_sub.add_parser("search-list", help="list saved searches")
    p.add_argument("--json", action="store_true")
    add_location_arguments(p)
    p.add_argument("--accounts-database", metavar="URL")
    p.set_defaults(func=run_search_list)

    p = imap_sub.add_parser("search-delete", help="delete a saved search")
    p.add_argument("name")
    add_location_arguments(p)
    p.add_argument("--accounts-database", metavar="URL")
    p.set_defaults(func=run_search_delete)


def _config(args: argparse.Namespace) -> Any:
    from gateway import config

    if getattr(args, "data_dir", None):
        return None
    path = config.find_config(getattr(args, "config", None))
    return config.load(path) if path.exists() else None


def _data_dir(args: argparse.Namespace, cfg: Any) -> Path:
    if getattr(args, "data_dir", None):
        return Path(args.data_dir)
    if cfg is None:
        raise ArchiveError("no configuration found: give --data-dir DIR or --config FILE")
    return Path(cfg.data_dir)


def open_accounts(args: argparse.Namespace, url: str | None,
                  with_upstream: bool = False) -> Any:
    """The account database: ``url`` (a --database option), else --data-dir's default,
    else what the configuration (--config, $COFFER_CONFIG, ./coffer.yaml) names in
    ``imap.accounts_database`` (and ``imap.upstream`` when logins are checked)."""
    from archive.imap.accounts import Accounts

    if url:
        return Accounts(url)
    cfg = _config(args)
    if cfg is None:
        return Accounts.for_data_dir(_data_dir(args, cfg))
    return cfg.imap.open_accounts(Path(cfg.data_dir), cfg.path, with_upstream)


def _accounts(args: argparse.Namespace) -> Any:
    return open_accounts(args, getattr(args, "accounts_database", None))


def run_search_save(args: argparse.Namespace) -> int:
    from archive.metadata import current_officer
    from archive.query import parse

    query = " ".join(args.query)
    parse(query)  # a malformed query fails here, with its column
    accounts = _accounts(args)
    try:
        accounts.save_search(args.name, query, current_officer(args.officer))
    finally:
        accounts.close()
    return EXIT_OK


def run_search_list(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
    try:
        for name, query in accounts.saved_searches():
            print(json.dumps({"name": name, "query": query}) if args.json
                  else f"{name}\t{query}")
    finally:
        accounts.close()
    return EXIT_OK


def run_search_delete(args: argparse.Namespace) -> int:
    accounts = _accounts(args)
    try:
        accounts.delete_search(args.name)
    finally:
        accounts.close()
    return EXIT_OK


def _tls_context(args: argparse.Namespace, cfg: Any) -> ssl.SSLContext | None:
    cert, key = args.tls_cert, args.tls_key
    if cert is None and cfg is not None and cfg.tls.cert and cfg.tls.key:
        cert, key = cfg.path(cfg.tls.cert), cfg.path(cfg.tls.key)
    if cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise ArchiveError(f"{cert}: cannot load the TLS certificate/key: {exc}") from None
    return ctx


def run_serve(args: argparse.Namespace) -> int:
    from archive.imap.archive_backend import ArchiveBackend, ledger_audit_hook
    from archive.imap.config import ImapSection
    from archive.imap.server import ImapServer
    from archive.location import location_from_args

    cfg = _config(args)
    _data_dir(args, cfg)  # a usage error when neither --data-dir nor a config says it
    # The configuration's imap section, with the command line's options over it.
    section: ImapSection = cfg.imap if cfg is not None else ImapSection()
    listen = args.listen or section.address
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ArchiveError(f"--listen {listen!r}: expected HOST:PORT")
    tls = _tls_context(args, cfg)
    implicit = args.implicit_tls or section.tls == "implicit"
    if implicit and tls is None:
        raise ArchiveError("implicit TLS needs a certificate (--tls-cert/--tls-key)")
    domains = args.domain if args.domain is not None else (
        list(cfg.relay.local_domains) if cfg is not None else [])
    loc = location_from_args(args)
    meta = loc.open_metadata()
    archive = loc.open_archive(create=False)
    index = loc.open_index(meta)
    accounts = open_accounts(args, args.accounts_database, with_upstream=True)
    backend = ArchiveBackend(meta, archive, accounts, index, domains,
                             audit_hooks=[ledger_audit_hook(archive)],
                             by_year=section.folders_by_year)
    config = section.server_config(tls)
    config.tls = tls if section.tls != "none" or args.tls_cert else None
    config.host, config.port, config.implicit_tls = host.strip("[]"), int(port), implicit
    config.allow_plaintext_loopback = (args.allow_plaintext_loopback
                                       or section.allow_plaintext_loopback)
    try:
        asyncio.run(_serve(ImapServer(backend, config, section.throttle())))
    finally:
        backend.close()
        accounts.close()
        index.close()
        archive.close()
        meta.close()
    return EXIT_OK


async def _serve(server: Any) -> None:
    await server.start()
    print(f"coffer imap: listening on {server.config.host}:{server.port}", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()
