"""PDF renderings with fpdf2 (pure Python): the custody report and per-message views.

fpdf2 was chosen over reportlab because it is pure Python with a small API and no
C extensions of its own; it embeds a TrueType font for Unicode text.  We use
DejaVu Sans when the system has it (Debian ``fonts-dejavu-core``); otherwise the
PDF core font Helvetica, which covers Latin-1 only (other characters become "?").
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fpdf import FPDF

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
_DEJAVU_BOLD = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


class _Doc:
    def __init__(self, title: str, created: datetime | None = None) -> None:
        pdf = FPDF(format="A4")
        pdf.set_creator("Coffer")
        pdf.set_title(title)
        pdf.set_creation_date(created or _EPOCH)  # the same input gives the same bytes
        pdf.set_auto_page_break(True, margin=15)
        self.unicode = _DEJAVU.exists() and _DEJAVU_BOLD.exists()
        if self.unicode:
            pdf.add_font("body", "", str(_DEJAVU))
            pdf.add_font("body", "B", str(_DEJAVU_BOLD))
            self.family = "body"
        else:
            self.family = "helvetica"
        pdf.add_page()
        self.pdf = pdf

    def text(self, s: str) -> str:
        return s if self.unicode else s.encode("latin-1", "replace").decode("latin-1")

    def heading(self, s: str, size: int = 14) -> None:
        self.pdf.set_font(self.family, "B", size)
        self.pdf.multi_cell(0, size * 0.5, self.text(s), new_x="LMARGIN", new_y="NEXT")
        self.pdf.ln(1)

    def para(self, s: str, size: int = 9) -> None:
        self.pdf.set_font(self.family, "", size)
        self.pdf.multi_cell(0, size * 0.5, self.text(s), new_x="LMARGIN", new_y="NEXT")
        self.pdf.ln(1)

    def pairs(self, rows: Sequence[tuple[str, str]], size: int = 9) -> None:
        for k, v in rows:
            self.pdf.set_font(self.family, "B", size)
            self.pdf.cell(45, size * 0.5, self.text(k))
            self.pdf.set_font(self.family, "", size)
            self.pdf.multi_cell(0, size * 0.5, self.text(v), new_x="LMARGIN", new_y="NEXT")
        self.pdf.ln(1)

    def output(self, path: Path) -> None:
        path.write_bytes(bytes(self.pdf.output()))


def custody_pdf(path: Path, ctx: dict[str, Any]) -> None:
    """The chain-of-custody report: the same facts as custody.html."""
    d = _Doc(f"Chain of custody: {ctx['case']}")
    d.heading(f"Chain of custody: export for case {ctx['case']}")
    d.pairs([(k, str(v)) for k, v in ctx["facts"]])
    d.heading("Verification without Coffer", 11)
    for step in ctx["verify_steps"]:
        d.para(step)
    d.heading(f"Items ({len(ctx['messages'])})", 11)
    # One fixed-width line per fact: cell() does no line breaking, which keeps a
    # 10,000-item report to seconds (multi_cell measures every character).
    pdf = d.pdf
    pdf.set_font("courier", "", 6.5)
    for m in ctx["messages"]:
        ledger = m.get("ledger") or {}
        lines = [f"#{m['archive_id']}  {m['date']}  ledger seq {ledger.get('seq', '-')}  "
                 f"first checkpoint {ledger.get('checkpoint_seq', '-')}",
                 f"  Message-ID {m['message_id'][:110]}",
                 f"  SHA-256 {m['sha256']}",
                 f"  entry   {ledger.get('hash', '-')}"]
        if m.get("status"):
            lines.append(f"  {m['status'][:120]}")
        for line in lines:
            pdf.cell(0, 3, line.encode("latin-1", "replace").decode("latin-1"),
                     new_x="LMARGIN", new_y="NEXT")
        pdf.ln(1)
    d.output(path)


def message_pdf(path: Path, headers: Sequence[tuple[str, str]], body: str,
                attachments: Sequence[str]) -> None:
    """A review rendering of one message: headers, body text, attachment list."""
    d = _Doc(dict(headers).get("Subject", ""))
    d.pairs(headers)
    d.para(body[:200_000] or "(no text body)")
    if attachments:
        d.heading("Attachments", 10)
        for a in attachments:
            d.para(a)
    d.output(path)
