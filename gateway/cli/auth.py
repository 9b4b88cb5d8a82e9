"""``coffer auth check`` and ``coffer dkim keygen``: sender authentication by hand.

``coffer auth check MESSAGE.eml --ip IP --helo NAME --mail-from ADDRESS [--json]
[--dns HOST:PORT]`` runs the check stage on one message as if it had arrived from
IP, and prints the SPF, DKIM (each signature), DMARC and ARC verdicts and the
Authentication-Results header Coffer would add.  It is how an operator debugs a
complaint, and how tests and benchmarks drive the stage without SMTP.  The exit
code is 0 whatever the verdicts are (they are the answer, not an error).

``coffer dkim keygen DOMAIN SELECTOR [--ed25519] [--out DIR]`` writes a new private
key (mode 0600, never over an existing file) and prints the DNS TXT record to
publish.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from gateway import config
from gateway.check.dns import parse_nameserver
from gateway.check.stage import CheckStage
from gateway.check.verdicts import Verdicts
from gateway.envelope import Envelope
from gateway.transform.dkim_sign import generate_key, public_record

EXIT_OK = 0
EXIT_USAGE = 2


def register(sub: Any) -> None:
    auth = sub.add_parser("auth", help="sender authentication (SPF, DKIM, DMARC, ARC)")
    auth_sub = auth.add_subparsers(dest="auth_command", metavar="COMMAND")
    auth_sub.required = True
    p = auth_sub.add_parser(
        "check", help="check one message as if it had arrived over SMTP",
        description="Run SPF, DKIM, DMARC and ARC on MESSAGE with the configured resolver "
        "and print the verdicts and the Authentication-Results header Coffer would add.",
    )
    p.add_argument("message", metavar="MESSAGE.eml", help="the message file ('-': stdin)")
    p.add_argument("--ip", required=True, help="the client IP address the message came from")
    p.add_argument("--helo", default="", help="the HELO/EHLO name the client gave")
    p.add_argument("--mail-from", required=True, dest="mail_from", metavar="ADDRESS",
                   help="the MAIL FROM address ('' for the null sender)")
    p.add_argument("--dns", metavar="HOST:PORT", action="append",
                   help="nameserver to ask instead of the configured ones (repeatable)")
    p.add_argument("--dns-timeout", type=float, metavar="SECONDS", dest="dns_timeout",
                   help="DNS lifetime per query (default: dns.timeout of the configuration)")
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help="configuration file (default: $COFFER_CONFIG, else ./coffer.yaml "
                   "if it exists, else built-in defaults)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_check)

    dkim = sub.add_parser("dkim", help="DKIM signing keys")
    dkim_sub = dkim.add_subparsers(dest="dkim_command", metavar="COMMAND")
    dkim_sub.required = True
    k = dkim_sub.add_parser(
        "keygen", help="write a new DKIM key and print the DNS record to publish",
        description="Write DOMAIN.SELECTOR.key (PEM, mode 0600) in --out and print the TXT "
        "record SELECTOR._domainkey.DOMAIN to publish.",
    )
    k.add_argument("domain", metavar="DOMAIN")
    k.add_argument("selector", metavar="SELECTOR")
    k.add_argument("--ed25519", action="store_true",
                   help="an Ed25519 key (RFC 8463) instead of RSA 2048")
    k.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    k.add_argument("--out", metavar="DIR", default=".", help="directory for the key file")
    k.add_argument("--json", action="store_true", help="print one JSON object")
    k.set_defaults(func=run_keygen)


def _load_config(args: argparse.Namespace) -> Any:
    explicit = getattr(args, "config", None)
    path = config.find_config(explicit)
    if explicit or os.environ.get("COFFER_CONFIG") or path.exists():
        return config.load(path)  # a ConfigError becomes exit 2 in gateway.cli.main
    return config.defaults(Path.cwd())


def _usage(message: str) -> int:
    print(f"coffer: {message}", file=sys.stderr)
    return EXIT_USAGE


def result_object(verdicts: Verdicts, header: str) -> dict[str, Any]:
    """The --json object: the facts, and the header as one unfolded line."""
    return {**verdicts.to_facts(),
            "authentication_results": header.replace("\r\n", "")}


def run_check(args: argparse.Namespace) -> int:
    for ns in args.dns or []:
        try:
            parse_nameserver(ns)
        except ValueError as exc:
            return _usage(f"--dns: {exc}")
    try:
        data = sys.stdin.buffer.read() if args.message == "-" else Path(args.message).read_bytes()
    except OSError as exc:
        return _usage(f"cannot read {args.message}: {exc.strerror or exc}")
    if args.dns_timeout is not None and not 0 < args.dns_timeout <= 60:
        return _usage("--dns-timeout must be between 0 and 60 seconds")
    cfg = _load_config(args)
    if args.dns_timeout is not None:
        cfg = cfg.model_copy(update={"dns": cfg.dns.model_copy(
            update={"timeout": args.dns_timeout})})
    stage = CheckStage.from_config(cfg, nameservers=args.dns)
    envelope = Envelope(args.mail_from, [], client_ip=args.ip, helo=args.helo)
    try:
        verdicts = asyncio.run(stage.check(data, envelope))
    finally:
        stage.close()
    header = stage.header(verdicts)
    if args.json:
        print(json.dumps(result_object(verdicts, header), ensure_ascii=False))
        return EXIT_OK
    s = verdicts.spf
    print(f"SPF    {s.result:<9} {s.identity} {s.domain or '-'}"
          + (f"  ({s.reason})" if s.reason else ""))
    if not verdicts.dkim:
        print("DKIM   none      no signature")
    for d in verdicts.dkim:
        print(f"DKIM   {d.result:<9} d={d.domain} s={d.selector} {d.algorithm}"
              + (f"  ({d.reason})" if d.reason else ""))
    m = verdicts.dmarc
    print(f"DMARC  {m.result:<9} {m.domain or '-'} policy={m.policy or '-'} "
          f"disposition={m.disposition}" + (f"  ({m.reason})" if m.reason else ""))
    a = verdicts.arc
    print(f"ARC    {a.result:<9}" + (f" ({a.reason})" if a.reason else ""))
    print(f"Authentication-Results: {header}".replace("\r\n", "\n"))
    return EXIT_OK


def _txt_strings(value: str) -> str:
    # RFC 1035 §3.3.14: character-strings of at most 255 octets
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


def run_keygen(args: argparse.Namespace) -> int:
    domain = args.domain.lower().rstrip(".")
    if not domain or "." not in domain:
        return _usage(f"{args.domain!r} is not a domain name")
    if not args.selector or any(not lbl or len(lbl) > 63 for lbl in args.selector.split(".")):
        return _usage(f"{args.selector!r} is not a valid selector (RFC 6376 §3.1)")
    if not args.ed25519 and not 1024 <= args.bits <= 8192:
        return _usage("--bits must be between 1024 and 8192 (RFC 8301 §3.2: at least 1024)")
    out = Path(args.out)
    key_file = out / f"{domain}.{args.selector}.key"
    algorithm = "ed25519-sha256" if args.ed25519 else "rsa-sha256"
    key = generate_key(algorithm, args.bits)  # type: ignore[arg-type]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _usage(f"{key_file} exists: not overwriting a key")
    except OSError as exc:
        return _usage(f"cannot write {key_file}: {exc.strerror or exc}")
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    record = public_record(key)
    name = f"{args.selector}._domainkey.{domain}."
    if args.json:
        print(json.dumps({"domain": domain, "selector": args.selector, "algorithm": algorithm,
                          "key_file": str(key_file), "dns_name": name, "txt": record}))
    else:
        print(f"{name} IN TXT ( {_txt_strings(record)} )")
        print(f"coffer: wrote {key_file}; in coffer.yaml: check: dkim_signing: {domain}: "
              f"{{selector: {args.selector}, key_file: {key_file}}}", file=sys.stderr)
    return EXIT_OK
