"""``coffer export verify DIR``: check an export package without trusting Coffer's archive.

It needs only the package: ``pub.pem`` checks ``manifest.sig`` (over manifest.json),
``SHA256SUMS.sig`` (over SHA256SUMS) and ``checkpoint.sig`` (over checkpoint.txt);
every file is hashed against SHA256SUMS and against the manifest; every file that
is in neither is named as added, every listed file that is absent as removed; the
ledger excerpt's hash chain is recomputed up to the signed head, and every
message's ``message_stored`` entry must be on it.  To trust the key itself,
compare pub.pem with the archive's key obtained independently (``--public-key``).

Each problem is one :class:`Finding` naming the file; none means the package is
exactly what the archive produced.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from archive.ledger import GENESIS, checkpoint_payload, entry_hash
from reports.errors import PackageError
from reports.export import ROWS_FILE, STATE_FILE, sha256_file

UNSIGNED = frozenset({"SHA256SUMS", "SHA256SUMS.sig"})


@dataclass(frozen=True, slots=True)
class Finding:
    code: str  # altered | removed | added | signature | key | ledger | manifest
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.code.upper()} {self.path}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PackageReport:
    findings: list[Finding]
    files_checked: int
    messages: int
    manifest_sha256: str

    @property
    def ok(self) -> bool:
        return not self.findings


def _load_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PackageError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError(f"{path}: not an Ed25519 public key")
    return key


def _sig_ok(key: Ed25519PublicKey, sig_path: Path, data: bytes) -> bool:
    try:
        key.verify(sig_path.read_bytes(), data)
    except (InvalidSignature, OSError):
        return False
    return True


def verify_package(root: Path, *, public_key: Path | None = None) -> PackageReport:
    if not (root / "manifest.json").is_file():
        raise PackageError(f"{root}: no manifest.json here (not an export package)")
    if (root / STATE_FILE).exists():
        raise PackageError(f"{root}: the export is unfinished (resume it with --resume)")
    if not (root / "pub.pem").is_file():
        raise PackageError(f"{root}/pub.pem: missing; the package cannot be checked")
    findings: list[Finding] = []
    seen: set[tuple[str, str]] = set()

    def report(code: str, path: str, message: str) -> None:
        if (code, path) not in seen:
            seen.add((code, path))
            findings.append(Finding(code, path, message))

    key = _load_key(root / "pub.pem")
    if public_key is not None:
        trusted = _load_key(public_key)
        raw = serialization.Encoding.Raw
        fmt = serialization.PublicFormat.Raw
        if trusted.public_bytes(raw, fmt) != key.public_bytes(raw, fmt):
            report("key", "pub.pem", f"is not the trusted key {public_key}")
    manifest_bytes = (root / "manifest.json").read_bytes()
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    if not _sig_ok(key, root / "manifest.sig", manifest_bytes):
        report("signature", "manifest.json",
               "the signature in manifest.sig does not verify (manifest or signature altered)")
    try:
        manifest: dict[str, Any] = json.loads(manifest_bytes)
    except ValueError as exc:
        raise PackageError(f"{root}/manifest.json: not JSON ({exc})") from None

    # 1. SHA256SUMS: its signature, then every file it lists.
    listed: dict[str, str] = {}
    sums = root / "SHA256SUMS"
    if not sums.is_file():
        report("removed", "SHA256SUMS", "the list of file hashes is missing")
    else:
        data = sums.read_bytes()
        if not _sig_ok(key, root / "SHA256SUMS.sig", data):
            report("signature", "SHA256SUMS",
                   "the signature in SHA256SUMS.sig does not verify (list or signature altered)")
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            digest, sep, name = line.partition("  ")
            if not sep or len(digest) != 64:
                report("manifest", "SHA256SUMS", f"line {n} is malformed")
                continue
            listed[name] = digest
    for name, digest in listed.items():
        path = root / name
        if not path.is_file():
            report("removed", name, "listed in SHA256SUMS but missing")
        elif sha256_file(path) != digest:
            report("altered", name, "SHA-256 differs from SHA256SUMS")

    # 2. The signed manifest: message files and load files.
    expected: dict[str, str] = {}
    for row in manifest.get("messages", []):
        if row.get("file"):
            expected[row["file"]] = row["sha256"]
    for f in manifest.get("files", []):
        expected[f["path"]] = f["sha256"]
    for name, digest in expected.items():
        path = root / name
        if not path.is_file():
            report("removed", name, "listed in the signed manifest but missing")
        elif listed.get(name) != digest and sha256_file(path) != digest:
            report("altered", name, "SHA-256 differs from the signed manifest")
        elif name not in listed and listed:
            report("manifest", name, "in the manifest but not in SHA256SUMS")

    # 3. Files nobody listed.
    known = set(listed) | set(expected) | UNSIGNED | {"manifest.json"}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in known and rel != ROWS_FILE:
            report("added", rel, "not part of the package (in neither SHA256SUMS nor manifest)")

    # 4. The ledger proof: checkpoint signature, chain, each item's entry on it.
    _verify_ledger(root, key, manifest, report)
    return PackageReport(findings, len(known), len(manifest.get("messages", [])), manifest_sha)


def _verify_ledger(root: Path, key: Ed25519PublicKey, manifest: dict[str, Any],
                   report: Any) -> None:
    cp = manifest.get("checkpoint") or {}
    payload = checkpoint_payload(int(cp.get("head_seq", 0)), str(cp.get("head_hash", "")))
    txt = root / "checkpoint.txt"
    if txt.is_file() and txt.read_bytes() != payload:
        report("ledger", "checkpoint.txt", "does not match the manifest's checkpoint")
    if not _sig_ok(key, root / "checkpoint.sig", payload):
        report("signature", "checkpoint.sig", "the ledger checkpoint signature does not verify")
    path = root / "ledger.jsonl"
    if not path.is_file():
        return  # reported as removed above
    hashes: dict[int, str] = {}
    prev: str | None = None
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            entry = json.loads(line)
            seq, h = int(entry["seq"]), str(entry["hash"])
        except (ValueError, KeyError, TypeError):
            report("ledger", "ledger.jsonl", f"line {n} is not a ledger entry")
            return
        if entry_hash(entry) != h:
            report("ledger", "ledger.jsonl", f"entry {seq} (line {n}): hash does not match")
            return
        if prev is not None and entry.get("prev") != prev:
            report("ledger", "ledger.jsonl", f"entry {seq} (line {n}): broken link")
            return
        if seq == 1 and entry.get("prev") != GENESIS:
            report("ledger", "ledger.jsonl", "entry 1 does not start the chain")
        prev = h
        hashes[seq] = h
    if hashes.get(int(cp.get("head_seq", -1))) != cp.get("head_hash"):
        report("ledger", "ledger.jsonl", "does not reach the signed checkpoint head")
    for row in manifest.get("messages", []):
        ledger = row.get("ledger")
        if ledger and hashes.get(int(ledger["seq"])) != ledger["hash"]:
            report("ledger", row.get("file") or str(row.get("archive_id")),
                   f"its ledger entry {ledger['seq']} is not on the signed chain")
