"""``coffer init DIR [--domain DOMAIN]...``: a working gateway in one directory.

Writes ``DIR/coffer.yaml`` (every key commented), a self-signed TLS certificate
and key in ``DIR/tls/`` (key mode 0600) and, when the package ships one, the
sample policy as ``DIR/policy.yaml``.  The embedded defaults need no other
service: spool, archive and the Maildir for local domains all live under DIR,
SMTP listens on 127.0.0.1:2525 and IMAP (the archive, read-only) on
127.0.0.1:1143.  An existing ``coffer.yaml`` is never
overwritten.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

EXIT_OK = 0
EXIT_USAGE = 2

# RFC 1035 §2.3.1 letters-digits-hyphen labels (an IDN must be given as A-labels).
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
DEFAULT_DOMAIN = "example.test"  # RFC 2606 §2: reserved for testing, never routed
CERT_DAYS = 825
MAX_DEFAULT_WORKERS = 4


def default_workers() -> int:
    """One worker process per core: measured on 2 cores, 2 workers relayed 28-55 % more
    messages per second end to end than 1 (bench/relay.py, 2,000 messages, 20 connections)."""
    return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


def register(sub: Any) -> None:
    p = sub.add_parser(
        "init", help="write a working configuration, TLS pair and sample policy into DIR",
        description="Create DIR/coffer.yaml (every key commented), a self-signed TLS "
        "certificate and key in DIR/tls/, and the sample policy. Refuses to overwrite an "
        "existing coffer.yaml.",
    )
    p.add_argument("dir", metavar="DIR", help="directory to create or fill")
    p.add_argument(
        "--domain", action="append", default=[], metavar="DOMAIN",
        help=f"a local domain to accept and deliver to DIR/mail (repeatable; "
        f"default {DEFAULT_DOMAIN})",
    )
    p.add_argument("--hostname", default="localhost",
                   help="name in the SMTP banner and the certificate (default localhost)")
    p.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                   help="processes sharing the SMTP ports (default: one per CPU core, "
                   f"at most {MAX_DEFAULT_WORKERS}; here {default_workers()})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    domains = [d.lower().rstrip(".") for d in args.domain] or [DEFAULT_DOMAIN]
    for d in domains:
        if not _DOMAIN.match(d):
            print(f"coffer init: {d!r} is not a domain name", file=sys.stderr)
            return EXIT_USAGE
    if not 1 <= args.workers <= 64:
        print("coffer init: --workers must be between 1 and 64", file=sys.stderr)
        return EXIT_USAGE
    if not _DOMAIN.match(args.hostname.lower()):
        print(f"coffer init: {args.hostname!r} is not a host name", file=sys.stderr)
        return EXIT_USAGE
    target = Path(args.dir)
    cfg_file = target / "coffer.yaml"
    if cfg_file.exists():
        print(f"coffer init: {cfg_file} already exists; not overwriting it", file=sys.stderr)
        return EXIT_USAGE
    try:
        target.mkdir(parents=True, exist_ok=True)
        tls_dir = target / "tls"
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        cert_file, key_file = tls_dir / "cert.pem", tls_dir / "key.pem"
        if not (cert_file.exists() and key_file.exists()):
            write_self_signed(cert_file, key_file, args.hostname, domains)
        policy = copy_sample_policy(target)
        # O_EXCL: a concurrent init (or a file that appeared since the check) is never clobbered.
        fd = os.open(cfg_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(render_config(domains, args.hostname, policy, args.workers))
    except FileExistsError:
        print(f"coffer init: {cfg_file} already exists; not overwriting it", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"coffer init: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {cfg_file}")
    print(f"wrote {cert_file} and {key_file} (self-signed, {CERT_DAYS} days)")
    if policy:
        print(f"wrote {target / policy}")
    print(f"run it with: coffer serve --config {cfg_file}")
    return EXIT_OK


def sample_policy_source() -> Path | None:
    """The shipped sample policy (policies/baseline.yaml), if this build has one."""
    # find_spec, not importlib.resources: policies/ may still be a namespace package,
    # which resources.files() cannot read in Python 3.11.
    try:
        spec = importlib.util.find_spec("policies")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "baseline.yaml"
        if path.is_file():
            return path
    return None


def copy_sample_policy(target: Path) -> str | None:
    """Copy the sample policy into ``target``; its name relative to data_dir, or None."""
    src = sample_policy_source()
    if src is None:
        return None
    dest = target / "policy.yaml"
    if not dest.exists():
        shutil.copyfile(src, dest)
    return dest.name


def write_self_signed(cert_file: Path, key_file: Path, hostname: str, domains: list[str]) -> None:
    """A P-256 key (0600) and a self-signed certificate naming the host and domains."""
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys([hostname, *domains, "localhost"]))
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in names]
                + [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                   x509.IPAddress(ipaddress.ip_address("::1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    os.chmod(key_file, 0o600)  # O_CREAT's mode is filtered by the umask; be explicit
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _q(s: str) -> str:
    """A YAML double-quoted scalar (a JSON string is one)."""
    return json.dumps(s)


def render_config(
    domains: list[str], hostname: str, policy: str | None, workers: int = 1
) -> str:
    local = "\n".join(f"    - {_q(d)}" for d in domains)
    routes = "\n".join(f"    {_q(d)}: \"maildir:mail\"" for d in domains)
    if policy:
        policy_line = f"policy: {_q(policy)}"
    else:
        policy_line = (
            "# (no sample policy shipped with this build; point this at a policy file)\n"
            "# policy: policy.yaml"
        )
    return f"""\
