"""archive.rows: the SQLite fast path stores exactly what SQLAlchemy Core stores.

Differential: the same batches of receipts go through ``Metadata.add_messages`` once
with the DBAPI-cursor writer (SqliteRows, the default on SQLite) and once with Core
(CoreRows), each into its own database; every table is then compared as stored
(raw sqlite3 rows: the JSON text and timestamp strings themselves).
"""

from __future__ import annotations

import functools
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import pytest
import sqlalchemy as sa
from archive_db import make_record

import archive.metadata as metadata_module
from archive.metadata import Base, MessageRecord, Metadata
from archive.rows import CoreRows, SqliteRows, _Prepared, rows_for
from gateway.archive_health import backend_unavailable

T0 = datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)


@functools.cache  # the same bytes in both runs (a MIME boundary is random)
def _raw(i: int, *, attachment: bool = False, date: bool = True) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Sender {i} <s{i}@example.com>"
    msg["To"] = f"r{i}@example.org, Zoë <zoe@example.org>"
    msg["Cc"] = "cc@example.net"
    msg["Subject"] = f"Subject {i} - ünïcode"
    if date:
        msg["Date"] = "Mon, 15 Jan 2024 10:30:00 +0100"
    msg["Message-ID"] = f"<m{i}@example.com>"
    msg.set_content(f"body {i}\n")
    if attachment:
        msg.add_attachment(b"PK\x03\x04 zip-ish", maintype="application", subtype="zip",
                           filename=f"file {i}.zip")
    return msg.as_bytes(policy=SMTP)


def _batches() -> list[list[MessageRecord]]:
    """Receipts that exercise every column and table: attachments, Bcc, verdict
    lists and None details, decisions with traces, rule hits (repeated), linked copies,
    retention, no Date header, the same bytes twice, a re-run of a receipt."""
    eastern = datetime(2026, 3, 1, 4, 30, tzinfo=UTC).astimezone(timezone(timedelta(hours=-5)))
    sent = b"DKIM-Signature: v=1; b=x\r\n" + _raw(2)
    received = _raw(2)
    first = [
        make_record(_raw(1, attachment=True), received_at=T0, mail_from="S1@Example.COM",
                    rcpt_to=["r1@example.org", "hidden@example.org", "R1@example.org"],
                    client_ip="192.0.2.7", helo="mx.example.com", tls="TLSv1.3 AES",
                    auth_user="", retention_until=T0 + timedelta(days=365),
                    verdicts={"spf": {"result": "pass", "domain": "example.com"},
                              "dkim": [{"result": "fail"}, {"result": "pass"}],
                              "dmarc": "None", "arc": None,
                              "spam": {"score": 1.5, "symbols": {"X": 1}}},
                    decision={"action": "accept", "trace": [{"rule": "r", "hit": True}],
                              "rules": [{"name": "keep", "matched": True}]},
                    rules=["keep", "keep", "x" * 300], once=True),
        make_record(received, received_at=T0 + timedelta(seconds=1), copy="received",
                    link_sha256=make_record(sent).sha256, direction="outbound"),
        make_record(sent, received_at=T0 + timedelta(seconds=1), copy="sent",
                    link_sha256=make_record(received).sha256, direction="outbound",
                    state="quarantined"),
    ]
    second = [
        make_record(_raw(3, date=False), received_at=eastern, source="import:/tmp/x.mbox",
                    decision=None, verdicts={}),
        make_record(_raw(1, attachment=True), received_at=T0 + timedelta(minutes=1),
                    rcpt_to=["other@example.org"]),  # same bytes: one blob, two receipts
        first[0],  # a re-run of the first receipt: the first row comes back
    ]
    return [first, second]


def _dump(path: Path) -> dict[str, list[tuple[object, ...]]]:
    db = sqlite3.connect(path)
    try:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                for t in Base.metadata.tables}
    finally:
        db.close()


def _record_all(tmp: Path) -> tuple[Path, list[list[tuple[int, int, bool]]]]:
    meta = Metadata.for_data_dir(tmp)
    meta.migrate()
    out = [[(s.id, s.blob_id, s.new_blob) for s in meta.add_messages(batch)]
           for batch in _batches()]
    meta.close()
    return tmp / "archive" / "meta.db", out


