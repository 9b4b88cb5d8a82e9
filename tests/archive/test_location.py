"""Every archive command finds the archive a configuration describes (``archive:`` section):
the configured database and index unless a flag or $COFFER_ARCHIVE_DB says otherwise."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from urllib.parse import quote

import pytest
from admin_env import *  # noqa: F403 - fixtures: env
from admin_env import Env
from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import M1, M2, PG_URL

from archive.location import ArchiveLocation, location_from_args
from gateway import config as config_mod
from gateway.cli import main
from gateway.errors import ConfigError


def _db_url(env: Env) -> str | None:
    if env.meta.dialect != "postgresql":
        return None
    return f"{PG_URL}?options={quote(f'-csearch_path={env.meta.schema}')}"


def _config(tmp_path: Path, env: Env, **archive: str) -> Path:
    lines = [f"data_dir: {env.data_dir}", "dns:", "  nameservers: [127.0.0.1]",
             "listeners:", "  - {name: in, address: '127.0.0.1:2525', tls: none}"]
    if archive:
        lines.append("archive:")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in archive.items()]
    path = tmp_path / "coffer.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_search_with_only_config_uses_the_configured_database_and_index(
        env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env.add(M1)
    env.add(M2)
    env.indexer().run()
    url = _db_url(env)
    cfg = _config(tmp_path, env, **({"database": url} if url else {}))
    code = main(["search", "--config", str(cfg), "--json", "subject:quarterly"])
    out, err = capsys.readouterr()
    assert code == 0, err
    hits = [json.loads(line) for line in out.splitlines()]
    assert [h["subject"] for h in hits] == ["Quarterly report"]
    if url is not None:
        # nothing was created beside the configured PostgreSQL database
        assert not (env.data_dir / "archive" / "meta.db").exists()


def test_flag_beats_environment_beats_config(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "coffer.yaml"
    cfg.write_text("data_dir: d\nlisteners: [{name: in, tls: none}]\narchive:\n  database: postgresql://cfg@127.0.0.1/c\n"
                   "  index: whoosh\n  node: n1\n")
    ns = argparse.Namespace(config=str(cfg), data_dir=None, database=None, index=None)
    monkeypatch.delenv("COFFER_ARCHIVE_DB", raising=False)
    loc = location_from_args(ns)
    assert (loc.database, loc.index, loc.node) == ("postgresql://cfg@127.0.0.1/c", "whoosh", "n1")
    assert loc.data_dir == (tmp_path / "d").resolve() and loc.shared
    monkeypatch.setenv("COFFER_ARCHIVE_DB", "postgresql://env@127.0.0.1/e")
    assert location_from_args(ns).database == "postgresql://env@127.0.0.1/e"
    ns.database, ns.index = "sqlite:////x.db", "fts5"
    loc = location_from_args(ns)
    assert (loc.database, loc.index, loc.shared) == ("sqlite:////x.db", "fts5", False)


def test_data_dir_flag_reads_no_configuration(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "coffer.yaml"
    cfg.write_text("listeners: [{name: in, tls: none}]\narchive:\n  database: postgresql://cfg@127.0.0.1/c\n")
    monkeypatch.setenv("COFFER_CONFIG", str(cfg))
    monkeypatch.delenv("COFFER_ARCHIVE_DB", raising=False)
    ns = argparse.Namespace(config=None, data_dir=str(tmp_path), database=None, index=None)
    assert location_from_args(ns) == ArchiveLocation(tmp_path)
    ns.data_dir = None  # now $COFFER_CONFIG is the configuration
    assert location_from_args(ns).database == "postgresql://cfg@127.0.0.1/c"


@pytest.mark.parametrize("database", [
    "postgresql://coffer:hunter2@db.internal/archive",
    "postgresql+psycopg://coffer:hunter2@db.internal:5432/archive",
])
def test_a_password_in_the_configured_url_is_refused_without_echoing_it(
        tmp_path: Path, database: str) -> None:
    cfg = tmp_path / "coffer.yaml"
    cfg.write_text(f"archive:\n  database: {database}\n")
    with pytest.raises(ConfigError) as exc:
        config_mod.load(cfg)
    assert "archive.database" in str(exc.value) or exc.value.key == "archive.database"
    assert "hunter2" not in str(exc.value)
    assert "pgpass" in str(exc.value)


def test_node_name_must_be_a_plain_label(tmp_path: Path) -> None:
    cfg = tmp_path / "coffer.yaml"
    cfg.write_text("archive:\n  node: ../evil\n")
    with pytest.raises(ConfigError):
        config_mod.load(cfg)
    cfg.write_text("hostname: mx1.example.com\nlisteners: [{name: in, tls: none}]\n")
    assert config_mod.load(cfg).node_name == "mx1.example.com"
