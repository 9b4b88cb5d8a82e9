"""What the audit trail holds for a data directory, for the audited commands' tests: the
metadata database's audit rows and the ledger's ``audit`` entries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from archive.facade import Archive
from archive.metadata import Metadata


def audit_rows(data_dir: Path) -> list[Any]:
    meta = Metadata.for_data_dir(data_dir)
    try:
        return list(meta.audit_events())
    finally:
        meta.close()


def ledger_audits(data_dir: Path) -> list[dict[str, Any]]:
    with Archive.open(data_dir, create=False) as a:
        return [e.fields for e in a.ledger.entries() if e.kind == "audit"]
