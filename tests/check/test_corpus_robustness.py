"""Every message of the MIME corpus (and SpamAssassin's regression mails) through
the check stage: verdicts, never a crash.

Malformed, truncated and exotic messages (the corpus has them on purpose) must
give well-formed verdicts and a parsable Authentication-Results header; an
exception would put the message on hold instead.
"""

from __future__ import annotations

from pathlib import Path

import authres
import pytest
from authcorpus import corpus_dir

from gateway.check.dns import Resolver
from gateway.check.stage import CheckStage
from gateway.check.verdicts import RESULTS
from gateway.envelope import Envelope
from gateway.pipeline import MessageContext


def _files() -> list[Path]:
    base = corpus_dir()
    if base is None:
        return []
    dirs = [base / "mime", base / "spam-ham" / "spamassassin-regression"]
    return sorted(p for d in dirs for p in d.rglob("*") if p.is_file())


async def test_every_corpus_message_gets_verdicts(resolver: Resolver) -> None:
    files = _files()
    if not files:
        pytest.skip("MIME corpus not found: set COFFER_CORPUS or check out ../shared/corpus")
    stage = CheckStage(resolver, authserv_id="mx.coffer.test")
    seen: set[str] = set()
    for path in files:
        ctx = MessageContext(Envelope("sender@example.com", ["rcpt@example.org"],
                                      client_ip="192.0.2.1", helo="mx.example.com"),
                             path.read_bytes())
        result = await stage.run(ctx)
        facts = result.facts
        results = [facts["spf"]["result"], facts["dmarc"]["result"], facts["arc"]["result"],
                   *(d["result"] for d in facts["dkim"])]
        assert set(results) <= RESULTS, path
        seen.update(results)
        parsed = authres.AuthenticationResultsHeader.parse(
            "Authentication-Results: " + result.headers[0][1].replace("\r\n", ""))
        assert parsed.authserv_id == "mx.coffer.test", path
    assert len(files) > 300
    assert {"none", "fail", "permerror"} <= seen
