"""Which recipients exist (gateway/receive/recipients.py): the list, verdicts, replies, cache.

Pure logic, no sockets: the probes themselves are tested against a loopback next
hop in test_recipient_verify.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import RecipientsConfig
from gateway.deliver.routes import parse_routes
from gateway.deliver.smtp import Destination, ProbeResult
from gateway.errors import ConfigError
from gateway.receive.addresses import Mailbox, parse_path
from gateway.receive.recipients import (
    RecipientList,
    RecipientRules,
    Verdict,
    VerifyCache,
    hop_text,
    load_recipient_list,
    parse_recipient_list,
    verdict_of,
)

LIST = """\
# valid recipients of local.example
alice@local.example
Bob.Smith@LOCAL.example   # trailing comment
"quoted"@local.example
a#b@local.example
@catchall.example
"""


def _mb(address: str) -> Mailbox:
    return parse_path(f"<{address}>")


@pytest.fixture
def listed() -> RecipientList:
    return parse_recipient_list(LIST, "recipients.txt")


@pytest.mark.parametrize("address", [
    "alice@local.example",
    "ALICE@Local.Example",  # domain and local part compare without case
    "bob.smith@local.example",
    "quoted@local.example",  # quoting undone on both sides
    '"alice"@local.example',
    "a#b@local.example",  # "#" inside an address is not a comment
    "anyone@catchall.example",  # @domain accepts every address of the domain
    "Someone.Else@CATCHALL.example",
])
def test_listed_recipients_are_accepted(listed: RecipientList, address: str) -> None:
    assert listed.accepts(_mb(address))


@pytest.mark.parametrize("address", [
    "mallory@local.example",
    "alice@other.example",  # a local domain the list does not name accepts nobody
    "alice@sub.catchall.example",  # @domain is that domain only
    "a@local.example",  # the "#" line is a#b, not a
])
def test_unlisted_recipients_are_refused(listed: RecipientList, address: str) -> None:
    assert not listed.accepts(_mb(address))


def test_unlisted_recipient_gets_550_5_1_1_with_its_address(listed: RecipientList) -> None:
    rules = RecipientRules(listed=listed)
    reply = rules.unlisted(_mb("mallory@local.example"))
    assert reply is not None
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert reply.text == "<mallory@local.example>: Recipient address rejected: user unknown"
    assert rules.unlisted(_mb("alice@local.example")) is None


def test_without_a_list_every_recipient_passes() -> None:
    assert RecipientRules().unlisted(_mb("anyone@local.example")) is None


def test_postmaster_is_never_refused_by_the_list(listed: RecipientList) -> None:
    # RFC 5321 §4.5.1: postmaster must be accepted.
    assert RecipientRules(listed=listed).unlisted(_mb("PostMaster@local.example")) is None


@pytest.mark.parametrize(("text", "line"), [
    ("alice@local.example\nnot an address\n", 2),
    ("# comment\n\nalice@\n", 3),
    ("@\n", 1),
    ("@bad..domain\n", 1),
    ("x@[127.0.0.1]\n", 1),
    ("@[127.0.0.1]\n", 1),
    ("<alice@local.example>\n", 1),
])
def test_a_bad_line_is_an_error_naming_file_and_line(text: str, line: int) -> None:
    with pytest.raises(ConfigError) as err:
        parse_recipient_list(text, "/etc/coffer/recipients.txt")
    assert err.value.file == "/etc/coffer/recipients.txt"
    assert err.value.line == line
    assert str(err.value).startswith(f"/etc/coffer/recipients.txt:{line}:")


def test_an_unreadable_list_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_recipient_list(tmp_path / "missing.txt")
    assert err.value.file == str(tmp_path / "missing.txt")
    assert "cannot read" in err.value.message


@pytest.mark.parametrize(("result", "verdict"), [
    (ProbeResult("250 2.1.5 Ok", answered=True), Verdict.VALID),
    (ProbeResult("251 2.1.5 Will forward", answered=True), Verdict.VALID),
    (ProbeResult("550 5.1.1 No such user", answered=True), Verdict.UNKNOWN),
    (ProbeResult("553 5.1.3 Bad address", answered=True), Verdict.UNKNOWN),
    (ProbeResult("450 4.2.1 Mailbox busy", answered=True), Verdict.UNDETERMINED),
    # not an answer about the recipient: connection, greeting, MAIL FROM:<> refused
    (ProbeResult("451 4.4.1 Connection failed", answered=False), Verdict.UNDETERMINED),
    (ProbeResult("550 5.7.1 No null senders", answered=False), Verdict.UNDETERMINED),
    (ProbeResult("250 2.1.0 Ok", answered=False), Verdict.UNDETERMINED),
])
def test_verdict_follows_the_reply_to_rcpt_to(result: ProbeResult, verdict: Verdict) -> None:
    assert verdict_of(result) is verdict


@pytest.mark.parametrize(("reply", "text"), [
    ("550 5.1.1 <x@local.example>: No such user", "<x@local.example>: No such user"),
    ("550 No such user here", "No such user here"),
    ("550 5.1.1 line one\nline two", "line one line two"),
    ("550", "no reason given"),
    ("550 5.1.1 " + "x" * 500, "x" * 200),
])
def test_next_hop_text_is_passed_on_without_codes_on_one_line(reply: str, text: str) -> None:
    assert hop_text(reply) == text


def test_reply_for_each_verdict() -> None:
    mb = _mb("bob@local.example")
    tempfail = RecipientRules(verify=True)
    accept = RecipientRules(verify=True, accept_undetermined=True)
    assert tempfail.reply_for(Verdict.VALID, mb, "250 2.1.5 Ok") is None
    unknown = tempfail.reply_for(Verdict.UNKNOWN, mb, "550 5.1.1 User unknown in table")
    assert str(unknown) == ("550 5.1.1 <bob@local.example>: recipient rejected by next hop: "
                            "User unknown in table")
    unverified = tempfail.reply_for(Verdict.UNDETERMINED, mb, "451 4.4.1 refused")
    assert unverified is not None and (unverified.code, unverified.enhanced) == (450, "4.1.1")
    assert accept.reply_for(Verdict.UNDETERMINED, mb, "451 4.4.1 refused") is None
    assert accept.reply_for(Verdict.UNKNOWN, mb, "550 5.1.1 no") is not None


def test_only_smtp_routes_are_probed(tmp_path: Path) -> None:
    routes = parse_routes({
        "local.example": "smtp://127.0.0.1:2526?tls=off",
        "secure.example": "smtps://store.internal:465",
        "box.example": f"maildir:{tmp_path}",
        "*": "mx",
    }, tmp_path)
    rules = RecipientRules(verify=True, routes=routes)
    assert rules.probe_target(_mb("a@LOCAL.example")) == Destination(
        "127.0.0.1", 2526, "off", "127.0.0.1")
    assert rules.probe_target(_mb("a@secure.example")) == Destination(
        "store.internal", 465, "implicit", "store.internal")
    assert rules.probe_target(_mb("a@box.example")) is None  # Coffer's own maildir
    assert rules.probe_target(_mb("a@mx.example")) is None  # MX of a local domain: ourselves
    assert rules.probe_target(_mb("postmaster@local.example")) is None
    assert RecipientRules(verify=False, routes=routes).probe_target(
        _mb("a@local.example")) is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_keeps_each_verdict_for_its_own_time() -> None:
    clock = Clock()
    cache = VerifyCache.from_config(
        RecipientsConfig(positive_ttl="2d", negative_ttl="3h", undetermined_ttl="1m"), clock)
    cache.put("good@l", Verdict.VALID, "250")
    cache.put("bad@l", Verdict.UNKNOWN, "550")
    cache.put("maybe@l", Verdict.UNDETERMINED, "451")
    clock.now += 59
    assert {k for k in ("good@l", "bad@l", "maybe@l") if cache.get(k)} == {
        "good@l", "bad@l", "maybe@l"}
    clock.now += 1
    assert cache.get("maybe@l") is None
    clock.now += 3 * 3600
    assert cache.get("bad@l") is None
    entry = cache.get("good@l")
    assert entry is not None and entry.verdict is Verdict.VALID
    clock.now += 2 * 86400
    assert cache.get("good@l") is None
    assert len(cache) == 0


def test_cache_is_bounded() -> None:
    clock = Clock()
    cache = VerifyCache(10.0, 10.0, 10.0, clock, max_entries=10)
    for i in range(25):
        cache.put(f"u{i}@l", Verdict.VALID, "250")
    assert len(cache) <= 10
    assert cache.get("u24@l") is not None  # the newest answer is kept
