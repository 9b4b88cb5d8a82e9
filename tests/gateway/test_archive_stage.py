"""The archive stage keeps every copy of a message the gateway changed, linked (issue 3 item 1).

A real encrypted store, ledger, SQLite metadata and FTS5 index under tmp_path.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from archive.facade import Archive
from archive.holds import create_hold, get_hold
from archive.index import Indexer, open_index
from archive.metadata import Metadata, resolve_links
from archive.search import Searcher
from gateway.archive_stage import ArchiveStage, archive_state, copies_of
from gateway.envelope import Envelope
from gateway.pipeline import MessageContext

PLAIN = (b"From: carol@partner.test\r\nTo: dana@corp.test\r\nSubject: tender\r\n"
         b"Message-ID: <tender-1@partner.test>\r\nMIME-Version: 1.0\r\n"
         b"Content-Type: text/plain\r\n\r\nThe walrus bid is final.\r\n")
# A PGP/MIME message (RFC 3156 §4) as it arrives: the inner entity is ciphertext here.
CIPHER = (b"From: carol@partner.test\r\nTo: dana@corp.test\r\nSubject: tender\r\n"
          b"Message-ID: <tender-2@partner.test>\r\nMIME-Version: 1.0\r\n"
          b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
          b' boundary="b1"\r\n\r\n--b1\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
          b"Version: 1\r\n--b1\r\nContent-Type: application/octet-stream\r\n\r\n"
          b"-----BEGIN PGP MESSAGE-----\r\nhQEMA0xyz\r\n-----END PGP MESSAGE-----\r\n--b1--\r\n")
ENTITY = b"Content-Type: text/plain; charset=utf-8\r\n\r\nThe narwhal bid is final.\r\n"


@dataclass
class Rig:
    data: Path
    archive: Archive
    meta: Metadata
    stage: ArchiveStage

    def searcher(self) -> Searcher:
        index = open_index("fts5", data_dir=self.data)
        Indexer(self.meta, index, self.archive.get).run()
        return Searcher(self.meta, index, self.archive.get)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    meta = Metadata.for_data_dir(tmp_path)
    meta.migrate()
    archive = Archive.open(tmp_path)
    stage = ArchiveStage(archive, meta)
    yield Rig(tmp_path, archive, meta, stage)
    await stage.close()
    archive.close()


def _ctx(data: bytes, *, received: bytes | None = None, **facts: object) -> MessageContext:
    env = Envelope("carol@partner.test", ["dana@corp.test"], received_at=1_800_000_000.0)
    return MessageContext(env, data, {"decide": {"decision": "accept", "direction": "inbound"},
                                      **facts}, qid="Q1", received=received)


async def test_inbound_decrypted_message_archives_ciphertext_and_decrypted_copies_linked(
        rig: Rig) -> None:
    ctx = _ctx(CIPHER, received=CIPHER, transform={
        "decrypted": base64.b64encode(ENTITY).decode()})
    facts = (await rig.stage.run(ctx)).facts
    dec, enc = facts["copies"]["decrypted"], facts["copies"]["encrypted"]
    # The bytes delivered are the ciphertext: the stage's own facts name that copy.
    assert facts["message"] == enc["message"]
    assert rig.archive.get(enc["sha256"]) == CIPHER
    readable = rig.archive.get(dec["sha256"])
    assert readable.endswith(ENTITY) and b"Subject: tender\r\n" in readable
    assert b"PGP MESSAGE" not in readable  # the ciphertext part is never merged in (EFAIL)
    d, e = rig.meta.get(dec["message"]), rig.meta.get(enc["message"])
    assert d is not None and e is not None
    assert (d.copy, d.linked_id, e.copy, e.linked_id) == ("decrypted", e.id, "encrypted", d.id)

    searcher = rig.searcher()
    # The body is found through the decrypted copy, and the message is listed once.
    result = searcher.search("narwhal", snippets=False)
    assert [h.message.id for h in result.hits] == [d.id]
    assert [h.message.id for h in searcher.search("subject:tender").hits] == [d.id]
    both = searcher.search("subject:tender", all_copies=True)
    assert sorted(h.message.copy for h in both.hits) == ["decrypted", "encrypted"]
    # A hold found by the body covers the ciphertext too: both are evidence.
    create_hold(rig.meta, rig.archive, searcher, "C-7", "narwhal", "officer")
    info = get_hold(rig.meta, "C-7", with_ids=True)
    assert info is not None and sorted(info.message_ids) == sorted([d.id, e.id])


async def test_transformed_message_archives_received_and_sent_copies_linked(rig: Rig) -> None:
    sent = b"DKIM-Signature: v=1; d=partner.test; b=abc\r\n" + PLAIN
    facts = (await rig.stage.run(_ctx(sent, received=PLAIN))).facts
    rec, out = facts["copies"]["received"], facts["copies"]["sent"]
    assert facts["message"] == out["message"] and facts["sha256"] == out["sha256"]
    assert rig.archive.get(rec["sha256"]) == PLAIN and rig.archive.get(out["sha256"]) == sent
    r, s = rig.meta.get(rec["message"]), rig.meta.get(out["message"])
    assert r is not None and s is not None
    assert (r.linked_id, s.linked_id) == (s.id, r.id)
    hits = rig.searcher().search("walrus", snippets=False).hits
    assert [(h.message.id, h.message.copy, h.message.linked_id) for h in hits] == [
        (r.id, "received", s.id)]


async def test_unchanged_message_is_archived_once_as_the_only_copy(rig: Rig) -> None:
    facts = (await rig.stage.run(_ctx(PLAIN, received=PLAIN))).facts
    assert "copies" not in facts
    row = rig.meta.get(facts["message"])
    assert row is not None and (row.copy, row.linked_id, row.state) == ("", None, "accepted")
    assert rig.meta.count() == 1


async def test_quarantined_message_is_archived_marked_quarantined(rig: Rig) -> None:
    ctx = _ctx(PLAIN, runner={"action": "quarantine"},
               trace=[{"stage": "decide", "action": "quarantine", "reason": "rule q"}])
    ctx.facts["decide"]["decision"] = "quarantine"
    row = rig.meta.get((await rig.stage.run(ctx)).facts["message"])
    assert row is not None and row.state == "quarantined"


def test_a_quarantine_after_the_queue_marks_the_archived_copy_quarantined() -> None:
    ctx = _ctx(PLAIN)
    ctx.trace.append({"stage": "transform", "action": "quarantine", "reason": "no key"})
    assert archive_state(ctx) == "quarantined"
    assert archive_state(_ctx(PLAIN)) == "accepted"


def test_undecodable_decrypted_entity_keeps_only_the_ciphertext() -> None:
    ctx = _ctx(CIPHER, received=CIPHER, transform={"decrypted": "not base64!"})
    assert [c.kind for c in copies_of(ctx)] == [""]


def test_links_resolve_to_the_nearest_copy_when_the_same_bytes_recur() -> None:
    # The same plaintext sent twice, each time signed differently: rows 0-1 and 2-3.
    rows = [("p", "s1"), ("s1", "p"), ("p", "s2"), ("s2", "p")]
    assert resolve_links(rows) == {0: 1, 1: 0, 2: 3, 3: 2}
    assert resolve_links([("a", None), ("b", "missing")]) == {}


async def test_a_rerun_after_the_metadata_write_failed_is_one_row_for_audit_db_and_rebuild(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    # The store and the ledger took the message, then the database write failed (a full
    # disk): the queue defers it and runs the stage again.  The second run appends the
    # same receipt to the ledger again; the database keeps one row, and audit-db must not
    # call that a deleted row.
    import errno

    from archive.audit import check_database

    real = rig.meta.add_messages
    calls = {"n": 0}

    def full_once(recs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(recs)

    monkeypatch.setattr(rig.meta, "add_messages", full_once)
    first = await rig.stage.run(_ctx(PLAIN))
    assert first.action.value == "tempfail"
    rig.stage.health.mark_up()
    second = await rig.stage.run(_ctx(PLAIN))
    assert second.action.value == "continue"
    stored = [e for e in rig.archive.ledger.entries()
              if e.kind == "message_stored" and e.fields.get("qid") == "Q1"]
    assert len(stored) == 2  # the same receipt twice
    assert check_database(rig.meta, rig.archive.paths.ledger) == []
    # A rebuild from the ledger restores the one row too, not two.
    from reports.rebuild import rebuild

    rebuilt_url = f"sqlite:///{rig.data / 'rebuilt.db'}"
    result = rebuild(rig.data, database=rebuilt_url, progress=False)
    assert result.messages == 1
    rebuilt = Metadata(rebuilt_url)
    try:
        assert rebuilt.count() == 1
    finally:
        rebuilt.close()


def test_the_gateway_logs_a_damaged_segment_the_archive_kept_when_it_opens(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A segment header lost to a power loss, its messages committed: the archive opens
    (mail goes on) and the operator hears of it at once (archive.store)."""
    import json

    from gateway import config, log

    cfg_file = tmp_path / "coffer.yaml"
    cfg_file.write_text("listeners:\n  - name: in\n    tls: none\nmetrics:\n  address: null\n")
    cfg = config.load(cfg_file)
    with Archive.open(cfg.data_dir) as a:
        a.put(b"Subject: committed\r\n\r\nx\r\n")
    (pack,) = (cfg.data_dir / "archive" / "store" / "packs").glob("*.pack")
    pack.chmod(0o640)
    data = pack.read_bytes()
    pack.write_bytes(bytes(7) + data[7:])
    log.setup("INFO", "json")  # to stderr, captured
    capsys.readouterr()
    stage = ArchiveStage.open(cfg)
    stage.archive.close()
    stage.meta.close()
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()
              if line.startswith("{")]
    (damaged,) = [e for e in events if e["event"] == "archive_segment_damaged"]
    assert damaged["segment"] == pack.name.removesuffix(".pack")
    assert "bad magic" in damaged["error"]
