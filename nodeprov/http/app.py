"""The ASGI app: routes, request ids, body limit (413), CORS, OpenAI-shaped errors; the server.

Middleware is plain ASGI (no per-request objects beyond a request id), so the API-key path
adds little to the payment pipeline's own cost and streams are never buffered.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nodeprov.errors import NodeprovError, RequestTooLarge, openai_error
from nodeprov.http.audio_routes import ROUTES as AUDIO_ROUTES
from nodeprov.http.billing import error_body_and_headers
from nodeprov.http.context import JSON, HttpContext, context
from nodeprov.http.info_routes import ROUTES as INFO_ROUTES
from nodeprov.http.landing import ROUTES as LANDING_ROUTES
from nodeprov.http.lightning_routes import ROUTES as LIGHTNING_ROUTES
from nodeprov.http.openai_routes import ROUTES as OPENAI_ROUTES
from nodeprov.http.server import bind, serve
from nodeprov.http.wallet_routes import ROUTES as WALLET_ROUTES
from nodeprov.observability import Metrics

logger = logging.getLogger(__name__)

__all__ = ["Guard", "bind", "create_app", "serve"]

EXPOSED_HEADERS = [
    "X-Cashu",
    "X-Cost-Msat",
    "X-Cost-Input-Msat",
    "X-Cost-Output-Msat",
    "X-Balance-Msat",
    "X-Request-Id",
]


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"the request body is larger than {limit} bytes")


class Guard:
    """Adds ``X-Request-Id``, enforces the body size limit, counts API requests in metrics."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics | None = None) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ("req_" + secrets.token_hex(8)).encode()
        started = time.perf_counter()
        metered = self.metrics is not None and scope["path"].startswith("/v1/")
        status, cost = 0, 0

        streaming = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, cost, streaming
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
                status = message["status"]
                for name, value in message["headers"]:
                    if name.lower() == b"x-cost-msat" and value.isdigit():
                        cost = int(value)
                    elif (
                        metered
                        and self.metrics is not None
                        and name.lower() == b"content-type"
                        and value.startswith(b"text/event-stream")
                    ):
                        streaming = True
                        self.metrics.stream_started()
            await send(message)
            final = message["type"] == "http.response.body" and not message.get("more_body")
            if metered and final and self.metrics is not None:
                model = scope.get("state", {}).get("model", "none")
                seconds = time.perf_counter() - started
                self.metrics.record_request("http", model, status, seconds, cost)

        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                body = _too_large(self.limit).to_openai()
                await JSON(body, status_code=413)(scope, receive, send_with_id)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _too_large(self.limit)
            return message

        try:
            await self.app(scope, limited, send_with_id)
        finally:
            if streaming and self.metrics is not None:  # also when the client left mid-stream
                self.metrics.stream_ended()


async def on_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, NodeprovError):
        body, headers = error_body_and_headers(context(request), exc)
        return JSON(body, status_code=exc.status, headers=headers)
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = openai_error("invalid_request_error", code, message)
        return JSON(body, status_code=exc.status_code, headers=exc.headers)
    if isinstance(exc, ClientDisconnect):
        # The client left (or was cut off) while its body was being read: nothing was held
        # yet, and no one is there to read an answer.
        logger.info("client gone while sending %s %s", request.method, request.url.path)
        return Response(status_code=400)
    logger.exception("unexpected error on %s", request.url.path, exc_info=exc)
    body = openai_error("server_error", "internal_error", "internal")
    return JSON(body, status_code=500)


def create_app(ctx: HttpContext, extra_routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The HTTP channel over ``ctx`` (built once; routes share it read-only).

    ``extra_routes`` adds the operator's pages (``/metrics``, ``/health``, ``/admin``).
    """
    http = ctx.config.http
    middleware = [Middleware(Guard, max_body_bytes=http.max_body_bytes, metrics=ctx.metrics)]
    if http.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(http.cors_origins),
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=["*"],
                expose_headers=EXPOSED_HEADERS,
            )
        )
    app = Starlette(
        routes=[
            *OPENAI_ROUTES,
            *AUDIO_ROUTES,
            *WALLET_ROUTES,
            *LIGHTNING_ROUTES,
            *INFO_ROUTES,
            *LANDING_ROUTES,
            *extra_routes,
        ],
        middleware=middleware,
        exception_handlers={NodeprovError: on_error, HTTPException: on_error, Exception: on_error},
    )
    app.state.ctx = ctx
    return app
