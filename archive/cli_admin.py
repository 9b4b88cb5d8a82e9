"""Archive administration: retention, legal holds, import, reindex and the audit log.

    coffer archive expire [--dry-run] [--json]       expire what retention allows
    coffer archive import PATH [--json] [--progress] [--retention PERIOD]
    coffer archive reindex [--engine fts5|whoosh|pg] [--progress]
    coffer archive audit-db [--json]                 cross-check the database and ledger
    coffer archive repair [--dry-run] [--json] [--progress]
                                                     rebuild a damaged segment header
    coffer hold create CASE --query QUERY [--reason TEXT] [--json]
    coffer hold list [--active] [--json] | show CASE [--json] | release CASE [--json]
    coffer audit log [--since DATE] [--json]

Every command takes ``--data-dir DIR | --config FILE`` and ``--database URL``
(default $COFFER_ARCHIVE_DB, else DATA_DIR/archive/meta.db); commands that act
for an officer take ``--officer NAME`` (default $USER).  Holds, releases and
expiries, imports and repairs are audited in the database and the ledger
(archive.audit); dry runs, ``reindex`` (derived data), ``audit-db`` and the read-only
``hold list|show`` and ``audit log`` are not.

There is no command that deletes a message: ``expire`` removes only what
retention allows and no hold covers (archive.retention).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from archive.audit import check_database, record
from archive.cli_common import (
    SubParsers,
    add_location_arguments,
    archive_subparsers,
)
from archive.errors import ArchiveError
from archive.facade import Archive
from archive.holds import HoldInfo, create_hold, get_hold, list_holds, release_hold
from archive.importer import ImportFailure, ImportReport, import_path
from archive.index import Index, Indexer
from archive.joblock import JobLock
from archive.location import location_from_args
from archive.metadata import Metadata, current_officer
from archive.query import QueryError
from archive.retention import expire
from archive.search import Searcher
from archive.store import HeaderRepair

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
ENGINES = ("fts5", "whoosh", "pg")


def register(sub: SubParsers) -> None:
    asub = archive_subparsers(sub)

    e = asub.add_parser(
        "expire", help="expire messages whose retention ended and that no hold covers",
        description="Crypto-shred every message whose retention period has ended and that "
        "no active legal hold covers (recorded items, a hold's query today, or a policy "
        "hold).  Rows are kept, marked expired; the ledger keeps a tombstone.")
    e.add_argument("--dry-run", action="store_true", help="report, change nothing")
    e.add_argument("--json", action="store_true", help="one JSON object per line")
    _common(e, officer=True)
    e.set_defaults(func=cmd_expire)

    i = asub.add_parser(
        "import", help="import an mbox, a Maildir or a directory of .eml files",
        description="Import messages (idempotent: importing the same PATH again stores "
        "nothing new).  Exit 1 if any file or message could not be imported.")
    i.add_argument("path", metavar="PATH", help="mbox file, Maildir, .eml file or directory")
    i.add_argument("--json", action="store_true", help="one JSON object per line")
    i.add_argument("--progress", action="store_true",
                   help="show progress on stderr even when it is not a terminal")
    i.add_argument("--retention", metavar="PERIOD",
                   help="keep imported messages for PERIOD (7y, 18mo, 90d) from their Date "
                   "(default: forever)")
    _common(i, officer=True)
    i.set_defaults(func=cmd_import)

    r = asub.add_parser(
        "reindex", help="rebuild a full-text index from the store",
        description="Empty the full-text index and index every live message again from the "
        "store.")
    r.add_argument("--engine", choices=ENGINES, default=None,
                   help="engine to rebuild (default: pg with PostgreSQL, else fts5)")
    r.add_argument("--progress", action="store_true",
                   help="show progress on stderr even when it is not a terminal")
    _common(r, index=False)
    r.set_defaults(func=cmd_reindex)

    a = asub.add_parser(
        "audit-db", help="cross-check the metadata database against the ledger",
        description="Find message rows deleted from (or added to) the database, audit events "
        "deleted from it and unfinished expiries, using the ledger as the proof.")
    a.add_argument("--json", action="store_true", help="one JSON object per finding, "
                   "then a summary")
    _common(a, index=False)
    a.set_defaults(func=cmd_audit_db)

    rp = asub.add_parser(
        "repair", help="rebuild a store segment header a power loss damaged, if provable",
        description="For each store segment whose header does not parse (verify's "
        "segment_header_damaged): if its first record starts at byte 7, right after a "
        "writer's 7-byte header, and every record frames to the end and authenticates "
        "with its key table, write the segment again with that header (new file, fsync, "
        "rename) and record it in the ledger (store_repaired, with the old header bytes). "
        "Otherwise say why not and change nothing.  Exit 1 if any damaged segment was left "
        "as it was.")
    rp.add_argument("--dry-run", action="store_true", help="report, change nothing")
    rp.add_argument("--json", action="store_true", help="one JSON object per segment, "
                    "then a summary")
    rp.add_argument("--progress", action="store_true",
                    help="show progress on stderr even when it is not a terminal")
    _common(rp, officer=True, index=False)
    rp.set_defaults(func=cmd_repair)

    h = sub.add_parser("hold", help="legal holds: create, list, show, release",
                       description="Legal holds by case.  A held message is never expired.")
    hsub = h.add_subparsers(dest="hold_command", metavar="HOLD_COMMAND")
    hsub.required = True
    hc = hsub.add_parser("create", help="place a hold on every message matching a query",
                         description="Run QUERY and hold every match; the query is kept as "
                         "evidence, and messages matching it later are held too.")
    hc.add_argument("case", metavar="CASE")
    hc.add_argument("--query", required=True, metavar="QUERY")
    hc.add_argument("--reason", default="", metavar="TEXT")
    hc.add_argument("--json", action="store_true")
    _common(hc, officer=True)
    hc.set_defaults(func=cmd_hold_create)
    hl = hsub.add_parser("list", help="every hold (released ones too, as history)")
    hl.add_argument("--active", action="store_true", help="only holds not released")
    hl.add_argument("--json", action="store_true")
    _common(hl, index=False)
    hl.set_defaults(func=cmd_hold_list)
    hs = hsub.add_parser("show", help="one hold with its query and held message ids")
    hs.add_argument("case", metavar="CASE")
    hs.add_argument("--json", action="store_true")
    _common(hs, index=False)
    hs.set_defaults(func=cmd_hold_show)
    hr = hsub.add_parser("release", help="end a hold (it is kept as history)")
    hr.add_argument("case", metavar="CASE")
    hr.add_argument("--json", action="store_true")
    _common(hr, officer=True, index=False)
    hr.set_defaults(func=cmd_hold_release)

    au = sub.add_parser("audit", help="the audit log", description="Who searched, viewed, "
                        "exported, held, released or expired what, and when.")
    ausub = au.add_subparsers(dest="audit_command", metavar="AUDIT_COMMAND")
    ausub.required = True
    al = ausub.add_parser("log", help="print audit events")
    al.add_argument("--since", metavar="DATE", type=_date,
                    help="only events at or after DATE (YYYY-MM-DD or ISO 8601, UTC)")
    al.add_argument("--json", action="store_true")
    _common(al, index=False)
    al.set_defaults(func=cmd_audit_log)


def _common(p: argparse.ArgumentParser, *, officer: bool = False, index: bool = True) -> None:
    add_location_arguments(p)
    p.add_argument("--database", metavar="URL",
                   help="metadata database URL (default $COFFER_ARCHIVE_DB, else "
                   "DATA_DIR/archive/meta.db)")
    if index:
        p.add_argument("--index", choices=ENGINES, default=None,
                       help="full-text engine (default: pg with PostgreSQL, else fts5)")
    if officer:
        p.add_argument("--officer", metavar="NAME", help="who is acting (default $USER)")


def _date(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD or ISO 8601): {text!r}"
                                         ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass
class _Env:
    data_dir: Path
    meta: Metadata
    archive: Archive
    index: Index | None


@contextmanager
def _open(args: argparse.Namespace, *, create: bool = False, engine: str | None = None,
          need_index: bool = True) -> Iterator[_Env]:
    loc = location_from_args(args)
    data_dir = loc.data_dir
    meta = loc.open_metadata(must_exist=not create, migrate=False)
    archive: Archive | None = None
    index: Index | None = None
    try:
        meta.migrate()
        archive = loc.open_archive(create=create)
        if need_index:
            index = loc.open_index(meta, engine)
        yield _Env(data_dir, meta, archive, index)
    finally:
        if index is not None:
            index.close()
        if archive is not None:
            archive.close()
        meta.close()


class _Progress:
    """A one-line counter on stderr, redrawn at most five times a second."""

    def __init__(self, what: str, enabled: bool) -> None:
        self.what = what
        self.enabled = enabled
        self.last = 0.0
        self.shown = False

    def __call__(self, text: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        self.shown = True
        print(f"\r{self.what}: {text}\x1b[K", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.shown:
            print(file=sys.stderr, flush=True)


# -- expire -----------------------------------------------------------------------------


def cmd_expire(args: argparse.Namespace) -> int:
    who = current_officer(args.officer)
    with _open(args) as env, JobLock("retention-expire", env.meta, env.data_dir).attempt() as mine:
        assert env.index is not None
        if not mine:
            # Each node's cron may start this at the same minute: one run does the work.
            note = "another node or process is expiring now: nothing done by this run"
            if args.json:
                print(json.dumps({"type": "summary", "skipped": True, "reason": note}))
            else:
                print(f"coffer: {note}", file=sys.stderr)
            return EXIT_OK
        report = expire(env.meta, env.archive, env.index, who, dry_run=args.dry_run)
    if args.json:
        for item in report.expired:
            print(json.dumps(item.to_json()))
        for kept in report.kept:
            print(json.dumps(kept.to_json()))
        print(json.dumps(report.to_json()))
        return EXIT_OK
    verb = "would expire" if args.dry_run else "expired"
    for item in report.expired:
        print(f"{verb} {item.message_id}  retention ended {item.retention_until:%Y-%m-%d}"
              f"{'  rule ' + item.rule if item.rule else ''}"
              f"{'' if item.blob_shredded else '  (content kept: another copy is live)'}")
    for kept in report.kept:
        print(f"kept {kept.message_id}  {kept.reason}")
    print(f"{len(report.expired)} message(s) {verb}, {len(report.kept)} due but kept"
          + ("" if args.dry_run else f", {report.blobs_shredded} blob(s) shredded"),
          file=sys.stderr)
    return EXIT_OK


# -- import -----------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        print(f"coffer: {path}: no such file or directory", file=sys.stderr)
        return EXIT_USAGE
    if args.retention:
        from gateway.archive_stage import retention_end

        try:
            retention_end(datetime.now(UTC), args.retention)
        except ValueError as exc:
            print(f"coffer: --retention: {exc}", file=sys.stderr)
            return EXIT_USAGE
    bar = _Progress("import", args.progress or sys.stderr.isatty())

    def progress(r: ImportReport) -> None:
        bar(f"{r.found} messages, {r.stored} stored, {r.duplicates} already imported, "
            f"{len(r.failures)} failed")

    def failed(f: ImportFailure) -> None:
        bar.done()
        bar.shown = False
        if args.json:
            print(json.dumps(f.to_json(), ensure_ascii=False), flush=True)
        else:
            print(f"coffer: {f.where}: {f.error}", file=sys.stderr)

    who = current_officer(args.officer)
    with _open(args, create=True) as env:
        # Messages added to the archive by hand, not by the gateway: audited with what came
        # in (and what could not), as an expiry is with what went out.
        detail: dict[str, object] = {"source": str(path), "retention": args.retention}
        try:
            report = import_path(env.meta, env.archive, env.index, path,
                                 retention=args.retention, progress=progress,
                                 on_failure=failed)
        except ArchiveError as exc:
            record(env.meta, env.archive, who, "import", result_count=0,
                   detail={**detail, "error": str(exc)})
            raise
        record(env.meta, env.archive, who, "import", result_count=report.stored,
               detail={**detail, "found": report.found, "new_blobs": report.new_blobs,
                       "duplicates": report.duplicates, "failed": len(report.failures)})
    bar.done()
    if args.json:
        print(json.dumps(report.to_json(), ensure_ascii=False))
    else:
        print(f"imported {report.stored} new message(s) from {report.source} "
              f"({report.new_blobs} new blobs, {report.duplicates} already imported, "
              f"{report.skipped_files} other files skipped, {report.indexed} indexed)")
    if report.failures:
        print(f"coffer: {len(report.failures)} item(s) could not be imported", file=sys.stderr)
        return EXIT_PROBLEM
    return EXIT_OK


# -- reindex ----------------------------------------------------------------------------


def cmd_reindex(args: argparse.Namespace) -> int:
    bar = _Progress(f"reindex {args.engine or ''}".strip(), args.progress or sys.stderr.isatty())
    with _open(args, engine=args.engine) as env:
        assert env.index is not None
        total = env.meta.approx_blobs()
        started = time.monotonic()
        n = Indexer(env.meta, env.index, env.archive.get).rebuild(
            progress=lambda done: bar(f"{done}/{total} blobs", force=done >= total))
        name = env.index.name
        docs = env.index.count()
    bar.done()
    print(f"reindexed {n} blobs into {name} ({docs} documents) in "
          f"{time.monotonic() - started:.1f} s")
    return EXIT_OK


# -- audit-db ---------------------------------------------------------------------------


def cmd_audit_db(args: argparse.Namespace) -> int:
    with _open(args, need_index=False) as env:
        findings = check_database(env.meta, env.archive.paths.ledger)
    errors = sum(1 for f in findings if f.severity == "error")
    for f in findings:
        print(json.dumps(f.as_dict()) if args.json else str(f))
    if args.json:
        print(json.dumps({"type": "summary", "findings": len(findings), "errors": errors,
                          "ok": errors == 0}))
    else:
        print(f"{'OK' if errors == 0 else 'PROBLEMS FOUND'}: {len(findings)} finding(s), "
              f"{errors} error(s)")
    return EXIT_OK if errors == 0 else EXIT_PROBLEM


# -- repair -----------------------------------------------------------------------------


def cmd_repair(args: argparse.Namespace) -> int:
    who = current_officer(args.officer)
    bar = _Progress("repair", args.progress or sys.stderr.isatty())
    with _open(args, need_index=False) as env:
        plans = env.archive.repair_headers(
            dry_run=args.dry_run,
            progress=lambda done, total: bar(f"{done}/{total} segments", force=done >= total))
        repaired = [p for p in plans if p.done]
        refused = [p for p in plans if not p.repairable]
        if not args.dry_run:
            # An officer's action on the archive's bytes: audited even when nothing was
            # done, as an expiry run is (archive.retention).
            record(env.meta, env.archive, who, "repair", result_count=len(repaired),
                   detail={"repaired": [p.segment for p in repaired],
                           "refused": [p.segment for p in refused]})
    bar.done()
    for p in plans:
        if args.json:
            print(json.dumps(_repair_json(p, args.dry_run)))
        elif p.repairable:
            print(f"{'repaired' if p.done else 'would repair'} {p.segment}: {p.reason}")
        else:
            print(f"cannot repair {p.segment}: {p.reason}; nothing changed")
    ok = not refused
    if args.json:
        print(json.dumps({"type": "summary", "damaged": len(plans), "repaired": len(repaired),
                          "would_repair": len([p for p in plans if p.repairable and not p.done]),
                          "refused": len(refused), "dry_run": args.dry_run, "ok": ok}))
    elif not plans:
        print("no store segment has a damaged header: nothing to repair", file=sys.stderr)
    else:
        verb = "would be repaired" if args.dry_run else "repaired"
        print(f"{len(plans)} damaged segment(s): "
              f"{len(plans) - len(refused)} {verb}, {len(refused)} left as they are"
              + ("" if ok else " (restore them from a backup: docs/recovery.md)"),
              file=sys.stderr)
    return EXIT_OK if ok else EXIT_PROBLEM


def _repair_json(p: HeaderRepair, dry_run: bool) -> dict[str, object]:
    action = "repaired" if p.done else "would_repair" if p.repairable else "refused"
    return {"type": "segment", "segment": p.segment, "action": action, "reason": p.reason,
            "old_header": p.old_header.hex(), "new_header": p.new_header.hex(),
            "records": p.records, "authenticated": p.authenticated, "dry_run": dry_run}


# -- holds ------------------------------------------------------------------------------


def _print_hold(h: HoldInfo, as_json: bool, *, with_ids: bool = False) -> None:
    if as_json:
        print(json.dumps(h.to_json(with_ids=with_ids), ensure_ascii=False))
        return
    state = "active" if h.active else (
        f"released {h.released_at:%Y-%m-%d %H:%M} by {h.released_by}" if h.released_at else "")
    print(f"{h.case}  {state}  {h.items} message(s)  created {h.created_at:%Y-%m-%d %H:%M} "
          f"by {h.created_by}")
    print(f"  query: {h.query}")
    if h.reason:
        print(f"  reason: {h.reason}")
    if with_ids:
        print(f"  messages: {' '.join(map(str, h.message_ids)) or '(none)'}")


def cmd_hold_create(args: argparse.Namespace) -> int:
    who = current_officer(args.officer)
    try:
        with _open(args) as env:
            assert env.index is not None
            # Bring the index up to date so the hold sees every message stored so far.
            Indexer(env.meta, env.index, env.archive.get).run()
            searcher = Searcher(env.meta, env.index, env.archive.get)
            info = create_hold(env.meta, env.archive, searcher, args.case, args.query, who,
                               reason=args.reason)
    except QueryError as exc:
        pointer = "\n".join("  " + line for line in exc.pointer().splitlines())
        print(f"coffer: {exc}\n{pointer}", file=sys.stderr)
        return EXIT_USAGE
    _print_hold(info, args.json)
    return EXIT_OK


def cmd_hold_list(args: argparse.Namespace) -> int:
    with _open(args, need_index=False) as env:
        holds = list_holds(env.meta, include_released=not args.active)
    for h in holds:
        _print_hold(h, args.json)
    if not args.json and not holds:
        print("no holds", file=sys.stderr)
    return EXIT_OK


def cmd_hold_show(args: argparse.Namespace) -> int:
    with _open(args, need_index=False) as env:
        info = get_hold(env.meta, args.case, missing_ok=False, with_ids=True)
    assert info is not None
    _print_hold(info, args.json, with_ids=True)
    return EXIT_OK


def cmd_hold_release(args: argparse.Namespace) -> int:
    who = current_officer(args.officer)
    with _open(args, need_index=False) as env:
        info = release_hold(env.meta, env.archive, args.case, who)
    _print_hold(info, args.json)
    return EXIT_OK


# -- audit log --------------------------------------------------------------------------


def cmd_audit_log(args: argparse.Namespace) -> int:
    with _open(args, need_index=False) as env:
        events = env.meta.audit_events(args.since)
    for ev in events:
        if args.json:
            print(json.dumps({"id": ev.id, "at": ev.at.isoformat(), "who": ev.who,
                              "action": ev.action, "query": ev.query,
                              "result_count": ev.result_count, "target": ev.target,
                              "detail": ev.detail}, ensure_ascii=False, default=str))
        else:
            count = "" if ev.result_count is None else f"{ev.result_count} result(s)"
            print(f"{ev.id:>6}  {ev.at:%Y-%m-%d %H:%M:%S}  {ev.who:12}  {ev.action:8}  "
                  f"{count:12}  {ev.target or ''}  {ev.query or ''}".rstrip())
    return EXIT_OK