def test_sqlite_fast_path_stores_what_core_stores(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fast_db, fast_out = _record_all(tmp_path / "fast")
    monkeypatch.setattr(metadata_module, "rows_for", CoreRows)
    core_db, core_out = _record_all(tmp_path / "core")
    assert fast_out == core_out
    fast, core = _dump(fast_db), _dump(core_db)
    assert fast == core
    # The comparison is not vacuous: every table got rows, JSON and timestamps included.
    assert all(fast[t] for t in ("blobs", "messages", "participants", "attachments",
                                 "verdicts", "decisions", "rule_hits"))
    assert fast_out[1][2][:2] == fast_out[0][0][:2]  # the re-run returned the first row


def test_the_writer_is_chosen_by_dialect(tmp_path: Path) -> None:
    meta = Metadata.for_data_dir(tmp_path)
    with meta.engine.connect() as conn:
        assert isinstance(rows_for(conn), SqliteRows)
    meta.close()


def test_ids_are_each_rows_own_even_when_sqlite_picks_them_at_random(tmp_path: Path) -> None:
    """Past the largest rowid SQLite chooses new rowids at random: an id is never derived
    from another row's, so each message still gets its own."""
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    top = 2**63 - 1
    with meta.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO blobs (id, sha256, size, stored_at, scan_flags) "
                             "VALUES (:i, 'x', 0, '2026-01-01 00:00:00.000000', '[]')"),
                     {"i": top})
    stored = meta.add_messages([make_record(_raw(i), received_at=T0) for i in range(5)])
    for s in stored:
        row = meta.get(s.id)
        assert row is not None and row.blob_id == s.blob_id
        assert row.sha256 == make_record(_raw(stored.index(s))).sha256
    assert len({s.blob_id for s in stored}) == 5 and top not in {s.blob_id for s in stored}
    meta.close()


def test_a_locked_database_is_an_outage_to_retry_and_nothing_is_half_written(
        tmp_path: Path) -> None:
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    other = sqlite3.connect(tmp_path / "archive" / "meta.db", timeout=0)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the database
    try:
        with pytest.raises(sa.exc.OperationalError) as info, meta.engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=50")
            SqliteRows(conn).insert_ids(metadata_module._BLOBS, [
                {"sha256": "a" * 64, "size": 1, "stored_at": T0, "scan_flags": []}])
        assert "locked" in str(info.value)
        assert backend_unavailable(info.value)  # the stage defers; the message is not held
    finally:
        other.rollback()
        other.close()
    assert meta.approx_blobs() == 0
    meta.close()


def test_a_failed_batch_leaves_no_rows(tmp_path: Path) -> None:
    """The fast path writes inside the batch's transaction: an error rolls all of it back."""
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    good = make_record(_raw(1), received_at=T0)
    with pytest.raises(sa.exc.IntegrityError), meta.engine.begin() as conn:
        rows = SqliteRows(conn)
        rows.insert_ids(metadata_module._BLOBS, [
            {"sha256": good.sha256, "size": 1, "stored_at": T0, "scan_flags": []}])
        rows.insert(metadata_module._TABLES["participants"], [
            {"message_pk": 999, "role": "to", "address": "a@b", "name": ""}])  # no such row
    assert meta.approx_blobs() == 0
    meta.close()


def test_columns_with_client_defaults_left_out_go_through_core(tmp_path: Path) -> None:
    """Core applies a column's Python default when the rows omit it; the fast path
    cannot, so such a statement is Core's."""
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    with meta.engine.begin() as conn:
        ids = SqliteRows(conn).insert_ids(metadata_module._BLOBS, [
            {"sha256": "b" * 64, "size": 3, "stored_at": T0}])  # scan_flags: default=list
    with meta.engine.connect() as conn:
        flags = conn.exec_driver_sql("SELECT scan_flags FROM blobs WHERE id = ?",
                                     (ids[0],)).scalar()
    assert flags == "[]"
    meta.close()


def test_prepared_values_are_each_columns_bind_processor_applied_in_sql_order() -> None:
    dialect = sa.create_engine("sqlite://").dialect
    table = metadata_module._MESSAGES
    rows = [metadata_module._message_row(7, rec) for batch in _batches() for rec in batch]
    prepared = _Prepared(table, tuple(rows[0]), dialect)
    expected = []
    for row in rows:
        values = []
        for key in prepared.keys:
            proc = table.c[key].type.dialect_impl(dialect).bind_processor(dialect)
            values.append(row[key] if proc is None else proc(row[key]))
        expected.append(tuple(values))
    assert prepared.params(rows) == expected
    assert any(isinstance(v, str) and v.startswith("20") for v in expected[0])  # timestamps


