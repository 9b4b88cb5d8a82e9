"""The reports package's exception hierarchy.

    gateway.errors.CofferError
    └── ReportError                 every error reports/ raises on purpose
        ├── ExportError             an export cannot be written or resumed
        ├── PackageError            an export package cannot be read at all
        │                           (no manifest, unreadable signature or key)
        ├── BackupError             a backup cannot be made or restored
        └── RebuildError            the metadata cannot be rebuilt from store + ledger

Tampering found by ``coffer export verify`` is not an exception: it is a list of
findings and exit code 1.  gateway.cli prints ``str(exc)`` on one line.
"""

from __future__ import annotations

from gateway.errors import CofferError


class ReportError(CofferError):
    """Base of every error the reports package raises on purpose."""


class ExportError(ReportError):
    """An export package cannot be written or resumed."""


class PackageError(ReportError):
    """An export package is unreadable as a whole (no manifest, key or signature)."""


class BackupError(ReportError):
    """A backup cannot be created or restored."""


class RebuildError(ReportError):
    """The metadata database cannot be rebuilt from the store and the ledger."""
