"""Selectors over queue entries: each criterion alone, AND between them, OR within one."""

from __future__ import annotations

import pytest

from gateway.queue.select import Entry, Selector, domain_of, select


def _entry(qid: str = "Q1", *, age_s: float = 60.0, sender: str = "alice@src.test",
           pending: tuple[str, ...] = ("bob@dst.test",), state: str = "deferred",
           last_error: str = "451 4.3.0 Mail store unavailable") -> Entry:
    return Entry(qid=qid, age_s=age_s, sender=sender, pending=pending, state=state,
                 last_error=last_error)


def test_an_empty_selector_matches_everything() -> None:
    sel = Selector.build()
    assert sel.empty
    assert sel.matches(_entry(state="held", pending=()))
    assert sel.describe() == "every message"


def test_to_domain_matches_a_pending_recipient_case_insensitively_and_repeats_as_or() -> None:
    sel = Selector.build(to_domains=["DST.test", "@other.test"])
    assert sel.matches(_entry(pending=("Bob@Dst.Test",)))
    assert sel.matches(_entry(pending=("x@elsewhere.test", "y@other.test")))
    assert not sel.matches(_entry(pending=("x@elsewhere.test",)))
    # A recipient already delivered is not pending: the message is no longer "for" it.
    assert not sel.matches(_entry(pending=()))
    # A subdomain is another domain.
    assert not sel.matches(_entry(pending=("x@mail.dst.test",)))


def test_from_matches_an_address_or_any_sender_of_a_domain() -> None:
    assert Selector.build(sender="Spammer@Src.test").matches(_entry(sender="spammer@src.test"))
    assert not Selector.build(sender="spammer@src.test").matches(_entry())
    by_domain = Selector.build(sender="@SRC.test")
    assert by_domain.matches(_entry()) and by_domain.matches(_entry(sender="x@src.test"))
    assert not by_domain.matches(_entry(sender="alice@src.test.evil"))
    assert not by_domain.matches(_entry(sender=""))  # the null sender has no domain


def test_age_bounds_are_strict_and_combine_into_a_window() -> None:
    sel = Selector.build(older_than=600, younger_than=3600)
    assert [e.qid for e in select([_entry("A", age_s=600), _entry("B", age_s=601),
                                   _entry("C", age_s=3599), _entry("D", age_s=3600)], sel)
            ] == ["B", "C"]


def test_error_is_a_case_insensitive_substring_of_the_last_reply() -> None:
    sel = Selector.build(error="STORE unavailable")
    assert sel.matches(_entry())
    assert not sel.matches(_entry(last_error="421 4.7.0 Try again later"))
    assert not sel.matches(_entry(last_error=""))


@pytest.mark.parametrize(("states", "matching"), [
    (["deferred"], ["D"]),
    (["held"], ["H"]),  # a quarantine is not an operator's or a stage's hold
    (["held", "quarantined"], ["H", "Q"]),
    (["active"], ["A"]),
])
def test_state_selects_disjoint_states(states: list[str], matching: list[str]) -> None:
    entries = [_entry("A", state="active"), _entry("D"), _entry("H", state="held"),
               _entry("Q", state="quarantined")]
    assert [e.qid for e in select(entries, Selector.build(states=states))] == matching


def test_criteria_are_combined_with_and() -> None:
    sel = Selector.build(to_domains=["dst.test"], sender="@src.test", older_than=60,
                         error="4.3.0", states=["deferred"])
    assert sel.matches(_entry(age_s=61))
    assert not sel.matches(_entry(age_s=59))
    assert not sel.matches(_entry(age_s=61, state="held"))
    assert not sel.matches(_entry(age_s=61, sender="eve@other.test"))
    assert "to-domain dst.test" in sel.describe() and "from @src.test" in sel.describe()


def test_entry_from_a_list_row_tells_quarantine_from_other_holds() -> None:
    row = {"qid": "Q", "status": "held", "held_reason": "quarantine", "age_s": 5.0,
           "sender": "a@b.test", "pending_recipients": ["c@d.test"], "last_error": "",
           "held_stage": "decide"}
    assert Entry.from_row(row).state == "quarantined"
    assert Entry.from_row({**row, "held_reason": "error"}).state == "held"
    assert Entry.from_row({**row, "status": "deferred"}).pending == ("c@d.test",)


def test_domain_of_lowercases_and_gives_nothing_for_the_null_sender() -> None:
    assert domain_of("A@EXAMPLE.Test") == "example.test"
    assert domain_of("") == ""
