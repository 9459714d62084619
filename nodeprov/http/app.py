"""The ASGI app: routes, request ids, body limit (413), CORS, OpenAI-shaped errors; the server.

Middleware is plain ASGI (no per-request objects beyond a request id), so the API-key path
adds little to the payment pipeline's own cost and streams are never buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from nodeprov.errors import NodeprovError, RequestTooLarge
from nodeprov.http import (
    audio_routes,
    info_routes,
    lightning_routes,
    openai_routes,
    wallet_routes,
)
from nodeprov.http.billing import error_body_and_headers
from nodeprov.http.context import JSON, HttpContext, context
from nodeprov.observability import Metrics

logger = logging.getLogger(__name__)

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

        async def send_with_id(message: Message) -> None:
            nonlocal status, cost
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
                status = message["status"]
                for name, value in message["headers"]:
                    if name.lower() == b"x-cost-msat" and value.isdigit():
                        cost = int(value)
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

        await self.app(scope, limited, send_with_id)


async def on_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, NodeprovError):
        body, headers = error_body_and_headers(context(request), exc)
        return JSON(body, status_code=exc.status, headers=headers)
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = {"error": {"type": "invalid_request_error", "code": code, "message": message}}
        return JSON(body, status_code=exc.status_code, headers=exc.headers)
    if isinstance(exc, ClientDisconnect):
        # The client left (or was cut off) while its body was being read: nothing was held
        # yet, and no one is there to read an answer.
        logger.info("client gone while sending %s %s", request.method, request.url.path)
        return Response(status_code=400)
    logger.exception("unexpected error on %s", request.url.path, exc_info=exc)
    body = {"error": {"type": "server_error", "code": "internal_error", "message": "internal"}}
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
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                expose_headers=EXPOSED_HEADERS,
            )
        )
    app = Starlette(
        routes=[
            *openai_routes.ROUTES,
            *audio_routes.ROUTES,
            *wallet_routes.ROUTES,
            *lightning_routes.ROUTES,
            *info_routes.ROUTES,
            *extra_routes,
        ],
        middleware=middleware,
        exception_handlers={NodeprovError: on_error, HTTPException: on_error, Exception: on_error},
    )
    app.state.ctx = ctx
    return app


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers and a limit on
    pauses while its body arrives.

    uvicorn times out idle keep-alive connections only after a first response, and every
    byte received resets that timer: a client that connects and trickles a request line
    (slowloris) holds a socket for ever. Here a connection must deliver a request's complete
    headers within ``header_timeout`` seconds of connecting (or of the request's first byte
    on a kept-alive connection), however slowly the bytes arrive; and once the headers are
    in, the body may not pause for more than ``body_idle_timeout`` seconds (a request that
    announces a body and never sends it). Either way the connection is closed; nothing has
    been held or charged yet, since every route reads its body first.
    """

    header_timeout: float = 10.0
    body_idle_timeout: float = 30.0
    _header_deadline: asyncio.TimerHandle | None = None
    _body_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()
        self._arm_body_deadline()  # disarmed at once by on_message_complete if no body

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm_body_deadline()

    def on_message_complete(self) -> None:
        self._disarm_body_deadline()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        self._disarm_body_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._late)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _arm_body_deadline(self) -> None:
        self._disarm_body_deadline()
        self._body_deadline = self.loop.call_later(self.body_idle_timeout, self._body_late)

    def _disarm_body_deadline(self) -> None:
        if self._body_deadline is not None:
            self._body_deadline.cancel()
            self._body_deadline = None

    def _body_late(self) -> None:
        self._body_deadline = None
        if self.flow is not None and self.flow.read_paused:
            # The server stopped reading (the app has not taken the body yet): not the
            # client's pause.
            self._arm_body_deadline()
            return
        self._late()

    def _late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def timeout_protocol(
    header_seconds: float, body_idle_seconds: float
) -> type[HeaderTimeoutProtocol]:
    """:class:`HeaderTimeoutProtocol` with its limits set."""
    limits = {"header_timeout": header_seconds, "body_idle_timeout": body_idle_seconds}
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), limits)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon (or the test) decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio turns on TCP_NODELAY only for sockets that do, and without
    # it every keep-alive response waits ~40 ms (Nagle against the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(
    app: Any,
    sock: socket.socket,
    stop: asyncio.Event,
    *,
    header_timeout_seconds: float = 10.0,
    body_idle_timeout_seconds: float = 30.0,
) -> None:
    """Serve ``app`` on ``sock`` until ``stop`` is set; open streams get a grace period.

    A connection that has not sent a request's headers ``header_timeout_seconds`` after it
    opened (or after the request began), or whose request body pauses longer than
    ``body_idle_timeout_seconds``, is closed.
    """
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        http=timeout_protocol(header_timeout_seconds, body_idle_timeout_seconds),
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        waiter.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
        sock.close()
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise RuntimeError("the HTTP server stopped") from task.exception()
