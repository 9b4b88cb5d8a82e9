"""Ledger documents: the clear text of a ledger entry, encrypted in the blob store.

The ledger is never encrypted and never erased, so its entries hold ids and
hashes only (archive.ledger).  What a rebuild needs beyond them (a legal hold's
case, query and frozen message set; who searched for what in an audit event)
goes into a small JSON document stored as a blob like every other: its own
data key, encrypted and compressed, so no query or name reaches the disk in
clear.  The ledger links the two, as receipts do (archive.receipts)::

    message_stored  {"sha256": DOC_SHA256, ..., "document_for": "hold_placed"}
    hold_placed     {"hold": 3, "case": "C-17", ..., "document": DOC_SHA256}

The document is written (and its ``message_stored`` entry appended) before the
entry that names it, so an entry never names a document the ledger does not
know; a crash in between leaves an unreferenced document, which is harmless.
Document blobs get no ``blobs``/``messages`` row: they are never indexed,
searched, exported or expired (:func:`is_message_entry` tells them apart).
``coffer archive rebuild`` reads them back with :func:`read_document`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from archive.errors import ArchiveError
from archive.facade import Archive
from archive.ledger import LedgerEntry
from archive.receipts import is_receipt_entry

__all__ = [
    "DOCUMENT", "DOCUMENT_FOR", "DocumentError", "append_documented", "encode",
    "is_document_entry", "is_message_entry", "read_document",
]

DOCUMENT_FOR = "document_for"  # field of the document's own message_stored entry
DOCUMENT = "document"  # field of the entry the document belongs to


class DocumentError(ArchiveError):
    """A ledger document that is missing, unreadable or not the one expected."""


def is_document_entry(fields: Mapping[str, Any]) -> bool:
    """True for the ``message_stored`` entry of a ledger document (not a message)."""
    return isinstance(fields.get(DOCUMENT_FOR), str)


def is_message_entry(entry: LedgerEntry) -> bool:
    """A ``message_stored`` entry of an archived message: not a receipt, not a document."""
    return (entry.kind == "message_stored" and not is_receipt_entry(entry.fields)
            and not is_document_entry(entry.fields))


def encode(doc: Mapping[str, Any]) -> bytes:
    """Canonical JSON (pure).  default=str: a detail value JSON cannot hold is kept as
    text rather than losing the whole entry."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode()


def append_documented(archive: Archive, kind: str, doc: Mapping[str, Any],
                      **fields: Any) -> LedgerEntry:
    """Store ``doc`` encrypted, then append the ``kind`` entry naming it."""
    ref = archive.put(encode(doc), {DOCUMENT_FOR: kind})
    return archive.append(kind, **fields, **{DOCUMENT: ref.sha256})


def read_document(archive: Archive, entry: LedgerEntry, doc_kind: str) -> dict[str, Any]:
    """The document ``entry`` names, decoded and checked; DocumentError otherwise."""
    sha = entry.fields.get(DOCUMENT)
    if not isinstance(sha, str):
        raise DocumentError(f"ledger seq {entry.seq}: {entry.kind} entry names no document")
    try:
        doc = json.loads(archive.get(sha))
    except ArchiveError as exc:
        raise DocumentError(f"ledger seq {entry.seq}: document {sha[:16]}: {exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise DocumentError(f"ledger seq {entry.seq}: document {sha[:16]} is not JSON "
                            f"({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != doc_kind:
        raise DocumentError(f"ledger seq {entry.seq}: document {sha[:16]} is not a "
                            f"{doc_kind} document")
    return doc
