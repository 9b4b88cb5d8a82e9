"""Recording the same SMTP receipt again (the archive stage re-run after a crash) keeps one
row; other records (imports, tests) are never merged."""

from __future__ import annotations

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
