"""Spam scores, the policy view, the encrypt stage's MIME reading and the archive's
extraction are the same whether each parses the message itself (the stdlib parser,
as before gateway.mailparse) or shares one cached tree in the pipeline's order:
spam, then decide (with the spam stage's field prepended), then encrypt and archive
on the spooled bytes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from mailparsekit import PREFIXES, corpus_messages, stdlib

from archive.extract import extract
from gateway import mailparse
from gateway.check.spam.message import parse as spam_parse
from gateway.transform import mime
from policies.message import MessageView


def results(data: bytes) -> tuple[Any, ...]:
    stamped = PREFIXES[0] + data
    mime._content_type.cache_clear()
    return (spam_parse(data), MessageView.from_bytes(stamped), mime.content_type(stamped),
            mime.encryption_of(stamped), extract(stamped))


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    mailparse.clear()
    yield
    mailparse.clear()


def test_shared_parse_changes_no_result_on_the_corpus() -> None:
    messages = corpus_messages()
    expected = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mailparse, "parse", stdlib)
        mp.setattr(mailparse, "parse_as", stdlib)
        mp.setattr(mailparse, "cached", lambda data: None)
        for data in messages:
            expected.append(results(data))
    assert mailparse.stats()["misses"] == 0
    for data, want in zip(messages, expected, strict=True):
        assert results(data) == want
    stats = mailparse.stats()
    assert stats["derived"] > len(messages) // 2  # decide used spam's tree
    assert stats["hits"] > len(messages) // 2  # archive used decide's tree


def test_mime_reads_the_header_of_a_message_too_deep_to_parse() -> None:
    deep = b"Content-Type: message/rfc822; x=1\r\n\r\n" * 5000 + b"x"
    with pytest.raises(RecursionError):
        mailparse.parse(deep)
    mime._content_type.cache_clear()
    assert mime.content_type(deep) == ("message/rfc822", {"x": "1"})
    assert mime.encryption_of(deep) is None
