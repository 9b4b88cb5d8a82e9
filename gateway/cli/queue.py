"""``coffer queue list|show|summary|retry|hold|release|delete``: the operator's view of the spool.

These commands work on the spool directory directly, so they work whether or
not the gateway is running, and they change a message only the way the gateway
itself does: by appending an event to its state log (gateway.queue.state), which
the queue worker folds on its next look at the message.  ``delete`` is the one
destructive command: it removes the message and logs who deleted it and why.

Every command that changes a message first takes its claim (the ``flock`` a worker
holds while it delivers; gateway.cli.claims, shared with ``coffer quarantine``),
waiting up to ``--wait`` seconds for an attempt in progress to end.  An event
written beside a running attempt was lost or contradicted by what the worker
wrote after it: a retry undone by the attempt's deferral, a hold on a message the
worker then delivered and removed (the operator told "held", and the hold left
behind as an orphaned ``.state``).  A message still
busy at the deadline, or gone meanwhile, is reported and the exit status is 1:
nothing is ever silently not done.  A hold alone is also written at once when the
claim is taken, then confirmed under it (see _hold_one: the claim may be one the
gateway keeps for a message it has not begun).

After a change the running gateway (found through the locked pid file in the
data directory) is sent SIGUSR1 so it rescans the spool at once instead of at
its next ``queue.scan_interval``.

During an incident the operator acts on a selection rather than on queue ids:
``--to-domain``, ``--from``, ``--older-than``, ``--younger-than``, ``--error`` and
``--state`` (gateway.queue.select) pick messages from the same rows ``list`` prints,
and ``summary`` counts them by domain and age as Postfix's qshape does
(gateway.queue.shape).  A mutating command given only a selector acts on every
match, so it says how many first and needs ``--yes`` (or a "y" at a terminal): a
mistyped selector must not empty the queue.
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import fcntl
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gateway import config, log
from gateway.cli import ago, claims, config_options, operator_name, setup_log
from gateway.cli.claims import wait_option
from gateway.config import Config
from gateway.errors import SpoolError
from gateway.queue import shape
from gateway.queue.select import STATES, Entry, Selector
from gateway.queue.spool import Spool
from gateway.queue.state import QueueState

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
PID_FILE = "coffer.pid"


def _duration(text: str) -> float:
    try:
        return config.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _selector_options() -> argparse.ArgumentParser:
    """The selectors every command that picks messages takes; combined with AND."""
    sel = argparse.ArgumentParser(add_help=False)
    g = sel.add_argument_group("selectors (combined with AND; a repeated one matches any)")
    g.add_argument("--to-domain", action="append", default=[], metavar="DOMAIN",
                   help="a recipient not yet delivered is in DOMAIN (case-insensitive)")
    g.add_argument("--from", dest="sender", default="", metavar="ADDR|@DOMAIN",
                   help="the envelope sender, or any sender in @DOMAIN")
    g.add_argument("--older-than", type=_duration, metavar="DURATION",
                   help="received longer ago than DURATION (30s, 5m, 2h, 5d)")
    g.add_argument("--younger-than", type=_duration, metavar="DURATION",
                   help="received less than DURATION ago")
    g.add_argument("--error", default="", metavar="TEXT",
                   help="the last deferral reply contains TEXT (case-insensitive)")
    g.add_argument("--state", action="append", default=[], choices=STATES,
                   help="active, deferred, held (any hold but a quarantine) or quarantined")
    return sel


def _bulk_options() -> argparse.ArgumentParser:
    bulk = argparse.ArgumentParser(add_help=False)
    bulk.add_argument("--yes", action="store_true",
                      help="act on every message the selectors match without asking")
    bulk.add_argument("--dry-run", action="store_true",
                      help="list what would be done and change nothing")
    return bulk


def register(sub: Any) -> None:
    common = config_options()
    sel, bulk = _selector_options(), _bulk_options()

    p = sub.add_parser("queue", help="list and manage queued messages",
                       description="Inspect and manage the spool of queued messages.")
    qsub = p.add_subparsers(dest="queue_command", metavar="QUEUE_COMMAND")
    qsub.required = True

    ls = qsub.add_parser("list", parents=[common, sel], help="list queued messages")
    ls.add_argument("--status", choices=["active", "deferred", "held"],
                    help="only messages in this state")
    ls.set_defaults(func=cmd_list)

    show = qsub.add_parser("show", parents=[common], help="envelope, state and headers of one")
    show.add_argument("qid", metavar="QID")
    show.set_defaults(func=cmd_show)

    summary = qsub.add_parser(
        "summary", parents=[common, sel], help="the queue's shape by domain and age (qshape)",
        description="Messages per recipient domain (or sender domain, or last deferral "
        "reason) and age bucket since reception, with counts by state; TOTAL first.")
    summary.add_argument("--by", choices=shape.GROUPINGS, default="domain",
                         help="rows: recipient domain (default), sender domain or reason")
    summary.add_argument("--top", type=int, default=20, metavar="N",
                         help="the N largest rows (default 20)")
    summary.set_defaults(func=cmd_summary)

    retry = qsub.add_parser("retry", parents=[common, sel, bulk, wait_option(10.0)],
                            help="attempt delivery now (QID..., --all deferred, --held failed, "
                            "or selectors)")
    retry.add_argument("qids", nargs="*", metavar="QID")
    retry.add_argument("--all", action="store_true",
                       help="every deferred message (held ones stay held)")
    retry.add_argument("--held", action="store_true",
                       help="every message held because a stage failed, re-run from the "
                       "start once the fault is fixed (quarantine and operator holds stay)")
    retry.set_defaults(func=cmd_retry)

    hold = qsub.add_parser("hold", parents=[common, sel, bulk, wait_option(10.0)],
                           help="keep messages from delivery (QID... or selectors)")
    hold.add_argument("qids", nargs="*", metavar="QID")
    hold.add_argument("--reason", default="", help="recorded with the hold")
    hold.set_defaults(func=cmd_hold)

    release = qsub.add_parser("release", parents=[common, sel, bulk, wait_option(10.0)],
                              help="let held messages go (QID... or selectors)")
    release.add_argument("qids", nargs="*", metavar="QID")
    release.set_defaults(func=cmd_release)

    delete = qsub.add_parser("delete", parents=[common, sel, bulk, wait_option(60.0)],
                             help="remove messages for good (logged with who and why)")
    delete.add_argument("qids", nargs="*", metavar="QID")
    delete.add_argument("--reason", default="", help="recorded in the log")
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
        "held_reason": st.held_reason if st.held else "",
        "pending_recipients": st.pending,
    }


def _rows(spool: Spool, now: float) -> Iterator[dict[str, Any]]:
    """One ``list`` row per queued message, oldest first: the one way the spool is read
    for ``list``, ``summary`` and the selectors."""
    for qid in spool.queue_ids():
        try:
            yield _summary(spool, qid, now)
        except FileNotFoundError:
            continue  # delivered and removed while we looked
        except SpoolError as exc:
            yield {"qid": qid, "status": "corrupt", "last_error": str(exc)}


def _entries(rows: Iterable[dict[str, Any]]) -> list[Entry]:
    """The messages selectors look at (a corrupt one matches none: ``list`` shows it)."""
    return [Entry.from_row(r) for r in rows if r["status"] != "corrupt"]


def _selector(args: argparse.Namespace) -> Selector:
    return Selector.build(to_domains=args.to_domain, sender=args.sender,
                          older_than=args.older_than, younger_than=args.younger_than,
                          error=args.error, states=args.state)


def _known(spool: Spool, qid: str) -> bool:
    if spool.exists(qid):
        return True
    _err(f"{qid}: no such queued message")
    return False


def _deadline(args: argparse.Namespace) -> float:
    return claims.deadline(args.wait)


def _under_claim(args: argparse.Namespace, spool: Spool, qid: str, deadline: float,
                 action: str, do: Callable[[], object]) -> bool:
    """gateway.cli.claims.under_claim, said on stderr as ``coffer queue``."""
    return claims.under_claim(spool, qid, deadline, action, do, wait=args.wait, err=_err)


def _hold_one(args: argparse.Namespace, spool: Spool, qid: str, event: dict[str, Any],
              deadline: float) -> bool:
    """Hold a message under its claim, or, while another process has it, at once and
    then wait for the claim to tell whether the hold took.

    Written at once because the claim may be one a gateway keeps for a message it has
    just spooled and not begun (gateway.queue.spool._Handoff): its worker reads the
    state log when it takes the claim, so a hold written now stops that message, as
    it must during a spam run.  Beside an attempt in progress a hold is never undone
    (gateway.queue.state.fold keeps it through the attempt's records); it comes too
    late only if the attempt finishes the message, and then the operator is told, and
    the log the hold may have left beside a removed message goes."""
    def confirm() -> None:
        if not spool.read_state(qid, []).held:  # the early hold was not written after all
            spool.append_event(qid, dict(event))

    with spool.claim(qid) as mine:
        if mine:
            spool.append_event(qid, dict(event))
            return True
    if spool.exists(qid):
        spool.append_event(qid, dict(event))
    outcome = claims.claim_then(spool, qid, deadline, confirm)
    if outcome == "gone":
        spool.state_path(qid).unlink(missing_ok=True)  # an orphan: the .msg is gone for good
        _err(f"{qid}: delivered or removed meanwhile; not held")
    elif outcome == "busy":
        _err(f"{qid}: a delivery attempt still holds it after {args.wait:g}s (the message "
             "is being delivered now); the hold is written but takes effect only if that "
             f"attempt leaves the message queued: see coffer queue show {qid}")
    return outcome == "done"


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
    sel = _selector(args)
    rows: list[dict[str, Any]] = []
    for row in _rows(spool, now):
        if args.status and row["status"] != args.status:
            continue
        if not sel.empty and (row["status"] == "corrupt" or not sel.matches(Entry.from_row(row))):
            continue
        rows.append(row)
    if args.json:
        for row in rows:
            _emit(row)
        return EXIT_OK
    if not rows:
        print("queue is empty" if not args.status and sel.empty else "no matching messages")
        return EXIT_OK
    print(f"{'QID':20} {'AGE':>5} {'SIZE':>7} {'RCPT':>7} {'STATUS':8} {'NEXT':>7}  SENDER / ERROR")
    for r in rows:
        if r["status"] == "corrupt":
            print(f"{r['qid']:20} {'':>5} {'':>7} {'':>7} corrupt  {'':>7}  {r['last_error']}")
            continue
        nxt = r["next_attempt_at"]
        when = "-" if r["status"] == "held" else (ago(nxt - now) if nxt and nxt > now else "now")
        print(f"{r['qid']:20} {ago(r['age_s'] or 0):>5} {_size(r['size']):>7} "
              f"{r['pending']:>3}/{r['total']:<3} {r['status']:8} {when:>7}  "
              f"<{r['sender']}>")
        if r["status"] == "held":
            print(f"{'':20} held at stage {r['held_stage'] or '?'}: {r['held_error']}")
        elif r["last_error"]:
            print(f"{'':20} {r['last_error']}")
    return EXIT_OK


def cmd_summary(args: argparse.Namespace) -> int:
    _cfg, spool = _open(args)
    sel = _selector(args)
    rows = list(_rows(spool, time.time()))
    corrupt = sum(r["status"] == "corrupt" for r in rows)
    result = shape.summarize([e for e in _entries(rows) if sel.matches(e)],
                             by=args.by, top=args.top)
    if args.json:
        _emit({**shape.to_json(result), "corrupt": corrupt})
        return EXIT_OK
    for line in shape.render(result):
        print(line)
    if corrupt:
        print(f"{corrupt} unreadable spool file(s) not counted: see coffer queue list")
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


# -- acting on QIDs or on a selection ---------------------------------------------


def _targets(args: argparse.Namespace, spool: Spool, eligible: Callable[[Entry], bool],
             action: str) -> list[str] | int:
    """The queue ids to act on: those given, or every eligible message the selectors
    match once the operator confirmed (``--yes``, or "y" at a terminal).  An int is
    the exit code to return at once (usage error, refusal, nothing matched)."""
    sel = _selector(args)
    if args.qids:
        if not sel.empty:
            _err("give QIDs or selectors, not both")
            return EXIT_USAGE
        return list(args.qids)
    if sel.empty:
        _err(f"give one or more QIDs or selectors (--to-domain, --from, ...) to {action}")
        return EXIT_USAGE
    qids = [e.qid for e in _entries(_rows(spool, time.time())) if sel.matches(e) and eligible(e)]
    if not qids:
        if not args.json:
            print(f"no message to {action} matches ({sel.describe()})")
        return EXIT_OK
    if args.dry_run or args.yes:
        return qids
    return qids if _confirmed(len(qids), action, sel) else EXIT_USAGE


def _confirmed(count: int, action: str, sel: Selector) -> bool:
    what = f"{count} message(s) match ({sel.describe()})"
    if not sys.stdin.isatty():
        _err(f"{what}: refusing to {action} them without --yes")
        return False
    print(f"{what}. {action.capitalize()} them? [y/N] ", end="", flush=True, file=sys.stderr)
    try:
        answer = input()
    except EOFError:
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return True
    _err("nothing done")
    return False


def _report(args: argparse.Namespace, qid: str, action: str, text: str,
            **extra: Any) -> None:
    if args.json:
        _emit({"qid": qid, "action": action, **extra})
    else:
        print(f"{qid}: {text}")


def _dry_run(args: argparse.Namespace, qids: list[str], action: str) -> int:
    for qid in qids:
        _report(args, qid, action, f"would {action}", dry_run=True)
    return EXIT_OK


def _log_bulk(cfg: Config, args: argparse.Namespace, action: str, done: list[str],
              failed: list[str], **extra: Any) -> None:
    """One summary line for an action on a selection (each message has its own line)."""
    if args.qids:
        return
    sel = _selector(args)
    # retry --all / --held pick their own messages; selectors narrow them further.
    picked = [f"--{flag}" for flag in ("all", "held") if getattr(args, flag, False)]
    selection = ", ".join(picked + ([] if sel.empty and picked else [sel.describe()]))
    setup_log(cfg)
    log.event("queue_bulk", action=action, by=operator_name(), selector=selection,
              done=len(done), failed=failed, **extra)


def cmd_retry(args: argparse.Namespace) -> int:
    cfg, spool = _open(args)
    sel = _selector(args)
    if sum((bool(args.qids), bool(args.all), bool(args.held))) > 1 or not (
            args.qids or args.all or args.held or not sel.empty):
        _err("give one or more QIDs, --all, --held or selectors (--to-domain, ...)")
        return EXIT_USAGE
    if (args.all or args.held) and sel.empty:
        # As before selectors existed: no confirmation for the whole deferred queue.
        qids: list[str] | int = [e.qid for e in _entries(_rows(spool, time.time()))
                                 if _retry_selects(e, held=args.held)]
    else:
        qids = _targets(args, spool, lambda e: _retry_selects(e, held=args.held), "retry")
    if isinstance(qids, int):
        return qids
    if args.dry_run:
        return _dry_run(args, qids, "retry")
    rc = EXIT_OK
    done: list[str] = []
    failed: list[str] = []
    deadline = _deadline(args)
    event = {"ev": "retry", "by": operator_name()}
    for qid in qids:
        # An explicit retry also releases a held message (gateway.queue.state.fold);
        # a selection holds no held message unless --held asked for them.
        if not _known(spool, qid) or not _under_claim(
                args, spool, qid, deadline, "retried",
                functools.partial(spool.append_event, qid, dict(event))):
            rc = EXIT_PROBLEM
            failed.append(qid)
            continue
        done.append(qid)
    poke_service(cfg)
    for qid in done:
        _report(args, qid, "retry", "scheduled for delivery now")
    if (args.all or args.held) and not qids and not args.json:
        print("no held messages" if args.held else "no deferred messages")
    _log_bulk(cfg, args, "retry", done, failed)
    return rc


def _retry_selects(e: Entry, *, held: bool) -> bool:
    """--held: held after a stage failure; otherwise (--all, a selection): not held."""
    if held:
        return e.state == "held" and e.held_reason == "error"
    return e.state in ("active", "deferred")


def cmd_hold(args: argparse.Namespace) -> int:
    cfg, spool = _open(args)
    # A selection leaves held messages alone: a new hold would replace the record of
    # why they are held (a quarantine, a stage failure).
    qids = _targets(args, spool, lambda e: e.state in ("active", "deferred"), "hold")
    if isinstance(qids, int):
        return qids
    if args.dry_run:
        return _dry_run(args, qids, "hold")
    who = operator_name()
    reason = f"held by {who}" + (f": {args.reason}" if args.reason else "")
    setup_log(cfg)
    event = {"ev": "held", "stage": "operator", "error": reason, "by": who,
             "reason": "operator"}
    rc, done, failed = EXIT_OK, [], []
    deadline = _deadline(args)
    for qid in qids:
        if not _known(spool, qid) or not _hold_one(args, spool, qid, event, deadline):
            rc = EXIT_PROBLEM
            failed.append(qid)
            continue
        log.event("queue_hold", qid=qid, by=who, reason=args.reason)
        done.append(qid)
        _report(args, qid, "hold", "held")
    _log_bulk(cfg, args, "hold", done, failed, reason=args.reason)
    return rc


def cmd_release(args: argparse.Namespace) -> int:
    cfg, spool = _open(args)
    # A quarantined message is released by a selection only if it names that state:
    # "release --from x" must not let through what the policy quarantined as spam.
    quarantine = "quarantined" in args.state
    qids = _targets(args, spool,
                    lambda e: e.state == "held" or (quarantine and e.state == "quarantined"),
                    "release")
    if isinstance(qids, int):
        return qids
    if args.dry_run:
        return _dry_run(args, qids, "release")
    who = operator_name()
    setup_log(cfg)
    rc, done, failed = EXIT_OK, [], []
    deadline = _deadline(args)
    for qid in qids:
        if not _known(spool, qid) or not _under_claim(
                args, spool, qid, deadline, "released",
                functools.partial(spool.append_event, qid, {"ev": "released", "by": who})):
            rc = EXIT_PROBLEM
            failed.append(qid)
            continue
        log.event("queue_release", qid=qid, by=who)
        done.append(qid)
        _report(args, qid, "release", "released")
    poke_service(cfg)
    _log_bulk(cfg, args, "release", done, failed)
    return rc


def cmd_delete(args: argparse.Namespace) -> int:
    cfg, spool = _open(args)
    qids = _targets(args, spool, lambda e: True, "delete")
    if isinstance(qids, int):
        return qids
    if args.dry_run:
        return _dry_run(args, qids, "delete")
    who = operator_name()
    deadline = _deadline(args)
    setup_log(cfg)
    done: list[str] = []
    failed: list[str] = []
    for qid in qids:
        if not _known(spool, qid) or not _delete_one(args, spool, qid, who, deadline):
            failed.append(qid)
        else:
            done.append(qid)
    _log_bulk(cfg, args, "delete", done, failed, reason=args.reason)
    return EXIT_PROBLEM if failed else EXIT_OK


def _delete_one(args: argparse.Namespace, spool: Spool, qid: str, who: str,
                deadline: float) -> bool:
    """Take the message's claim (waiting for an attempt in progress until ``deadline``),
    remove it and log who deleted it, why and what was never delivered."""
    sender, size = "", 0
    pending: list[str] = []

    def delete() -> None:
        nonlocal sender, pending, size
        try:
            env, _f, size = spool.read_header(qid)
            sender, pending = env.mail_from, spool.read_state(qid, env.rcpt_to).pending
        except SpoolError:
            pass
        spool.append_event(qid, {"ev": "deleted", "by": who, "reason": args.reason})
        spool.remove(qid)

    if not _under_claim(args, spool, qid, deadline, "deleted", delete):
        return False
    log.event("queue_delete", qid=qid, by=who, reason=args.reason, sender=sender,
              undelivered=pending, size=size)
    _report(args, qid, "delete", f"deleted ({len(pending)} recipient(s) never delivered)",
            undelivered=pending)
    return True

