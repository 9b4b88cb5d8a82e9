"""Property tests: evaluation never raises, whatever the message, headers or facts."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.envelope import Envelope
from policies import SHIPPED
from policies.engine import evaluate
from policies.loader import load_policy
from policies.message import MessageView
from policies.schema import Policy

# A policy that touches every condition kind, so every predicate meets the junk.
EVERYTHING = """
version: 1
lists:
  words: [secret, "top secret"]
  nets: [10.0.0.0/8]
rules:
  - name: envelope
    when:
      any:
        - {direction: [inbound, relay]}
        - {sender.domain: {in: words}}
        - {recipient.local: {regex: '^a'}}
        - {all_recipients.domain: {glob: '*.example'}}
        - {from.address: {contains: '@'}}
        - {recipients.count: {gt: 2}}
        - {client_ip: {in: nets}}
        - {tls: true}
        - {authenticated: false}
        - {auth_user: x}
    then: [{tag_subject: "[T]"}]
  - name: content
    when:
      any:
        - {header: {name: X-A, regex: 'a.b'}}
        - {header.Received: {exists: true}}
        - {subject: {keywords: words}}
        - {body: {contains: secret}}
        - {size: {gt: 100}}
    then: [{add_header: {name: X-C, value: "1"}}]
  - name: attachments
    when:
      any:
        - {attachment: {extension: [exe], detected_type: {glob: 'application/*'}, size: {gt: 0}}}
        - {attachment.encrypted: true}
        - {attachment.unscannable: true}
        - {attachments.count: {ge: 1}}
        - {attachments.depth: {ge: 1}}
    then: [quarantine]
  - name: verdicts
    when:
      any:
        - {spf: fail}
        - {dkim: {result: pass, domain: x.example}}
        - {dmarc: {result: fail, disposition: reject}}
        - {arc: pass}
        - {spam.score: {ge: 5}}
        - {spam.verdict: spam}
        - {spam.symbol: X}
    then: [{retain: 1y}]
  - name: dlp-and-time
    when:
      any:
        - {dlp: {detector: credit_card}}
        - {dlp: {detector: iban}}
        - {dlp: {detector: us_ssn}}
        - {dlp: {detector: keywords, list: words, min_count: 2}}
        - {dlp: {detector: regex, pattern: '\\d{4}', min_count: 3}}
        - {time: {between: "09:00-17:00", days: [mon]}}
        - {date: {from: 2020-01-01}}
    then: [{hold: case}]
"""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=10,
)
facts_strategy = st.dictionaries(
    st.sampled_from(["check", "spam", "other"]),
    st.dictionaries(st.sampled_from(["spf", "dkim", "dmarc", "arc", "score", "verdict",
                                     "symbols", "result"]), json_values, max_size=5)
    | json_values,
    max_size=3,
)
header_name = st.text(st.characters(min_codepoint=33, max_codepoint=126,
                                    blacklist_characters=":"), min_size=1, max_size=12)
header_value = st.text(max_size=40)


_cache: dict[str, Policy] = {}


def everything() -> Policy:
    if "p" not in _cache:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "everything.yaml"
            path.write_text(EVERYTHING, encoding="utf-8")
            _cache["p"] = load_policy(path)
    return _cache["p"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=2000), facts=facts_strategy,
       sender=st.text(max_size=30), rcpts=st.lists(st.text(max_size=30), max_size=4),
       ip=st.text(max_size=20))
def test_evaluation_never_raises_on_arbitrary_bytes_and_facts(
    raw: bytes, facts: dict[str, object], sender: str, rcpts: list[str], ip: str
) -> None:
    policy = everything()
    d = evaluate(policy, Envelope(sender, rcpts, client_ip=ip), raw, facts,
                 local_domains=["example.com"])
    assert d.decision in ("accept", "quarantine")
    assert len(d.rules) == 5
    assert d.errors == []
    json.dumps(d.to_facts())
    json.dumps(d.to_json())


@settings(max_examples=150, deadline=None)
@given(headers=st.lists(st.tuples(header_name, header_value), max_size=8),
       body=st.text(max_size=500), ctype=st.sampled_from([
           "text/plain", "text/html", "multipart/mixed; boundary=x", "message/rfc822",
           "application/zip", "text/plain; charset=bogus", "multipart/alternative"]))
def test_evaluation_never_raises_on_arbitrary_headers(
    headers: list[tuple[str, str]], body: str, ctype: str
) -> None:
    head = "".join(f"{n}: {v}\r\n" for n, v in headers)
    raw = (head + f"Content-Type: {ctype}\r\n\r\n" + body).encode("utf-8", "surrogateescape")
    view = MessageView.from_bytes(raw)
    d = evaluate(everything(), Envelope("a@x.example", ["b@example.com"]), view,
                 local_domains=["example.com"])
    assert d.decision in ("accept", "quarantine")
    assert d.errors == []


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=3000))
def test_shipped_baseline_never_raises(raw: bytes) -> None:
    if "baseline" not in _cache:
        _cache["baseline"] = load_policy(SHIPPED / "baseline.yaml")
    d = evaluate(_cache["baseline"], Envelope("a@x.example", ["b@example.com"]), raw,
                 {}, local_domains=["example.com"])
    assert d.decision in ("accept", "reject", "quarantine", "discard", "tempfail")
