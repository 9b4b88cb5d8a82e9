"""``coffer search QUERY`` and ``coffer show ID`` (also as ``coffer archive search|show``).

Both are audited before they print anything: a row in the metadata database
(who: --officer, else $USER) and the registered audit hooks (the ledger), see
archive.search.audit.  The query language is documented in archive.query.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from archive.audit import ledger_audit
from archive.cli_common import SubParsers, add_location_arguments, archive_subparsers
from archive.errors import ArchiveError
from archive.extract import extract
from archive.facade import Archive
from archive.index import Index
from archive.location import ArchiveLocation, location_from_args
from archive.metadata import (
    DECRYPTED,
    ENCRYPTED,
    JOURNAL_REPORT,
    JOURNALED,
    RECEIVED,
    SECONDARY_COPIES,
    SENT,
    Message,
    Metadata,
    current_officer,
)
from archive.query import QueryError
from archive.search import Searcher, audit

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def register(sub: SubParsers) -> None:
    for target in (sub, archive_subparsers(sub)):
        p = target.add_parser(
            "search", help="search the archive (audited)",
            description="Search the archive with the Coffer query language, e.g. "
            "'from:alice@example.com subject:\"quarterly report\" date:2024-01..2024-06'. "
            "Quote the whole query for the shell.",
        )
        p.add_argument("query", nargs="+", metavar="QUERY", help="the query (words are joined)")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.add_argument("--limit", type=_positive, default=50, metavar="N",
                       help="show at most N messages (default 50)")
        p.add_argument("--offset", type=int, default=0, metavar="N", help="skip N messages")
        p.add_argument("--order", choices=("date", "relevance"), default="date")
        p.add_argument("--no-snippets", action="store_true",
                       help="do not decrypt messages to show snippets")
        p.add_argument("--all-copies", action="store_true",
                       help="also list the copies as sent and as received encrypted (by "
                       "default a message is listed once, as its readable copy)")
        _common(p)
        p.set_defaults(func=cmd_search)

        s = target.add_parser("show", help="print an archived message (audited)",
                              description="Print one archived message by archive id "
                              "(or by Message-ID when it is unique).")
        s.add_argument("id", metavar="ID", help="archive id, or <message-id>")
        s.add_argument("--raw", action="store_true",
                       help="write the exact original bytes to standard output")
        _common(s)
        s.set_defaults(func=cmd_show)


def _common(p: argparse.ArgumentParser) -> None:
    add_location_arguments(p)
    p.add_argument("--database", metavar="URL",
                   help="metadata database URL (default $COFFER_ARCHIVE_DB, else "
                   "DATA_DIR/archive/meta.db)")
    p.add_argument("--index", choices=("fts5", "whoosh", "pg"), default=None,
                   help="full-text engine (default: pg with PostgreSQL, else fts5)")
    p.add_argument("--officer", metavar="NAME", help="who is searching (default $USER)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


@dataclass
class _Backend:
    loc: ArchiveLocation
    meta: Metadata
    index: Index
    reader: Archive | None


def open_blob_reader(loc: ArchiveLocation) -> Archive:
    """The blob store, opened read-mostly (it finishes a crashed writer's batch)."""
    return loc.open_archive(create=False)


@contextmanager
def open_backend(args: argparse.Namespace, *, need_reader: bool) -> Iterator[_Backend]:
    loc = location_from_args(args, required=False)
    meta = loc.open_metadata(must_exist=True)
    index: Index | None = None
    reader: Archive | None = None
    try:
        index = loc.open_index(meta)
        if need_reader:
            reader = open_blob_reader(loc)
        yield _Backend(loc, meta, index, reader)
    finally:
        if reader is not None:
            reader.close()
        if index is not None:
            index.close()
        meta.close()


def cmd_search(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    query = " ".join(args.query)
    who = current_officer(args.officer)
    try:
        with open_backend(args, need_reader=False) as be:
            reader: Archive | None = None
            if not args.no_snippets:
                try:
                    reader = open_blob_reader(be.loc)
                except ArchiveError as exc:
                    print(f"coffer: no snippets: {exc}", file=sys.stderr)
            try:
                searcher = Searcher(be.meta, be.index, reader.get if reader else None)
                result = searcher.search(query, limit=args.limit, offset=args.offset,
                                         order=args.order, snippets=reader is not None,
                                         all_copies=args.all_copies)
            finally:
                if reader is not None:
                    reader.close()
            # the database and the ledger (archive.audit)
            with contextlib.closing(be.loc.open_archive(create=False)) as archive, \
                    ledger_audit(archive):
                audit(be.meta, who, "search", query=result.query, result_count=result.total,
                      detail={"limit": args.limit, "offset": args.offset, "order": args.order,
                              "index": be.index.name, "all_copies": args.all_copies})
    except QueryError as exc:
        print(f"coffer: {exc}\n{_indent(exc.pointer())}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        for hit in result.hits:
            print(json.dumps(hit.to_json(), ensure_ascii=False), file=out)
    else:
        _table(result.hits, out)
    print(f"{result.total} message{'s' if result.total != 1 else ''} match"
          f"{'es' if result.total == 1 else ''}; showing {len(result.hits)}", file=sys.stderr)
    return EXIT_OK


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(hits: list[Any], out: TextIO) -> None:
    print(f"{'ID':>8}  {'DATE':16}  {'FROM':30}  SUBJECT", file=out)
    for hit in hits:
        m = hit.message
        # --all-copies: the copy as sent (or received encrypted) says so before its subject.
        label = f"[{m.copy}] " if m.copy in SECONDARY_COPIES else ""
        print(f"{m.id:>8}  {m.date:%Y-%m-%d %H:%M}  {_cut(m.from_addr, 30):30}  "
              f"{_cut(label + m.subject, 60)}", file=out)
        if hit.snippet:
            print(f"{'':>8}  {_cut(hit.snippet, 110)}", file=out)


def _resolve_id(meta: Metadata, ident: str) -> int:
    if ident.isdigit():
        return int(ident)
    found = meta.find_message_id(ident)
    if not found:
        raise ArchiveError(f"no archived message with Message-ID {ident}")
    if len(found) > 1:
        raise ArchiveError(f"Message-ID {ident} was archived {len(found)} times: archive ids "
                           f"{', '.join(map(str, found))}; show one of them")
    return found[0]


def cmd_show(args: argparse.Namespace, out: TextIO | None = None) -> int:
    who = current_officer(args.officer)
    with open_backend(args, need_reader=True) as be:
        pk = _resolve_id(be.meta, args.id)
        msg = be.meta.get(pk)
        if msg is None:
            raise ArchiveError(f"no archived message with id {pk}")
        assert be.reader is not None
        raw = be.reader.get(msg.sha256)
        with ledger_audit(be.reader):
            audit(be.meta, who, "show", target=str(pk), result_count=1,
                  detail={"raw": bool(args.raw), "sha256": msg.sha256})
        if args.raw:
            if out is not None:
                out.write(raw.decode("utf-8", "surrogateescape"))
            else:
                sys.stdout.flush()
                sys.stdout.buffer.write(raw)
                sys.stdout.buffer.flush()
            return EXIT_OK
        _print_message(be.meta, msg, raw, out or sys.stdout)
    return EXIT_OK


_COPY_TEXT = {
    RECEIVED: "as received (plaintext, before signing/encryption)",
    SENT: "as sent (after signing/encryption: the exact bytes delivered)",
    DECRYPTED: "decrypted (as the recipient reads it)",
    ENCRYPTED: "as received and delivered (encrypted)",
    JOURNALED: "journaled original (the message a journal report carried, with its envelope)",
    JOURNAL_REPORT: "journal report as received (how the journaled copy arrived)",
}


def copy_line(copy: str, linked_id: int | None) -> str:
    """Which copy a row is and the archive id of its other copy ("" for the only one)."""
    if not copy:
        return ""
    text = _COPY_TEXT.get(copy, copy)
    return f"{text}; other copy: archive id {linked_id}" if linked_id else text


def _print_message(meta: Metadata, msg: Message, raw: bytes, out: TextIO) -> None:
    def line(key: str, value: object) -> None:
        if value not in (None, "", [], {}):
            print(f"{key + ':':18}{value}", file=out)

    line("Archive-Id", msg.id)
    line("SHA-256", msg.sha256)
    line("Received", msg.received_at.isoformat())
    line("Direction", msg.direction)
    line("Source", msg.source)
    line("State", msg.state)
    line("Copy", copy_line(msg.copy, msg.linked_id))
    rejected = (meta.decision_trace(msg.id) or {}).get("rejected")
    if isinstance(rejected, dict):  # rejected after DATA (gateway.runner)
        line("Rejected", f"{rejected.get('reply')} (stage {rejected.get('stage')}: "
             f"{rejected.get('reason')})")
    line("Retention-Until", msg.retention_until.isoformat() if msg.retention_until else "")
    people = meta.participants(msg.id)
    line("Envelope-From", next((p.address for p in people if p.role == "envelope_from"), ""))
    line("Envelope-To", ", ".join(p.address for p in people if p.role == "envelope_to"))
    line("Bcc (envelope)", ", ".join(p.address for p in people if p.role == "bcc"))
    line("Verdicts", ", ".join(f"{k}={v}" for k, v in
                               (("spf", msg.spf), ("dkim", msg.dkim), ("dmarc", msg.dmarc)) if v))
    line("Flags", "; ".join(msg.flags))
    for a in meta.attachments(msg.blob_id):
        line("Attachment", f"{a.name or '(unnamed)'} ({a.content_type}, {a.size} bytes"
             f"{', not scanned' if not a.scanned else ''})")
    print(file=out)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    for name in ("Date", "From", "To", "Cc", "Subject", "Message-ID"):
        try:
            value = parsed.get(name)
        except Exception:
            value = None
        if value is not None:
            print(f"{name}: {value}", file=out)
    print(file=out)
    print(extract(raw).body, file=out)
