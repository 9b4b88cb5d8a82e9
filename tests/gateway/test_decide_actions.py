"""The policy's message actions take effect before the queue.

Header edits are pure functions over the raw bytes (only the edited fields
change); redirect / bcc / journal change the envelope before the spool write;
notify spools a separate notice from the null sender.  Audit-mode rules and
refused messages change nothing.
"""

from __future__ import annotations

import email
import email.policy
import textwrap
from pathlib import Path

import pytest

from gateway.decide import DecideStage, to_result
from gateway.decide_actions import (
    NOTICE_HEADER,
    apply_header_actions,
    build_notice,
    remove_header,
    rewrite_header,
    routing,
    tag_subject,
)
from gateway.envelope import Envelope
from gateway.pipeline import Action, MessageContext, StageResult, apply
from gateway.queue.spool import Spool
from gateway.runner import Runner
from policies.engine import evaluate
from policies.loader import load_policy
from policies.schema import Policy

MSG = (
    b"Received: from a by b;\r\n\tFri, 1 Jan 2027 00:00:00 +0000\r\n"
    b"From: Alice <alice@outside.example>\r\n"
    b"X-Spam-Flag: YES\r\n"
    b"Subject: hello\r\n"
    b"x-spam-flag: also\r\n  folded continuation\r\n"
    b"Message-ID: <m1@outside.example>\r\n"
    b"\r\n"
    b"X-Spam-Flag: in the body stays\r\n"
)


def subject_of(data: bytes) -> str:
    return str(email.message_from_bytes(data, policy=email.policy.default)["Subject"])


# -- remove_header ------------------------------------------------------------------


def test_remove_header_removes_every_instance_with_folded_lines_and_nothing_else() -> None:
    out = remove_header(MSG, "X-SPAM-FLAG")
    assert out == (
        b"Received: from a by b;\r\n\tFri, 1 Jan 2027 00:00:00 +0000\r\n"
        b"From: Alice <alice@outside.example>\r\n"
        b"Subject: hello\r\n"
        b"Message-ID: <m1@outside.example>\r\n"
        b"\r\n"
        b"X-Spam-Flag: in the body stays\r\n"
    )


def test_remove_header_keeps_lf_messages_lf_and_absent_fields_change_nothing() -> None:
    lf = MSG.replace(b"\r\n", b"\n")
    out = remove_header(lf, "x-spam-flag")
    assert b"\r" not in out and b"X-Spam-Flag: YES" not in out
    assert out.endswith(b"\n\nX-Spam-Flag: in the body stays\n")
    assert remove_header(MSG, "X-Absent") is MSG


def test_remove_header_does_not_match_a_longer_name() -> None:
    data = b"X-Spam: 1\r\nX-Spam-Flag: 2\r\n\r\nb"
    assert remove_header(data, "X-Spam") == b"X-Spam-Flag: 2\r\n\r\nb"


# -- rewrite_header -----------------------------------------------------------------


def test_rewrite_header_value_replaces_every_instance_keeping_the_rest_byte_identical() -> None:
    out = rewrite_header(MSG, "x-spam-flag", value="NO")
    assert out == MSG.replace(b"X-Spam-Flag: YES\r\n", b"X-Spam-Flag: NO\r\n").replace(
        b"x-spam-flag: also\r\n  folded continuation\r\n", b"x-spam-flag: NO\r\n")


def test_rewrite_header_pattern_substitutes_over_the_unfolded_value() -> None:
    out = rewrite_header(MSG, "X-Spam-Flag", pattern=r"also\s+folded", replace="was folded")
    assert b"x-spam-flag: was folded continuation\r\n" in out
    assert b"X-Spam-Flag: YES\r\n" in out  # not matched: its bytes are kept


def test_rewrite_header_pattern_works_on_the_decoded_subject_and_reencodes() -> None:
    data = b"Subject: =?utf-8?q?=5BSPAM=5D_Gr=C3=BC=C3=9Fe?=\n\nbody\n"
    out = rewrite_header(data, "Subject", pattern=r"^\[SPAM\]\s*", replace="")
    assert subject_of(out) == "Grüße"
    assert out.isascii() and out.endswith(b"\n\nbody\n") and b"\r" not in out


