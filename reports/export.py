"""``coffer export``: an eDiscovery package with a signed manifest and chain of custody.

Package layout (DIR)::

    messages/<archive id>.eml   each original, byte-exact (its SHA-256 is the archive's)
    export.mbox                 the same messages as one mboxrd file
    pdf/<archive id>.pdf        review renderings (only with --format ...,pdf)
    manifest.json               JSON load file: package facts, one record per message
                                (archive id, Message-ID, date, from, to, cc, bcc, subject,
                                attachments, SHA-256, ledger proof), every other file's hash
    manifest.csv                the same records as CSV
    loadfile.dat                Concordance-style DAT load file (þ quote, DC4 separator)
    manifest.sig                Ed25519 signature of manifest.json (raw 64 bytes)
    pub.pem                     the archive's ledger-signing public key (SubjectPublicKeyInfo)
    ledger.jsonl                the ledger entries from the first exported item to the
                                signed checkpoint (ids and hashes only)
    checkpoint.txt / .sig       the signed checkpoint payload and its signature
    custody.html / custody.pdf  the chain-of-custody report
    SHA256SUMS / SHA256SUMS.sig ``sha256sum -c`` list of every file, and its signature

The package's own hash is the SHA-256 of manifest.json, which commits to every
message and load file; the custody reports (which quote it) are covered by
SHA256SUMS and its signature.

Exports stream: messages are fetched, written and hashed in chunks, and the state
(ids to export, how many are done, the mbox and row-file sizes at that point) is
saved in DIR/.coffer-export-state.json after each chunk (the ids, fixed when the
export starts, in .coffer-export-ids.json), so ``--resume`` truncates the partial
tail and continues.  The manifest rows are kept in memory at the end (about 1 kB
per message) to write the load files and the custody report.  The export is
audited when it completes.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives import serialization
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import select

from archive.errors import ArchiveError
from archive.facade import Archive
from archive.index import Index
from archive.keys import public_key_id
from archive.ledger import checkpoint_payload, read_lines
from archive.metadata import Attachment, Hold, HoldItem, Message, Metadata, Participant
from archive.query import parse, to_string
from archive.search import Searcher
from reports.common import Clock, LedgerIndex, Progress, record_audit, utcnow
from reports.errors import ExportError

STATE_FILE = ".coffer-export-state.json"
ROWS_FILE = ".coffer-export-rows.jsonl"
IDS_FILE = ".coffer-export-ids.json"  # written once: the state file stays small
FORMATS = frozenset({"eml", "mbox", "pdf"})
CHUNK = 500
MANIFEST_FIELDS = ("archive_id", "message_id", "date", "from", "to", "cc", "bcc", "subject",
                   "attachments", "sha256", "size", "file", "ledger_seq", "ledger_hash",
                   "checkpoint_seq", "status")
# Concordance delimiters: þ (U+00FE) quotes each field, DC4 (0x14) separates them,
# ® (U+00AE) stands for a newline inside a field.
DAT_QUOTE, DAT_SEP, DAT_NEWLINE = "\u00fe", "\x14", "\u00ae"
# mboxrd: every line that starts with (">"*)"From " gets one more ">".
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)


@dataclass
class ExportRequest:
    case: str
    query: str
    out: Path
    officer: str
    formats: frozenset[str] = frozenset({"eml", "mbox"})
    resume: bool = False
    progress: bool | None = None


@dataclass
class ExportResult:
    out: Path
    count: int
    unavailable: int
    manifest_sha256: str
    checkpoint_seq: int
    audit_id: int


def parse_formats(text: str) -> frozenset[str]:
    wanted = frozenset(f.strip().lower() for f in text.split(",") if f.strip())
    unknown = wanted - FORMATS
    if unknown or not wanted:
        raise ExportError(f"--format: unknown format(s) {', '.join(sorted(unknown)) or '(none)'}"
                          f" (choose from {', '.join(sorted(FORMATS))})")
    return wanted


def mbox_entry(raw: bytes, mail_from: str, when: datetime) -> bytes:
    """One mboxrd entry: the From_ line, the quoted message, a blank line."""
    sender = mail_from if mail_from and " " not in mail_from else "MAILER-DAEMON"
    head = f"From {sender} {when.astimezone(UTC):%a %b %d %H:%M:%S %Y}\n".encode("ascii",
                                                                                  "replace")
    body = _FROM_LINE.sub(rb">\1", raw)
    if not body.endswith(b"\n"):
        body += b"\n"
    return head + body + b"\n"


def dat_line(values: Sequence[str]) -> str:
    cells = (DAT_QUOTE + v.replace("\r\n", DAT_NEWLINE).replace("\n", DAT_NEWLINE)
             .replace(DAT_QUOTE, "") + DAT_QUOTE for v in values)
    return DAT_SEP.join(cells) + "\r\n"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def templates() -> Environment:
    return Environment(loader=PackageLoader("reports", "templates"),
                       autoescape=select_autoescape(["html"]), keep_trailing_newline=True)


class Exporter:
    def __init__(self, archive: Archive, meta: Metadata, index: Index,
                 clock: Clock | None = None) -> None:
        self.archive = archive
        self.meta = meta
        self.index = index
        self.clock = clock or utcnow

    # -- the whole run ----------------------------------------------------------------

    def run(self, req: ExportRequest) -> ExportResult:
        state = self._start(req)
        out = req.out
        ids: list[int] = json.loads((out / IDS_FILE).read_bytes())
        progress = Progress("export", len(ids), enabled=req.progress)
        formats = frozenset(state["formats"])
        (out / "messages").mkdir(exist_ok=True)
        if "pdf" in formats:
            (out / "pdf").mkdir(exist_ok=True)
        mode = "r+b" if state["done"] else "wb"
        with contextlib.ExitStack() as stack:
            rows = stack.enter_context(open(out / ROWS_FILE, mode))
            mbox = (stack.enter_context(open(out / "export.mbox", mode))
                    if "mbox" in formats else None)
            # Anything past the last saved state is a partial chunk: drop it, redo it.
            rows.truncate(state["rows_size"])
            rows.seek(state["rows_size"])
            if mbox is not None:
                mbox.truncate(state["mbox_size"])
                mbox.seek(state["mbox_size"])
            done = state["done"]
            progress.update(done)
            while done < len(ids):
                chunk = ids[done:done + CHUNK]
                for row, raw, mail_from in self._records(chunk):
                    if raw is not None:
                        self._write_message(out, row, raw, mail_from, formats, mbox)
                    rows.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
                done += len(chunk)
                rows.flush()
                if mbox is not None:
                    mbox.flush()
                state.update(done=done, rows_size=rows.tell(),
                             mbox_size=mbox.tell() if mbox is not None else 0)
                _write_atomic(out / STATE_FILE, json.dumps(state).encode())
                progress.update(done)
        progress.done(len(ids))
        return self._finish(req, state)

    def _start(self, req: ExportRequest) -> dict[str, Any]:
        out = req.out
        state_path = out / STATE_FILE
        if state_path.exists():
            if not req.resume:
                raise ExportError(f"{out}: an unfinished export is here; continue it with "
                                  "--resume, or choose another directory")
            state: dict[str, Any] = json.loads(state_path.read_text())
            if state["case"] != req.case or state["query_given"] != req.query:
                raise ExportError(f"{out}: --resume with another case or query than the "
                                  f"unfinished export (case {state['case']!r}, query "
                                  f"{state['query_given']!r})")
            self._recheck(out, state)
            return state
        if req.resume:
            raise ExportError(f"{out}: nothing to resume (no {STATE_FILE})")
        node = parse(req.query)  # a mistake in the query leaves no directory behind
        if out.exists() and any(out.iterdir()):
            raise ExportError(f"{out}: directory is not empty; an export needs a new one")
        out.mkdir(parents=True, exist_ok=True)
        ids = sorted(Searcher(self.meta, self.index).message_ids(node))
        state = {
            "version": 1, "case": req.case, "query_given": req.query,
            "query": to_string(node), "officer": req.officer,
            "started": self.clock().isoformat(), "formats": sorted(req.formats),
            "count": len(ids), "done": 0, "mbox_size": 0, "rows_size": 0,
        }
        _write_atomic(out / IDS_FILE, json.dumps(ids).encode())
        _write_atomic(state_path, json.dumps(state).encode())
        return state

    @staticmethod
    def _recheck(out: Path, state: dict[str, Any]) -> None:
        """On resume, a message file of a finished chunk that a crash left short is
        rewritten: roll ``done`` back to the first chunk holding a bad file."""
        done = 0
        with open(out / ROWS_FILE, "r+b") as fh:
            fh.truncate(state["rows_size"])
            for i, line in enumerate(fh):
                row = json.loads(line)
                path = out / row["file"] if row.get("file") else None
                if path is not None and (not path.exists() or sha256_file(path) != row["sha256"]):
                    break
                done = i + 1
        if done < state["done"]:
            # Keep whole chunks only (the mbox offset is known at chunk boundaries only).
            state["done"] = 0
            state["mbox_size"] = 0
            state["rows_size"] = 0

    def _records(self, ids: list[int]) -> Iterator[tuple[dict[str, Any], bytes | None, str]]:
        """One manifest row per id (in order) with the original bytes (None if gone)."""
        meta = self.meta
        with meta.session() as s:
            msgs = {m.id: m for m in s.scalars(select(Message).where(
                meta.ids_condition(Message.id, ids)))}
            people: dict[int, dict[str, list[str]]] = {i: {"to": [], "cc": [], "bcc": []}
                                                       for i in msgs}
            for pk, role, addr in s.execute(
                    select(Participant.message_pk, Participant.role, Participant.address)
                    .where(meta.ids_condition(Participant.message_pk, list(msgs)),
                           Participant.role.in_(("to", "cc", "bcc")))
                    .order_by(Participant.id)):
                people[pk][role].append(addr)
            atts: dict[int, list[dict[str, Any]]] = {}
            for a in s.scalars(select(Attachment).where(meta.ids_condition(
                    Attachment.blob_id, {m.blob_id for m in msgs.values()}))
                    .order_by(Attachment.id)):
                atts.setdefault(a.blob_id, []).append(
                    {"name": a.name, "type": a.content_type, "size": a.size,
                     "sha256": a.sha256, "depth": a.depth})
        for pk in ids:
            m = msgs.get(pk)
            if m is None:
                raise ExportError(f"archive id {pk} vanished from the metadata during export")
            row: dict[str, Any] = {
                "archive_id": m.id, "message_id": m.message_id, "date": m.date.isoformat(),
                "from": m.from_addr, **people[m.id], "subject": m.subject,
                "attachments": atts.get(m.blob_id, []), "sha256": m.sha256, "size": m.size,
                "file": f"messages/{m.id}.eml", "ledger_ref": m.ledger_ref, "status": "",
            }
            try:
                raw: bytes | None = self.archive.get(m.sha256)
            except ArchiveError as exc:
                # Shredded under retention, or missing: say so; never invent content.
                raw = None
                row["file"] = None
                row["status"] = f"unavailable: {exc}"
            yield row, raw, m.mail_from

    def _write_message(self, out: Path, row: dict[str, Any], raw: bytes, mail_from: str,
                       formats: frozenset[str], mbox: IO[bytes] | None) -> None:
        if hashlib.sha256(raw).hexdigest() != row["sha256"]:  # archive.get checks it too
            raise ExportError(f"archive id {row['archive_id']}: content hash mismatch")
        path = out / row["file"]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, path)
        if mbox is not None:
            mbox.write(mbox_entry(raw, mail_from, datetime.fromisoformat(row["date"])))
        if "pdf" in formats:
            from archive.extract import body_text
            from reports.pdf import message_pdf

            heads = [("Archive id", str(row["archive_id"])), ("Message-ID", row["message_id"]),
                     ("Date", row["date"]), ("From", row["from"]),
                     ("To", ", ".join(row["to"])), ("Cc", ", ".join(row["cc"])),
                     ("Bcc", ", ".join(row["bcc"])), ("Subject", row["subject"]),
                     ("SHA-256", row["sha256"])]
            message_pdf(out / "pdf" / f"{row['archive_id']}.pdf", heads, body_text(raw),
                        [f"{a['name']} ({a['type']}, {a['size']} bytes)"
                         for a in row["attachments"]])

    # -- the end: manifest, signatures, custody report ---------------------------------

    def _finish(self, req: ExportRequest, state: dict[str, Any]) -> ExportResult:
        out = req.out
        finished = self.clock()
        cp_entry = self.archive.checkpoint()  # a signed head that covers every item
        ledger = LedgerIndex.read(self.archive.paths.ledger)
        checkpoint = next(c for c in reversed(ledger.checkpoints) if c.seq == cp_entry.seq)
        rows: list[dict[str, Any]] = []
        with open(out / ROWS_FILE, "rb") as fh:
            for line in fh:
                row = json.loads(line)
                proof = ledger.proof(row["sha256"], row.pop("ledger_ref", None))
                row["ledger"] = ({"seq": proof.seq, "hash": proof.hash,
                                  "checkpoint_seq": proof.checkpoint_seq,
                                  "checkpoint_hash": proof.checkpoint_hash}
                                 if proof else None)
                if proof is None and not row["status"]:
                    row["status"] = "no message_stored ledger entry found"
                rows.append(row)
        pub_pem = self.archive.keys.signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        key_id = public_key_id(self.archive.keys.signer.public_key())
        (out / "pub.pem").write_bytes(pub_pem)
        self._write_ledger_excerpt(out, rows, checkpoint.seq)
        (out / "checkpoint.txt").write_bytes(checkpoint_payload(checkpoint.head_seq,
                                                                checkpoint.head_hash))
        (out / "checkpoint.sig").write_bytes(base64.b64decode(checkpoint.signature))
        self._write_csv(out / "manifest.csv", rows)
        self._write_dat(out / "loadfile.dat", rows)
        hold = self._hold(req.case)
        files = ["manifest.csv", "loadfile.dat", "pub.pem", "ledger.jsonl", "checkpoint.txt",
                 "checkpoint.sig"]
        if "mbox" in state["formats"]:
            files.insert(0, "export.mbox")
        if "pdf" in state["formats"]:
            files += [f"pdf/{r['archive_id']}.pdf" for r in rows if r["file"]]
        unavailable = sum(1 for r in rows if not r["file"])
        manifest = {
            "format": "coffer-export-v1",
            "case": state["case"], "query": state["query"], "query_given": state["query_given"],
            "officer": state["officer"], "started": state["started"],
            "finished": finished.isoformat(), "count": len(rows), "unavailable": unavailable,
            "formats": state["formats"], "hold": hold,
            "signing_key": {"key_id": key_id, "file": "pub.pem", "algorithm": "Ed25519"},
            "checkpoint": {"seq": checkpoint.seq, "hash": checkpoint.hash,
                           "head_seq": checkpoint.head_seq, "head_hash": checkpoint.head_hash,
                           "time": checkpoint.time, "key_id": checkpoint.key_id,
                           "signature": checkpoint.signature},
            "files": [{"path": f, "sha256": sha256_file(out / f),
                       "size": (out / f).stat().st_size} for f in files],
            "messages": rows,
        }
        manifest_bytes = json.dumps(manifest, ensure_ascii=False, indent=1).encode() + b"\n"
        (out / "manifest.json").write_bytes(manifest_bytes)
        (out / "manifest.sig").write_bytes(self.archive.keys.signer.sign(manifest_bytes))
        manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
        event = record_audit(
            self.meta, self.archive, state["officer"], "export", query=state["query"],
            result_count=len(rows), target=state["case"], clock=self.clock,
            detail={"out": str(out.resolve()), "manifest_sha256": manifest_sha,
                    "checkpoint_seq": checkpoint.seq, "unavailable": unavailable,
                    "formats": state["formats"]})
        self._custody(out, manifest, manifest_sha, event.id)
        self._write_sums(out)
        (out / "SHA256SUMS.sig").write_bytes(
            self.archive.keys.signer.sign((out / "SHA256SUMS").read_bytes()))
        (out / STATE_FILE).unlink()  # last: until here, --resume redoes the finish
        (out / ROWS_FILE).unlink()
        (out / IDS_FILE).unlink()
        return ExportResult(out, len(rows), unavailable, manifest_sha, checkpoint.seq, event.id)

    def _hold(self, case: str) -> dict[str, Any] | None:
        with self.meta.session() as s:
            hold = s.scalar(select(Hold).where(Hold.case == case))
            if hold is None:
                return None
            items = len(list(s.scalars(select(HoldItem.message_pk)
                                       .where(HoldItem.hold_id == hold.id))))
            return {"case": hold.case, "query": hold.query, "reason": hold.reason,
                    "created_at": hold.created_at.isoformat(), "created_by": hold.created_by,
                    "released_at": hold.released_at.isoformat() if hold.released_at else None,
                    "items": items}

    def _write_ledger_excerpt(self, out: Path, rows: list[dict[str, Any]], upto: int) -> None:
        """Entries from the first item's to the checkpoint: with the chain rule
        (archive.ledger) anyone can recompute each link up to the signed head."""
        seqs = [r["ledger"]["seq"] for r in rows if r["ledger"]]
        start = min(seqs) if seqs else upto
        with open(out / "ledger.jsonl", "wb") as fh:
            for raw in read_lines(self.archive.paths.ledger):
                if not raw.complete:
                    break
                seq = json.loads(raw.data)["seq"]
                if seq > upto:
                    break
                if seq >= start:
                    fh.write(raw.data + b"\n")

    @staticmethod
    def _flat(row: dict[str, Any]) -> list[str]:
        ledger = row.get("ledger") or {}
        return [str(row["archive_id"]), row["message_id"], row["date"], row["from"],
                "; ".join(row["to"]), "; ".join(row["cc"]), "; ".join(row["bcc"]),
                row["subject"], "; ".join(a["name"] for a in row["attachments"]),
                row["sha256"], str(row["size"]), row["file"] or "",
                str(ledger.get("seq", "")), str(ledger.get("hash", "")),
                str(ledger.get("checkpoint_seq", "") or ""), row["status"]]

    def _write_csv(self, path: Path, rows: list[dict[str, Any]]) -> None:
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(MANIFEST_FIELDS)
            for row in rows:
                w.writerow(self._flat(row))

    def _write_dat(self, path: Path, rows: list[dict[str, Any]]) -> None:
        with open(path, "w", newline="", encoding="utf-8-sig") as fh:
            fh.write(dat_line([f.upper() for f in MANIFEST_FIELDS]))
            for row in rows:
                fh.write(dat_line(self._flat(row)))

    def _custody(self, out: Path, manifest: dict[str, Any], manifest_sha: str,
                 audit_id: int) -> None:
        cp = manifest["checkpoint"]
        hold = manifest["hold"]
        facts = [
            ("Case", manifest["case"]),
            ("Legal hold", (f"{hold['case']}: placed {hold['created_at']} by "
                            f"{hold['created_by']}, query {hold['query']!r}, {hold['items']} "
                            "items" + (f", released {hold['released_at']}"
                                       if hold["released_at"] else ""))
             if hold else "no legal hold with this case name exists in the archive"),
            ("Exported by", manifest["officer"]),
            ("Started", manifest["started"]),
            ("Finished", manifest["finished"]),
            ("Query (as given)", manifest["query_given"]),
            ("Query (as run)", manifest["query"]),
            ("Items", str(manifest["count"])),
            ("Items unavailable", str(manifest["unavailable"])),
            ("Package hash (SHA-256 of manifest.json)", manifest_sha),
            ("Signing key (Ed25519, pub.pem)", manifest["signing_key"]["key_id"]),
            ("Ledger checkpoint", f"entry {cp['seq']} signs head {cp['head_seq']} "
                                  f"{cp['head_hash']} at {cp['time']}"),
            ("Audit event", f"id {audit_id} (database) and an 'audit' ledger entry"),
        ]
        verify_steps = [
            "1. Check every file: sha256sum -c SHA256SUMS",
            "2. Check the list itself was signed by the archive: openssl pkeyutl -verify "
            "-pubin -inkey pub.pem -rawin -in SHA256SUMS -sigfile SHA256SUMS.sig",
            "3. Check the manifest (the load file with every message's SHA-256): openssl "
            "pkeyutl -verify -pubin -inkey pub.pem -rawin -in manifest.json -sigfile "
            "manifest.sig",
            "4. Check the ledger checkpoint: openssl pkeyutl -verify -pubin -inkey pub.pem "
            "-rawin -in checkpoint.txt -sigfile checkpoint.sig ; checkpoint.txt names the "
            "signed head entry (seq and hash) of ledger.jsonl. Each ledger line's hash is "
            "the SHA-256 of the line without its \"hash\" key (keys sorted, no spaces) and "
            "each \"prev\" is the previous line's hash, so each item's message_stored entry "
            "(seq and hash in the manifest) is chained to the signed head.",
            "5. Compare the key: obtain the archive's public key (archive/keys/"
            "ledger-signing.pub) from its operator independently and check it equals "
            "pub.pem; its id is " + manifest["signing_key"]["key_id"] + ".",
            "6. Or run: coffer export verify DIR (does all of the above).",
        ]
        ctx = {"case": manifest["case"], "facts": facts, "verify_steps": verify_steps,
               "messages": manifest["messages"], "manifest": manifest}
        html = templates().get_template("custody.html").render(**ctx)
        (out / "custody.html").write_text(html, encoding="utf-8")
        from reports.pdf import custody_pdf

        custody_pdf(out / "custody.pdf", ctx)

    @staticmethod
    def _write_sums(out: Path) -> None:
        lines = []
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            rel = path.relative_to(out).as_posix()
            if rel in ("SHA256SUMS", "SHA256SUMS.sig", STATE_FILE, ROWS_FILE, IDS_FILE):
                continue
            lines.append(f"{sha256_file(path)}  {rel}\n")
        (out / "SHA256SUMS").write_text("".join(lines), encoding="utf-8")


def export(archive: Archive, meta: Metadata, index: Index, req: ExportRequest,
           clock: Clock | None = None) -> ExportResult:
    """Run (or resume) an export into ``req.out``; see the module docstring."""
    return Exporter(archive, meta, index, clock).run(req)
