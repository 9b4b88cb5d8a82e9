"""Receipt blobs: what the SMTP transaction and the policy said about one archived message.

The message bytes carry their headers, but not the envelope (Bcc recipients are
in no header, RFC 5321 §7.2), the verdicts, the policy decision with its rule
hits, nor the retention end.  The archive stage therefore stores, next to each
message, a small JSON document of its own in the same encrypted store, in the
same group commit (archive.facade.BatchWriter.put_many)::

    {"kind": "coffer-receipt/1", "message_sha256": ..., "qid": ...,
     "envelope": {...Envelope.to_dict()...}, "received_at": ISO, "direction": ...,
     "state": ..., "source": ..., "tls": ..., "verdicts": {...},
     "decision": {...} | null, "rules": [...], "retention_until": ISO | null,
     "copy": "" | "received" | "sent" | "decrypted" | "encrypted",
     "linked_sha256": SHA256 | null}

``copy`` and ``linked_sha256`` (archive.metadata.COPIES) let a rebuild link the
copies of one message again (as received <-> as sent, ciphertext <-> decrypted);
receipts written before them lack both and mean the only copy.

The ledger entries hold hashes only, never the personal data itself:

* the receipt's ``message_stored`` entry: ``{"receipt_of": MESSAGE_SHA256}``;
* the message's ``message_stored`` entry: ``{"qid": ..., "receipt": RECEIPT_SHA256}``
  (so ``coffer archive rebuild`` follows it directly).

The receipt is written before the message in the same ledger append, so a
message entry never names a receipt the ledger does not know.  A receipt blob
has its own data key and is crypto-shredded with its message blob at expiry
(archive.retention), so the Bcc list is destroyed with the content.  Receipts
get no ``blobs``/``messages`` row: they are never indexed, searched or exported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any

from archive.errors import ArchiveError
from archive.ledger import Ledger, LedgerEntry
from archive.metadata import MessageRecord
from gateway.mailparse import JsonFragments

KIND = "coffer-receipt/1"
RECEIPT_OF = "receipt_of"  # field of the receipt's own message_stored entry
RECEIPT = "receipt"  # field of the message's message_stored entry


class ReceiptError(ArchiveError):
    """A receipt blob that is not a Coffer receipt document."""


def is_receipt_entry(fields: Mapping[str, Any]) -> bool:
    """True for the ``message_stored`` entry of a receipt blob (not a message)."""
    return isinstance(fields.get(RECEIPT_OF), str)


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t is not None else None


def receipt_document(rec: MessageRecord, envelope: Mapping[str, Any], qid: str) -> bytes:
    """The receipt blob for one metadata record (pure)."""
    try:
        text = _fast_document(rec, envelope, qid)
    except Exception:  # e.g. a fact JSON has no type for: the general encoding decides
        text = _document_text(rec, envelope, qid)
    return text.encode()  # a lone surrogate in a fact fails here, as it always did


def _document_text(rec: MessageRecord, envelope: Mapping[str, Any], qid: str) -> str:
    doc = {
        "kind": KIND, "message_sha256": rec.sha256, "qid": qid, "envelope": dict(envelope),
        "received_at": _iso(rec.received_at), "direction": rec.direction,
        "state": rec.state, "source": rec.source, "tls": rec.tls,
        "verdicts": rec.verdicts, "decision": rec.decision, "rules": list(rec.rules),
        "retention_until": _iso(rec.retention_until),
        "copy": rec.copy, "linked_sha256": rec.link_sha256,
    }
    if rec.flags:  # only when there are some: every other receipt stays as it was
        doc["flags"] = list(rec.flags)
    # default=str: a fact a stage stored as a non-JSON value must not hold the message.
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)


# The encoding of _document_text for documents of JSON types only: no default, so a
# value of any other type raises and the general encoding takes the whole document.
_STRICT = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# The encoded decision and verdicts, by their marshal bytes (see JsonFragments).
# tests/gateway/test_archive_stage_fastpaths.py holds this to _document_text.
_FRAGMENTS = JsonFragments(_STRICT)
_fragment = _FRAGMENTS.encode


def _text(value: object) -> str:
    return encode_basestring(value) if type(value) is str else _STRICT.encode(value)


def _fast_document(rec: MessageRecord, envelope: Mapping[str, Any], qid: str) -> str:
    """_document_text from fragments; raises for a value of no JSON type.

    The keys in the order sort_keys puts them (tests hold it to _document_text), each
    value encoded alone: a value's encoding does not depend on its neighbours.
    """
    return (f'{{"copy":{_text(rec.copy)},"decision":{_fragment(rec.decision)},'
            f'"direction":{_text(rec.direction)},"envelope":{_STRICT.encode(dict(envelope))},'
            f'{_flags(rec.flags)}"kind":{_KIND_JSON},"linked_sha256":{_text(rec.link_sha256)},'
            f'"message_sha256":{_text(rec.sha256)},"qid":{_text(qid)},'
            f'"received_at":{_text(_iso(rec.received_at))},'
            f'"retention_until":{_text(_iso(rec.retention_until))},'
            f'"rules":{_STRICT.encode(list(rec.rules))},"source":{_text(rec.source)},'
            f'"state":{_text(rec.state)},"tls":{_text(rec.tls)},'
            f'"verdicts":{_fragment(rec.verdicts)}}}')


_KIND_JSON = encode_basestring(KIND)


def _flags(flags: list[str]) -> str:
    return f'"flags":{_STRICT.encode(list(flags))},' if flags else ""


def parse_receipt(raw: bytes, message_sha256: str) -> dict[str, Any]:
    """Decode and check a receipt blob; ReceiptError if it is not the one expected."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ReceiptError(f"receipt is not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ReceiptError(f"receipt is not a {KIND} document")
    if doc.get("message_sha256") != message_sha256:
        raise ReceiptError(f"receipt belongs to {doc.get('message_sha256')!r}, "
                           f"not {message_sha256}")
    return doc


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def apply_receipt(rec: MessageRecord, doc: Mapping[str, Any]) -> MessageRecord:
    """``rec`` (rebuilt from the headers) with what the receipt recorded (pure: a new
    record; ValueError/TypeError from a malformed document leave ``rec`` as it was)."""
    env = doc.get("envelope") or {}
    decision = doc.get("decision")
    return replace(
        rec,
        mail_from=str(env.get("mail_from") or ""),
        rcpt_to=[str(r) for r in env.get("rcpt_to") or []],
        client_ip=str(env.get("client_ip") or ""),
        helo=str(env.get("helo") or ""),
        auth_user=str(env.get("auth_user") or ""),
        tls=str(doc.get("tls") or ""),
        received_at=_time(doc.get("received_at")) or rec.received_at,
        direction=str(doc.get("direction") or rec.direction),
        state=str(doc.get("state") or rec.state),
        source=str(doc.get("source") or rec.source),
        verdicts=dict(doc.get("verdicts") or {}),
        decision=dict(decision) if isinstance(decision, dict) else None,
        rules=[str(r) for r in doc.get("rules") or []],
        retention_until=_time(doc.get("retention_until")),
        copy=str(doc.get("copy") or ""),
        link_sha256=str(doc["linked_sha256"]) if doc.get("linked_sha256") else None,
        flags=[str(f) for f in doc.get("flags") or []],
    )


def receipts_of(ledger: Ledger, message_shas: Iterable[str]) -> dict[str, list[str]]:
    """Message SHA-256 -> the SHA-256s of its receipt blobs (one ledger pass)."""
    wanted = set(message_shas)
    out: dict[str, list[str]] = {}
    if not wanted:
        return out
    for e in ledger.entries():
        of = e.fields.get(RECEIPT_OF)
        if e.kind == "message_stored" and of in wanted:
            out.setdefault(str(of), []).append(str(e.fields["sha256"]))
    return out


def receipt_key(entry: LedgerEntry) -> str:
    """What a message entry (``message_stored``) records one receipt of: its blob and
    receipt SHA-256s, or the entry itself when it names no receipt (imports, entries
    from before receipts).  Two entries with one key are the same receipt written twice:
    the archive stage ran again after its database write failed (a full disk, a lost
    connection), and the database keeps one row for it, so rebuilds and checks count
    one."""
    receipt = entry.fields.get(RECEIPT)
    if isinstance(receipt, str):
        return f"{entry.fields.get('sha256')}/{receipt}"
    return f"#{entry.seq}"

