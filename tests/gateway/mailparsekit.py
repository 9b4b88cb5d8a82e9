"""Helpers of the shared-parse tests: the corpus, the stdlib parse, tree shapes."""

from __future__ import annotations

import email.parser
import email.policy
import os
import random
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from gateway.mailparse import IndexedMessage

REPO = Path(__file__).resolve().parents[2]


def corpus_messages() -> list[bytes]:
    root = Path(os.environ.get("COFFER_CORPUS") or REPO.parent / "shared" / "corpus")
    dirs = [root / "mime", root / "spam-ham" / "spamassassin-regression"]
    if not all(d.is_dir() for d in dirs):
        pytest.skip(f"MIME corpus not found under {root} (set COFFER_CORPUS)")
    files = sorted(p for d in dirs for p in d.rglob("*") if p.is_file())
    ham_spam = sorted((root / "spam-ham" / "test").rglob("*"))
    files += random.Random(5).sample([p for p in ham_spam if p.is_file()], 200)
    return [p.read_bytes() for p in files]


def stdlib(data: bytes, policy: Any = email.policy.compat32) -> Message:
    return email.parser.BytesParser(policy=policy).parsebytes(data)


def kind(msg: Message) -> type:
    """The node's class, IndexedMessage counted as the stdlib's Message: it answers
    every question as Message does (tests/gateway/test_mailparse_index.py)."""
    return Message if type(msg) is IndexedMessage else type(msg)


def shape(msg: Message) -> Any:
    """Everything the parser put into a node and its children, comparable with ==."""
    state = vars(msg)
    payload = state["_payload"]
    return (
        kind(msg), state["policy"], state["_headers"], state["_unixfrom"],
        state["_default_type"], state["_charset"], state["preamble"], state["epilogue"],
        [(type(d), str(d)) for d in state["defects"]],
        [shape(p) for p in payload] if isinstance(payload, list) else payload,
    )


def nodes(msg: Message) -> Iterator[Message]:
    yield msg
    payload = vars(msg)["_payload"]
    if isinstance(payload, list):
        for p in payload:
            yield from nodes(p)


PREFIXES = [
    b"X-Spam-Status: No, score=-0.1 required=5.0\r\n",
    b"Authentication-Results: mx.example; spf=none\r\n smtp.mailfrom=a@b.example\r\n",
    b"X-Spam-Status: No\r\nAuthentication-Results: mx.example; dkim=none\r\n",
    b"X-Spam-Status: No\n",
    # Prefixes the cache must not extend a tree with (the parse would differ):
    b"Content-Type: multipart/mixed; boundary=x\r\n",
    b"content-transfer-encoding: base64\r\n",
    b" continuation\r\n",
    b"From sender@example Fri Nov 27 12:00:00 2026\r\n",
    b"X-A: 1\r\n\r\n",
    b"no colon\r\n",
    b"X-A: no line end",
    b"X-A: 1\r",
    b":x\r\n",
]
