"""``coffer spam score|train|learn|stats`` and ``coffer quarantine list|show|release|delete``.

``coffer spam score MESSAGE... [--json]`` scores files with the built-in scorer
(heuristics and the classifier; no DNS, no external scanner) and prints the
score, the verdict and the symbols; with ``--json`` one object per line:
``{"file", "score", "verdict", "action", "symbols"}``.  Files may begin with an
mbox ``From `` line.  The exit code is 0 whatever the verdicts are.

``coffer spam train --ham DIR --spam DIR`` teaches the classifier every file
under the two directories; ``coffer spam learn ham|spam MESSAGE...`` a few more
(a message learned before as the other class is moved).  The token database is
``spam.bayes.db`` under the data directory (or ``--db``).

``coffer quarantine ...`` works on the spool's messages held with the reason
"quarantine" (gateway.queue.state): ``release`` appends the ``released`` event,
after which the worker delivers the message through the normal path (the
quarantine decision is not applied again), and with ``--learn`` teaches the
classifier that it was ham; ``delete`` removes it for good, logged.  Both act
under the message's claim as ``coffer queue`` does (gateway.cli.claims): they
wait up to ``--wait`` seconds (10 for release, 60 for delete) for a delivery
attempt that holds it, and report a message still busy then with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gateway import config, log
from gateway.check.spam.bayes import BayesError, TokenStore
from gateway.check.spam.config import spam_config_of
from gateway.check.spam.scorer import Scorer, Verdict
from gateway.cli import claims, operator_name
from gateway.cli.claims import wait_option
from gateway.errors import SpoolError
from gateway.queue.spool import Spool

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
BATCH = 500  # messages learned per transaction by ``train``


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="configuration file (default: $COFFER_CONFIG, else ./coffer.yaml "
                        "if it exists, else built-in defaults)")
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", metavar="FILE",
                    help="token database (default: spam.bayes.db of the configuration)")

    spam = sub.add_parser("spam", help="score messages, train the spam classifier")
    ssub = spam.add_subparsers(dest="spam_command", metavar="COMMAND")
    ssub.required = True

    sc = ssub.add_parser("score", parents=[common, db], help="score message files",
                         description="Score each MESSAGE with the built-in scorer (no DNS) "
                         "and print its score, verdict and symbols.")
    sc.add_argument("messages", nargs="+", metavar="MESSAGE", help="message file ('-': stdin)")
    sc.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    sc.set_defaults(func=cmd_score)

    tr = ssub.add_parser("train", parents=[common, db], help="learn directories of ham and spam",
                         description="Teach the classifier every file under --ham and --spam.")
    tr.add_argument("--ham", action="append", default=[], metavar="DIR", help="ham (repeatable)")
    tr.add_argument("--spam", action="append", default=[], metavar="DIR",
                    help="spam (repeatable)")
    tr.add_argument("--progress", action="store_true",
                    help="show progress on stderr even when it is not a terminal")
    tr.add_argument("--json", action="store_true", help="print the totals as one JSON object")
    tr.set_defaults(func=cmd_train)

    le = ssub.add_parser("learn", parents=[common, db], help="learn messages as ham or spam")
    le.add_argument("kind", choices=["ham", "spam"])
    le.add_argument("messages", nargs="+", metavar="MESSAGE")
    le.add_argument("--json", action="store_true", help="print the totals as one JSON object")
    le.set_defaults(func=cmd_learn)

    st = ssub.add_parser("stats", parents=[common, db], help="what the classifier has learned")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_stats)

    q = sub.add_parser("quarantine", help="list and act on quarantined messages",
                       description="Messages held by a quarantine decision, in the spool.")
    qsub = q.add_subparsers(dest="quarantine_command", metavar="COMMAND")
    qsub.required = True
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    ql = qsub.add_parser("list", parents=[common, js], help="list quarantined messages")
    ql.set_defaults(func=cmd_q_list)
    qs = qsub.add_parser("show", parents=[common, js], help="one quarantined message")
    qs.add_argument("qid", metavar="QID")
    qs.set_defaults(func=cmd_q_show)
    qr = qsub.add_parser("release", parents=[common, js, db, wait_option(10.0)],
                         help="deliver quarantined messages after all")
    qr.add_argument("qids", nargs="+", metavar="QID")
    qr.add_argument("--learn", action="store_true", help="and teach the classifier they are ham")
    qr.set_defaults(func=cmd_q_release)
    qd = qsub.add_parser("delete", parents=[common, js, wait_option(60.0)],
                         help="remove quarantined messages")
    qd.add_argument("qids", nargs="+", metavar="QID")
    qd.add_argument("--reason", default="", help="recorded in the log")
    qd.set_defaults(func=cmd_q_delete)


# -- helpers -------------------------------------------------------------------


def _err(msg: str) -> None:
    print(f"coffer: {msg}", file=sys.stderr)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False, default=str))


def _load_config(args: argparse.Namespace) -> Any:
    path = config.find_config(args.config)
    if args.config or os.environ.get("COFFER_CONFIG") or path.exists():
        return config.load(path)  # a ConfigError becomes exit 2 in gateway.cli.main
    return config.defaults(Path.cwd())


def _scorer(args: argparse.Namespace, cfg: Any | None = None) -> Scorer:
    cfg = cfg if cfg is not None else _load_config(args)
    spam = spam_config_of(cfg)
    db = getattr(args, "db", None)
    if db:
        return Scorer(spam, TokenStore(Path(db)))
    return Scorer.from_config(cfg)


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    return Path(path).read_bytes()


def _files(root: str) -> Iterator[Path]:
    p = Path(root)
    if p.is_file():
        yield p
        return
    if not p.is_dir():
        raise FileNotFoundError(root)
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def verdict_object(file: str, v: Verdict) -> dict[str, Any]:
    obj: dict[str, Any] = {"file": file, "score": v.score, "verdict": v.verdict,
                           "action": v.action, "symbols": v.symbols}
    if v.bayes is not None:
        obj["bayes"] = round(v.bayes, 4)
    return obj


# -- spam ----------------------------------------------------------------------


def cmd_score(args: argparse.Namespace) -> int:
    scorer = _scorer(args)
    rc = EXIT_OK
    try:
        for name in args.messages:
            try:
                data = _read(name)
            except OSError as exc:
                _err(f"cannot read {name}: {exc.strerror or exc}")
                rc = EXIT_USAGE
                continue
            v = scorer.score(data)
            if args.json:
                _emit(verdict_object(name, v))
                continue
            print(f"{name}: {v.verdict} score={v.score:g} action={v.action}")
            for sym, w in sorted(v.symbols.items(), key=lambda kv: (-abs(kv[1]), kv[0])):
                detail = v.details.get(sym, "")
                print(f"  {sym:28} {w:+7.2f}" + (f"  {detail}" if detail else ""))
    finally:
        scorer.close()
    return rc


def _progress_on(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "progress", False)) or sys.stderr.isatty()


def cmd_train(args: argparse.Namespace) -> int:
    if not args.ham and not args.spam:
        _err("give --ham DIR and/or --spam DIR")
        return EXIT_USAGE
    try:
        jobs = [(f, False) for d in args.ham for f in _files(d)]
        jobs += [(f, True) for d in args.spam for f in _files(d)]
    except FileNotFoundError as exc:
        _err(f"no such file or directory: {exc}")
        return EXIT_USAGE
    scorer = _scorer(args)
    show = _progress_on(args)
    learned = unreadable = 0
    started = time.monotonic()
    try:
        for i in range(0, len(jobs), BATCH):
            batch: list[tuple[bytes, bool]] = []
            for path, is_spam in jobs[i:i + BATCH]:
                try:
                    batch.append((path.read_bytes(), is_spam))
                except OSError as exc:
                    _err(f"cannot read {path}: {exc.strerror or exc}")
                    unreadable += 1
            learned += scorer.learn(batch, at=time.time())
            if show:
                done = min(i + BATCH, len(jobs))
                print(f"\rlearned {done}/{len(jobs)} messages "
                      f"({time.monotonic() - started:.0f}s)", end="", file=sys.stderr,
                      flush=True)
        if show:
            print(file=sys.stderr)
        nspam, nham, ntokens = scorer.store.counts() if scorer.store else (0, 0, 0)
    except BayesError as exc:
        _err(str(exc))
        return EXIT_PROBLEM
    finally:
        scorer.close()
    totals = {"files": len(jobs), "learned": learned, "unreadable": unreadable,
              "spam": nspam, "ham": nham, "tokens": ntokens}
    if args.json:
        _emit(totals)
    else:
        print(f"learned {learned} of {len(jobs)} messages (the others were known); "
              f"database: {nspam} spam, {nham} ham, {ntokens} tokens")
    return EXIT_PROBLEM if unreadable else EXIT_OK


def cmd_learn(args: argparse.Namespace) -> int:
    batch: list[tuple[bytes, bool]] = []
    for name in args.messages:
        try:
            batch.append((_read(name), args.kind == "spam"))
        except OSError as exc:
            _err(f"cannot read {name}: {exc.strerror or exc}")
            return EXIT_USAGE
    scorer = _scorer(args)
    try:
        learned = scorer.learn(batch, at=time.time())
        nspam, nham, _ = scorer.store.counts() if scorer.store else (0, 0, 0)
    except BayesError as exc:
        _err(str(exc))
        return EXIT_PROBLEM
    finally:
        scorer.close()
    if args.json:
        _emit({"learned": learned, "given": len(batch), "spam": nspam, "ham": nham})
    else:
        print(f"learned {learned} of {len(batch)} as {args.kind} "
              f"(database: {nspam} spam, {nham} ham)")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    scorer = _scorer(args, cfg)
    try:
        nspam, nham, ntokens = scorer.store.counts() if scorer.store else (0, 0, 0)
    finally:
        scorer.close()
    need = spam_config_of(cfg).bayes.min_learned
    obj = {"spam": nspam, "ham": nham, "tokens": ntokens, "min_learned": need,
           "ready": nspam >= need and nham >= need}
    if args.json:
        _emit(obj)
    else:
        print(f"{nspam} spam, {nham} ham, {ntokens} tokens learned; the classifier is "
              + ("used" if obj["ready"] else f"not used until {need} of each are learned"))
    return EXIT_OK


# -- quarantine ----------------------------------------------------------------


def _spool(cfg: Any) -> Spool:
    try:
        return Spool(cfg.spool_dir, fsync=cfg.queue.fsync)
    except OSError as exc:
        raise SpoolError(f"cannot open the spool {cfg.spool_dir}: {exc.strerror or exc}") from None


def _quarantined(spool: Spool, qid: str) -> dict[str, Any] | None:
    """A summary of ``qid`` if it is held in quarantine, else None."""
    try:
        env, facts, size = spool.read_header(qid)
    except (FileNotFoundError, SpoolError):
        return None
    st = spool.read_state(qid, env.rcpt_to)
    if not (st.held and st.held_reason == "quarantine"):
        return None
    spam = facts.get("spam")
    spam = spam if isinstance(spam, dict) else {}
    return {
        "qid": qid, "received_at": env.received_at, "size": size, "sender": env.mail_from,
        "recipients": env.rcpt_to, "stage": st.held_stage, "reason": st.held_error,
        "score": spam.get("score"), "verdict": spam.get("verdict"),
    }


def _subject(spool: Spool, qid: str) -> str:
    from gateway.check.spam.message import parse_headers, split_head

    try:
        data = spool.load(qid).data
    except SpoolError:
        return ""
    head = split_head(data[:65536])[0].decode("utf-8", "replace")
    for name, value in parse_headers(head):
        if name == "subject":
            return value
    return ""


def cmd_q_list(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    spool = _spool(cfg)
    rows = [r for q in spool.queue_ids() if (r := _quarantined(spool, q)) is not None]
    for r in rows:
        r["subject"] = _subject(spool, r["qid"])
    if args.json:
        for r in rows:
            _emit(r)
        return EXIT_OK
    if not rows:
        print("no quarantined messages")
        return EXIT_OK
    print(f"{'QID':20} {'RECEIVED':16} {'SCORE':>6}  SENDER / SUBJECT")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["received_at"] or 0))
        score = f"{r['score']:.1f}" if isinstance(r["score"], int | float) else "-"
        print(f"{r['qid']:20} {when:16} {score:>6}  <{r['sender']}>  {r['subject'][:50]}")
    return EXIT_OK


def cmd_q_show(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    spool = _spool(cfg)
    row = _quarantined(spool, args.qid)
    if row is None:
        _err(f"{args.qid}: no such quarantined message")
        return EXIT_PROBLEM
    msg = spool.load(args.qid)
    from gateway.check.spam.message import parse_headers, split_head

    head = split_head(msg.data)[0].decode("utf-8", "replace")
    headers = [(n, v) for n, v in parse_headers(head)
               if n in ("from", "to", "cc", "subject", "date", "message-id", "reply-to")]
    spam = msg.facts.get("spam") if isinstance(msg.facts.get("spam"), dict) else {}
    obj = {**row, "envelope": msg.envelope.to_dict(), "spam": spam,
           "decide": msg.facts.get("decide"), "headers": dict(headers)}
    if args.json:
        _emit(obj)
        return EXIT_OK
    print(f"queue id     {args.qid}")
    print(f"quarantined  by {row['stage'] or '?'}: {row['reason']}")
    print(f"from         <{msg.envelope.mail_from}> ({msg.envelope.client_ip or '-'})")
    for r in msg.envelope.rcpt_to:
        print(f"to           <{r}>")
    for n, v in headers:
        print(f"{n + ':':12} {v}")
    if spam:
        print(f"spam         {spam.get('verdict')} score={spam.get('score')} "
              f"action={spam.get('action')}")
        symbols = spam.get("symbols") or {}
        for sym, w in sorted(symbols.items(), key=lambda kv: -abs(float(kv[1]))):
            print(f"  {sym:28} {float(w):+7.2f}")
    return EXIT_OK


def _setup_log(cfg: Any) -> None:
    file = cfg.path(cfg.log.file) if cfg.log.file else None
    log.setup(cfg.log.level, cfg.log.format, file)


def _quarantined_under_claim(args: argparse.Namespace, spool: Spool, qid: str,
                             until: float, action: str,
                             do: Callable[[], object]) -> bool:
    """Run ``do`` under the message's claim if it is (still) in quarantine, as the
    queue commands do (gateway.cli.claims); False, said on stderr, if not done.

    Asked again under the claim: another operator may have released or deleted it
    since the first look."""
    if _quarantined(spool, qid) is None:
        _err(f"{qid}: no such quarantined message")
        return False
    still = True

    def checked() -> None:
        nonlocal still
        still = _quarantined(spool, qid) is not None
        if still:
            do()

    if not claims.under_claim(spool, qid, until, action, checked, wait=args.wait, err=_err):
        return False
    if not still:
        _err(f"{qid}: no longer in quarantine (released or deleted meanwhile); not {action}")
    return still


def cmd_q_release(args: argparse.Namespace) -> int:
    from gateway.cli.queue import poke_service

    cfg = _load_config(args)
    spool = _spool(cfg)
    who = operator_name()
    rc = EXIT_OK
    released: list[str] = []
    to_learn: list[tuple[bytes, bool]] = []
    until = claims.deadline(args.wait)
    for qid in args.qids:
        def release(qid: str = qid) -> None:
            if args.learn:  # read first: a release whose message cannot be read is none
                to_learn.append((spool.load(qid).data, False))
            spool.append_event(qid, {"ev": "released", "by": who})

        if not _quarantined_under_claim(args, spool, qid, until, "released", release):
            rc = EXIT_PROBLEM
            continue
        released.append(qid)
    learned = 0
    if to_learn:
        scorer = _scorer(args, cfg)
        try:
            learned = scorer.learn(to_learn, at=time.time())
        except BayesError as exc:
            _err(f"released, but not learned: {exc}")
            rc = EXIT_PROBLEM
        finally:
            scorer.close()
    if released:
        _setup_log(cfg)
        for qid in released:
            log.event("quarantine_release", qid=qid, by=who, learned=bool(args.learn))
        poke_service(cfg)
    for qid in released:
        if args.json:
            _emit({"qid": qid, "action": "release", "learned": bool(args.learn)})
        else:
            print(f"{qid}: released" + (" and learned as ham" if args.learn else ""))
    if args.learn and not args.json and released and learned < len(to_learn):
        print(f"({len(to_learn) - learned} were already learned as ham)")
    return rc


def cmd_q_delete(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    spool = _spool(cfg)
    who = operator_name()
    rc = EXIT_OK
    until = claims.deadline(args.wait)
    for qid in args.qids:
        gone: dict[str, Any] = {}

        def delete(qid: str = qid, gone: dict[str, Any] = gone) -> None:
            env, _facts, size = spool.read_header(qid)
            gone.update(sender=env.mail_from, recipients=env.rcpt_to, size=size)
            spool.append_event(qid, {"ev": "deleted", "by": who, "reason": args.reason})
            spool.remove(qid)

        if not _quarantined_under_claim(args, spool, qid, until, "deleted", delete):
            rc = EXIT_PROBLEM
            continue
        _setup_log(cfg)
        log.event("quarantine_delete", qid=qid, by=who, reason=args.reason, **gone)
        if args.json:
            _emit({"qid": qid, "action": "delete"})
        else:
            print(f"{qid}: deleted")
    return rc
