"""Coffer: a compliance-focused, encrypted, archiving SMTP mail gateway.

The message flow is receive -> check -> decide -> transform -> archive -> deliver;
each stage lives in the sub-package or module of the same name (see
docs/architecture.md).
"""

__version__ = "0.1.0"
