"""The HTTP channel: an OpenAI-compatible API paid with Cashu, plus wallet and info routes.

:func:`http_service` is one of the daemon's services; it serves the app over the core.
"""

from __future__ import annotations

import asyncio

from nodeprov.daemon import Core
from nodeprov.http.app import bind, create_app, serve
from nodeprov.http.context import HttpContext
from nodeprov.upstream import Upstreams

__all__ = ["HttpContext", "create_app", "http_context", "http_service"]


def http_context(core: Core, upstreams: Upstreams, npub: str | None = None) -> HttpContext:
    """The routes' wiring over the daemon's core."""
    return HttpContext(core.config, core.payments, upstreams, npub)


async def http_service(core: Core, stop: asyncio.Event) -> None:
    """A daemon service: the HTTP API on ``http.host:http.port`` until ``stop``."""
    app = create_app(http_context(core, core.upstreams, core.npub))
    await serve(app, bind(core.config.http.host, core.config.http.port), stop)
