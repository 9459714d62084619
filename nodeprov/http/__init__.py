"""The HTTP channel: an OpenAI-compatible API paid with Cashu, plus wallet and info routes.

:func:`http_service` is one of the daemon's services; it serves the app over the core.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute, Mount

from nodeprov.core.lightning_funding import LightningFunding
from nodeprov.core.node import Core, Service
from nodeprov.http.admin import build_admin_app
from nodeprov.http.app import create_app
from nodeprov.http.context import HttpContext
from nodeprov.http.server import bind, serve
from nodeprov.observability import HealthProbes, ops_routes
from nodeprov.upstream import Upstreams

__all__ = [
    "HttpContext",
    "create_app",
    "http_context",
    "http_service",
    "listening_http_service",
]


def http_context(core: Core, upstreams: Upstreams, npub: str | None = None) -> HttpContext:
    """The routes' wiring over the daemon's core."""
    return HttpContext(
        core.config,
        core.payments,
        upstreams,
        npub,
        metrics=core.metrics,
        funding=LightningFunding(
            core.wallet,
            max_sat=core.config.wallet.lightning_max_sat,
            max_open=core.config.wallet.lightning_max_open_quotes,
        ),
    )


def operator_routes(core: Core) -> list[BaseRoute]:
    """``/metrics``, ``/health`` and the admin dashboard at ``/admin``."""

    def relays() -> dict[str, Any]:
        status = core.relay_status() if core.relay_status else {}
        return {
            url: {"ok": bool(s.get("connected")), "last_error": s.get("last_error")}
            for url, s in status.items()
        }

    probes = HealthProbes(
        relays=relays if core.config.nostr.relays else None, upstreams=core.upstreams.check
    )
    return [
        *ops_routes(core, core.metrics, probes),
        Mount("/admin", app=build_admin_app(core, core.config, metrics=core.metrics)),
    ]


async def http_service(
    core: Core, stop: asyncio.Event, socks: Sequence[socket.socket] = ()
) -> None:
    """A daemon service: the HTTP API on ``socks`` (else ``http.host:http.port``) until
    ``stop``."""
    app = create_app(http_context(core, core.upstreams, core.npub), operator_routes(core))
    http = core.config.http
    first, *more = socks or [bind(http.host, http.port)]
    await serve(app, first, stop, http, more=more)


def listening_http_service(socks: Sequence[socket.socket]) -> Service:
    """:func:`http_service` on sockets bound before the daemon built anything."""

    async def http_service_on(core: Core, stop: asyncio.Event) -> None:
        await http_service(core, stop, socks)

    http_service_on.__name__ = http_service.__name__
    return http_service_on
