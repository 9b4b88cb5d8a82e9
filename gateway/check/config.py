"""The ``check:`` section of coffer.yaml: sender authentication and DKIM/ARC keys.

Kept beside the checks (rather than in gateway/config.py) so that the section
and the code that reads it change together; gateway.config.Config holds it as
``check: CheckConfig``.  DNS settings are Config.dns, shared with delivery.

    check:
      authserv_id: mx.example.com        # default: hostname
      checks: [spf, dkim, dmarc, arc]
      multiple_from: fail                # or reject
      dkim_signing:
        example.com: {selector: s2026, key_file: keys/example.com.s2026.key}
      arc_sealing: {domain: example.com, selector: arc2026, key_file: keys/arc.key}
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

CheckName = Literal["spf", "dkim", "dmarc", "arc"]
ALL_CHECKS: tuple[CheckName, ...] = ("spf", "dkim", "dmarc", "arc")


class _Model(BaseModel):
    # the same rules as gateway.config._Model (not imported: gateway.config imports us)
    model_config = ConfigDict(extra="forbid", frozen=True)


class SigningKey(_Model):
    selector: str = Field(description="DKIM selector (the s= tag; DNS name SELECTOR._domainkey)")
    key_file: Path = Field(
        description="PEM private key, RSA or Ed25519 (relative to data_dir); "
        "`coffer dkim keygen` writes one"
    )

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        # RFC 6376 §3.1: a selector is one or more DNS labels
        if not v or any(not lbl or len(lbl) > 63 for lbl in v.split(".")):
            raise ValueError(f"{v!r} is not a valid selector")
        return v


class ArcSealingConfig(_Model):
    domain: str = Field(description="d= of the ARC-Seal and ARC-Message-Signature")
    selector: str = Field(description="s= of the ARC set")
    key_file: Path = Field(description="PEM private key (relative to data_dir)")


class CheckConfig(_Model):
    authserv_id: str | None = Field(
        None, description="authserv-id of the Authentication-Results we add (default: hostname)"
    )
    checks: list[CheckName] = Field(
        default_factory=lambda: list(ALL_CHECKS),
        description="Sender-authentication checks to run on every message",
    )
    multiple_from: Literal["fail", "reject"] = Field(
        "fail", description="DMARC for a message with several or no From addresses: fail, "
        "or fail with disposition reject"
    )
    dkim_min_key_bits: int = Field(
        1024, ge=1024, description="Shortest RSA key accepted (RFC 8301 §3.2: at least 1024)"
    )
    dns_cache_entries: int = Field(10000, ge=0, description="DNS answers cached (0: no cache)")
    threads: int = Field(
        32, ge=1, le=512,
        description="Worker threads for the blocking SPF/DKIM/DMARC lookups (messages "
        "checked at once while waiting on DNS)",
    )
    dkim_signing: dict[str, SigningKey] = Field(
        default_factory=dict, description="Sending domain -> DKIM selector and key"
    )
    arc_sealing: ArcSealingConfig | None = Field(
        None, description="Seal outbound mail with an ARC set (null: off)"
    )

    def enabled(self, check: CheckName) -> bool:
        return check in self.checks