def test_rewrite_header_non_ascii_value_is_rfc2047_encoded_and_folded() -> None:
    long = " ".join(["Grüße"] * 20)
    out = rewrite_header(MSG, "Subject", value=long)
    assert out.isascii() and subject_of(out) == long
    head = out.split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))


def test_rewrite_header_absent_field_stays_absent() -> None:
    assert rewrite_header(MSG, "X-Absent", value="v") is MSG


def test_rewrite_header_needs_value_or_pattern_and_replace() -> None:
    with pytest.raises(ValueError):
        rewrite_header(MSG, "Subject", pattern="x")


# -- tag_subject --------------------------------------------------------------------


def test_tag_subject_prefixes_once() -> None:
    once = tag_subject(MSG, "[EXTERNAL] ")
    assert b"Subject: [EXTERNAL] hello\r\n" in once
    assert tag_subject(once, "[EXTERNAL]") is once
    assert once.replace(b"[EXTERNAL] ", b"") == MSG


def test_tag_subject_already_tagged_reply_is_not_tagged_again() -> None:
    data = b"Subject: Re: [external] hello\r\n\r\nb"
    assert tag_subject(data, "[EXTERNAL]") is data


def test_tag_subject_before_an_encoded_word_keeps_the_encoded_word_bytes() -> None:
    data = b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n\nbody\n"
    out = tag_subject(data, "[EXTERNAL]")
    assert out == b"Subject: [EXTERNAL] =?utf-8?q?Gr=C3=BC=C3=9Fe?=\n\nbody\n"
    assert subject_of(out) == "[EXTERNAL] Grüße"
    assert tag_subject(out, "[EXTERNAL]") is out  # tagged is detected on the decoded text


