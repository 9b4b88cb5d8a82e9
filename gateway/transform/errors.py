"""Errors of the encryption gateway (a branch of gateway.errors.CofferError).

    CryptoError                  anything the transform stage's crypto raises on purpose
    ├── MimeError                the message lacks the structure its Content-Type promises
    ├── KeyStoreError            a key file is unreadable, unsafe (permissions) or unusable
    ├── ToolError                gpg or openssl is missing, crashed or refused: retry later
    └── IntegrityError           decrypted data without integrity protection (EFAIL):
                                 the plaintext is thrown away, never used

The stage turns ToolError into TEMPFAIL (never plaintext), a missing recipient key
under ``require`` into a bounce, and KeyStoreError at start into a refusal to run.
"""

from __future__ import annotations

from gateway.errors import CofferError


class CryptoError(CofferError):
    """Base of the transform stage's crypto errors."""


class MimeError(CryptoError):
    """The message does not have the structure its Content-Type promises."""


class KeyStoreError(CryptoError):
    """A key or certificate cannot be imported, found or safely used."""


class ToolError(CryptoError):
    """gpg or openssl could not do what was asked (missing, crashed, refused)."""


class IntegrityError(CryptoError):
    """OpenPGP data without an MDC or AEAD: refused (EFAIL, CVE-2017-17688)."""
