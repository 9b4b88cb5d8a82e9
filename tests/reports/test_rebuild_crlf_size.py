"""The IMAP size (messages.crlf_size) is recorded by the archive stage and restored by
``coffer archive rebuild``: both measure the bytes they hold (archive.extract)."""

from __future__ import annotations

from metadata_db import *  # noqa: F403 - fixtures: db (sqlite, postgresql), backend, pg_admin
from metadata_db import Db
from sqlalchemy import select

from archive.facade import Archive
from archive.imap.render import to_crlf
from archive.metadata import Message
from gateway.archive_stage import ArchiveStage
from gateway.cli import main
from gateway.envelope import Envelope
from gateway.pipeline import MessageContext

CRLF = (b"From: carol@partner.test\r\nTo: dana@corp.test\r\nSubject: tender\r\n"
        b"Message-ID: <c1@partner.test>\r\n\r\nThe walrus bid is final.\r\n")
LF = (b"From: carol@partner.test\nTo: dana@corp.test\nSubject: lf\n"
      b"Message-ID: <c2@partner.test>\n\nbare lf\nand a bare\rcr, no final newline")


def sizes(db: Db) -> dict[int, int | None]:
    with db.open() as meta, meta.session() as s:
        return {pk: size for pk, size in s.execute(select(Message.id, Message.crlf_size))}


async def test_archive_stage_records_the_imap_size_and_rebuild_restores_it(db: Db) -> None:
    meta = db.open()
    meta.migrate()
    archive = Archive.open(db.data)
    stage = ArchiveStage(archive, meta)
    try:
        ids = [(await stage.run(MessageContext(
            Envelope("carol@partner.test", ["dana@corp.test"],
                     received_at=1_800_000_000.0 + i), raw,
            {"decide": {"decision": "accept", "direction": "inbound"}}, qid=f"Q{i}"))
                ).facts["message"] for i, raw in enumerate((CRLF, LF))]
        served = {pk: len(to_crlf(archive.get(m.sha256)))
                  for pk in ids if (m := meta.get(pk)) is not None}
    finally:
        await stage.close()
        archive.close()
        meta.close()
    recorded = sizes(db)
    assert recorded == served and len(served) == 2
    assert served[ids[0]] == len(CRLF) and served[ids[1]] == len(LF) + LF.count(b"\n")  # all bare
    db.lose()
    assert main(["archive", "rebuild", *db.cli()]) == 0
    assert sizes(db) == recorded
