"""`coffer tlsrpt show` prints the reports a day's counts make, as the daily job sends them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import load
from gateway.deliver.tlsrpt import SessionKey
from gateway.deliver.tlsrpt_store import open_store

IN_DAY = datetime(2026, 11, 28, 9, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    p = tmp_path / "coffer.yaml"
    p.write_text("hostname: coffer.test\nlisteners:\n  - name: in\n    tls: none\n"
                 "metrics:\n  address: null\ndelivery:\n  tls_rpt:\n    enabled: true\n"
                 "    organization: Example Org\n    from: tlsrpt@coffer.test\n")
    store = open_store(load(p).data_dir)
    store.count(IN_DAY, SessionKey("dst.test", "tlsa", ("3 1 1 ab",), ("mx1.dst.test",),
                                   "success"))
    store.count(IN_DAY, SessionKey("dst.test", "tlsa", ("3 1 1 ab",), ("mx1.dst.test",),
                                   "validation-failure", "mx1.dst.test", "192.0.2.1"))
    store.flush()
    store.close()
    return p


def test_show_json_prints_the_report_of_each_domain(
    cfg_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["tlsrpt", "show", "--date", "2026-11-28", "--json",
                 "--config", str(cfg_path)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    report = json.loads(line)
    assert report["organization-name"] == "Example Org"
    (entry,) = report["policies"]
    assert entry["summary"] == {"total-successful-session-count": 1,
                                "total-failure-session-count": 1}
    assert entry["failure-details"][0]["result-type"] == "validation-failure"


def test_show_text_names_domain_counts_and_failures(
    cfg_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["tlsrpt", "show", "--date", "2026-11-28", "--config", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "dst.test  tlsa  ok 1  failed 1" in out
    assert "validation-failure" in out and "192.0.2.1" in out


def test_show_of_a_day_without_counts_says_so(
    cfg_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["tlsrpt", "show", "--date", "2026-11-27", "--config", str(cfg_path)]) == 0
    assert capsys.readouterr().out == "no TLS sessions counted for 2026-11-27\n"
