"""coffer export and coffer export verify, through the real CLI entry point."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Populated

from archive.metadata import Metadata
from gateway.cli import main


def export(data: Path, out: Path, query: str = "merger OR lunch OR invoice OR report",
           *extra: str) -> int:
    return main(["export", "--data-dir", str(data), "--case", "C-17", "--query", query,
                 "--out", str(out), "--officer", "olivia", *extra])


def verify(out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict[str, str]]]:
    capsys.readouterr()
    rc = main(["export", "verify", str(out), "--json"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    return rc, lines[:-1]


def test_export_writes_byte_exact_originals_with_the_archive_hashes(
        archive_dir: Populated, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    assert export(archive_dir.data_dir, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 5  # the duplicate receipt is its own item
    meta = Metadata.for_data_dir(archive_dir.data_dir)
    try:
        for row in manifest["messages"]:
            msg = meta.get(row["archive_id"])
            assert msg is not None
            data = (out / row["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["sha256"] == msg.sha256
            assert row["ledger"]["seq"] > 0 and row["ledger"]["checkpoint_seq"]
        bcc = next(r for r in manifest["messages"] if r["subject"] == "Quarterly report")
        assert bcc["bcc"] == ["secret@example.org"]
        assert bcc["attachments"][0]["name"] == "forecast.xlsx"
        events = [e for e in meta.audit_events() if e.action == "export"]
        assert len(events) == 1 and events[0].result_count == 5 and events[0].who == "olivia"
    finally:
        meta.close()
    raws = {r.raw for r in archive_dir.receipts}
    assert {p.read_bytes() for p in (out / "messages").iterdir()} == raws
    mbox = (out / "export.mbox").read_bytes()
    assert mbox.count(b"\nFrom ") + mbox.startswith(b"From ") == 5
    assert b"\n>From the desk of Alice" in mbox  # mboxrd quoting
    assert (out / "custody.pdf").read_bytes().startswith(b"%PDF")
    html = (out / "custody.html").read_text()
    assert hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() in html
    assert "C-17" in html and "olivia" in html and "openssl pkeyutl -verify" in html
    ledger_text = "".join(p.read_text() for p in sorted(
        (archive_dir.data_dir / "archive" / "ledger").glob("*.jsonl")))
    assert '"kind":"audit"' in ledger_text and '"action":"export"' in ledger_text


def test_verify_accepts_an_untouched_package(archive_dir: Populated, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pkg"
    assert export(archive_dir.data_dir, out) == 0
    assert verify(out, capsys) == (0, [])


@pytest.mark.parametrize("damage, code, path", [
    ("flip", "altered", "messages/1.eml"),
    ("remove", "removed", "messages/1.eml"),
    ("add", "added", "messages/99.eml"),
    ("manifest", "signature", "manifest.json"),
    ("mbox", "altered", "export.mbox"),
])
def test_verify_names_each_tampered_added_or_removed_file(
        archive_dir: Populated, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        damage: str, code: str, path: str) -> None:
    out = tmp_path / "pkg"
    assert export(archive_dir.data_dir, out) == 0
    target = out / path
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 1
        target.write_bytes(bytes(data))
    elif damage == "remove":
        target.unlink()
    elif damage == "add":
        target.write_bytes(b"Subject: planted\r\n\r\nnot from the archive\r\n")
    elif damage == "manifest":
        target.write_text(target.read_text().replace('"C-17"', '"C-18"'))
    else:
        with open(target, "ab") as fh:
            fh.write(b"From x\n\nextra\n")
    rc, findings = verify(out, capsys)
    assert rc == 1
    assert {"code": code, "path": path} in [{"code": f["code"], "path": f["path"]}
                                             for f in findings]


def test_openssl_and_sha256sum_alone_verify_the_package(archive_dir: Populated,
                                                        tmp_path: Path) -> None:
    if shutil.which("openssl") is None or shutil.which("sha256sum") is None:
        pytest.skip("openssl and sha256sum are needed for this test")
    out = tmp_path / "pkg"
    assert export(archive_dir.data_dir, out) == 0
    cmd = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin", "-in",
           "manifest.json", "-sigfile", "manifest.sig"]
    ok = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout
    for data, sig in (("SHA256SUMS", "SHA256SUMS.sig"), ("checkpoint.txt", "checkpoint.sig")):
        r = subprocess.run([*cmd[:8], data, "-sigfile", sig], cwd=out, capture_output=True)
        assert r.returncode == 0, r.stderr
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=out).returncode == 0
    # The same command refuses a manifest changed by one byte.
    manifest = out / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b"C-17", b"C-71"))
    bad = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    assert bad.returncode != 0


def test_resume_finishes_an_interrupted_export_identically(archive_dir: Populated,
                                                           tmp_path: Path) -> None:
    import reports.export as ex

    whole = tmp_path / "whole"
    assert export(archive_dir.data_dir, whole) == 0
    out = tmp_path / "pkg"
    old_chunk, old_finish = ex.CHUNK, ex.Exporter._finish

    def crash(self: ex.Exporter, req: ex.ExportRequest, state: dict[str, object]) -> None:
        raise KeyboardInterrupt

    ex.CHUNK = 2
    ex.Exporter._finish = crash  # type: ignore[method-assign,assignment]
    try:
        assert export(archive_dir.data_dir, out) == 130
    finally:
        ex.Exporter._finish = old_finish  # type: ignore[method-assign]
    try:
        assert (out / ex.STATE_FILE).exists()
        assert export(archive_dir.data_dir, out) == 1  # refuses without --resume
        assert export(archive_dir.data_dir, out, "merger OR lunch OR invoice OR report",
                      "--resume") == 0
    finally:
        ex.CHUNK = old_chunk
    assert not (out / ex.STATE_FILE).exists()
    assert (out / "export.mbox").read_bytes() == (whole / "export.mbox").read_bytes()
    a = json.loads((out / "manifest.json").read_text())["messages"]
    b = json.loads((whole / "manifest.json").read_text())["messages"]
    assert [(r["archive_id"], r["sha256"]) for r in a] == [(r["archive_id"], r["sha256"])
                                                           for r in b]


def test_export_of_a_bad_query_is_a_usage_error(archive_dir: Populated, tmp_path: Path) -> None:
    assert export(archive_dir.data_dir, tmp_path / "pkg", "from:(") == 2
    assert not (tmp_path / "pkg").exists()
    assert export(archive_dir.data_dir, tmp_path / "pkg", "merger", "--format", "tiff") == 2


def test_a_shredded_message_is_listed_as_unavailable_and_the_package_verifies(
        archive_dir: Populated, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from archive.facade import Archive

    shredded = archive_dir.receipts[3].raw  # "Re: merger", archive id 4
    with Archive.open(archive_dir.data_dir) as archive:
        archive.shred(hashlib.sha256(shredded).hexdigest(), reason="retention")
    out = tmp_path / "pkg"
    assert export(archive_dir.data_dir, out, "merger") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (gone,) = [r for r in manifest["messages"] if r["archive_id"] == 4]
    assert gone["file"] is None and gone["status"].startswith("unavailable")
    assert gone["ledger"]["seq"] > 0  # its hash stays provable
    assert manifest["unavailable"] == 1 and not (out / "messages" / "4.eml").exists()
    assert verify(out, capsys) == (0, [])


def test_pdf_format_renders_each_message_for_review(archive_dir: Populated, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pkg"
    assert export(archive_dir.data_dir, out, "merger", "--format", "eml,pdf") == 0
    pdfs = sorted(p.name for p in (out / "pdf").iterdir())
    assert pdfs == ["1.pdf", "4.pdf"]
    assert not (out / "export.mbox").exists()
    from pypdf import PdfReader

    text = PdfReader(out / "pdf" / "1.pdf").pages[0].extract_text()
    assert "Quarterly report" in text and "forecast.xlsx" in text
    assert verify(out, capsys) == (0, [])


def test_custody_report_names_the_legal_hold_and_progress_is_shown(
        archive_dir: Populated, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from archive.facade import Archive
    from archive.holds import create_hold
    from archive.index import open_index
    from archive.search import Searcher

    data = archive_dir.data_dir
    with Archive.open(data) as archive, Metadata.for_data_dir(data) as meta:
        index = open_index("fts5", data_dir=data)
        try:
            create_hold(meta, archive, Searcher(meta, index), "C-17", "merger", "harriet")
        finally:
            index.close()
    out = tmp_path / "pkg"
    capsys.readouterr()
    assert export(data, out, "merger", "--progress", "--json") == 0
    captured = capsys.readouterr()
    assert "export: 2/2" in captured.err
    summary = json.loads(captured.out)
    assert summary["count"] == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["hold"]["created_by"] == "harriet" and manifest["hold"]["items"] == 2
    html = (out / "custody.html").read_text()
    assert "placed" in html and "harriet" in html