def test_tag_subject_non_ascii_prefix_is_its_own_encoded_word() -> None:
    before_ew = tag_subject(b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nb", "[EXTERN Ä]")
    assert before_ew.isascii() and subject_of(before_ew) == "[EXTERN Ä] Grüße"
    assert before_ew.endswith(b" =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nb")
    before_text = tag_subject(b"Subject: plain\r\n\r\nb", "[EXTERN Ä]")
    assert before_text.isascii() and subject_of(before_text) == "[EXTERN Ä] plain"


def test_tag_subject_keeps_a_raw_utf8_subject_and_folds_a_long_first_line() -> None:
    data = "Subject: Grüße\r\n\r\nb".encode()
    assert tag_subject(data, "[EXT]") == "Subject: [EXT] Grüße\r\n\r\nb".encode()
    long = b"Subject: " + b"x" * 75 + b"\r\n\r\nb"
    out = tag_subject(long, "[EXT]")
    assert out == b"Subject: [EXT]\r\n " + b"x" * 75 + b"\r\n\r\nb"
    assert subject_of(out) == "[EXT] " + "x" * 75


def test_tag_subject_adds_a_subject_when_there_is_none() -> None:
    assert tag_subject(b"From: a@b.example\r\n\r\nbody", "[EXT]") == (
        b"From: a@b.example\r\nSubject: [EXT]\r\n\r\nbody")
    assert tag_subject(b"From: a@b.example", "[EXT]") == (
        b"From: a@b.example\r\nSubject: [EXT]\r\n")


def test_header_actions_apply_in_rule_order() -> None:
    out, errors = apply_header_actions(MSG, [
        {"action": "remove_header", "name": "X-Spam-Flag"},
        {"action": "tag_subject", "prefix": "[EXT]"},
        {"action": "rewrite_header", "name": "Subject", "pattern": "hello", "replace": "hi"},
        {"action": "encrypt", "method": "pgp"},  # not a header action: ignored here
    ])
    assert b"Subject: [EXT] hi\r\n" in out and b"X-Spam-Flag: YES" not in out
    assert errors == []


def test_a_header_action_that_cannot_apply_is_skipped_and_reported() -> None:
    out, errors = apply_header_actions(MSG, [
        {"action": "rewrite_header", "name": "Subject", "pattern": "hel+", "replace": r"\9",
         "rule": "bad-template"},
        {"action": "tag_subject", "prefix": "[EXT]"},
    ])
    assert b"Subject: [EXT] hello\r\n" in out
    assert len(errors) == 1 and "bad-template" in errors[0]


def test_rewrite_header_with_undecodable_bytes_still_produces_ascii() -> None:
    data = b"Subject: caf\xe9 [SPAM]\r\n\r\nb"
    out = rewrite_header(data, "Subject", pattern=r"\s*\[SPAM\]", replace="")
    assert out.isascii() and subject_of(out) == "caf\ufffd"


# -- routing and notices ------------------------------------------------------------


def test_routing_redirect_replaces_and_bcc_journal_add_without_duplicates() -> None:
    r = routing(["bob@example.com"], [
        {"action": "redirect", "to": ["review@example.com"]},
        {"action": "bcc", "to": ["copy@example.com", "review@example.com"]},
        {"action": "journal", "to": ["journal@example.com"]},
    ])
    assert r.recipients == ["review@example.com"]
    assert r.extra == ["copy@example.com", "journal@example.com"]
    plain = routing(["bob@example.com"], [{"action": "bcc", "to": ["BOB@example.com"]}])
    assert plain.recipients is None and plain.extra == []


def test_apply_changes_the_envelope_before_the_spool_write() -> None:
    env = Envelope("a@x.example", ["bob@example.com"], rcpt_options=[["NOTIFY=NEVER"]])
    ctx = MessageContext(env, b"x")
    apply(ctx, "decide", StageResult(recipients=["r@example.com"],
                                     extra_recipients=["c@example.com", "R@example.com"]))
    assert env.rcpt_to == ["r@example.com", "c@example.com"]
    assert env.rcpt_options == [[], []]


def test_notice_names_rule_sender_and_message_id_but_never_the_body() -> None:
    raw = build_notice(to="sec@example.com", rule="flag-cards", decision="quarantine",
                       message_id="<m1@outside.example>", sender="alice@outside.example",
                       sender_from="MAILER-DAEMON@gw.example", hostname="gw.example",
                       now=1800000000.0)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["From"] == "MAILER-DAEMON@gw.example" and msg["To"] == "sec@example.com"
    assert "flag-cards" in msg["Subject"] and msg["Auto-Submitted"] == "auto-generated"
    assert msg[NOTICE_HEADER] == "flag-cards"
    body = msg.get_content()
    assert "<m1@outside.example>" in body and "alice@outside.example" in body
    assert "flag-cards" in body and "quarantine" in body


# -- the decide stage and the runner ------------------------------------------------

POLICY = """
version: 1
rules:
  - name: strip-spam-flag
    then: [{remove_header: X-Spam-Flag}]
  - name: tag-external
    when: {direction: inbound}
    then: [{tag_subject: "[EXTERNAL]"}]
  - name: to-review
    when: {subject: {contains: review}}
    then: [{redirect: review@example.com}]
  - name: journal-all
    then: [{bcc: journal@example.com}]
  - name: tell-security
    when: {subject: {contains: review}}
    then: [{notify: {to: sec@example.com, subject: "Review needed"}}]
  - name: audit-only
    mode: audit
    then: [{redirect: audit@example.com}, {notify: audit@example.com},
           {tag_subject: "[AUDIT]"}]
  - name: refuse
    when: {subject: {contains: refuse}}
    then: [reject]
"""


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(POLICY), encoding="utf-8")
    return load_policy(path)


def _env() -> Envelope:
    return Envelope("alice@outside.example", ["bob@example.com"], received_at=1800000000.0)


def test_decide_result_carries_the_edits_and_records_them(policy: Policy) -> None:
    ctx = MessageContext(_env(), MSG)
    decision = evaluate(policy, ctx.envelope, ctx.data, local_domains=["example.com"])
    result = to_result(decision, ctx, hostname="gw.example")
    assert result.data is not None
    assert b"Subject: [EXTERNAL] hello\r\n" in result.data
    assert b"X-Spam-Flag: YES" not in result.data and b"AUDIT" not in result.data
    assert result.recipients is None and result.extra_recipients == ["journal@example.com"]
    assert result.notify == []
    executed = result.facts["executed"]
    assert executed["copied_to"] == ["journal@example.com"]
    assert executed["original_recipients"] == ["bob@example.com"]