# Coffer configuration, written by `coffer init`.
# Every key is documented in docs/configuration.md with its default.
# Check it with:  coffer check-config --config THIS_FILE
# Run it with:    coffer serve --config THIS_FILE
# Reload after editing: kill -HUP $(cat coffer.pid)   (a bad file keeps the old config)

# Name in the SMTP banner, the EHLO reply and Received headers.
hostname: {_q(hostname)}

# Root of the spool, archive and maildirs; relative paths are relative to this file.
data_dir: "."

relay:
  # Domains Coffer accepts mail for from anyone (inbound role).
  local_domains:
{local}
  # Networks (CIDR) allowed to relay to any domain without AUTH, like Postfix mynetworks.
  # Empty: only authenticated clients may send to other domains.
  trusted_networks: []
  # Refuse unknown recipients of your domains at RCPT (550 5.1.1) rather than bounce
  # them later to forged senders (backscatter); see "Rejecting unknown recipients" in
  # the README. Off by default: every address of a local domain is accepted.
  # recipients:
  #   # One address a line, @domain for a whole domain; re-read on SIGHUP.
  #   file: "recipients.txt"
  #   # Ask the mail store (an smtp:// route) with RCPT TO and remember its answer.
  #   verify: true
  #   # When the mail store cannot answer: tempfail (450 4.1.1) or accept.
  #   undetermined: tempfail

# SMTP listeners. Changing an address needs a restart (SIGHUP logs that).
listeners:
  # Where other servers deliver mail for your domains (port 25 in production).
  - name: inbound
    # inbound: MX role; submission: your users' mail clients, which authenticate.
    role: inbound
    # host:port to listen on ([::1]:2525 for IPv6).
    address: "127.0.0.1:2525"
    # none | starttls | implicit (port 465 style).
    tls: starttls
  # Where your users submit mail (port 587 in production): AUTH, after STARTTLS.
  - name: submission
    role: submission
    address: "127.0.0.1:5587"
    tls: starttls
    # AUTH required before MAIL FROM (the default for role: submission).
    require_auth: true

tls:
  # PEM certificate chain and private key, relative to data_dir (self-signed by coffer init;
  # replace with your own, then send SIGHUP).
  cert: "tls/cert.pem"
  key: "tls/key.pem"

