"""Settings of the encryption gateway (the ``crypto:`` section of coffer.yaml).

The lead adds one line to :class:`gateway.config.Config` (and the import
``from gateway.transform.config import CryptoConfig``)::

    crypto: CryptoConfig = Field(default_factory=CryptoConfig)

Paths are relative to ``data_dir`` (resolved with ``Config.path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _duration(value: Any) -> float:
    # Imported when a value is validated, not at import time: gateway.config
    # imports this module to build Config.
    from gateway.config import parse_duration

    return parse_duration(value)


Duration = Annotated[float, BeforeValidator(_duration)]


class _Model(BaseModel):
    # the same rules as gateway.config._Model (not imported: gateway.config imports us)
    model_config = ConfigDict(extra="forbid", frozen=True)


class CryptoConfig(_Model):
    keys_dir: Path = Field(
        Path("keys"), description="Key store: gpg keyring, certificates, org private keys"
    )
    gpg_binary: str = Field("gpg", description="The gpg executable (GnuPG 2.2 or later)")
    openssl_binary: str = Field(
        "openssl",
        description="The openssl executable (OpenSSL 3): encrypts outbound S/MIME, verifies "
        "inbound signatures, decrypts what cryptography cannot"
    )
    passphrase_file: Path | None = Field(
        None,
        description="File holding the passphrase of the organisation's private keys "
        "(mode 0600); required to sign, to decrypt inbound mail and to import PKCS#12",
    )
    prefer: Literal["pgp", "smime"] = Field(
        "pgp", description="Method tried first when the policy says encrypt/sign method auto"
    )
    smime_signing: Literal["detached", "opaque"] = Field(
        "detached",
        description="S/MIME signature form: detached (multipart/signed, RFC 8551 §3.5.3: "
        "readable without S/MIME) or opaque (signed-data, §3.5.2: survives relays that "
        "rewrite MIME, but only S/MIME clients can show it)",
    )
    protected_headers: bool = Field(
        False, description="RFC 9788: real Subject inside the encryption, a placeholder outside"
    )
    placeholder_subject: str = Field(
        "[...]", description="Outer Subject with protected headers (RFC 9788 §2.2.4)"
    )
    decrypt_inbound: bool = Field(
        True,
        description="Decrypt inbound PGP/MIME and S/MIME mail addressed to the organisation's "
        "keys, for the archive (the recipient still gets the ciphertext)",
    )
    verify_inbound: bool = Field(
        True, description="Verify inbound PGP and S/MIME signatures into policy facts"
    )
    smime_trust_anchors: Path | None = Field(
        None, description="PEM bundle of CA certificates trusted for inbound S/MIME signatures"
    )
    sign_as: str | None = Field(
        None,
        description="Address or domain whose organisation key signs; default: the envelope "
        "sender, then the sender's domain",
    )
    gpg_workers: int = Field(
        1, ge=1, le=32,
        description="gpg processes run at once (each call starts one); more only helps with "
        "idle cores: concurrent gpg processes contend on the keyring lock (bench/crypto.py)",
    )
    timeout: Duration = Field(120.0, description="Longest a single gpg/openssl call may take")
