"""Recovery and rebuild against a real `coffer serve` and the archive it wrote.

A message relayed by the running gateway (to a visible recipient and a Bcc) is
recovered with --original-recipients: the same running gateway delivers it again
to both, marked X-Coffer-Recovered, without archiving it a second time.  Then the
database is lost and rebuilt from that real archive: the Received field the
gateway wrote gives back the client and the TLS facts; the Bcc is gone, as
documented.
"""

from __future__ import annotations

import json
import shutil
import smtplib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "service"))
from svcproc import Gateway, Sink, free_port, wait_for, write_config

from archive.index import open_index
from archive.metadata import Metadata
from archive.search import Searcher
from gateway.cli import main


@pytest.fixture
def procs() -> Iterator[list[Gateway | Sink]]:
    started: list[Gateway | Sink] = []
    yield started
    for p in reversed(started):
        if isinstance(p, Gateway) and p.proc is not None:
            p.kill9()
        elif isinstance(p, Sink):
            p.stop()


def search(data: Path, query: str) -> list[int]:
    """Archive ids matching ``query``, read in this process (the gateway may be running)."""
    with Metadata.for_data_dir(data) as meta:
        index = open_index("fts5", data_dir=data)
        try:
            return [h.message.id for h in
                    Searcher(meta, index).search(query, snippets=False).hits]
        finally:
            index.close()


def test_running_gateway_delivers_a_recovery_and_rebuild_reads_its_archive(
        tmp_path: Path, procs: list[Gateway | Sink],
        capsys: pytest.CaptureFixture[str]) -> None:
    sink = Sink(free_port(), tmp_path / "sink.jsonl")
    procs.append(sink.start())
    port = free_port()
    cfg = write_config(tmp_path / "coffer.yaml", port=port, local_domains=["gw.test"],
                       routes={"*": f"smtp://127.0.0.1:{sink.port}?tls=off"},
                       trusted=["127.0.0.1/32"])
    gw = Gateway(cfg, port, tmp_path / "coffer.log")
    procs.append(gw.start())

    token = uuid.uuid4().hex
    body = (f"From: alice@src.test\r\nTo: bob@remote.test\r\nSubject: lost {token}\r\n"
            f"Message-ID: <{token}@src.test>\r\nX-Token: {token}\r\n\r\n"
            "The file you deleted.\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("alice@src.test", ["bob@remote.test", "carol@remote.test"], body)
    wait_for(lambda: len([r for r in sink.records() if r["token"] == token]) == 2,
             what="the first delivery")
    data = tmp_path
    wait_for(lambda: len(search(data, f"subject:{token}")) == 1, what="indexing")

    capsys.readouterr()
    assert main(["recover", "--config", str(cfg), "--original-recipients", "--json",
                 "--officer", "olivia", f"subject:{token}"]) == 0
    (item,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert item["rcpt_to"] == ["bob@remote.test", "carol@remote.test"] and item["qid"]
    wait_for(lambda: len([r for r in sink.records() if r["token"] == token]) == 4,
             what="the recovered copies to be delivered by the running gateway")
    again = [r for r in sink.records() if r["token"] == token][2:]
    assert sorted(r["rcpt"] for r in again) == ["bob@remote.test", "carol@remote.test"]
    assert [r["mail_from"] for r in again] == ["<>", "<>"], again  # null reverse-path
    assert len(search(data, f"subject:{token}")) == 1  # not archived a second time

    gw.signal(15)
    assert gw.wait_exit() == 0
    before = {q: search(data, q) for q in (f"subject:{token}", "to:bob@remote.test",
                                          "from:alice@src.test", "bcc:carol@remote.test")}
    for p in (data / "archive").glob("meta.db*"):
        p.unlink()
    shutil.rmtree(data / "archive" / "index")
    assert main(["archive", "rebuild", "--config", str(cfg)]) == 0
    assert "1 audit events from the ledger" in capsys.readouterr().err
    after = {q: search(data, q) for q in before}
    assert after[f"subject:{token}"] == before[f"subject:{token}"]
    assert after["to:bob@remote.test"] == after["from:alice@src.test"] == before[
        f"subject:{token}"]
    # The receipt blob (archive.receipts) brings the envelope back, Bcc included.
    assert before["bcc:carol@remote.test"] and after["bcc:carol@remote.test"] == before[
        "bcc:carol@remote.test"]
    with Metadata.for_data_dir(data) as meta:
        msg = meta.get(after[f"subject:{token}"][0])
        assert msg is not None and msg.client_ip == "127.0.0.1" and msg.source == "smtp"
        # The recovery's audit event, in clear again from its ledger document.
        recovered = [e for e in meta.audit_events() if e.action == "recover"]
        assert [(e.who, e.query) for e in recovered] == [("olivia", f"subject:{token}")]
    assert main(["archive", "verify", "--config", str(cfg)]) == 0