limits:
  # Largest message (advertised as SIZE; larger ones get 552 5.3.4). 35M, 512k or bytes.
  max_message_size: 35M
  # Recipients per transaction (more get 452 4.5.3).
  max_recipients: 100
  # Longest command or text line including CRLF (RFC 5321 §4.5.3.1).
  max_line_length: 1000
  # Commands per session before 421 (those of accepted messages do not count).
  max_commands: 1000
  # Idle time before 421 4.4.2.
  idle_timeout: 5m
  # Concurrent sessions per client IP, and per process.
  max_connections_per_ip: 20
  max_connections: 1000
  # Failed AUTH attempts before the session is closed.
  max_auth_failures: 3

# Sending rate limits, shared by every worker (DATA_DIR/ratelimit.db): a stolen password
# must not send 50,000 messages in an hour. Over a limit, MAIL or RCPT gets 450 4.7.1;
# `coffer ratelimit list` shows who is near one, `coffer ratelimit reset KEY` lifts it.
# key: auth_user | client_ip (IPv6 by /64) | sender_domain (AUTH or trusted clients only).
# Rates are COUNT/DURATION over a sliding window. [] turns rate limits off.
rate_limits:
  - key: auth_user
    # Per authenticated user: far above what a person sends, far below what spam does.
    messages: 500/1h
    recipients: 2000/1h
    # Listener roles (and, with listeners: [NAME, ...], listeners) the rule applies on.
    roles: [submission]
  # e.g. per client address on the inbound role, the mail store exempt:
  # - key: client_ip
  #   messages: 100/1m
  #   roles: [inbound]
  #   exempt_networks: ["10.0.5.20/32"]

auth:
  # File of "user:argon2-hash" lines for SMTP AUTH, relative to data_dir.
  # Without it nobody can authenticate, so submission refuses every sender.
  # e.g. passwd_file: passwd
  passwd_file: null

queue:
  # fsync every spool write before answering 250. Never turn this off in production.
  fsync: true
  # Give up on a recipient (and bounce) after this long.
  max_age: 5d
  # Retry delays: exponential from retry_initial to retry_max, spread by retry_jitter.
  retry_initial: 5m
  retry_max: 1h
  retry_jitter: 0.2
  # How often the spool is rescanned for due messages.
  scan_interval: 5s
  # Below this much free disk, new mail gets 452 4.3.1 instead of 250.
  min_free_space: 100M
  # Processes sharing the SMTP ports (SO_REUSEPORT); each also delivers. Restart to change.
  # (coffer init writes one per CPU core, at most 4.)
  workers: {workers}
  # Messages delivered at once, and connections per destination.
  delivery_concurrency: 50
  destination_concurrency: 10

delivery:
  # Recipient domain -> next hop. Keys: a domain, ".example.com" (every subdomain) or "*".
  # Values: mx | smtp://host:port[?tls=required|opportunistic|off] | smtps://host:port
  #         | maildir:PATH (local delivery into PATH/<recipient>/, relative to data_dir).
  routes:
{routes}
    "*": mx
  # EHLO name towards next hops (default: the machine's host name).
  # helo_name: mail.example.com
  # Timeouts towards next hops (RFC 5321 §4.5.3.2).
  connect_timeout: 30s
  command_timeout: 5m
  # TLS towards MX hosts: required | opportunistic | off.
  mx_tls: opportunistic
  # Honour the recipient domain's MTA-STS policy (RFC 8461) on MX delivery: a domain in
  # enforce mode gets mail only over verified TLS to its listed MX hosts (else 451 4.7.5).
  mta_sts: true
  # Time limit for fetching one policy over HTTPS.
  mta_sts_timeout: 10s
  # SMTP TLS Reporting (RFC 8460): count MTA-STS/DANE sessions and send each domain that
  # publishes a _smtp._tls TXT record a daily report (coffer tlsrpt show: what it gets).
  tls_rpt:
    enabled: false
    # organization: Example Ltd        (default: hostname)
    # contact: postmaster@example.com  (default: postmaster@ the first local domain)
    # from: noreply-tlsrpt@mail.example.com
  # CA certificates (PEM) for verified next hops and policy hosts (default: the system's).
  # ca_file: /etc/ssl/certs/ca-certificates.crt

