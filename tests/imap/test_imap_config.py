"""The ``imap:`` section of coffer.yaml: defaults, located mistakes, the server settings it
makes, and the embedded server `coffer serve` starts from it."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from archive.facade import Archive
from archive.imap.config import ImapSection
from archive.imap.embedded import EmbeddedImap
from archive.imap.server import ImapConfig
from archive.metadata import Metadata
from gateway import config
from gateway.cli.init import write_self_signed
from gateway.errors import ConfigError
from gateway.preflight import preflight


def _load(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "coffer.yaml"
    p.write_text("listeners:\n  - {name: in, tls: none}\n" + text)
    return config.load(p)


def test_defaults_are_the_servers_own_on_127_0_0_1_port_1143() -> None:
    section = config.Config().imap
    assert section.enabled and section.tls == "starttls"
    assert not section.allow_plaintext_loopback
    assert section.server_config(None) == ImapConfig()


def test_settings_map_onto_the_server_config(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "imap:\n  address: '[::1]:1993'\n  tls: implicit\n"
                "  allow_plaintext_loopback: true\n  select_read_only: false\n"
                "  idle_timeout: 1h\n  max_literal: 2M\n  max_login_failures_per_ip: 7\n")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server = cfg.imap.server_config(ctx)
    assert (server.host, server.port, server.tls, server.implicit_tls) == ("::1", 1993, ctx, True)
    assert server.allow_plaintext_loopback and not server.select_read_only
    assert (server.idle_timeout, server.max_literal) == (3600.0, 2 * 1024 * 1024)
    assert cfg.imap.throttle().per_ip == 7
    # tls: none never offers STARTTLS, whatever certificate the gateway has.
    assert ImapSection(tls="none").server_config(ctx).tls is None


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("imap:\n  address: 'host:port'\n", "imap.address", "port is not a number"),
        ("imap:\n  idle_timeout: 5m\n", "imap.idle_timeout", "greater than or equal to 1800"),
        ("imap:\n  max_literal: lots\n", "imap.max_literal", "not a size"),
        ("imap:\n  tls: maybe\n", "imap.tls", "'starttls', 'implicit' or 'none'"),
        ("imap:\n  enable: true\n", "imap.enable", "unknown key"),
    ],
)
def test_a_mistake_names_file_line_and_key(tmp_path: Path, text: str, key: str,
                                           message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, text)
    assert exc.value.key == key and exc.value.line == 4
    assert message in exc.value.message


def test_implicit_tls_without_a_certificate_fails_the_preflight(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "imap:\n  tls: implicit\n")
    with pytest.raises(ConfigError) as exc:
        preflight(cfg)
    assert exc.value.key == "imap.tls" and "tls.cert" in exc.value.message
    preflight(_load(tmp_path, "imap:\n  tls: implicit\n  enabled: false\n"))


async def _greeting(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_embedded_server_without_a_certificate_offers_no_starttls_and_no_login(
    tmp_path: Path,
) -> None:
    cfg = _load(tmp_path, "imap:\n  address: '127.0.0.1:0'\n")
    meta = Metadata.for_data_dir(cfg.data_dir)
    meta.migrate()
    archive = Archive.open(cfg.data_dir)
    try:
        imap = await EmbeddedImap.start(cfg, archive, meta)
        port = imap.server.port
        greeting = await _greeting(port)
        # Credentials never cross in clear: no TLS to offer, and loopback plaintext is off.
        assert b"LOGINDISABLED" in greeting and b"STARTTLS" not in greeting
        await imap.close()
        with pytest.raises(OSError):
            await _greeting(port)
    finally:
        archive.close()
        meta.close()


async def test_embedded_server_offers_starttls_with_the_gateways_certificate(
    tmp_path: Path,
) -> None:
    write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", "localhost", [])
    cfg = _load(tmp_path, "tls: {cert: cert.pem, key: key.pem}\n"
                "imap:\n  address: '127.0.0.1:0'\n  allow_plaintext_loopback: true\n")
    meta = Metadata.for_data_dir(cfg.data_dir)
    meta.migrate()
    archive = Archive.open(cfg.data_dir)
    try:
        imap = await EmbeddedImap.start(cfg, archive, meta)
        try:
            greeting = await _greeting(imap.server.port)
            assert b"STARTTLS" in greeting and b"AUTH=PLAIN" in greeting
        finally:
            await imap.close()
    finally:
        archive.close()
        meta.close()
