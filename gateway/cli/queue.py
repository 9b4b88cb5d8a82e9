"""``coffer queue list|show|retry|hold|release|delete``: the operator's view of the spool.

These commands work on the spool directory directly, so they work whether or
not the gateway is running, and they change a message only the way the gateway
itself does: by appending an event to its state log (gateway.queue.state), which
the queue worker folds on its next look at the message.  ``delete`` is the one
destructive command: it takes the message's claim (the same ``flock`` a worker
holds while delivering), waiting for an in-flight attempt to finish, then
removes the message and logs who deleted it and why.

After a change the running gateway (found through the locked pid file in the
data directory) is sent SIGUSR1 so it rescans the spool at once instead of at
its next ``queue.scan_interval``.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import fcntl
import getpass
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gateway import config, log
from gateway.config import Config
from gateway.errors import SpoolError
from gateway.queue.spool import Spool
from gateway.queue.state import QueueState

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
PID_FILE = "coffer.pid"


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="configuration file (default: $COFFER_CONFIG, else ./coffer.yaml)")
    common.add_argument("--json", action="store_true", help="one JSON object per line on stdout")

    p = sub.add_parser("queue", help="list and manage queued messages",
                       description="Inspect and manage the spool of queued messages.")
    qsub = p.add_subparsers(dest="queue_command", metavar="QUEUE_COMMAND")
    qsub.required = True

    ls = qsub.add_parser("list", parents=[common], help="list queued messages")
    ls.add_argument("--status", choices=["active", "deferred", "held"],
                    help="only messages in this state")
    ls.set_defaults(func=cmd_list)

    show = qsub.add_parser("show", parents=[common], help="envelope, state and headers of one")
    show.add_argument("qid", metavar="QID")
    show.set_defaults(func=cmd_show)

    retry = qsub.add_parser("retry", parents=[common],
                            help="attempt delivery now (QID..., --all deferred, --held failed)")
    retry.add_argument("qids", nargs="*", metavar="QID")
    retry.add_argument("--all", action="store_true",
                       help="every deferred message (held ones stay held)")
    retry.add_argument("--held", action="store_true",
                       help="every message held because a stage failed, re-run from the "
                       "start once the fault is fixed (quarantine and operator holds stay)")
    retry.set_defaults(func=cmd_retry)

    hold = qsub.add_parser("hold", parents=[common], help="keep a message from delivery")
    hold.add_argument("qid", metavar="QID")
    hold.add_argument("--reason", default="", help="recorded with the hold")
    hold.set_defaults(func=cmd_hold)

    release = qsub.add_parser("release", parents=[common], help="let a held message go")
    release.add_argument("qid", metavar="QID")
    release.set_defaults(func=cmd_release)

    delete = qsub.add_parser("delete", parents=[common],
                             help="remove a message for good (logged with who and why)")
    delete.add_argument("qid", metavar="QID")
    delete.add_argument("--reason", default="", help="recorded in the log")
    delete.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for an in-flight delivery (default 60)")
    delete.set_defaults(func=cmd_delete)


# -- helpers -------------------------------------------------------------------


def _open(args: argparse.Namespace) -> tuple[Config, Spool]:
    cfg = config.load(config.find_config(args.config))
    try:
        return cfg, Spool(cfg.spool_dir, fsync=cfg.queue.fsync)
    except OSError as exc:  # e.g. run as a user who may not read the spool
        raise SpoolError(f"cannot open the spool {cfg.spool_dir}: {exc.strerror or exc}") from None


def _err(msg: str) -> None:
    print(f"coffer queue: {msg}", file=sys.stderr)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False, default=str))


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _ago(seconds: float) -> str:
    s = int(max(seconds, 0))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f}k"
    return f"{n / 1024 / 1024:.1f}M"


def _summary(spool: Spool, qid: str, now: float) -> dict[str, Any]:
    env, _facts, size = spool.read_header(qid)
    st = spool.read_state(qid, env.rcpt_to)
    return {
        "qid": qid,
        "received_at": env.received_at,
        "age_s": round(now - env.received_at, 1) if env.received_at else None,
        "size": size,
        "sender": env.mail_from,
        "recipients": env.rcpt_to,
        "pending": len(st.pending),
        "total": len(st.recipients),
        "status": st.status,
        "attempts": st.attempts,
        "next_attempt_at": st.next_attempt_at or None,
        "last_error": st.last_error,
        "held_stage": st.held_stage if st.held else "",
        "held_error": st.held_error if st.held else "",
    }


def _known(spool: Spool, qid: str) -> bool:
    if spool.exists(qid):
        return True
    _err(f"{qid}: no such queued message")
    return False


def poke_service(cfg: Config) -> bool:
    """Ask a running gateway to rescan the spool now (SIGUSR1).

    Only a pid file that is still locked names a live gateway: a stale one (left
    by kill -9) can hold a pid since reused by an unrelated process, which must
    never be signalled.
    """
    path = cfg.data_dir / PID_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # locked: the gateway is alive
        else:
            return False  # nobody holds it: stale
        pid = int(os.read(fd, 64).split()[0])
        os.kill(pid, signal.SIGUSR1)
        return True
    except (OSError, ValueError, IndexError):
        return False
    finally:
        os.close(fd)


# -- commands ------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    _cfg, spool = _open(args)
    now = time.time()
    rows: list[dict[str, Any]] = []
    for qid in spool.queue_ids():
        try:
            row = _summary(spool, qid, now)
        except FileNotFoundError:
            continue  # delivered and removed while we looked
        except SpoolError as exc:
            row = {"qid": qid, "status": "corrupt", "last_error": str(exc)}
        if args.status and row["status"] != args.status:
            continue
        rows.append(row)
    if args.json:
        for row in rows:
            _emit(row)
        return EXIT_OK
    if not rows:
        print("queue is empty" if not args.status else f"no {args.status} messages")
        return EXIT_OK
    print(f"{'QID':20} {'AGE':>5} {'SIZE':>7} {'RCPT':>7} {'STATUS':8} {'NEXT':>7}  SENDER / ERROR")
    for r in rows:
        if r["status"] == "corrupt":
            print(f"{r['qid']:20} {'':>5} {'':>7} {'':>7} corrupt  {'':>7}  {r['last_error']}")
            continue
        nxt = r["next_attempt_at"]
        when = "-" if r["status"] == "held" else (_ago(nxt - now) if nxt and nxt > now else "now")
        print(f"{r['qid']:20} {_ago(r['age_s'] or 0):>5} {_size(r['size']):>7} "
              f"{r['pending']:>3}/{r['total']:<3} {r['status']:8} {when:>7}  "
              f"<{r['sender']}>")
        if r["status"] == "held":
            print(f"{'':20} held at stage {r['held_stage'] or '?'}: {r['held_error']}")
        elif r["last_error"]:
            print(f"{'':20} {r['last_error']}")
    return EXIT_OK


def _headers(data: bytes) -> dict[str, str]:
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    return {k: str(v) for k, v in msg.items()}


def _state_json(st: QueueState) -> dict[str, Any]:
    return {
        "status": st.status,
        "attempts": st.attempts,
        "next_attempt_at": st.next_attempt_at or None,
        "last_error": st.last_error,
        "held": st.held,
        "held_stage": st.held_stage,
        "held_error": st.held_error,
        "stages_done": sorted(st.stages_done),
        "recipients": [
            {"address": r.address, "status": str(r.status), "reply": r.reply,
             "updated_at": r.updated_at or None}
            for r in st.recipients.values()
        ],
    }


def cmd_show(args: argparse.Namespace) -> int:
    _cfg, spool = _open(args)
    try:
        msg = spool.load(args.qid)
    except SpoolError as exc:
        _err(str(exc))
        return EXIT_PROBLEM
    events = spool.events(args.qid)
    headers = _headers(msg.data)
    obj = {
        "qid": msg.qid,
        "size": len(msg.data),
        "envelope": msg.envelope.to_dict(),
        "state": _state_json(msg.state),
        "facts": msg.facts,
        "events": events,
        "headers": headers,
    }
    if args.json:
        _emit(obj)
        return EXIT_OK
    env, st = msg.envelope, msg.state
    print(f"queue id     {msg.qid}")
    print(f"status       {st.status} (attempts {st.attempts})")
    print(f"received     {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(env.received_at))} "
          f"UTC from {env.client_ip} (helo {env.helo!r}, listener {env.listener})")
    tls = f"{env.tls.version} {env.tls.cipher}" if env.tls else "none"
    print(f"tls / auth   {tls} / {env.auth_user or '-'}")
    print(f"size         {len(msg.data)} bytes")
    params = f"  {' '.join(env.mail_options)}" if env.mail_options else ""
    print(f"from         <{env.mail_from}>{params}")
    options = env.options_by_recipient()  # RFC 3461 NOTIFY, ORCPT
    for r in st.recipients.values():
        reply = f"  {r.reply}" if r.reply else ""
        given = options.get(r.address)
        params = f"  [{' '.join(given)}]" if given else ""
        print(f"to           <{r.address}> {r.status}{params}{reply}")
    if st.held:
        print(f"held         at stage {st.held_stage or '?'}: {st.held_error}")
    elif st.last_error:
        print(f"last error   {st.last_error}")
    if st.next_attempt_at and not st.held:
        print(f"next attempt {time.strftime('%H:%M:%S', time.gmtime(st.next_attempt_at))} UTC")
    for name in ("Message-ID", "Subject", "From", "To", "Date"):
        if name in headers:
            print(f"{name + ':':12} {headers[name]}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    cfg, spool = _open(args)
    if sum((bool(args.qids), bool(args.all), bool(args.held))) != 1:
        _err("give one or more QIDs, --all or --held")
        return EXIT_USAGE
    rc = EXIT_OK
    done: list[str] = []
    if args.all or args.held:
        for qid in spool.queue_ids():
            try:
                env, _f, _s = spool.read_header(qid)
            except (FileNotFoundError, SpoolError):
                continue
            if _retry_selects(spool.read_state(qid, env.rcpt_to), held=args.held):
                spool.append_event(qid, {"ev": "retry", "by": _operator()})
                done.append(qid)
    else:
        for qid in args.qids:
            if not _known(spool, qid):
                rc = EXIT_PROBLEM
                continue
            # An explicit retry also releases a held message (gateway.queue.state.fold).
            spool.append_event(qid, {"ev": "retry", "by": _operator()})
            done.append(qid)
    poke_service(cfg)
    for qid in done:
        if args.json:
            _emit({"qid": qid, "action": "retry"})
        else:
            print(f"{qid}: scheduled for delivery now")
    if (args.all or args.held) and not done and not args.json:
        print("no held messages" if args.held else "no deferred messages")
    return rc


def _retry_selects(st: QueueState, *, held: bool) -> bool:
    """--held: held after a stage failure; --all: deferred and not held."""
    if st.finished:
        return False
    if held:
        return st.held and st.held_reason == "error"
    return not st.held


def cmd_hold(args: argparse.Namespace) -> int:
    cfg, spool = _open(args)
    if not _known(spool, args.qid):
        return EXIT_PROBLEM
    who = _operator()
    reason = f"held by {who}" + (f": {args.reason}" if args.reason else "")
    spool.append_event(args.qid, {"ev": "held", "stage": "operator", "error": reason, "by": who,
                                  "reason": "operator"})
    _setup_log(cfg)
    log.event("queue_hold", qid=args.qid, by=who, reason=args.reason)
    if args.json:
        _emit({"qid": args.qid, "action": "hold"})
    else:
        print(f"{args.qid}: held (an attempt in progress finishes first)")
    return EXIT_OK


def cmd_release(args: argparse.Namespace) -> int:
    cfg, spool = _open(args)
    if not _known(spool, args.qid):
        return EXIT_PROBLEM
    who = _operator()
    spool.append_event(args.qid, {"ev": "released", "by": who})
    _setup_log(cfg)
    log.event("queue_release", qid=args.qid, by=who)
    poke_service(cfg)
    if args.json:
        _emit({"qid": args.qid, "action": "release"})
    else:
        print(f"{args.qid}: released")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    cfg, spool = _open(args)
    if not _known(spool, args.qid):
        return EXIT_PROBLEM
    who = _operator()
    deadline = time.monotonic() + max(args.wait, 0.0)
    while True:
        with spool.claim(args.qid) as mine:
            if mine:
                try:
                    env, _f, size = spool.read_header(args.qid)
                    st = spool.read_state(args.qid, env.rcpt_to)
                    sender, pending = env.mail_from, st.pending
                except SpoolError:
                    sender, pending, size = "", [], 0
                spool.append_event(args.qid, {"ev": "deleted", "by": who, "reason": args.reason})
                spool.remove(args.qid)
                break
            if not spool.exists(args.qid):
                _err(f"{args.qid}: delivered or removed meanwhile")
                return EXIT_PROBLEM
        if time.monotonic() >= deadline:
            _err(f"{args.qid}: a delivery attempt still holds it after {args.wait:g}s; "
                 "try again (or --wait longer)")
            return EXIT_PROBLEM
        time.sleep(0.1)
    _setup_log(cfg)
    log.event("queue_delete", qid=args.qid, by=who, reason=args.reason, sender=sender,
              undelivered=pending, size=size)
    if args.json:
        _emit({"qid": args.qid, "action": "delete", "undelivered": pending})
    else:
        print(f"{args.qid}: deleted ({len(pending)} recipient(s) never delivered)")
    return EXIT_OK


def _setup_log(cfg: Config) -> None:
    """Operator actions go to the gateway's log (its file, or stderr)."""
    file: Path | None = cfg.path(cfg.log.file) if cfg.log.file else None
    log.setup(cfg.log.level, cfg.log.format, file)
