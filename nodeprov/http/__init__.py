"""The HTTP channel: an OpenAI-compatible API paid with Cashu, plus wallet and info routes.

Plug into the daemon with ``daemon.run(config, stop, services=(*CORE_SERVICES, http_service))``.
"""

from __future__ import annotations

import asyncio

from nodeprov.daemon import Core
from nodeprov.http.app import bind, create_app, serve
from nodeprov.http.audio_routes import audio_payments
from nodeprov.http.context import HttpContext
from nodeprov.upstream import Upstreams

__all__ = ["HttpContext", "create_app", "http_context", "http_service"]


def http_context(core: Core, upstreams: Upstreams, npub: str | None = None) -> HttpContext:
    """The routes' wiring over the daemon's core."""
    return HttpContext(core.config, core.payments, upstreams, audio_payments(core.payments), npub)


async def http_service(core: Core, stop: asyncio.Event) -> None:
    """A daemon service: the HTTP API on ``http.host:http.port`` until ``stop``."""
    upstreams = Upstreams.from_config(core.config)
    try:
        await upstreams.start()
        app = create_app(http_context(core, upstreams))
        await serve(app, bind(core.config.http.host, core.config.http.port), stop)
    finally:
        await upstreams.aclose()
