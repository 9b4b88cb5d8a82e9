"""gateway/envelope.py: the spooled form of an envelope."""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given
from hypothesis import strategies as st

from gateway.envelope import Envelope, TlsInfo

_text = st.text(max_size=20)
_envelopes = st.builds(
    Envelope,
    mail_from=_text,
    rcpt_to=st.lists(_text, max_size=4),
    client_ip=_text,
    client_port=st.integers(0, 65535),
    helo=_text,
    tls=st.none() | st.builds(TlsInfo, version=_text, cipher=_text),
    auth_user=st.none() | _text,
    received_at=st.floats(0, 2e9),
    listener=_text,
    role=st.sampled_from(["inbound", "submission", "local"]),
    mail_options=st.lists(_text, max_size=3),
    rcpt_options=st.lists(st.lists(_text, max_size=2), max_size=3),
)


@given(_envelopes)
def test_to_dict_is_exactly_what_dataclasses_asdict_gives(env: Envelope) -> None:
    fast, generic = env.to_dict(), dataclasses.asdict(env)
    assert fast == generic
    # Same key order, so the spool header's JSON is byte-for-byte what it was.
    assert json.dumps(fast) == json.dumps(generic)


@given(_envelopes)
def test_to_dict_round_trips_through_from_dict(env: Envelope) -> None:
    assert Envelope.from_dict(json.loads(env.to_json())) == env


def test_to_dict_copies_the_lists_so_the_envelope_cannot_be_changed_through_it() -> None:
    env = Envelope("a@x.example", ["b@y.example"], rcpt_options=[["NOTIFY=NEVER"]])
    d = env.to_dict()
    d["rcpt_to"].append("c@z.example")
    d["rcpt_options"][0].append("ORCPT=rfc822;b@y.example")
    assert env.rcpt_to == ["b@y.example"]
    assert env.rcpt_options == [["NOTIFY=NEVER"]]
