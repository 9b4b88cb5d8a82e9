"""Command registration for reports/: export, recover, report, backup, archive rebuild.

    coffer export --case CASE --query QUERY --out DIR [--format eml,mbox,pdf] [--resume]
    coffer export verify DIR [--json] [--public-key FILE]
    coffer recover QUERY --to ADDRESS [--original-recipients] [--dry-run]
    coffer report NAME --from DATE --to DATE [--format html,csv,json] [--out FILE]
    coffer backup create DEST | coffer backup restore SRC
    coffer archive rebuild

Handlers return 0 (done), 1 (a problem was found, e.g. a tampered package), 2 (usage).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from archive.cli_common import (
    SubParsers,
    add_location_arguments,
    archive_subparsers,
)
from archive.facade import Archive
from archive.index import Index
from archive.location import location_from_args
from archive.metadata import Metadata, current_officer
from archive.query import QueryError
from reports.common import open_metadata

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def _db_args(p: argparse.ArgumentParser) -> None:
    add_location_arguments(p)
    p.add_argument("--database", metavar="URL",
                   help="metadata database URL (default $COFFER_ARCHIVE_DB, else "
                   "DATA_DIR/archive/meta.db)")
    p.add_argument("--index", choices=("fts5", "whoosh", "pg"), default=None,
                   help="full-text engine (default: pg with PostgreSQL, else fts5)")


def register(sub: SubParsers) -> None:
    e = sub.add_parser(
        "export", help="write a signed eDiscovery export package (audited); or verify one",
        description="coffer export --case CASE --query QUERY --out DIR  writes the package; "
        "coffer export verify DIR  checks one against its signed manifest.")
    e.add_argument("verb", nargs="*", metavar="verify DIR",
                   help="'verify DIR' checks a package instead of writing one")
    e.add_argument("--case", metavar="CASE", help="the legal-hold case this export is for")
    e.add_argument("--query", metavar="QUERY", help="which messages (Coffer query language)")
    e.add_argument("--out", metavar="DIR", help="a new directory for the package")
    e.add_argument("--format", default="eml,mbox", metavar="LIST",
                   help="eml,mbox,pdf (default eml,mbox; EML files are always written)")
    e.add_argument("--officer", metavar="NAME", help="who exports (default $USER)")
    e.add_argument("--resume", action="store_true", help="continue an unfinished export")
    e.add_argument("--progress", action="store_true", default=None,
                   help="show progress even when stderr is not a terminal")
    e.add_argument("--json", action="store_true", help="one JSON object per line")
    e.add_argument("--public-key", metavar="FILE",
                   help="verify: the archive's public key obtained independently")
    _db_args(e)
    e.set_defaults(func=cmd_export)

    r = sub.add_parser(
        "recover", help="re-deliver archived originals through the relay (audited)",
        description="Spool archived originals again, marked X-Coffer-Recovered; the running "
        "gateway delivers them.")
    r.add_argument("query", nargs="+", metavar="QUERY")
    r.add_argument("--to", metavar="ADDRESS", action="append", default=[],
                   help="deliver to this address (repeatable)")
    r.add_argument("--original-recipients", action="store_true",
                   help="deliver to the archived envelope recipients")
    r.add_argument("--dry-run", action="store_true", help="list what would be re-delivered")
    r.add_argument("--sender", metavar="ADDRESS", default="",
                   help="MAIL FROM of the recovered copies (default: null sender, so a "
                   "failed delivery never bounces to the original sender)")
    r.add_argument("--officer", metavar="NAME", help="who recovers (default $USER)")
    r.add_argument("--json", action="store_true")
    _db_args(r)
    r.set_defaults(func=cmd_recover)

    rep = sub.add_parser(
        "report", help="compliance reports: retention, holds, policy, auth, audit",
        description="Render a compliance report for a period.")
    rep.add_argument("name", choices=("retention", "holds", "policy", "auth", "audit"))
    rep.add_argument("--from", dest="start", required=True, metavar="DATE",
                     help="first day (YYYY-MM-DD, inclusive)")
    rep.add_argument("--to", dest="end", required=True, metavar="DATE",
                     help="last day (YYYY-MM-DD, inclusive)")
    rep.add_argument("--format", default="html", choices=("html", "csv", "json"))
    rep.add_argument("--out", metavar="FILE", help="write here (default: standard output)")
    rep.add_argument("--officer", metavar="NAME", help="who runs the report (default $USER)")
    _db_args(rep)
    rep.set_defaults(func=cmd_report)

    b = sub.add_parser("backup", help="consistent, verifiable backups of the archive",
                       description="Back up or restore store, ledger, database and keys.")
    bsub = b.add_subparsers(dest="backup_command", metavar="BACKUP_COMMAND")
    bsub.required = True
    bc = bsub.add_parser("create", help="copy the archive to DEST while the gateway runs")
    bc.add_argument("dest", metavar="DEST")
    bc.add_argument("--no-keys", action="store_true",
                    help="leave the keys out (the backup then cannot be read alone)")
    bc.add_argument("--officer", metavar="NAME")
    bc.add_argument("--progress", action="store_true", default=None)
    _db_args(bc)
    bc.set_defaults(func=cmd_backup_create)
    br = bsub.add_parser("restore", help="restore a backup into the data directory")
    br.add_argument("src", metavar="SRC")
    br.add_argument("--officer", metavar="NAME")
    br.add_argument("--progress", action="store_true", default=None)
    _db_args(br)
    br.set_defaults(func=cmd_backup_restore)

    rb = archive_subparsers(sub).add_parser(
        "rebuild", help="rebuild the metadata database and full-text index from store+ledger",
        description="After losing the metadata database: reconstruct it and the full-text "
        "index from the store and the ledger alone (see docs/operations.md for what "
        "cannot be recovered).")
    rb.add_argument("--force", action="store_true",
                    help="replace an existing (e.g. damaged) metadata database")
    rb.add_argument("--missing", action="store_true",
                    help="keep the database; add only the rows of ledger messages it lacks "
                    "(after a power loss or an older database backup)")
    rb.add_argument("--officer", metavar="NAME")
    rb.add_argument("--progress", action="store_true", default=None)
    rb.add_argument("--json", action="store_true",
                    help="print the counts and warnings as one JSON object on stdout")
    _db_args(rb)
    rb.set_defaults(func=cmd_rebuild)


@dataclass
class _Open:
    data_dir: Path
    archive: Archive
    meta: Metadata
    index: Index


@contextmanager
def _open(args: argparse.Namespace) -> Iterator[_Open]:
    loc = location_from_args(args)
    meta = open_metadata(loc.data_dir, loc.database)
    archive: Archive | None = None
    index: Index | None = None
    try:
        archive = loc.open_archive(create=False)
        index = loc.open_index(meta)
        yield _Open(loc.data_dir, archive, meta, index)
    finally:
        if index is not None:
            index.close()
        if archive is not None:
            archive.close()
        meta.close()


def cmd_export(args: argparse.Namespace) -> int:
    if args.verb:
        if len(args.verb) != 2 or args.verb[0] != "verify":
            print("coffer export: usage: coffer export verify DIR", file=sys.stderr)
            return EXIT_USAGE
        return _export_verify(Path(args.verb[1]), args)
    missing = [o for o, v in (("--case", args.case), ("--query", args.query),
                              ("--out", args.out)) if not v]
    if missing:
        print(f"coffer export: {', '.join(missing)} required", file=sys.stderr)
        return EXIT_USAGE
    from reports.errors import ExportError
    from reports.export import ExportRequest, export, parse_formats

    try:
        formats = parse_formats(args.format) | {"eml"}
    except ExportError as exc:
        print(f"coffer export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    req = ExportRequest(args.case, args.query, Path(args.out), current_officer(args.officer),
                        formats, args.resume, args.progress)
    try:
        with _open(args) as o:
            res = export(o.archive, o.meta, o.index, req)
    except QueryError as exc:
        print(f"coffer: {exc}\n  {exc.pointer()}", file=sys.stderr)
        return EXIT_USAGE
    summary = {"out": str(res.out), "count": res.count, "unavailable": res.unavailable,
               "manifest_sha256": res.manifest_sha256, "checkpoint_seq": res.checkpoint_seq,
               "audit_id": res.audit_id}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"exported {res.count} messages to {res.out} ({res.unavailable} unavailable); "
              f"package hash (SHA-256 of manifest.json) {res.manifest_sha256}")
    return EXIT_OK


def _export_verify(root: Path, args: argparse.Namespace) -> int:
    from reports.export_verify import verify_package

    rep = verify_package(root, public_key=Path(args.public_key) if args.public_key else None)
    for f in rep.findings:
        if args.json:
            print(json.dumps(f.as_dict(), ensure_ascii=False))
        else:
            print(str(f))
    status = {"ok": rep.ok, "problems": len(rep.findings), "messages": rep.messages,
              "manifest_sha256": rep.manifest_sha256}
    if args.json:
        print(json.dumps(status))
    else:
        verdict = "OK" if rep.ok else f"FAILED: {len(rep.findings)} problem(s)"
        print(f"{root}: {verdict}; {rep.messages} messages; package hash "
              f"{rep.manifest_sha256}", file=sys.stderr if rep.ok else sys.stdout)
    return EXIT_OK if rep.ok else EXIT_PROBLEM


def cmd_recover(args: argparse.Namespace) -> int:
    from reports.recover import recover

    if not args.to and not args.original_recipients:
        print("coffer recover: give --to ADDRESS or --original-recipients", file=sys.stderr)
        return EXIT_USAGE
    try:
        with _open(args) as o:
            plan = recover(o.archive, o.meta, o.index, o.data_dir / "spool",
                           " ".join(args.query), to=args.to,
                           original_recipients=args.original_recipients,
                           sender=args.sender, officer=current_officer(args.officer),
                           dry_run=args.dry_run)
    except QueryError as exc:
        print(f"coffer: {exc}\n  {exc.pointer()}", file=sys.stderr)
        return EXIT_USAGE
    for item in plan:
        if args.json:
            print(json.dumps(item.as_dict(), ensure_ascii=False))
        else:
            what = "would spool" if args.dry_run else f"spooled {item.qid}"
            print(f"{item.archive_id}: {what} to {', '.join(item.rcpt_to) or '(nobody)'}"
                  + (f" ({item.problem})" if item.problem else ""))
    problems = sum(1 for i in plan if i.problem)
    return EXIT_PROBLEM if problems else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from reports.compliance import parse_period, render_report
    from reports.errors import ReportError

    try:
        start, end = parse_period(args.start, args.end)
    except ReportError as exc:
        print(f"coffer report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    loc = location_from_args(args)
    meta = open_metadata(loc.data_dir, loc.database)
    archive: Archive | None = None
    try:
        try:
            archive = loc.open_archive(create=False)
        except Exception as exc:  # a report reads the database; the ledger audit is a bonus
            print(f"coffer: report not recorded in the ledger: {exc}", file=sys.stderr)
        text = render_report(meta, archive, args.name, start, end, args.format,
                             officer=current_officer(args.officer))
    finally:
        if archive is not None:
            archive.close()
        meta.close()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_backup_create(args: argparse.Namespace) -> int:
    from reports.backup import create_backup

    loc = location_from_args(args)
    data_dir = loc.data_dir
    res = create_backup(data_dir, Path(args.dest), database=loc.database,
                        keys=not args.no_keys, officer=current_officer(args.officer),
                        progress=args.progress)
    print(f"backup of {res.blobs} blobs, ledger up to checkpoint {res.checkpoint_seq}, "
          f"written to {res.dest}", file=sys.stderr)
    for f in res.findings:  # the copy failed its own verify: it must not pass for good
        print(f"coffer backup: {f}", file=sys.stderr)
    return EXIT_PROBLEM if res.findings else EXIT_OK


def cmd_backup_restore(args: argparse.Namespace) -> int:
    from reports.backup import restore_backup

    loc = location_from_args(args)
    data_dir = loc.data_dir
    res = restore_backup(Path(args.src), data_dir, database=loc.database,
                         officer=current_officer(args.officer), progress=args.progress)
    for finding in res.findings:
        print(finding)
    print(f"restored into {data_dir}; archive verify: "
          f"{'passed' if res.ok else 'FAILED'}", file=sys.stderr)
    return EXIT_OK if res.ok else EXIT_PROBLEM


def cmd_rebuild(args: argparse.Namespace) -> int:
    from reports.rebuild import rebuild

    loc = location_from_args(args)
    data_dir = loc.data_dir
    if args.missing:
        return _rebuild_missing(args, loc.data_dir, loc.database, loc.index)
    res = rebuild(data_dir, database=loc.database, index_engine=loc.index, force=args.force,
                  officer=current_officer(args.officer), progress=args.progress)
    if args.json:
        print(json.dumps(dataclasses.asdict(res), ensure_ascii=False))
    print(f"rebuilt {res.messages} messages ({res.blobs} blobs, {res.shredded} shredded, "
          f"{res.indexed} indexed, {res.receipts} with receipts, {res.links} copies linked), "
          f"{res.holds} legal holds and {res.audit_events} audit events from the ledger",
          file=sys.stderr)
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return EXIT_OK


def _rebuild_missing(args: argparse.Namespace, data_dir: Path, database: str | None,
                     index: str | None) -> int:
    from reports.rebuild import rebuild_missing

    if args.force:
        print("coffer archive rebuild: --missing keeps the database, --force replaces it: "
              "choose one", file=sys.stderr)
        return EXIT_USAGE
    res = rebuild_missing(data_dir, database=database, index_engine=index,
                          officer=current_officer(args.officer), progress=args.progress)
    if args.json:
        print(json.dumps(dataclasses.asdict(res), ensure_ascii=False))
    print(f"checked {res.checked} ledger messages, restored {res.restored} missing rows "
          f"({res.receipts} with receipts, {res.shredded} shredded, {res.links} copies "
          f"linked), {res.audit_events} audit events, {res.holds} legal holds and "
          f"{res.hold_releases} hold releases", file=sys.stderr)
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return EXIT_OK
