"""The message's log says which notices were made: the fold reads it back (pure)."""

from __future__ import annotations

from gateway.queue.state import NoticeState, fold


def _notice(dsn_qid: str, kind: str, state: str,
            rcpts: list[str] | None = None) -> dict[str, object]:
    ev: dict[str, object] = {"ev": "notice", "kind": kind, "dsn_qid": dsn_qid, "state": state}
    if rcpts is not None:
        ev["rcpts"] = rcpts
    return ev


def test_a_refused_notice_is_owed_again_and_a_spooled_one_is_not() -> None:
    st = fold(["a@x", "b@x"], [
        _notice("D1", "failure", "spooling", ["a@x"]),
        _notice("D2", "success", "spooling", ["b@x"]),
        _notice("D1", "failure", "spooled"), _notice("D2", "success", "refused"),
    ])
    assert st.notice_made("failure") and not st.notice_made("success")
    assert st.unsettled_notices == []


def test_a_notice_left_spooling_by_a_crash_is_unsettled_and_never_owed_again() -> None:
    st = fold(["a@x"], [_notice("D1", "failure", "spooling", ["a@x"])])
    assert st.unsettled_notices == ["D1"] and st.notice_made("failure")
    assert st.notices["D1"].state is NoticeState.SPOOLING


def test_a_delay_notice_warns_its_recipients_once_unless_the_spool_refused_it() -> None:
    refused = fold(["a@x", "b@x"], [_notice("D1", "delay", "spooling", ["a@x"]),
                                    _notice("D1", "delay", "refused")])
    assert not refused.recipients["a@x"].delay_warned
    made = fold(["a@x", "b@x"], [_notice("D1", "delay", "spooling", ["a@x"]),
                                 _notice("D1", "delay", "spooled")])
    assert made.recipients["a@x"].delay_warned and not made.recipients["b@x"].delay_warned
    older = fold(["a@x"], [{"ev": "delay_notice", "rcpts": ["a@x"]}])  # older spools
    assert older.recipients["a@x"].delay_warned


def test_an_unknown_notice_state_is_ignored() -> None:
    st = fold(["a@x"], [_notice("D1", "failure", "teleported", ["a@x"])])
    assert st.notices == {} and not st.notice_made("failure")
