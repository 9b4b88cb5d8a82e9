"""``coffer keys import|list|show|remove``: the encryption gateway's key store.

``import FILE`` takes OpenPGP keys (public, or the organisation's secret keys),
X.509 certificates (PEM or DER) and PKCS#12 files (the organisation's own
S/MIME keys: stored encrypted with ``crypto.passphrase_file``).  ``--for``
binds the imported keys to an address or a whole domain; ``--capabilities``
records what an S/MIME correspondent can decrypt (RFC 8551 §2.5.2 names, e.g.
``aes256-gcm,aes256-cbc``), which otherwise is learned from the signed mail they
send.  ``list`` and ``show`` report every key with its status: expired, revoked or
otherwise unusable keys are listed, and never used; ``show`` prints the
capabilities recorded for a certificate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway import config
from gateway.cli import config_options
from gateway.errors import ConfigError
from gateway.transform import smime_caps
from gateway.transform.config import CryptoConfig
from gateway.transform.errors import CryptoError
from gateway.transform.keystore import KeyInfo, KeyStore

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


def register(sub: Any) -> None:
    common = config_options()

    p = sub.add_parser("keys", help="manage encryption keys and certificates",
                       description="Import, list, show and remove OpenPGP keys and S/MIME "
                       "certificates used by the encryption gateway.")
    ksub = p.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND")
    ksub.required = True

    imp = ksub.add_parser("import", parents=[common],
                          help="import OpenPGP keys, an X.509 certificate or a PKCS#12 file")
    imp.add_argument("file", metavar="FILE", type=Path)
    imp.add_argument("--for", dest="bind", metavar="ADDRESS|DOMAIN",
                     help="use these keys for this address or every address of this domain")
    imp.add_argument("--password-file", type=Path, metavar="FILE",
                     help="file holding the PKCS#12 file's password")
    imp.add_argument("--capabilities", metavar="LIST",
                     help="what the certificate's holder decrypts, most preferred first "
                     f"(comma-separated: {', '.join(smime_caps.CAPABILITIES)}); kept over "
                     "what their signed mail announces")
    imp.set_defaults(func=cmd_import)

    ls = ksub.add_parser("list", parents=[common], help="list keys with their status")
    ls.set_defaults(func=cmd_list)

    show = ksub.add_parser("show", parents=[common],
                           help="keys by id (or prefix), address or domain")
    show.add_argument("query", metavar="ID|ADDRESS|DOMAIN")
    show.set_defaults(func=cmd_show)

    rm = ksub.add_parser("remove", parents=[common], help="remove a key by its full id")
    rm.add_argument("key_id", metavar="ID")
    rm.set_defaults(func=cmd_remove)


def _open(args: argparse.Namespace) -> KeyStore:
    cfg = config.load(config.find_config(args.config))
    crypto = getattr(cfg, "crypto", None)
    if not isinstance(crypto, CryptoConfig):
        crypto = CryptoConfig()
    try:
        return KeyStore.open(cfg.data_dir, crypto)
    except CryptoError as exc:
        raise ConfigError(str(exc), file=cfg.source, key="crypto") from None


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False, sort_keys=True))


def _line(k: KeyInfo) -> str:
    who = ", ".join(k.addresses + [f"for {b}" for b in k.bound_to]) or k.subject
    priv = " +private" if k.private else ""
    return f"{k.kind:5} {k.id[:40]:40} {k.status:28} {k.expires or 'never':20} {who}{priv}"


def _print(keys: list[KeyInfo], as_json: bool) -> None:
    if as_json:
        for k in keys:
            _emit(k.to_dict())
        return
    for k in keys:
        print(_line(k))


def cmd_import(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        password = None
        if args.password_file is not None:
            try:
                password = args.password_file.read_bytes().rstrip(b"\r\n")
            except OSError as exc:
                print(f"coffer: {args.password_file}: {exc.strerror}", file=sys.stderr)
                return EXIT_USAGE
        try:
            caps = smime_caps.parse_list(args.capabilities) \
                if args.capabilities is not None else None
        except CryptoError as exc:
            print(f"coffer: --capabilities: {exc}", file=sys.stderr)
            return EXIT_USAGE
        try:
            ids = store.import_file(args.file, bind=args.bind, password=password,
                                    capabilities=caps)
        except CryptoError as exc:
            print(f"coffer: {exc}", file=sys.stderr)
            return EXIT_PROBLEM
        keys = [k for k in store.list_keys() if k.id in ids]
        _print(keys, args.json)
        unusable = [k for k in keys if k.problem]
        for k in unusable:
            print(f"coffer: warning: {k.kind} key {k.id} is not usable: {k.problem}",
                  file=sys.stderr)
        return EXIT_PROBLEM if unusable and len(unusable) == len(keys) else EXIT_OK
    finally:
        store.close()


def cmd_list(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        keys = store.list_keys()
    except CryptoError as exc:
        print(f"coffer: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    finally:
        store.close()
    if not keys and not args.json:
        print("no keys")
    _print(keys, args.json)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        keys = store.find(args.query)
    except CryptoError as exc:
        print(f"coffer: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    finally:
        store.close()
    if not keys:
        print(f"coffer: no key matches {args.query}", file=sys.stderr)
        return EXIT_PROBLEM
    if args.json:
        _print(keys, True)
        return EXIT_OK
    for k in keys:
        for name, value in k.to_dict().items():
            if isinstance(value, list):
                value = ", ".join(value) or "-"
            print(f"{name:20} {value}")
        print()
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    store = _open(args)
    try:
        k = store.remove(args.key_id)
    except CryptoError as exc:
        print(f"coffer: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    finally:
        store.close()
    if args.json:
        _emit({"removed": k.id, "kind": k.kind})
    else:
        print(f"removed {k.kind} key {k.id}")
    return EXIT_OK
