"""The archive's exception hierarchy.

    gateway.errors.CofferError
    └── ArchiveError                 every error the archive raises on purpose
        ├── KeyFileError             a key file is missing, unreadable, malformed or
        │                            group/world readable (refuse to start)
        ├── BlobNotFoundError        no blob with that SHA-256 in the store
        ├── BlobShreddedError        the blob's data key was destroyed (crypto-shredded)
        ├── BlobIntegrityError       a blob failed to decrypt or its hash does not match
        ├── LedgerError              the ledger cannot be read or appended to
        │   └── LedgerCorruptError   a ledger line is malformed or a link is broken
        ├── EscrowError              exporting keys to, or restoring them from, an
        │                            officer's OpenPGP escrow failed
        ├── MetadataError            the metadata database refused an operation (metadata.py)
        ├── FullTextError            a full-text engine failed (index/__init__.py)
        ├── QueryError               a search query is malformed; carries the column (query.py)
        ├── ObjectStoreError         S3 object storage (s3store.py)
        │   ├── ObjectStoreUnavailableError   unreachable: the gateway answers 4xx
        │   ├── ObjectLockedError             Object Lock refused a deletion
        │   └── BucketConfigError             bucket missing or without Object Lock
        └── ImapError                the IMAP server (imap/errors.py)
            ├── ParseError, MailboxError, AccountError

Subclasses live beside the code that raises them; this tree is their map.

Errors are translated at the edge: gateway.cli prints ``str(exc)`` on one line
and exits 1.  Messages name the file (or the blob hash / ledger seq) at fault.
"""

from __future__ import annotations

from gateway.errors import CofferError


class ArchiveError(CofferError):
    """Base of every error the archive raises on purpose."""


class KeyFileError(ArchiveError):
    """A key file is missing, malformed, or readable by group/others."""


class BlobNotFoundError(ArchiveError):
    """No blob with the requested SHA-256 exists in the store."""


class BlobShreddedError(ArchiveError):
    """The blob's wrapped data key was destroyed: its content is gone for good."""


class BlobIntegrityError(ArchiveError):
    """The blob failed authenticated decryption or its plaintext hash does not match."""


class LedgerError(ArchiveError):
    """The ledger cannot be read or appended to."""


class LedgerCorruptError(LedgerError):
    """A ledger line is malformed, or its hash chain is broken."""


class EscrowError(ArchiveError):
    """Key escrow failed: gpg error, unknown recipient, or a bundle that does not fit."""
