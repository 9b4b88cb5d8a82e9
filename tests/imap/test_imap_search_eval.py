"""SEARCH evaluation (pure) over message metadata and raw bytes."""

from __future__ import annotations

from datetime import UTC, datetime

from archive.imap.backend import MessageInfo
from archive.imap.parser import parse_command
from archive.imap.render import parse_message
from archive.imap.search import SearchTarget, evaluate

MSGS = {
    1: b"From: =?utf-8?q?J=C3=BCrgen?= <j@example.de>\r\nSubject: Budget\r\n"
       b"Date: Mon, 1 Jul 2024 10:00:00 +0000\r\n\r\nplain text",
    2: b"From: b@example.com\r\nSubject: other\r\nContent-Type: text/plain; charset=utf-8\r\n"
       b"Content-Transfer-Encoding: base64\r\n\r\nR3LDvMOfZSBhdXMgS8O2bG4=\r\n",
    3: b"From: c@example.com\r\nX-Case: c-17\r\n\r\nsomething",
}


def run(criteria: str, hits: dict[tuple[str, bool], set[int]] | None = None) -> list[int]:
    key = parse_command(f"t SEARCH {criteria}".encode()).search
    assert key is not None
    targets = [SearchTarget(uid, MessageInfo(uid, datetime(2024, 7, uid, tzinfo=UTC),
                                             len(raw), frozenset({"\\Seen"}) if uid == 2
                                             else frozenset()))
               for uid, raw in MSGS.items()]
    return [t.seq for t in evaluate(key, targets, lambda uid: parse_message(MSGS[uid]), hits)]


def test_header_keys_decode_encoded_words_case_insensitively() -> None:
    assert run('FROM "jürgen"') == [1]
    assert run("SUBJECT BUDGET") == [1]
    assert run("HEADER X-Case C-17") == [3]
    assert run('HEADER X-Case ""') == [3]


def test_body_and_text_decode_transfer_encoding_and_charset() -> None:
    assert run('BODY "grüße aus köln"') == [2]
    assert run("TEXT other") == [2]
    assert run("BODY other") == []


def test_full_text_hook_answers_text_and_body() -> None:
    assert run("BODY anything", {("anything", True): {3}}) == [3]


def test_flags_dates_sizes_and_logic() -> None:
    assert run("SEEN") == [2] and run("UNSEEN") == [1, 3]
    assert run("DELETED") == [] and run("UNANSWERED") == [1, 2, 3]
    assert run("SINCE 2-Jul-2024") == [2, 3] and run("ON 1-Jul-2024") == [1]
    assert run("SENTBEFORE 1-Jan-2000") == [2, 3]  # no Date: counts as the epoch
    assert run("LARGER 60") == [1, 2] and run("SMALLER 60") == [3]
    assert run("OR 1 UID 3") == [1, 3] and run("NOT 2:*") == [1]
    assert run("2:* UNSEEN") == [3]