def test_a_one_column_table_gets_one_value_tuples(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'one.db'}")
    table = sa.Table("one", sa.MetaData(), sa.Column("name", sa.String))
    table.create(engine)
    with engine.begin() as conn:
        SqliteRows(conn).insert(table, [{"name": "a"}, {"name": "b"}])
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM one ORDER BY name").scalars().all() \
            == ["a", "b"]
    engine.dispose()


@pytest.mark.parametrize("none_as_null", [False, True])
def test_json_values_bind_as_sqlalchemys_json_processor_binds_them(none_as_null: bool) -> None:
    """The fast path's JSON processor (archive.rows._json_text) against the type's own:
    the same text, the same SQL NULL / JSON null, the same errors."""
    from archive.rows import _bind_processor

    dialect = sa.create_engine("sqlite://").dialect
    impl = sa.JSON(none_as_null=none_as_null).dialect_impl(dialect)
    theirs = impl.bind_processor(dialect)
    ours = _bind_processor(impl, dialect)
    assert theirs is not None and ours is not None
    assert ours.__qualname__ != theirs.__qualname__  # the fast one is in use
    loop: list[object] = []
    loop.append(loop)
    values: list[object] = [
        None, sa.JSON.NULL, sa.null(), [], {}, "text", 'q"\\\n\x01 Zoë \udcff 日本', 0, -(10**30),
        1.5, float("nan"), float("-inf"), True, False, ["a", "b"],
        {"result": "pass", "domain": "example.com", "n": [1, 2.5, None, {"z": {}}]},
        {2: "int key", 1.5: "float key", None: "none key", True: "bool key"}, ("t", 1)]
    for value in values:
        assert ours(value) == theirs(value), value
        assert ours(value) == theirs(value), value  # a dict's second time: from the memo
    for typed in ({"x": True}, {"x": 1}, {"x": 1.0}, {"x": -0.0}, {"x": 0.0}, {"x": "1"},
                  {"2": "a"}, {2: "a"}):  # equal as JSON or not: never confused
        assert ours(typed) == theirs(typed), typed
    for bad in (loop, {"x": object()}, {("tuple", "key"): 1}):
        with pytest.raises((ValueError, TypeError)) as mine:
            ours(bad)
        with pytest.raises((ValueError, TypeError)) as other:
            theirs(bad)
        assert type(mine.value) is type(other.value) and str(mine.value) == str(other.value)


def test_a_json_serialiser_set_on_the_engine_is_used_as_it_is() -> None:
    from archive.rows import _bind_processor

    dialect = sa.create_engine("sqlite://", json_serializer=lambda v: "custom").dialect
    impl = sa.JSON().dialect_impl(dialect)
    proc = _bind_processor(impl, dialect)
    assert proc is not None and proc({"a": 1}) == "custom"


def test_ids_by_finds_what_cores_select_finds(tmp_path: Path) -> None:
    """SqliteRows.ids_by (its IN list compiled per count, run on the cursor) against
    CoreRows.ids_by (Core's expanding IN), over present, absent and repeated values."""
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    shas = [f"{i:064x}" for i in range(40)]
    with meta.engine.begin() as conn:
        ids = SqliteRows(conn).insert_ids(metadata_module._BLOBS, [
            {"sha256": s, "size": 1, "stored_at": T0, "scan_flags": [], "indexed_at": None,
             "shredded_at": None} for s in shas[:30]])
    stored = dict(zip(shas[:30], ids, strict=True))
    with meta.engine.connect() as conn:
        fast, core = SqliteRows(conn), CoreRows(conn)
        for wanted in ([], shas[:1], shas[25:35], shas[::3], shas[30:], shas + shas[:5]):
            got = fast.ids_by(metadata_module._BLOBS, "sha256", wanted)
            assert got == core.ids_by(metadata_module._BLOBS, "sha256", wanted)
            assert got == {s: stored[s] for s in wanted if s in stored}
    meta.close()
