"""CheckStage in the pipeline, its configuration, and the DKIM signing stage."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydantic
import pytest
from authdns import DnsTestServer, Zone

from gateway import config as gconfig
from gateway.check import dmarc
from gateway.check.config import CheckConfig, SigningKey
from gateway.check.dns import Resolver, TtlCache
from gateway.check.stage import CheckStage
from gateway.envelope import Envelope
from gateway.pipeline import Action, MessageContext, Stage
from gateway.transform.dkim_sign import (
    DkimSignError,
    DkimSignStage,
    LoadedKey,
    generate_key,
    public_record,
    sign,
)

ID = "mx.coffer.test"
MSG = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
       b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <h1@example.com>\r\n\r\nhi\r\n")


def inbound(data: bytes, ip: str = "192.0.2.10", mail_from: str = "alice@example.com",
            role: str = "inbound") -> MessageContext:
    env = Envelope(mail_from, ["bob@example.org"], client_ip=ip, helo="mx.example.com",
                   role=role)
    return MessageContext(env, data)


@pytest.fixture
def published(zone: Zone) -> bytes:
    key = generate_key("ed25519-sha256")
    zone.txt("s1._domainkey.example.com", public_record(key))
    zone.txt("example.com", "v=spf1 ip4:192.0.2.0/24 -all")
    zone.txt("_dmarc.example.com", "v=DMARC1; p=reject; sp=quarantine")
    return key


def test_stage_follows_the_pipeline_protocol(resolver: Resolver) -> None:
    stage: Stage = CheckStage(resolver, authserv_id=ID)
    assert (stage.name, stage.once) == ("check", False)


async def test_all_checks_pass_for_a_signed_message_from_an_authorized_ip(
        resolver: Resolver, published: bytes) -> None:
    result = await CheckStage(resolver, authserv_id=ID).run(
        inbound(sign(MSG, "example.com", "s1", published)))
    assert result.action == Action.CONTINUE and result.data is None
    assert result.facts == {
        "spf": {"result": "pass", "domain": "example.com", "reason": result.facts["spf"]["reason"]},
        "dkim": [{"result": "pass", "domain": "example.com", "selector": "s1",
                  "reason": "signature verified", "unsigned_bytes": 0}],
        "dmarc": {"result": "pass", "domain": "example.com", "policy": "reject",
                  "disposition": "none"},
        "arc": {"result": "none"},
    }
    ((name, value),) = result.headers
    assert name == "Authentication-Results" and value.startswith(f"{ID};")


async def test_stage_never_rejects_even_when_dmarc_says_reject(resolver: Resolver,
                                                               published: bytes) -> None:
    result = await CheckStage(resolver, authserv_id=ID).run(inbound(MSG, ip="198.51.100.1"))
    assert result.facts["dmarc"]["disposition"] == "reject"
    assert result.action == Action.CONTINUE and result.reply is None


async def test_submission_is_not_checked(resolver: Resolver, zone: Zone) -> None:
    result = await CheckStage(resolver, authserv_id=ID).run(inbound(MSG, role="submission"))
    assert result.headers == [("Authentication-Results", f"{ID};\r\n\tnone")]
    assert result.facts["spf"]["result"] == "none"
    assert zone.queries == []


async def test_only_configured_checks_run(resolver: Resolver, published: bytes,
                                          zone: Zone) -> None:
    stage = CheckStage(resolver, CheckConfig(checks=["spf"]), authserv_id=ID)
    result = await stage.run(inbound(sign(MSG, "example.com", "s1", published)))
    value = result.headers[0][1]
    assert "spf=pass" in value and "dkim" not in value and "dmarc" not in value
    assert result.facts["dkim"] == [] and result.facts["dmarc"]["result"] == "none"
    assert all(not name.startswith(("_dmarc", "s1._domainkey")) for name, _ in zone.queries)


async def test_dmarc_uses_dkim_even_when_dkim_is_not_reported(resolver: Resolver,
                                                              published: bytes) -> None:
    stage = CheckStage(resolver, CheckConfig(checks=["dmarc"]), authserv_id=ID)
    result = await stage.run(inbound(sign(MSG, "example.com", "s1", published),
                                     ip="198.51.100.1"))
    assert result.facts["dmarc"]["result"] == "pass"
    assert result.facts["dkim"] == []


async def test_checks_do_not_block_the_event_loop(dns_server: DnsTestServer) -> None:
    dns_server.zone.timeout("example.com")
    slow = Resolver([dns_server.hostport], timeout=1.5)
    task = asyncio.create_task(CheckStage(slow, authserv_id=ID).run(inbound(MSG)))
    await asyncio.sleep(0.05)  # the loop runs while the lookups wait
    assert not task.done()
    result = await task
    assert result.facts["spf"]["result"] == "temperror"


def test_from_config_uses_the_dns_section_and_hostname(tmp_path: Path,
                                                       dns_server: DnsTestServer) -> None:
    cfg = gconfig.defaults(tmp_path)
    cfg = cfg.model_copy(update={"hostname": "gw.example", "dns": gconfig.DnsConfig(
        nameservers=[dns_server.hostport], timeout=1.5)})
    stage = CheckStage.from_config(cfg)
    assert stage.authserv_id == "gw.example"
    assert stage.resolver.nameservers == [("127.0.0.1", dns_server.port)]
    assert stage.resolver.timeout == 1.5
    assert stage.resolver.cache is not None
    assert stage.resolver.executor is not None  # its own threads, not the loop's default
    stage.close()


def test_from_config_parses_the_public_suffix_list_at_start_up(tmp_path: Path) -> None:
    # The first message checked must not pay for parsing the list (about 50 ms).
    dmarc._psl.cache_clear()
    cfg = gconfig.defaults(tmp_path)
    stage = CheckStage.from_config(cfg, nameservers=["127.0.0.1:9"])
    assert dmarc._psl.cache_info().currsize == 1
    stage.close()


def test_from_config_leaves_the_list_alone_without_dmarc(tmp_path: Path) -> None:
    dmarc._psl.cache_clear()
    cfg = gconfig.defaults(tmp_path)
    cfg = cfg.model_copy(update={"check": CheckConfig(checks=["spf", "dkim"])})
    stage = CheckStage.from_config(cfg, nameservers=["127.0.0.1:9"])
    assert dmarc._psl.cache_info().currsize == 0
    stage.close()


def test_check_config_refuses_unknown_keys_and_bad_selectors() -> None:
    with pytest.raises(pydantic.ValidationError, match="extra"):
        CheckConfig.model_validate({"authserv_id": "x", "spf_strict": True})
    with pytest.raises(pydantic.ValidationError, match="selector"):
        CheckConfig.model_validate({"dkim_signing": {"example.com": {
            "selector": "a..b", "key_file": "k.pem"}}})
    with pytest.raises(pydantic.ValidationError):
        CheckConfig.model_validate({"checks": ["spf", "sender-id"]})


# --- DKIM signing stage ---------------------------------------------------------


async def test_sign_stage_signs_submission_with_the_from_domain_key(
        zone: Zone, resolver: Resolver) -> None:
    key = generate_key("rsa-sha256")
    zone.txt("out._domainkey.example.com", public_record(key))
    stage = DkimSignStage({"example.com": LoadedKey("out", key)})
    sub = MSG.replace(b"alice@example.com", b"alice@eu.example.com")
    result = await stage.run(inbound(sub, role="submission"))
    assert result.data is not None and result.data.startswith(b"DKIM-Signature:")
    assert result.facts == {"dkim_signed": {"domain": "example.com", "selector": "out"}}
    check = await CheckStage(resolver, CheckConfig(checks=["dkim"]), authserv_id=ID).run(
        inbound(result.data))
    assert check.facts["dkim"][0]["result"] == "pass"


async def test_sign_stage_leaves_inbound_and_unknown_domains_alone() -> None:
    stage = DkimSignStage({"example.com": LoadedKey("out", generate_key("ed25519-sha256"))})
    assert (await stage.run(inbound(MSG))).data is None
    other = MSG.replace(b"alice@example.com", b"alice@example.net")
    assert (await stage.run(inbound(other, role="submission"))).data is None


def test_sign_stage_from_config_reads_keys_relative_to_data_dir(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k.pem").write_bytes(generate_key("ed25519-sha256"))
    signing = {"example.com": SigningKey(selector="s", key_file=Path("keys/k.pem"))}
    stage = DkimSignStage.from_config(signing, lambda p: tmp_path / p)
    assert stage.key_for("mail.example.com") is not None
    with pytest.raises(DkimSignError, match="cannot read"):
        DkimSignStage.from_config(signing, lambda p: tmp_path / "missing" / p)


class _CountingExecutor(ThreadPoolExecutor):
    """The resolver's executor, counting the checks sent to a worker thread."""

    def __init__(self) -> None:
        super().__init__(2)
        self.jobs = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