dns:
  # Resolvers as host or host:port; empty: /etc/resolv.conf.
  nameservers: []
  # Lifetime of one DNS query.
  timeout: 5s

check:
  # Sender authentication before the queue; verdicts go to the policy and the archive.
  # authserv-id of the Authentication-Results header we add (default: hostname).
  # authserv_id: mx.example.com
  # Checks to run: spf, dkim, dmarc, arc ([] turns them off).
  checks: [spf, dkim, dmarc, arc]
  # DMARC for a message with several or no From addresses: fail | reject.
  multiple_from: fail
  # Outbound DKIM keys per From domain (coffer dkim keygen DOMAIN SELECTOR writes one).
  # dkim_signing:
  #   example.com: {{selector: s2026, key_file: dkim/example.com.s2026.key}}
  # Seal outbound mail with an ARC set (RFC 8617).
  # arc_sealing: {{domain: example.com, selector: arc2026, key_file: dkim/arc.key}}

metrics:
  # Prometheus /metrics on this loopback address (null: off). With queue.workers N,
  # worker k serves on port+k.
  address: "127.0.0.1:9025"

log:
  # DEBUG | INFO | WARNING | ERROR (SIGHUP applies a change).
  level: INFO
  # json: one JSON object per line; text: key=value.
  format: json
  # Log file (default: standard error).
  # file: coffer.log

# Archiving internal mail by journaling (README): mail servers send a copy of every message
# to a journal address; Coffer archives it with its true envelope and delivers nothing.
# Only these sources may send to it (others: 550 5.7.1); the policy does not run for it.
# archive:
#   journal:
#     addresses: [journal@example.com]
#     sources: [trusted_networks, authenticated]
#     retention: 7y

# Policy rules (relative to data_dir).
{policy_line}

# Read the archive over IMAP (read-only, RFC 3501) from any mail client; coffer serve runs
# it in worker 0. Accounts: coffer users add NAME --role user|officer --password-stdin.
# Changing this section needs a restart (SIGHUP logs that).
imap:
  # false: no IMAP from coffer serve (coffer imap serve runs it on its own).
  enabled: true
  # host:port to listen on (993 for implicit TLS in production).
  address: "127.0.0.1:1143"
  # starttls | implicit | none, with the certificate of tls: above.
  tls: starttls
  # LOGIN without TLS, from 127.0.0.1/::1 only (local tools and scripts). Nothing but a
  # loopback client is ever let in without TLS; set false to require STARTTLS everywhere.
  allow_plaintext_loopback: true
  # SELECT answers [READ-ONLY] (the archive is immutable); false answers [READ-WRITE] for
  # clients such as Python's imaplib that refuse read-only folders.
  select_read_only: true
  # Account database as an SQLAlchemy URL (default: archive/imap.db under data_dir).
  # accounts_database: "postgresql://coffer@db.internal/coffer"
  # Domains/ folders officers see (default: relay.local_domains).
  # domains: [example.com]
  # Autologout after this long idle (RFC 3501 §5.4: at least 30m), and time to log in.
  idle_timeout: 30m
  login_timeout: 1m
  # IDLE re-checks the selected folder this often (new mail also wakes it sooner).
  idle_poll: 30s
  # Concurrent sessions; longest command line, largest literal and command.
  max_sessions: 1000
  max_line: 64k
  max_literal: 1M
  max_command: 4M
  # Failed logins per account and per client IP within the window, then refused.
  max_login_failures_per_account: 5
  max_login_failures_per_ip: 20
  login_failure_window: 5m
"""
