"""The archive reads the same participants from a message on every Python.

A rebuild restores rows from the bytes (reports/rebuild.py): if the standard library's
address parsing differed between the interpreter that archived a message and the one
that rebuilds, `from:` and `participant:` searches would change after a rebuild.  The
stdlib's getaddresses differs between patch releases (CVE-2023-27043); extraction asks
for its lenient mode everywhere (gateway.check.headers.getaddresses_lenient).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from archive_db import corpus_dir
from other_python import other_interpreter

from archive.extract import extract

REPO = Path(__file__).resolve().parents[2]

# Address lists the strict and the lenient parser read differently, or that make the
# default policy's parser give up (so the extractor's fallback runs).
VECTORS = [
    "alice@example.org)<bob@example.com>",
    "alice@example.org <bob@example.com>",
    '"alice <a@example.com>',
    "(comment <a@example.com>",
    "a@example.com (c@example.org)",
    '"a@example.org" <c@example.com>',
    "tim@example.com concierge@example.com",
    "Mary <@route.example:mary@example.net>",
    "undisclosed-recipients:;",
    "=?utf-8?q?J=C3=B6rg?= <joerg@example.de>, <>",
    "a@b@c.example",
    "<<nested@example.com>>",
    "a@[192.0.2.1",  # the default policy raises: the fallback reads it (strictly: nothing)
    "a@",
]

PROBE = """
import json, sys
from archive.extract import extract
out = []
for text in json.load(sys.stdin):
    e = extract(text.encode("utf-8", "surrogateescape"))
    out.append([[p.role, p.address, p.name] for p in e.participants])
print(json.dumps(out))
"""


def _messages() -> list[str]:
    texts = [f"From: {v}\r\nTo: {v}\r\nCc: x@example.com, {v}\r\nSubject: s\r\n\r\nb\r\n"
             for v in VECTORS]
    try:
        mime = corpus_dir()
    except pytest.skip.Exception:
        return texts
    for path in sorted(p for p in mime.rglob("*") if p.is_file())[:1500]:
        if path.stat().st_size < 300_000:
            texts.append(path.read_bytes().decode("utf-8", "surrogateescape"))
    return texts


def test_every_interpreter_extracts_the_same_participants() -> None:
    other = other_interpreter()
    if other is None:
        pytest.skip("no second Python >= 3.11 on this machine to compare with")
    texts = _messages()
    # archive.extract needs only the standard library and gateway.mailparse: the other
    # interpreter runs without this virtualenv.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([other, "-c", PROBE], input=json.dumps(texts), env=env,
                         capture_output=True, text=True, check=True, timeout=300).stdout
    theirs = json.loads(out)
    ours = [[[p.role, p.address, p.name] for p in extract(
        t.encode("utf-8", "surrogateescape")).participants] for t in texts]
    differ = [(t[:200], a, b) for t, a, b in zip(texts, ours, theirs, strict=True) if a != b]
    assert not differ, (sys.version, differ[:3])
