"""Plumbing shared by the report, export, recovery and backup commands.

* :func:`metadata_url` / :func:`open_metadata`: the metadata database of a data dir.
* :func:`record_audit`: who did what, in the database and in the ledger.
* :class:`Progress`: a one-line counter on stderr (tty, or ``--progress``).
* :class:`LedgerIndex`: which ledger entry proves a blob's inclusion, and which
  signed checkpoint covers that entry (read from the ledger alone).
* :func:`bar_chart`: an inline SVG bar chart (no scripts, no network resources).
"""

from __future__ import annotations

import bisect
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any, TextIO

from archive.facade import Archive
from archive.ledger import parse_entry, read_lines
from archive.metadata import AuditEvent, Metadata
from archive.search import audit

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_utc(text: str) -> datetime:
    """An ISO 8601 time (ledger entries, documents); a naive one is taken as UTC."""
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def metadata_url(data_dir: Path, database: str | None = None) -> str:
    """--database, else $COFFER_ARCHIVE_DB, else DATA_DIR/archive/meta.db (SQLite)."""
    url = database or os.environ.get("COFFER_ARCHIVE_DB")
    if url:
        return url
    return f"sqlite:///{data_dir / 'archive' / 'meta.db'}"


def open_metadata(data_dir: Path, database: str | None = None, *,
                  must_exist: bool = True) -> Metadata:
    """The metadata database (archive.location), migrated."""
    from archive.location import ArchiveLocation

    url = database or os.environ.get("COFFER_ARCHIVE_DB")
    return ArchiveLocation(data_dir, url).open_metadata(must_exist=must_exist)


def record_audit(meta: Metadata, archive: Archive | None, who: str, action: str, *,
                 query: str | None = None, result_count: int | None = None,
                 target: str | None = None, detail: dict[str, Any] | None = None,
                 clock: Clock | None = None) -> AuditEvent:
    """An audit event in the database, then (with an archive) an ``audit`` ledger entry.

    archive.audit.record does both; the ledger gets ids and hashes only (the
    officer's and the query's SHA-256, the count), never names or query text.
    """
    if archive is None:
        return audit(meta, who, action, query=query, result_count=result_count,
                     target=target, detail=detail, clock=clock)
    from archive.audit import record

    return record(meta, archive, who, action, query=query, result_count=result_count,
                  target=target, detail=detail, clock=clock)


class Progress:
    """``what: done/total`` on one stderr line, at most ~10 times a second."""

    def __init__(self, what: str, total: int | None = None, *, enabled: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.what = what
        self.total = total
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        rate = done / max(now - self.started, 1e-6)
        total = f"/{self.total}" if self.total is not None else ""
        print(f"\r{self.what}: {done}{total} ({rate:.0f}/s)", end="", file=self.stream,
              flush=True)

    def done(self, done: int) -> None:
        if self.enabled:
            self.update(done, force=True)
            print(file=self.stream, flush=True)


@dataclass(frozen=True, slots=True)
class Proof:
    """A message_stored entry and the first signed checkpoint at or after it."""

    seq: int
    hash: str
    checkpoint_seq: int | None
    checkpoint_hash: str | None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: str
    head_seq: int
    head_hash: str
    key_id: str
    signature: str
    time: str


class LedgerIndex:
    """Everything the export needs from the ledger, in one pass over it."""

    def __init__(self) -> None:
        self.stored: dict[str, list[tuple[int, str]]] = {}  # sha256 -> (seq, hash)
        self.checkpoints: list[Checkpoint] = []
        self._heads: list[int] = []

    @classmethod
    def read(cls, ledger_dir: Path) -> LedgerIndex:
        out = cls()
        for raw in read_lines(ledger_dir):
            if not raw.complete:
                break
            e = parse_entry(raw)
            if e.kind in ("message_stored", "blob_recovered"):
                sha = e.fields.get("sha256")
                if isinstance(sha, str):
                    out.stored.setdefault(sha, []).append((e.seq, e.hash))
            elif e.kind == "checkpoint":
                f = e.fields
                out.checkpoints.append(Checkpoint(e.seq, e.hash, int(f["head_seq"]),
                                                  str(f["head_hash"]), str(f.get("key_id", "")),
                                                  str(f.get("signature", "")), e.time))
        out._heads = [c.head_seq for c in out.checkpoints]
        return out

    def proof(self, sha256: str, ledger_ref: str | None = None) -> Proof | None:
        """The entry recording the blob (``ledger_ref`` "seq" if the row has one, else
        the first), with the first checkpoint whose signed head covers it."""
        entries = self.stored.get(sha256)
        if not entries:
            return None
        seq, h = entries[0]
        if ledger_ref and ledger_ref.isdigit():
            for s, hh in entries:
                if s == int(ledger_ref):
                    seq, h = s, hh
        i = bisect.bisect_left(self._heads, seq)
        cp = self.checkpoints[i] if i < len(self.checkpoints) else None
        return Proof(seq, h, cp.seq if cp else None, cp.hash if cp else None)

    @property
    def latest(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None


# -- inline SVG charts ----------------------------------------------------------------

_COLOURS = ("#3465a4", "#cc0000", "#73d216", "#f57900", "#75507b", "#c4a000")


def bar_chart(rows: Sequence[tuple[str, Sequence[int]]], series: Sequence[str] = ("count",),
              *, title: str = "", width: int = 640) -> str:
    """Horizontal (stacked) bars, one row per label; empty input draws "no data"."""
    bar_h, gap, label_w = 18, 6, 220
    height = max(1, len(rows)) * (bar_h + gap) + 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{escape(title)}" font-family="sans-serif" '
             f'font-size="12">']
    if title:
        parts.append(f'<title>{escape(title)}</title>')
    if not rows:
        parts.append('<text x="10" y="24">no data in this period</text></svg>')
        return "".join(parts)
    top = max(sum(v) for _, v in rows) or 1
    scale = (width - label_w - 60) / top
    for i, (label, values) in enumerate(rows):
        y = 10 + i * (bar_h + gap)
        short = label if len(label) <= 32 else label[:31] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">'
                     f'{escape(short)}</text>')
        x = float(label_w)
        for j, v in enumerate(values):
            w = v * scale
            if w > 0:
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                             f'fill="{_COLOURS[j % len(_COLOURS)]}"><title>'
                             f'{escape(series[j] if j < len(series) else "")}: {v}'
                             f'</title></rect>')
            x += w
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 13}">{sum(values)}</text>')
    if len(series) > 1:
        y = 10 + len(rows) * (bar_h + gap) + 8
        x = label_w
        for j, name in enumerate(series):
            parts.append(f'<rect x="{x}" y="{y}" width="10" height="10" '
                         f'fill="{_COLOURS[j % len(_COLOURS)]}"/>'
                         f'<text x="{x + 14}" y="{y + 9}">{escape(name)}</text>')
            x += 20 + 8 * len(name)
    parts.append("</svg>")
    return "".join(parts)