async def test_cached_checks_run_inline_and_give_what_the_network_gave(
        dns_server: DnsTestServer, published: bytes) -> None:
    signed = sign(MSG, "example.com", "s1", published)
    executor = _CountingExecutor()
    r = Resolver([dns_server.hostport], timeout=0.5, cache=TtlCache(), executor=executor)
    try:
        cold = await CheckStage(r, authserv_id=ID).run(inbound(signed))
        assert executor.jobs == 3  # SPF, DKIM (key) and DMARC (record) needed the network
        queries = len(dns_server.zone.queries)
        warm = await CheckStage(r, authserv_id=ID).run(inbound(signed))
        assert executor.jobs == 3 and len(dns_server.zone.queries) == queries
    finally:
        executor.shutdown()
    assert (warm.facts, warm.headers, warm.reason) == (cold.facts, cold.headers, cold.reason)
    assert warm.facts["dkim"][0]["result"] == "pass"


async def test_a_check_missing_from_the_cache_runs_in_a_thread_the_others_inline(
        dns_server: DnsTestServer, published: bytes) -> None:
    signed = sign(MSG, "example.com", "s1", published)
    expected = await CheckStage(Resolver([dns_server.hostport], timeout=0.5),
                                authserv_id=ID).run(inbound(signed))
    executor = _CountingExecutor()
    r = Resolver([dns_server.hostport], timeout=0.5, cache=TtlCache(), executor=executor)
    try:
        # SPF's names only are cached; the DKIM key is not
        await CheckStage(r, CheckConfig(checks=["spf"]), authserv_id=ID).run(inbound(signed))
        before = executor.jobs
        result = await CheckStage(r, authserv_id=ID).run(inbound(signed))
        assert executor.jobs - before == 2  # DKIM (key) and DMARC (record); not SPF
    finally:
        executor.shutdown()
    assert (result.facts, result.headers) == (expected.facts, expected.headers)
