"""The copies of one message are linked rows, on SQLite and on PostgreSQL (issue 3 item 1)."""

from __future__ import annotations

from archive_db import *  # noqa: F403 - fixtures: backend, meta, pg_admin
from archive_db import make_record

from archive.metadata import Metadata

PLAIN = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: q3\r\n\r\nnumbers\r\n"
SIGNED = b"DKIM-Signature: v=1; b=x\r\n" + PLAIN
SIGNED_AGAIN = b"DKIM-Signature: v=1; b=y\r\n" + PLAIN


def test_copies_in_one_batch_are_linked_both_ways_and_holds_take_both(meta: Metadata) -> None:
    p, s1, s2 = (make_record(x) for x in (PLAIN, SIGNED, SIGNED_AGAIN))
    # The same plaintext sent twice: two received rows share one blob, each links to
    # its own copy as sent.
    recs = [make_record(PLAIN, copy="received", link_sha256=s1.sha256),
            make_record(SIGNED, copy="sent", link_sha256=p.sha256),
            make_record(PLAIN, copy="received", link_sha256=s2.sha256),
            make_record(SIGNED_AGAIN, copy="sent", link_sha256=p.sha256)]
    a, b, c, d = (row.id for row in meta.add_messages(recs))
    links = {}
    for pk in (a, b, c, d):
        row = meta.get(pk)
        assert row is not None
        links[pk] = (row.copy, row.linked_id)
    assert links == {a: ("received", b), b: ("sent", a), c: ("received", d), d: ("sent", c)}
    assert meta.with_linked([c]) == [c, d]
    assert meta.with_linked([b, a]) == [b, a]


def test_links_set_after_the_rows_exist(meta: Metadata) -> None:
    """What a rebuild does when a message's copies fell into two batches."""
    [r] = meta.add_messages([make_record(PLAIN, copy="received")])
    [s] = meta.add_messages([make_record(SIGNED, copy="sent")])
    meta.link([(r.id, s.id), (s.id, r.id)])
    assert [(m.copy, m.linked_id) for m in (meta.get(r.id), meta.get(s.id)) if m] == [
        ("received", s.id), ("sent", r.id)]
