"""``coffer archive verify``, ``coffer archive checkpoint`` and ``coffer archive keys``.

    coffer archive verify [--data-dir DIR | --config FILE] [--json] [--progress]
                          [--public-key FILE] [--ciphertext-only]
    coffer archive checkpoint            sign the ledger head now
    coffer archive compact [--json] [--progress] [--officer NAME]
                                         drop deleted records' bytes (audited)
    coffer archive keys list             archive key ids, the current one, signing key id
    coffer archive keys rotate [--officer NAME]  new blobs use a new archive key (audited)
    coffer archive keys escrow --recipient FPR [--gnupghome DIR] [--output FILE]  (audited)
    coffer archive keys restore FILE [--gnupghome DIR]                            (audited)

verify exits 1 when it finds any problem (see archive.verify for the codes), 0
when the archive is intact; warnings (a torn ledger tail or an interrupted batch
after a crash) do not fail it.

compact, keys rotate, keys escrow and keys restore change the archive's bytes or
keys, or let its keys leave the server, for an officer, so they are audited like
expire and repair (archive.audit.record: a database row and an ``audit`` ledger
entry), failures included (a failed restore only when the archive opens without
the keys it could not restore).  verify, checkpoint and keys list show
no message content and change nothing an officer chose, so they are not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from archive.audit import record
from archive.cli_common import (
    SubParsers,
    add_location_arguments,
    archive_subparsers,
    data_dir_from_args,
)
from archive.errors import ArchiveError
from archive.facade import Archive, ArchivePaths
from archive.keys import KeyRing, escrow_restore, load_public_key, public_key_id
from archive.location import location_from_args
from archive.metadata import Metadata, current_officer
from archive.verify import Finding, verify

EXIT_OK, EXIT_PROBLEM = 0, 1


def register(sub: SubParsers) -> None:
    asub = archive_subparsers(sub)
    v = asub.add_parser(
        "verify", help="check every blob, ledger link and checkpoint signature",
        description="Re-read every blob and check its SHA-256, every ledger link and every "
        "checkpoint signature, using only the store, the ledger and the public key (not the "
        "database).  With s3: configured, every blob in the bucket is checked against this "
        "node's ledger chain and every other node's chain mirrored there.  Exit 1 if anything "
        "is missing, altered, reordered or extra.",
    )
    add_location_arguments(v)
    v.add_argument("--json", action="store_true",
                   help="one JSON object per finding, then a summary object")
    v.add_argument("--progress", action="store_true",
                   help="show progress on stderr even when it is not a terminal")
    v.add_argument("--public-key", metavar="FILE",
                   help="ledger public key (PEM) kept apart from the server "
                   "(default: archive/keys/ledger-signing.pub)")
    v.add_argument("--ciphertext-only", action="store_true",
                   help="do not decrypt blobs even if the archive keys are present")
    v.set_defaults(func=cmd_verify)

    c = asub.add_parser("checkpoint", help="sign the current ledger head now",
                        description="Append a checkpoint entry signed with the ledger key.")
    add_location_arguments(c)
    c.set_defaults(func=cmd_checkpoint)

    cp = asub.add_parser(
        "compact", help="remove the bytes of expired (deleted) messages from the store",
        description="Rewrite each store segment that holds records deleted after expiry "
        "without them (crypto-shredding already made them unreadable); the ledger records "
        "what was freed.  Segments a running writer is appending to are left for next time.")
    add_location_arguments(cp)
    cp.add_argument("--json", action="store_true", help="print one JSON object")
    cp.add_argument("--progress", action="store_true",
                    help="show progress on stderr even when it is not a terminal")
    _audited(cp)
    cp.set_defaults(func=cmd_compact)

    k = asub.add_parser("keys", help="archive keys: list, rotate, escrow",
                        description="Manage the archive's encryption and signing keys.")
    ksub = k.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND")
    ksub.required = True
    kl = ksub.add_parser("list", help="list archive key ids and the signing key id")
    add_location_arguments(kl)
    kl.add_argument("--json", action="store_true", help="print one JSON object")
    kl.set_defaults(func=cmd_keys_list)
    kr = ksub.add_parser("rotate", help="make a new archive key current")
    add_location_arguments(kr)
    _audited(kr)
    kr.set_defaults(func=cmd_keys_rotate)
    ke = ksub.add_parser(
        "escrow", help="export the archive keys encrypted to an officer's OpenPGP key",
        description="Write every archive key as one OpenPGP message (ASCII armour) that only "
        "the named recipients can decrypt, for escrow with compliance officers.",
    )
    add_location_arguments(ke)
    ke.add_argument("--recipient", action="append", required=True, metavar="FPR",
                    help="recipient key fingerprint (repeat for several officers)")
    ke.add_argument("--gnupghome", metavar="DIR", help="gpg home holding the recipients' keys")
    ke.add_argument("--output", metavar="FILE", help="write here (default: standard output)")
    _audited(ke)
    ke.set_defaults(func=cmd_keys_escrow)
    ks = ksub.add_parser(
        "restore", help="write archive keys back from an escrow file (needs the officer's key)",
        description="Decrypt an escrow file with gpg and write the archive keys it holds into "
        "archive/keys; existing key files are never overwritten.",
    )
    add_location_arguments(ks)
    ks.add_argument("file", metavar="FILE", help="the escrow file (ASCII armour)")
    ks.add_argument("--gnupghome", metavar="DIR", help="gpg home holding the officer's key")
    _audited(ks)
    ks.set_defaults(func=cmd_keys_restore)


def _audited(p: argparse.ArgumentParser) -> None:
    """--database and --officer, as the commands of archive.cli_admin take them."""
    p.add_argument("--database", metavar="URL",
                   help="metadata database URL (default $COFFER_ARCHIVE_DB, else "
                   "DATA_DIR/archive/meta.db)")
    p.add_argument("--officer", metavar="NAME", help="who is acting (default $USER)")


class _Progress:
    """A one-line counter on stderr, redrawn at most five times a second."""

    def __init__(self, command: str = "verify") -> None:
        self.last = 0.0
        self.command = command

    def __call__(self, what: str, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last < 0.2 and done != total:
            return
        self.last = now
        of = f"/{total}" if total is not None else ""
        end = "\n" if done == total else ""
        print(f"\r{self.command}: {what} {done}{of}", end=end, file=sys.stderr, flush=True)


def cmd_verify(args: argparse.Namespace) -> int:
    loc = location_from_args(args)
    paths = ArchivePaths(loc.data_dir)
    show_progress = args.progress or sys.stderr.isatty()

    def emit(f: Finding) -> None:
        if args.json:
            print(json.dumps(f.as_dict(), ensure_ascii=False), flush=True)
        else:
            print(str(f), flush=True)

    public_key = Path(args.public_key) if args.public_key else None
    progress = _Progress() if show_progress else None
    if loc.s3 is not None:
        from archive.cluster import verify_cluster

        # Blobs in the bucket, one ledger chain per node (archive.cluster).
        summary, _ = verify_cluster(
            paths.root, loc.s3, loc.node, data_dir=loc.data_dir, grace=2 * loc.ledger_seal,
            public_key_path=public_key, use_keys=not args.ciphertext_only,
            on_finding=emit, progress=progress)
    else:
        summary, _ = verify(paths.root, public_key_path=public_key,
                            use_keys=not args.ciphertext_only, on_finding=emit,
                            progress=progress)
    if args.json:
        print(json.dumps(summary.as_dict(), ensure_ascii=False))
    else:
        verdict = "OK" if summary.ok else "PROBLEMS FOUND"
        print(f"{verdict}: {summary.blobs} blobs ({summary.blobs_decrypted} decrypted, "
              f"{summary.tombstoned} tombstoned), {summary.ledger_entries} ledger entries, "
              f"{summary.checkpoints} checkpoints, head {summary.head_seq} "
              f"{summary.head_hash[:16]}; {summary.errors} errors, {summary.warnings} warnings "
              f"[{summary.mode}]")
    return EXIT_OK if summary.ok else EXIT_PROBLEM


def cmd_checkpoint(args: argparse.Namespace) -> int:
    with _open(args) as archive:
        entry = archive.checkpoint()
    print(f"checkpoint {entry.seq}: head {entry.fields['head_seq']} {entry.fields['head_hash']}")
    return EXIT_OK


def cmd_compact(args: argparse.Namespace) -> int:
    who = current_officer(args.officer)
    show = args.progress or sys.stderr.isatty()
    bar = _Progress("compact")
    with _audit_env(args) as (meta, archive):
        try:
            result = archive.compact(
                (lambda done, total: bar("segments", done, total)) if show else None)
        except ArchiveError as exc:
            # A refusal (objects in S3) is audited too, as a refused repair is.
            record(meta, archive, who, "compact", result_count=0, detail={"error": str(exc)})
            raise
        record(meta, archive, who, "compact", result_count=result.segments,
               detail={"records": result.removed_records, "freed_bytes": result.freed_bytes})
    if args.json:
        print(json.dumps({"segments": result.segments, "records": result.removed_records,
                          "freed_bytes": result.freed_bytes}))
    else:
        print(f"compacted {result.segments} segment(s): {result.removed_records} deleted "
              f"record(s), {result.freed_bytes} bytes freed")
    return EXIT_OK


def cmd_keys_list(args: argparse.Namespace) -> int:
    paths = ArchivePaths(data_dir_from_args(args))
    ring = KeyRing.open(paths.keys, need_signer=False)
    pub = paths.keys / "ledger-signing.pub"
    signing = public_key_id(load_public_key(pub)) if pub.exists() else None
    if args.json:
        print(json.dumps({"keys": ring.ids(), "current": ring.current.id,
                          "signing_key_id": signing}))
        return EXIT_OK
    for kid in ring.ids():
        key = ring.get(kid)
        mark = "  (current)" if kid == ring.current.id else ""
        print(f"{kid}  created {key.created}{mark}")
    print(f"ledger signing key {signing or '(missing)'}  {pub}")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    who = current_officer(args.officer)
    with _audit_env(args) as (meta, archive):
        try:
            kid = archive.rotate_key()
        except ArchiveError as exc:
            record(meta, archive, who, "key-rotate", detail={"error": str(exc)})
            raise
        record(meta, archive, who, "key-rotate", target=kid)
    print(f"new blobs are now wrapped with archive key {kid}; export it to escrow "
          "(coffer archive keys escrow)")
    return EXIT_OK


def cmd_keys_escrow(args: argparse.Namespace) -> int:
    who = current_officer(args.officer)
    paths = ArchivePaths(data_dir_from_args(args))
    with _audit_env(args) as (meta, archive):
        ring = KeyRing.open(paths.keys, need_signer=False)
        # Every archive key leaves the server here (encrypted): who, to whom, and where to.
        detail: dict[str, object] = {"recipients": list(args.recipient), "keys": ring.ids(),
                                     "output": args.output or "-"}
        try:
            armored = ring.escrow_export(list(args.recipient),
                                         Path(args.gnupghome) if args.gnupghome else None)
            if args.output:
                out = Path(args.output)
                try:
                    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    raise ArchiveError(f"{out}: already exists, not overwriting") from None
                with os.fdopen(fd, "w", encoding="ascii") as fh:
                    fh.write(armored)
        except ArchiveError as exc:
            record(meta, archive, who, "key-escrow", result_count=0,
                   detail={**detail, "error": str(exc)})
            raise
        record(meta, archive, who, "key-escrow", result_count=len(ring.ids()), detail=detail)
    if not args.output:
        sys.stdout.write(armored)
    return EXIT_OK


def cmd_keys_restore(args: argparse.Namespace) -> int:
    paths = ArchivePaths(data_dir_from_args(args))
    try:
        armored = Path(args.file).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{args.file}: cannot read the escrow file ({exc})") from None
    try:
        written = escrow_restore(paths.keys, armored,
                                 Path(args.gnupghome) if args.gnupghome else None)
    except ArchiveError as exc:
        _audit_restore(args, {"file": args.file, "error": str(exc)}, 0, best_effort=True)
        raise
    # Audited after the keys are back: before, the archive may not open (its keys are
    # what was lost), so there is no ledger to write to yet.
    _audit_restore(args, {"file": args.file, "restored": written}, len(written))
    print(f"restored archive keys: {', '.join(written) or '(none: all were present)'}")
    return EXIT_OK


def _audit_restore(args: argparse.Namespace, detail: dict[str, object], count: int, *,
                   best_effort: bool = False) -> None:
    """Record a key restore; a refused one only if the archive opens without the keys."""
    who = current_officer(args.officer)
    try:
        with _audit_env(args) as (meta, archive):
            record(meta, archive, who, "key-restore", result_count=count, detail=detail)
    except ArchiveError:
        if not best_effort:
            raise


def _open(args: argparse.Namespace) -> Archive:
    return location_from_args(args).open_archive(create=False)


@contextmanager
def _audit_env(args: argparse.Namespace) -> Iterator[tuple[Metadata, Archive]]:
    """The archive and its metadata database, for a command that records an audit event.

    The archive is opened first, so a directory without one fails with the same one
    line as before; the database is created if missing (SQLite), so the audit is never
    skipped for want of it.
    """
    loc = location_from_args(args)
    archive = loc.open_archive(create=False)
    try:
        meta = loc.open_metadata()
        try:
            yield meta, archive
        finally:
            meta.close()
    finally:
        archive.close()
