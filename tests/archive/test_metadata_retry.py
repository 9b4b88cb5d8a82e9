"""Recording the same SMTP receipt again (the archive stage re-run after a crash) keeps one
row; other records (imports, tests) are never merged."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import M1, M2, make_record

from archive.metadata import Metadata

T = datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC)


def test_a_receipt_recorded_again_returns_the_first_row(meta: Metadata) -> None:
    [first] = meta.add_messages([make_record(M1, received_at=T, once=True)])
    again = meta.add_messages([make_record(M2, received_at=T, once=True),
                               make_record(M1, received_at=T, once=True)])
    assert again[1] == first.__class__(first.id, first.blob_id, False)
    assert again[0].id != first.id and again[0].new_blob
    assert meta.find_message_id(meta.get(first.id).message_id) == [first.id]  # type: ignore[union-attr]


def test_the_same_bytes_received_again_later_are_a_second_message(meta: Metadata) -> None:
    [a] = meta.add_messages([make_record(M1, received_at=T, once=True)])
    [b] = meta.add_messages([make_record(M1, received_at=T.replace(microsecond=123457),
                                         once=True)])
    [c] = meta.add_messages([make_record(M1, received_at=T, source="import", once=True)])
    [d] = meta.add_messages([make_record(M1, received_at=T)])  # not marked: a new receipt
    assert len({a.id, b.id, c.id, d.id}) == 4 and a.blob_id == b.blob_id == c.blob_id
    assert not b.new_blob and not c.new_blob


def _hold_exclusive(meta: Metadata) -> Callable[[], None]:
    """Take the receipts lock as a catch-up does (exclusive); returns its release."""
    if meta.dialect == "postgresql":
        from archive.metadata import _PG_RECEIPTS_LOCK

        conn = meta.engine.connect()
        tx = conn.begin()
        conn.execute(_PG_RECEIPTS_LOCK[True], {"k": "coffer-receipts"})

        def release() -> None:
            tx.commit()
            conn.close()
        return release
    held = meta._receipts_lock(True)
    held.__enter__()
    return lambda: held.__exit__(None, None, None)


def test_a_writer_waits_for_the_catch_up_before_it_checks_for_its_receipt(
        meta: Metadata) -> None:
    release = _hold_exclusive(meta)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (
        meta.add_messages([make_record(M1, received_at=T, once=True)]), done.set()))
    worker.start()
    try:
        assert not done.wait(0.5)  # the archive writer (``once``) waits
        # An import (not ``once``) takes no lock and is not held up.
        meta.add_messages([make_record(M2, received_at=T, source="import")])
    finally:
        release()
    worker.join(10)
    assert done.is_set() and meta.count() == 2
