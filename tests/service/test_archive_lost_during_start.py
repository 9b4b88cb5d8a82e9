"""`coffer serve` whose PostgreSQL goes away after the archive opened, during the rest of
the archive's start-up (the full-text table, the IMAP server): the node keeps running,
serves SMTP with the outage's 451, and finishes the start-up at the first probe that
finds the database again.  A private PostgreSQL, stopped by a relay (tests/service/
pg_cut.py) the moment the node first asks for the full-text table."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from cluster_env import archived, send
from pg_cut import PgCut
from private_pg import *  # noqa: F403 - fixture: private_pg
from private_pg import PrivatePostgres
from svcproc import Gateway, Sink, free_port, port_open, wait_for
from test_archive_down_at_start import (
    assert_waiting_for_the_archive,
    imap_node_config,
    node_config,
)


@pytest.fixture
def fts_cut(private_pg: PrivatePostgres) -> Iterator[PgCut]:
    cut = PgCut(private_pg, b"fts_docs")
    yield cut
    cut.close()


def test_postgresql_lost_while_the_archive_starts_keeps_smtp_and_finishes_at_the_first_probe(
    tmp_path: Path, procs: list[Gateway | Sink], private_pg: PrivatePostgres, fts_cut: PgCut,
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    port, metrics_port, imap_port = free_port(), free_port(), free_port()
    cfg = imap_node_config(tmp_path / "coffer.yaml", port, sink, fts_cut.url,
                           imap_port=imap_port, metrics_port=metrics_port)
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())
    gw.wait_event("started")
    # The database went away after the archive opened (the relay's pg_ctl may still be
    # waiting for the last server process when the node, cut off, goes on).
    wait_for(fts_cut.cut.is_set, what="the database to be stopped")
    assert gw.events("archive_open_failed") == []
    assert_waiting_for_the_archive(gw, port, metrics_port)
    assert not port_open(imap_port)  # the IMAP server waits for the archive

    private_pg.start()
    gw.wait_event("archive_backend_up", timeout=30)
    wait_for(lambda: port_open(imap_port), what="IMAP once the archive is open")
    token = uuid.uuid4().hex
    assert send(port, token) == 250
    wait_for(lambda: len(sink.records()) == 1, timeout=30, what="the mail delivered")
    assert archived(private_pg.url, token) == 1
    assert len(gw.events("archive_backend_down")) == 1
    assert gw.events("held") == []
    assert "Traceback" not in gw.log.read_text()
    gw.signal(15)
    assert gw.wait_exit() == 0


def _lose_newest_row(url: str) -> None:
    """The newest transaction gone, as after a power loss without synchronous commit."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as c:
            pk, blob = c.execute(sqlalchemy.text(
                "SELECT id, blob_id FROM messages ORDER BY id DESC LIMIT 1")).one()
            for table in ("rule_hits", "decisions", "verdicts", "participants", "hold_items"):
                c.execute(sqlalchemy.text(f"DELETE FROM {table} WHERE message_pk = :pk"),
                          {"pk": pk})
            c.execute(sqlalchemy.text("DELETE FROM messages WHERE id = :pk"), {"pk": pk})
            c.execute(sqlalchemy.text("DELETE FROM attachments WHERE blob_id = :b"), {"b": blob})
            c.execute(sqlalchemy.text("DELETE FROM blobs WHERE id = :b"), {"b": blob})
    finally:
        engine.dispose()


def test_postgresql_lost_during_the_catch_up_runs_it_again_once_back(
    tmp_path: Path, procs: list[Gateway | Sink], private_pg: PrivatePostgres,
) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    port, metrics_port = free_port(), free_port()
    cfg = node_config(tmp_path / "coffer.yaml", port, sink,
                      f"  database: {private_pg.url}\n", metrics_port=metrics_port)
    first = Gateway(cfg, port, tmp_path / "first.log")
    procs.append(first.start())
    tokens = [uuid.uuid4().hex for _ in range(2)]
    assert [send(port, t) for t in tokens] == [250, 250]
    wait_for(lambda: all(archived(private_pg.url, t) == 1 for t in tokens),
             what="both messages archived")
    first.signal(15)
    assert first.wait_exit() == 0
    _lose_newest_row(private_pg.url)
    assert sorted(archived(private_pg.url, t) for t in tokens) == [0, 1]

    # The catch-up's first question (reports.rebuild.tail_start) is where it goes away.
    cut = PgCut(private_pg, b"ORDER BY messages.id DESC")
    try:
        cfg.write_text(cfg.read_text().replace(private_pg.url, cut.url))
        gw = Gateway(cfg, port, tmp_path / "coffer.log")
        procs.append(gw.start())
        wait_for(cut.cut.is_set, what="the database to be stopped")
        gw.wait_event("archive_backend_down")
        assert gw.events("archive_caught_up") == []
        assert gw.events("archive_catch_up_failed") == []
        private_pg.start()
        gw.wait_event("archive_backend_up", timeout=30)
        line = gw.wait_event("archive_caught_up", timeout=30)
        assert line["restored"] == 1
        assert [archived(private_pg.url, t) for t in tokens] == [1, 1]
        assert len(gw.events("archive_backend_down")) == 1
        assert "Traceback" not in gw.log.read_text()
        gw.signal(15)
        assert gw.wait_exit() == 0
    finally:
        cut.close()
