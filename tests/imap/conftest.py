"""Fixtures for the IMAP tests (see imap_helpers)."""

from imap_helpers import mem_backend, server, tls

__all__ = ["mem_backend", "server", "tls"]