def test_a_refused_message_changes_nothing_and_notifies_no_one(policy: Policy) -> None:
    data = MSG.replace(b"Subject: hello", b"Subject: refuse review")
    ctx = MessageContext(_env(), data)
    decision = evaluate(policy, ctx.envelope, ctx.data, local_domains=["example.com"])
    result = to_result(decision, ctx)
    assert result.action is Action.REJECT
    assert result.data is None and result.recipients is None and result.notify == []
    assert "executed" not in result.facts


def test_a_notice_never_triggers_another_notice(policy: Policy) -> None:
    data = MSG.replace(b"Subject: hello", b"Subject: review\r\nX-Coffer-Notice: x")
    ctx = MessageContext(_env(), data)
    decision = evaluate(policy, ctx.envelope, ctx.data, local_domains=["example.com"])
    result = to_result(decision, ctx)
    assert result.notify == []
    assert "notice" in result.facts["executed"]["notify_skipped"]


async def test_runner_spools_redirect_bcc_and_notice(tmp_path: Path, policy: Policy) -> None:
    spool = Spool(tmp_path / "spool")
    queued: list[str] = []
    stage = DecideStage(policy, ["example.com"], clock=lambda: 1800000000.0,
                        hostname="gw.example")
    runner = Runner(spool, [stage], on_queued=queued.append, clock=lambda: 1800000000.0)
    data = MSG.replace(b"Subject: hello", b"Subject: please review")
    reply = await runner.accept(_env(), data)
    assert reply.code == 250
    msgs = {qid: spool.load(qid) for qid in spool.queue_ids()}
    assert len(msgs) == 2 and sorted(queued) == sorted(msgs)
    [original] = [m for m in msgs.values() if m.envelope.mail_from]
    [notice] = [m for m in msgs.values() if not m.envelope.mail_from]

    assert original.envelope.rcpt_to == ["review@example.com", "journal@example.com"]
    assert original.data.startswith(b"Received: from a by b;\r\n\tFri")
    assert b"Subject: [EXTERNAL] please review\r\n" in original.data
    assert b"X-Spam-Flag: YES" not in original.data
    assert original.data.endswith(b"\r\n\r\nX-Spam-Flag: in the body stays\r\n")
    decided = original.facts["decide"]
    assert decided["executed"]["redirected_to"] == ["review@example.com"]
    assert decided["executed"]["notified"] == [{"to": "sec@example.com",
                                                "rule": "tell-security"}]
    audit = next(r for r in decided["rules"] if r["name"] == "audit-only")
    assert audit["matched"] and audit["mode"] == "audit"  # recorded, not carried out

    assert notice.envelope.rcpt_to == ["sec@example.com"] and notice.envelope.role == "local"
    assert notice.facts["notify"]["of"] == original.qid
    msg = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert msg["Subject"] == "Review needed" and msg["From"] == "MAILER-DAEMON@gw.example"
    assert "<m1@outside.example>" in msg.get_content()
    assert b"in the body stays" not in notice.data


KEEP_ONE = """
version: 1
rules:
  - name: to-review
    then: [{redirect: [bob@example.com, review@example.com]}]
  - name: journal-all
    then: [{bcc: journal@example.com}]
"""


async def test_a_redirect_keeps_the_dsn_parameters_of_the_recipients_that_remain(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(KEEP_ONE), encoding="utf-8")
    spool = Spool(tmp_path / "spool")
    runner = Runner(spool, [DecideStage(load_policy(path), ["example.com"])])
    bob = ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@example.com"]
    env = Envelope("alice@outside.example", ["bob@example.com", "carol@example.com"],
                   received_at=1800000000.0, rcpt_options=[bob, ["NOTIFY=NEVER"]])
    assert (await runner.accept(env, MSG)).code == 250
    [qid] = spool.queue_ids()
    spooled = spool.load(qid).envelope
    assert spooled.rcpt_to == ["bob@example.com", "review@example.com", "journal@example.com"]
    # bob stays a recipient: what he asked for stays with him; carol's NOTIFY=NEVER
    # went with her; the recipients the policy added asked for nothing.
    assert spooled.rcpt_options == [bob, [], []]
