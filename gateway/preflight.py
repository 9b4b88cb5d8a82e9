"""Checks a loaded configuration needs beyond its schema: files exist, TLS loads.

:func:`gateway.config.load` validates types and values; this module checks what
only the file system can tell (the TLS pair loads, the password file exists, the
policy file exists and is a valid policy) and what the metrics endpoint may
bind to.  ``coffer check-config`` and ``coffer serve`` (at start and on every
SIGHUP) run the same checks, so a file that checks clean is a file that starts.
Every error names file, line and key.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import yamlsource
from gateway.config import Config
from gateway.errors import ConfigError
from gateway.metrics_http import endpoint
from gateway.receive.recipients import load_recipient_list


def config_error(cfg: Config, path: Sequence[str | int], message: str) -> ConfigError:
    """A ConfigError pointing at ``path`` in the file ``cfg`` was loaded from."""
    try:
        _, loc = yamlsource.load(Path(cfg.source))
    except ConfigError:
        return ConfigError(message, file=cfg.source, key=".".join(map(str, path)) or None)
    return loc.error(path, message)


def preflight(cfg: Config) -> None:
    """Raise ConfigError (located) for the first problem found."""
    if cfg.tls.cert or cfg.tls.key:
        if not (cfg.tls.cert and cfg.tls.key):
            missing = "key" if cfg.tls.cert else "cert"
            raise config_error(cfg, ["tls"], f"tls.{missing} must be set with the other")
        for key in ("cert", "key"):
            p = cfg.path(getattr(cfg.tls, key))
            if not p.is_file():
                raise config_error(cfg, ["tls", key], f"{p}: no such file")
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cfg.path(cfg.tls.cert), cfg.path(cfg.tls.key))
        except (ssl.SSLError, OSError) as exc:
            raise config_error(
                cfg, ["tls", "cert"], f"certificate and key do not load as a pair: {exc}"
            ) from None
    if cfg.auth.passwd_file is not None:
        p = cfg.path(cfg.auth.passwd_file)
        if not p.is_file():
            raise config_error(cfg, ["auth", "passwd_file"], f"{p}: no such file")
    if cfg.relay.recipients.file is not None:
        p = cfg.path(cfg.relay.recipients.file)
        if not p.is_file():
            raise config_error(cfg, ["relay", "recipients", "file"], f"{p}: no such file")
        # A bad line is located in the list file itself, like a policy mistake.
        load_recipient_list(p)
    if cfg.policy is not None:
        p = cfg.path(cfg.policy)
        if not p.is_file():
            raise config_error(cfg, ["policy"], f"{p}: no such file")
        # A policy mistake is located in the policy file (policies.errors.PolicyError
        # is a ConfigError): the operator is sent to the rule, not to coffer.yaml.
        from policies.loader import check_policy

        problems = check_policy(p)
        if problems:
            raise problems[0]
    if cfg.imap.enabled and cfg.imap.tls == "implicit" and not cfg.tls.cert:
        raise config_error(cfg, ["imap", "tls"], "implicit TLS needs tls.cert and tls.key")
    if cfg.metrics.address is not None:
        try:
            endpoint(cfg.metrics.address)
        except ValueError as exc:
            raise config_error(cfg, ["metrics", "address"], str(exc)) from None


def summary(cfg: Config) -> dict[str, Any]:
    """What an operator wants to see after a clean check (JSON-friendly)."""
    recipients = cfg.relay.recipients
    return {
        "file": cfg.source,
        "hostname": cfg.hostname,
        "data_dir": str(cfg.data_dir),
        "listeners": [
            {"name": lst.name, "role": lst.role, "address": lst.address, "tls": lst.tls,
             "auth_required": lst.auth_required}
            for lst in cfg.listeners
        ],
        "local_domains": list(cfg.relay.local_domains),
        "trusted_networks": list(cfg.relay.trusted_networks),
        "recipients": {
            "file": str(cfg.path(recipients.file)) if recipients.file else None,
            "verify": recipients.verify, "undetermined": recipients.undetermined,
        },
        "routes": dict(cfg.delivery.routes),
        "workers": cfg.queue.workers,
        "fsync": cfg.queue.fsync,
        "metrics": cfg.metrics.address,
        "policy": str(cfg.path(cfg.policy)) if cfg.policy else None,
        "log": {"level": cfg.log.level, "format": cfg.log.format,
                "file": str(cfg.path(cfg.log.file)) if cfg.log.file else None},
    }
