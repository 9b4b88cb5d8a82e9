"""headers.addresses: one reading of address lists on every interpreter, and none of an
ambiguous one (CVE-2023-27043)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from authcorpus import corpus_dir
from other_python import other_interpreter

from gateway.check import dmarc, headers

REPO = Path(__file__).resolve().parents[2]

VECTORS = [
    "alice@example.org)<bob@example.com>",  # CVE-2023-27043
    "alice@example.org <bob@example.com>",
    "tim@example.com concierge@example.com",  # two addresses, no comma
    '"alice <a@example.com>',  # a quote never closed
    "(comment <a@example.com>",  # a comment never closed
    "a@example.com (c@example.org)",
    '"a@example.org" <c@example.com>',
    '"a, b" <c@example.com>, d@example.com',
    "undisclosed-recipients:;",
    "team: a@example.com, b@example.com;",
    "Mary <@route.example:mary@example.net>",
    "",
    "a@example.com,",
    'x (a (b) "c) <y@example.com>',
]


def test_an_address_hidden_by_an_unbalanced_comment_is_not_read() -> None:
    assert headers.addresses(["alice@example.org)<bob@example.com>"]) == headers.UNREADABLE
    assert dmarc.from_domains("alice@example.org)<bob@example.com>") == []


def test_unbalanced_quotes_or_comments_make_the_list_unreadable() -> None:
    for value in ('"alice <a@example.com>', "(comment <a@example.com>", "a@example.com)"):
        assert headers.addresses([value]) == headers.UNREADABLE, value


def test_an_at_sign_that_is_no_address_makes_the_list_unreadable() -> None:
    assert headers.addresses(["tim@example.com concierge@example.com"]) == headers.UNREADABLE
    # one unreadable value spoils the list: which addresses it held is unknown
    assert headers.addresses(["a@example.com", "b@x c@y"]) == headers.UNREADABLE


def test_at_signs_in_quoted_strings_and_comments_are_text() -> None:
    assert headers.addresses(['"a@example.org" <c@example.com>']) == [
        ("a@example.org", "c@example.com")]
    assert headers.addresses(["a@example.com (c@example.org)"]) == [
        ("c@example.org", "a@example.com")]
    assert dmarc.from_domains('"ceo@bank.example" <x@example.com>') == ["example.com"]


def test_display_names_with_a_bare_address_are_two_addresses() -> None:
    # Invalid (an unquoted '@' in a phrase), read as two addresses as before: DMARC
    # then fails it for two domains, the spam rules count two senders.
    assert dmarc.from_domains("paypal@paypal.example <x@evil.example>") == [
        "paypal.example", "evil.example"]


PROBE = """
import json, sys
from gateway.check import headers
print(json.dumps([headers.addresses(v) for v in json.load(sys.stdin)]))
"""


def test_every_interpreter_reads_address_lists_alike() -> None:
    other = other_interpreter()
    if other is None:
        pytest.skip("no second Python >= 3.11 on this machine to compare with")
    values = [[v] for v in VECTORS]
    root = corpus_dir()
    if root is not None:  # the From, To and Cc fields of the MIME corpus
        for path in sorted((root / "mime").rglob("*"))[:3000]:
            if path.is_file() and path.stat().st_size < 1_000_000:
                data = path.read_bytes()
                values += [[v[:4096]] for name in ("from", "to", "cc")
                           for v in headers.values(data, name)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # gateway.check.headers needs only the standard library: the other interpreter
    # runs without this virtualenv.
    out = subprocess.run([other, "-c", PROBE], input=json.dumps(values), env=env,
                         capture_output=True, text=True, check=True).stdout
    theirs = json.loads(out)
    ours = [[list(p) for p in headers.addresses(v)] for v in values]
    differ = [(v, a, b) for v, a, b in zip(values, ours, theirs, strict=True) if a != b]
    assert not differ, differ[:5]
