"""The ``spam:`` section of coffer.yaml (gateway.config.Config holds it as ``spam``).

    spam:
      enabled: true
      roles: [inbound]                  # whose mail is scored
      thresholds: {quarantine: 6, reject: 15}
      symbols: {HTML_ONLY: 0.2, MISSING_DATE: 0}   # weight overrides (0: reported only)
      bayes:
        enabled: true
        db: spam/bayes.sqlite            # relative to data_dir
        min_learned: 50                  # of each class before it is trusted
      dnsbl:
        enabled: false                   # off by default: queries leave the host
        ip_zones:
          - {zone: zen.spamhaus.org, symbol: RBL_ZEN, weight: 4}
        uri_zones:
          - {zone: multi.uribl.com, symbol: URIBL_MULTI, weight: 3}
        max_uris: 20
      external:
        rspamd: {url: "http://127.0.0.1:11333", timeout: 5s, weight: 1.0}
        spamd: {address: "127.0.0.1:783", timeout: 5s, weight: 1.0}
        on_error: pass                   # or tempfail

DNS lookups use ``dns:`` (the resolver every check shares).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

_SYMBOL = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}


def _duration(value: Any) -> float:
    # the same spelling as gateway.config.Duration (not imported: config imports us)
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms or 5s")
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 5s)")
    return float(m.group(1)) * _UNITS[m.group(2)]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


def _size(value: Any) -> int:
    # the same spelling as gateway.config.Size
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512k or 1M")
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size (use e.g. 512k, 1M)")
    unit = (m.group(2) or "").lower()[:1]
    return int(float(m.group(1)) * {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit])


Duration = Annotated[float, BeforeValidator(_duration)]
Size = Annotated[int, BeforeValidator(_size)]
Role = Literal["inbound", "submission", "local"]


class _Model(BaseModel):
    # the same rules as gateway.config._Model (not imported: gateway.config imports us)
    model_config = ConfigDict(extra="forbid", frozen=True)


def _symbol_name(v: str) -> str:
    if not _SYMBOL.match(v):
        raise ValueError(f"{v!r} is not a symbol name (capitals, digits and _)")
    return v


class Thresholds(_Model):
    quarantine: float = Field(
        6.0, description="Score from which the verdict is spam (rspamd's add-header action)"
    )
    reject: float = Field(15.0, description="Score from which the action is reject")


class BayesConfig(_Model):
    enabled: bool = Field(True, description="Use the statistical classifier")
    db: Path = Field(Path("spam/bayes.sqlite"),
                     description="Token database (relative to data_dir)")
    min_learned: int = Field(
        50, ge=1, description="Messages of each class learned before the classifier is used"
    )


class DnsblZone(_Model):
    zone: str = Field(description="Blocklist zone, e.g. zen.spamhaus.org")
    symbol: str = Field(description="Symbol added when it lists the address or domain")
    weight: float = Field(3.0, description="Weight of the symbol")
    codes: dict[str, float] = Field(
        default_factory=dict,
        description="Answer address -> weight (e.g. 127.0.0.2: 4); other answers in "
        "127.0.0.0/8 get `weight`",
    )

    @field_validator("symbol")
    @classmethod
    def _symbol(cls, v: str) -> str:
        return _symbol_name(v)

    @field_validator("zone")
    @classmethod
    def _zone(cls, v: str) -> str:
        v = v.strip().strip(".").lower()
        if not v or any(not lbl or len(lbl) > 63 for lbl in v.split(".")):
            raise ValueError(f"{v!r} is not a DNS zone")
        return v


class DnsblConfig(_Model):
    enabled: bool = Field(False, description="Ask DNS blocklists (queries leave the host)")
    ip_zones: list[DnsblZone] = Field(
        default_factory=list, description="Blocklists of client IP addresses (RFC 5782 §2)"
    )
    uri_zones: list[DnsblZone] = Field(
        default_factory=list, description="Blocklists of domains found in links (RFC 5782 §3)"
    )
    max_uris: int = Field(20, ge=0, description="Distinct link domains looked up per message")


class RspamdConfig(_Model):
    url: str = Field("http://127.0.0.1:11333", description="rspamd's normal worker")
    timeout: Duration = Field(5.0, description="Time allowed for one scan")
    weight: float = Field(1.0, description="rspamd's score is multiplied by this")
    password: str | None = Field(None, description="Password header, if rspamd wants one")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^http://[^/\s]+(/\S*)?$", v):
            raise ValueError(f"{v!r} is not an http:// URL")
        return v.rstrip("/")


class SpamdConfig(_Model):
    address: str = Field("127.0.0.1:783", description="spamd's host:port")
    timeout: Duration = Field(5.0, description="Time allowed for one scan")
    weight: float = Field(1.0, description="SpamAssassin's score is multiplied by this")
    user: str | None = Field(None, description="User whose preferences spamd applies")


class ExternalConfig(_Model):
    rspamd: RspamdConfig | None = Field(None, description="Ask rspamd (null: no)")
    spamd: SpamdConfig | None = Field(None, description="Ask SpamAssassin's spamd (null: no)")
    on_error: Literal["pass", "tempfail"] = Field(
        "pass", description="A scanner timed out or failed: score without it, or answer 4xx"
    )


class SpamConfig(_Model):
    enabled: bool = Field(True, description="Score messages for spam")
    roles: list[Role] = Field(
        default_factory=lambda: list[Role](["inbound"]),
        description="Envelope roles whose mail is scored (outbound mail is not, by default)",
    )
    thresholds: Thresholds = Field(default_factory=Thresholds)
    symbols: dict[str, float] = Field(
        default_factory=dict, description="Symbol -> weight, overriding the built-in weights"
    )
    max_size: Size = Field(
        1024 * 1024, ge=1024, description="Only the first bytes of larger messages are scored"
    )
    bayes: BayesConfig = Field(default_factory=BayesConfig)
    dnsbl: DnsblConfig = Field(default_factory=DnsblConfig)
    external: ExternalConfig = Field(default_factory=ExternalConfig)

    @field_validator("symbols")
    @classmethod
    def _symbols(cls, v: dict[str, float]) -> dict[str, float]:
        for name in v:
            _symbol_name(name)
        return v


def spam_config_of(cfg: Any) -> SpamConfig:
    """Config.spam, or the defaults while Config has no ``spam`` section."""
    section = getattr(cfg, "spam", None)
    return section if isinstance(section, SpamConfig) else SpamConfig()
