"""The sliding-window counter and the choice of counters (pure: no I/O, injected time)."""

from __future__ import annotations

from gateway.config import RateLimitRule
from gateway.receive.rate_limits import (
    Charge,
    Client,
    RateRules,
    Window,
    advance,
    charge,
    client_key,
    estimate,
    refusal,
)

HOUR = 3600.0
T0 = 1_000_000 * HOUR  # the start of a fixed window


def _c(limit: int = 3, amount: int = 1) -> Charge:
    return Charge("auth_user", "messages", "auth_user", "alice", limit, HOUR, amount)


def _fill(w: Window, now: float, n: int, limit: int = 3) -> Window:
    for _ in range(n):
        out = charge(w, _c(limit), now)
        assert not out.over
        w = out.window
    return w


def test_the_charge_over_the_limit_is_refused_and_not_counted() -> None:
    w = _fill(Window(), T0 + 10, 3)
    out = charge(w, _c(), T0 + 20)
    assert out.over and out.count == 3
    assert out.window.current == 3


def test_a_charge_of_several_that_would_cross_the_limit_is_refused() -> None:
    w = _fill(Window(), T0, 2)
    assert charge(w, _c(amount=2), T0 + 1).over
    assert not charge(w, _c(amount=1), T0 + 1).over


def test_the_previous_window_counts_by_how_much_of_it_is_still_covered() -> None:
    w = _fill(Window(), T0 + HOUR - 1, 3)  # three at the very end of a window
    quarter = T0 + HOUR + HOUR / 4
    w2 = advance(w, quarter, HOUR)
    assert (w2.previous, w2.current) == (3, 0)
    assert estimate(w2, quarter, HOUR) == 3 * 0.75
    assert charge(w, _c(), quarter).over  # 2.25 + 1 > 3
    assert not charge(w, _c(), T0 + HOUR + HOUR * 0.4).over  # 1.8 + 1 <= 3


def test_a_whole_window_without_sending_clears_the_count() -> None:
    w = _fill(Window(), T0 + 5, 3)
    later = advance(w, T0 + 2 * HOUR + 5, HOUR)
    assert estimate(later, T0 + 2 * HOUR + 5, HOUR) == 0
    assert not charge(w, _c(), T0 + 2 * HOUR + 5).over


def test_a_refusal_is_reported_first_once_per_window() -> None:
    w = _fill(Window(), T0, 3)
    first = charge(w, _c(), T0 + 1)
    second = charge(first.window, _c(), T0 + 2)
    assert first.first_refusal and not second.first_refusal
    # Next window, still over (the previous window weighs almost fully): first again.
    third = charge(second.window, _c(), T0 + HOUR + 1)
    assert third.over and third.first_refusal


def test_ipv6_clients_are_counted_by_their_64_and_ipv4_by_address() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("192.0.2.7") == "192.0.2.7"


def _client(**kw: object) -> Client:
    base: dict[str, object] = dict(listener="submission", role="submission", ip="192.0.2.7",
                                   auth_user="alice", trusted=False)
    base.update(kw)
    return Client(**base)  # type: ignore[arg-type]


def test_default_rule_counts_authenticated_users_on_submission_only() -> None:
    rules = RateRules([RateLimitRule(key="auth_user", messages="500/1h",
                                     recipients="2000/1h", roles=["submission"])])
    [c] = rules.charges(_client(), "messages", "alice@corp.example")
    assert (c.key, c.limit, c.window) == ("alice", 500, HOUR)
    [r] = rules.charges(_client(), "recipients", "alice@corp.example")
    assert r.limit == 2000
    assert rules.charges(_client(role="inbound", listener="inbound"), "messages", "") == []
    assert rules.charges(_client(auth_user=None), "messages", "x@y.example") == []


def test_exempt_networks_and_listener_names_narrow_a_rule() -> None:
    rules = RateRules([RateLimitRule(key="client_ip", messages="10/1m", listeners=["mx2"],
                                     exempt_networks=["10.0.0.0/8"])])
    assert rules.charges(_client(listener="mx2", ip="10.1.2.3"), "messages", "") == []
    assert rules.charges(_client(listener="other"), "messages", "") == []
    [c] = rules.charges(_client(listener="mx2"), "messages", "")
    assert c.key == "192.0.2.7" and c.window == 60
    trusted = RateRules([RateLimitRule(key="client_ip", messages="10/1m", exempt_trusted=True)])
    assert trusted.charges(_client(trusted=True), "messages", "") == []
    assert len(trusted.charges(_client(), "messages", "")) == 1


def test_sender_domain_is_counted_only_for_clients_that_vouch_for_the_sender() -> None:
    rules = RateRules([RateLimitRule(key="sender_domain", messages="10/1h")])
    [c] = rules.charges(_client(), "messages", "bob@Corp.Example")
    assert c.key == "corp.example"
    assert rules.charges(_client(auth_user=None), "messages", "bob@corp.example") == []
    assert len(rules.charges(_client(auth_user=None, trusted=True), "messages",
                             "bob@corp.example")) == 1
    assert rules.charges(_client(), "messages", "") == []  # the null sender
    [u] = rules.charges(_client(), "messages", "bob@bücher.example")
    assert u.key == "xn--bcher-kva.example"  # the U-label and A-label count together


def test_refusal_is_450_4_7_1_naming_the_key_and_limit() -> None:
    assert str(refusal(_c(limit=500))) == ("450 4.7.1 Sending rate limit exceeded for user "
                                           "alice (500 messages per 1h); try again later")
