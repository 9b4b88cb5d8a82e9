"""Where a recipient's mail goes next (pure logic).

Route specifications, as written in ``delivery.routes``::

    mx                                   look up the domain's MX records (RFC 5321 §5.1)
    smtp://host:port?tls=required        a smarthost or per-domain next hop;
                                         tls = required | opportunistic (default) | off
    smtps://host:port                    implicit TLS to the next hop
    maildir:PATH                         local delivery into PATH/<recipient>/ (Maildir)

Keys are a domain (``example.com``), a parent-domain wildcard (``.example.com``
matches every subdomain), or ``*`` for everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from gateway.errors import CofferError

TlsMode = Literal["required", "opportunistic", "off", "implicit"]


class RouteError(CofferError):
    pass


@dataclass(frozen=True, slots=True)
class SmtpRoute:
    host: str
    port: int = 25
    tls: TlsMode = "opportunistic"

    @property
    def key(self) -> str:
        return f"smtp:{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class MxRoute:
    tls: TlsMode = "opportunistic"


@dataclass(frozen=True, slots=True)
class MaildirRoute:
    path: Path

    @property
    def key(self) -> str:
        return f"maildir:{self.path}"


Route = SmtpRoute | MxRoute | MaildirRoute


def parse_route(spec: str) -> Route:
    spec = spec.strip()
    if spec == "mx":
        return MxRoute()
    if spec.startswith("maildir:"):
        path = spec[len("maildir:") :]
        if not path:
            raise RouteError("maildir: needs a path")
        return MaildirRoute(Path(path))
    parts = urlsplit(spec)
    if parts.scheme in ("smtp", "smtps"):
        if not parts.hostname:
            raise RouteError(f"{spec!r}: missing host")
        try:
            port = parts.port or (465 if parts.scheme == "smtps" else 25)
        except ValueError:
            raise RouteError(f"{spec!r}: bad port") from None
        query = parse_qs(parts.query)
        tls = query.pop("tls", ["opportunistic"])[-1]
        if query:
            raise RouteError(f"{spec!r}: unknown option {next(iter(query))!r}")
        if parts.scheme == "smtps":
            tls = "implicit"
        if tls not in ("required", "opportunistic", "off", "implicit"):
            raise RouteError(f"{spec!r}: tls must be required, opportunistic or off")
        return SmtpRoute(parts.hostname, port, tls)  # type: ignore[arg-type]
    raise RouteError(f"{spec!r}: expected mx, smtp://host:port, smtps://host:port or maildir:PATH")


def parse_routes(specs: dict[str, str], base: Path) -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for key, spec in specs.items():
        route = parse_route(spec)
        if isinstance(route, MaildirRoute) and not route.path.is_absolute():
            route = MaildirRoute(base / route.path)
        routes[key.lower().rstrip(".")] = route
    return routes


def select_route(routes: dict[str, Route], domain: str) -> Route | None:
    """The route for a recipient domain: exact, then nearest '.parent', then '*'."""
    domain = domain.lower().rstrip(".")
    if domain in routes:
        return routes[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        wildcard = "." + ".".join(labels[i:])
        if wildcard in routes:
            return routes[wildcard]
    return routes.get("*")
