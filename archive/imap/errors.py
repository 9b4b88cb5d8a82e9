"""The IMAP server's exceptions.

    archive.errors.ArchiveError
    └── ImapError                  every error the IMAP package raises on purpose
        ├── ParseError             a command does not match the RFC 3501 grammar (-> BAD)
        ├── MailboxError           no such mailbox / not allowed (-> NO [NONEXISTENT])
        ├── AccountError           a user account operation failed (CLI: one line, exit 1)
        └── UpstreamError          imap.upstream is misconfigured (CLI/serve: one line)
            └── UpstreamUnavailable  the upstream IMAP/LDAP server cannot be asked now
                                     (-> NO [UNAVAILABLE], never a login)
"""

from __future__ import annotations

from archive.errors import ArchiveError


class ImapError(ArchiveError):
    """Base of every error raised on purpose by archive.imap."""


class ParseError(ImapError):
    """The command is malformed; ``tag`` is set once the tag has been read."""

    def __init__(self, reason: str, tag: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tag = tag


class MailboxError(ImapError):
    """The mailbox does not exist for this principal (we never say "exists but not yours")."""


class AccountError(ImapError):
    """A user account cannot be created, changed or found."""


class UpstreamError(ImapError):
    """The upstream authentication server is misconfigured."""


class UpstreamUnavailable(UpstreamError):
    """The upstream server could not be asked (outage, timeout, TLS, refused service)."""
