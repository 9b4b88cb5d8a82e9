"""Who may send to a journal address (archive.journal.sources): everyone else gets 550 5.7.1."""

from __future__ import annotations

import pytest
from receive_helpers import RawClient, StartGateway

from gateway.config import JournalConfig, RelayConfig
from gateway.receive.addresses import parse_path
from gateway.receive.relay_control import JOURNAL_DENIED, RelayRules, check_journal

JOURNAL = "<Journal@Corp.Example>"  # matched whatever its case


def _rules(*sources: str) -> RelayRules:
    return RelayRules.from_config(
        RelayConfig(local_domains=["corp.example"], trusted_networks=["192.0.2.0/24"]),
        JournalConfig(addresses=["journal@corp.example"], sources=list(sources)))


@pytest.mark.parametrize(("sources", "client", "authenticated", "allowed"), [
    (("trusted_networks", "authenticated"), "192.0.2.9", False, True),
    (("trusted_networks", "authenticated"), "198.51.100.1", True, True),
    (("trusted_networks", "authenticated"), "198.51.100.1", False, False),
    (("trusted_networks",), "198.51.100.1", True, False),
    (("authenticated",), "192.0.2.9", False, False),
    (("203.0.113.0/28",), "203.0.113.5", False, True),
    (("203.0.113.0/28",), "::ffff:203.0.113.5", False, True),
    (("203.0.113.0/28",), "192.0.2.9", False, False),
    ((), "192.0.2.9", True, False),
])
def test_journal_address_takes_mail_only_from_its_sources(
        sources: tuple[str, ...], client: str, authenticated: bool, allowed: bool) -> None:
    got = check_journal(_rules(*sources), parse_path(JOURNAL), client,
                        authenticated=authenticated)
    assert got == (None if allowed else JOURNAL_DENIED)


def test_journal_refusal_is_550_5_7_1_and_other_recipients_are_not_affected() -> None:
    assert (JOURNAL_DENIED.code, JOURNAL_DENIED.enhanced) == (550, "5.7.1")
    assert check_journal(_rules(), parse_path("<bob@corp.example>"), "198.51.100.1",
                         authenticated=False) is None


async def test_session_refuses_journal_address_outside_sources_and_never_relays_for_one(
        start_gateway: StartGateway) -> None:
    gw = await start_gateway(archive={"journal": {"addresses": ["journal@archive.test"],
                                                  "sources": ["127.0.0.2/32"]}})
    outsider = await RawClient.connect(gw.port())
    source = await RawClient.connect(gw.port(), source="127.0.0.2")
    try:
        for c in (outsider, source):
            await c.reply()
            await c.cmd("EHLO client.example")
            assert (await c.cmd("MAIL FROM:<exchange@corp.example>")).startswith("250")
        assert (await outsider.cmd("RCPT TO:<journal@archive.test>")).startswith(
            "550 5.7.1 Journal address")
        # A listed source reaches the journal address (its domain is no local domain),
        # and nothing else: being a journal source is no licence to relay.
        assert (await source.cmd("RCPT TO:<Journal@Archive.Test>")).startswith("250")
        assert (await source.cmd("RCPT TO:<x@ext.example>")).startswith("550 5.7.1 Relay")
    finally:
        await outsider.close()
        await source.close()
