"""coffer report: every report renders, empty or not, and its figures match the database."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import Populated, corpus_receipts, populate
from sqlalchemy import text

from archive.facade import Archive
from archive.metadata import Metadata
from gateway.cli import main
from reports.compliance import REPORTS

PERIOD = ["--from", "2024-03-01", "--to", "2024-03-31"]


def report(data: Path, name: str, fmt: str, out: Path, period: list[str] = PERIOD) -> str:
    path = out / f"{name}.{fmt}"
    assert main(["report", name, *period, "--format", fmt, "--out", str(path),
                 "--data-dir", str(data), "--officer", "olivia"]) == 0
    return path.read_text()


def figures(data: Path, name: str, out: Path, period: list[str] = PERIOD) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(report(data, name, "json", out, period))
    return result


def sql(data: Path, query: str) -> int:
    with Metadata.for_data_dir(data) as meta, meta.session() as s:
        return int(s.execute(text(query)).scalar() or 0)


@pytest.mark.parametrize("name", sorted(REPORTS))
@pytest.mark.parametrize("fmt", ["html", "csv", "json"])
def test_every_report_renders_for_an_empty_archive(tmp_path: Path, name: str, fmt: str) -> None:
    data = tmp_path / "data"
    Archive.open(data).close()
    with Metadata.for_data_dir(data) as meta:
        meta.migrate()
    body = report(data, name, fmt, tmp_path)
    if fmt == "html":
        assert "<svg" in body and "no data in this period" in body
        assert not re.search(r"(src|href)=\"?https?:", body)  # no network resources
    elif fmt == "json":
        assert all(v == 0 for v in json.loads(body)["summary"].values())


def test_policy_figures_match_the_database(archive_dir: Populated, tmp_path: Path) -> None:
    data = archive_dir.data_dir
    rep = figures(data, "policy", tmp_path)
    assert rep["summary"] == {
        "messages": sql(data, "SELECT count(*) FROM messages"),
        "quarantined": 1, "encrypted": 1,
        "rule_hits": sql(data, "SELECT count(*) FROM rule_hits")}
    tables = rep["tables"]
    assert {r["rule"]: r["messages"] for r in tables["rule_hits"]} == {
        "keep-finance": 1, "encrypt-finance": 1, "phishing-words": 1}
    assert tables["top_senders"][0] == {"sender": "bob@example.org", "messages": 2}
    assert {r["recipient"]: r["messages"] for r in tables["top_recipients"]}[
        "alice@example.com"] == sql(
        data, "SELECT count(*) FROM participants WHERE role='envelope_to' "
              "AND address='alice@example.com'")
    html = report(data, "policy", "html", tmp_path)
    assert "phishing-words" in html and "<svg" in html


def test_auth_report_counts_results_by_from_domain(archive_dir: Populated,
                                                   tmp_path: Path) -> None:
    data = archive_dir.data_dir
    rep = figures(data, "auth", tmp_path)
    rows = {r["domain"]: r for r in rep["tables"]["domains"]}
    assert rows["evil.test"]["spf_fail"] == 1 and rows["evil.test"]["dmarc_fail"] == 1
    assert rows["example.org"]["messages"] == 2 and rows["example.org"]["dmarc_pass"] == 2
    assert rep["summary"]["dmarc_pass"] == sql(
        data, "SELECT count(*) FROM messages WHERE dmarc='pass'")


def test_retention_report_shows_what_expires_and_under_which_rule(
        archive_dir: Populated, tmp_path: Path) -> None:
    data = archive_dir.data_dir
    rep = figures(data, "retention", tmp_path)  # the 30-day one ends on 2024-04-02
    assert rep["summary"]["messages_expiring"] == 0
    rep = figures(data, "retention", tmp_path, ["--from", "2024-04-01", "--to", "2024-04-30"])
    assert rep["tables"]["expiring_by_rule"] == [{"rule": "short", "messages": 1}]
    assert rep["summary"]["messages_expiring"] == sql(
        data, "SELECT count(*) FROM messages WHERE retention_until >= '2024-04-01' "
              "AND retention_until < '2024-05-01'")


def test_holds_and_audit_reports_list_what_happened(archive_dir: Populated,
                                                    tmp_path: Path) -> None:
    from datetime import UTC, datetime

    data = archive_dir.data_dir
    with Metadata.for_data_dir(data) as meta:
        meta.place_hold("C-17", "merger", "olivia", [1, 4], datetime(2024, 3, 5, tzinfo=UTC))
    rep = figures(data, "holds", tmp_path)
    assert rep["tables"]["holds"][0]["case"] == "C-17"
    assert rep["tables"]["holds"][0]["messages"] == 2
    assert main(["export", "--data-dir", str(data), "--case", "C-17", "--query", "merger",
                 "--out", str(tmp_path / "pkg"), "--officer", "olivia"]) == 0
    today = datetime.now(UTC).date().isoformat()
    rep = figures(data, "audit", tmp_path, ["--from", today, "--to", today])
    assert rep["summary"]["exports"] == 1
    assert rep["summary"]["events"] == sql(data, "SELECT count(*) FROM audit_events") - 1
    (export_event,) = [e for e in rep["tables"]["events"] if e["action"] == "export"]
    assert export_event["who"] == "olivia" and export_event["results"] == 2


def test_every_report_renders_for_a_corpus_sample(tmp_path: Path) -> None:
    data = tmp_path / "data"
    populate(data, corpus_receipts(60))
    for name in REPORTS:
        for fmt in ("html", "csv", "json"):
            assert report(data, name, fmt, tmp_path)
    rep = figures(data, "policy", tmp_path)
    assert rep["summary"]["messages"] == sql(
        data, "SELECT count(*) FROM messages WHERE received_at >= '2024-03-01' "
              "AND received_at < '2024-04-01'")
    rep = figures(data, "auth", tmp_path)
    assert sum(r["messages"] for r in rep["tables"]["domains"]) == rep["summary"]["messages"]


def test_a_bad_date_is_one_clear_usage_error(archive_dir: Populated,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "policy", "--from", "March", "--to", "2024-03-31",
                 "--data-dir", str(archive_dir.data_dir)]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err

