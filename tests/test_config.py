"""Configuration mistakes are reported with file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import config
from gateway.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "coffer.yaml"
    p.write_text(text)
    return p


def _error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.load(_write(tmp_path, text))
    return info.value


MINIMAL = "listeners:\n  - name: in\n    tls: none\n"


def test_minimal_config_loads_with_documented_defaults(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, MINIMAL))
    assert cfg.limits.max_message_size == 36700160
    assert cfg.queue.max_age == 5 * 86400
    assert cfg.data_dir == tmp_path.resolve()
    assert cfg.listeners[0].host_port == ("127.0.0.1", 2525)


def test_durations_and_sizes_accept_units(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, MINIMAL + "queue:\n  max_age: 2d\n  retry_initial: 90s\n"
                             "limits:\n  max_message_size: 10M\n"))
    assert cfg.queue.max_age == 172800
    assert cfg.queue.retry_initial == 90
    assert cfg.limits.max_message_size == 10 * 1024 * 1024


def test_unknown_key_names_file_line_and_key(tmp_path: Path) -> None:
    err = _error(tmp_path, MINIMAL + "limits:\n  max_recipients: 5\n  max_recipeints: 7\n")
    assert err.key == "limits.max_recipeints"
    assert err.line == 6
    assert err.file is not None and err.file.endswith("coffer.yaml")
    assert "unknown key" in str(err)


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    err = _error(tmp_path, MINIMAL + "limits:\n  max_recipients: many\n")
    assert err.key == "limits.max_recipients"
    assert err.line == 5


def test_bad_duration_explains_the_format(tmp_path: Path) -> None:
    err = _error(tmp_path, MINIMAL + "queue:\n  max_age: forever\n")
    assert err.key == "queue.max_age" and "duration" in err.message


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    err = _error(tmp_path, "hostname: [unclosed\nlimits: {}\n")
    assert err.line is not None and "invalid YAML" in err.message


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    err = _error(tmp_path, MINIMAL + "hostname: a\nhostname: b\n")
    assert err.key == "hostname" and err.line == 5


def test_bad_route_is_located(tmp_path: Path) -> None:
    err = _error(tmp_path, MINIMAL + "delivery:\n  routes:\n    example.com: ftp://x\n")
    assert err.key == "delivery.routes.example.com" and err.line == 6


def test_missing_delivery_ca_file_is_located(tmp_path: Path) -> None:
    err = _error(tmp_path, MINIMAL + "delivery:\n  mta_sts: true\n  ca_file: certs/ca.pem\n")
    assert err.key == "delivery.ca_file" and err.line == 6
    assert "no such file" in err.message


def test_mta_sts_is_on_by_default(tmp_path: Path) -> None:
    assert config.load(_write(tmp_path, MINIMAL)).delivery.mta_sts is True


def test_tls_without_certificate_is_refused_with_a_hint(tmp_path: Path) -> None:
    err = _error(tmp_path, "listeners:\n  - name: in\n    tls: starttls\n")
    assert err.key == "listeners.0.tls" and "coffer init" in err.message


def test_bad_trusted_network_is_located(tmp_path: Path) -> None:
    err = _error(tmp_path, MINIMAL + "relay:\n  trusted_networks: [10.0.0.0/8, nonsense]\n")
    assert err.key == "relay.trusted_networks.1"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "absent.yaml")


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("1.5h", 5400),
                                               (" 7 d", 604800), (12, 12)])
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("512k", 524288), ("10M", 10485760),
                                            ("1GiB", 1 << 30), (100, 100)])
def test_parse_size(text: str | int, size: int) -> None:
    assert config.parse_size(text) == size


def test_a_bad_rate_names_file_line_and_key(tmp_path: Path) -> None:
    err = _error(tmp_path, MINIMAL + "rate_limits:\n  - key: auth_user\n"
                 "    messages: 500/1x\n")
    assert err.key == "rate_limits.0.messages" and err.line == 6
    assert err.file is not None and err.file.endswith("coffer.yaml")
    assert "500/1x" in err.message and "COUNT/DURATION" in err.message


def test_rate_limits_parse_and_default_to_submission_users(tmp_path: Path) -> None:
    [default] = config.load(_write(tmp_path, MINIMAL)).rate_limits
    assert (default.key, default.roles) == ("auth_user", ["submission"])
    assert (default.message_rate, default.recipient_rate) == ((500, 3600.0), (2000, 3600.0))
    cfg = config.load(_write(tmp_path, MINIMAL + "rate_limits:\n  - key: client_ip\n"
                             "    messages: 100/1m\n    listeners: [in]\n"))
    assert cfg.rate_limits[0].message_rate == (100, 60.0)
    assert config.load(_write(tmp_path, MINIMAL + "rate_limits: []\n")).rate_limits == []


def test_rate_rule_mistakes_name_the_key(tmp_path: Path) -> None:
    err = _error(tmp_path, MINIMAL + "rate_limits:\n  - key: client_ip\n")
    assert err.key == "rate_limits.0" and "messages, recipients" in err.message
    err = _error(tmp_path, MINIMAL + "rate_limits:\n  - key: client_ip\n    messages: 1/1m\n"
                 "    listeners: [nope]\n")
    assert err.key == "rate_limits.0.listeners.0" and err.line == 7
    err = _error(tmp_path, MINIMAL + "rate_limits:\n  - {key: client_ip, messages: 1/1m}\n"
                 "  - {key: client_ip, messages: 9/1h}\n")
    assert err.key == "rate_limits.1.name" and "named 'client_ip'" in err.message
    err = _error(tmp_path, MINIMAL + "rate_limits:\n  - key: client_ip\n    messages: 1/1m\n"
                 "    exempt_networks: [10.0.0.0/33]\n")
    assert err.key == "rate_limits.0.exempt_networks.0"


def test_journal_is_off_by_default_and_takes_trusted_and_authenticated_sources(
        tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, MINIMAL))
    assert cfg.archive.journal.addresses == []
    assert cfg.archive.journal.sources == ["trusted_networks", "authenticated"]
    cfg = config.load(_write(tmp_path, MINIMAL + "archive:\n  journal:\n"
                             "    addresses: [Journal@Corp.Example]\n"))
    assert cfg.archive.journal.addresses == ["journal@corp.example"]


@pytest.mark.parametrize(("text", "key", "why"), [
    ("    addresses: [journal]\n", "archive.journal.addresses", "not an address"),
    ("    sources: [trusted, 10.0.0.0/8]\n", "archive.journal.sources",
     "neither trusted_networks, authenticated nor a CIDR"),
    ("    retention: seven years\n", "archive.journal.retention", "not a retention period"),
])
def test_bad_journal_setting_is_located(tmp_path: Path, text: str, key: str, why: str) -> None:
    err = _error(tmp_path, MINIMAL + "archive:\n  journal:\n" + text)
    assert err.key == key and why in err.message
    assert err.line == 6  # the line of the key in the file (1-based)


def test_a_tls_report_sender_that_is_no_address_is_located(tmp_path: Path) -> None:
    # It becomes the reports' envelope sender: a mistake must stop the start, not every
    # report a day later.
    err = _error(tmp_path, MINIMAL + "delivery:\n  tls_rpt:\n    from: noreply\n")
    assert err.key == "delivery.tls_rpt.from" and "not an address" in err.message
    assert err.line == 6
