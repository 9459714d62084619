"""The local proxy: an OpenAI-compatible server on 127.0.0.1 that pays a provider per request.

Clients send their usual OpenAI requests (any API key; it is never forwarded). Each paid
request goes to the provider with an ``X-Cashu`` token from the client wallet; the change
comes back into the wallet. Streams pass through as they arrive, minus nodeprov's change
lines. ``GET /proxy/status`` shows the wallet balance and any problems seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from nodeprov.client.pay import PATHS, Opened, PayingClient, Receipt
from nodeprov.errors import InvalidRequest, NodeprovError, openai_error

logger = logging.getLogger(__name__)

PASS_HEADERS = ("content-type", "x-cost-msat", "x-cost-input-msat", "x-cost-output-msat")


def error(exc: NodeprovError) -> JSONResponse:
    return JSONResponse(exc.to_openai(), status_code=exc.status)


def receipt_headers(receipt: Receipt) -> dict[str, str]:
    headers = {
        "x-nodeprov-paid-msat": str(receipt.paid_msat),
        "x-nodeprov-change-msat": str(receipt.change_msat),
    }
    if receipt.problems:
        headers["x-nodeprov-warning"] = "; ".join(receipt.problems)[:1000]
    return headers


def _pass(response: httpx.Response) -> dict[str, str]:
    return {k: response.headers[k] for k in PASS_HEADERS if k in response.headers}


def create_proxy_app(payer: PayingClient) -> Starlette:
    """The ASGI app of the proxy for one provider."""

    async def paid(request: Request) -> Response:
        path = request.url.path.removeprefix("/v1")
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise InvalidRequest("the request body must be a JSON object")
        except ValueError:
            return error(InvalidRequest("the request body is not valid JSON"))
        except InvalidRequest as exc:
            return error(exc)
        try:
            opened = await payer.open(path, body)
        except NodeprovError as exc:
            return error(exc)
        streamed = opened.response.headers.get("content-type", "").startswith("text/event-stream")
        if streamed and opened.response.status_code == 200:
            return StreamingResponse(
                payer.relay_stream(opened),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        return await _finish(payer, opened)

    async def models(request: Request) -> Response:
        try:
            response = await payer.http.get(payer.provider.api + "/models")
        except httpx.TransportError as exc:
            message = f"the provider is unreachable: {exc}"
            return JSONResponse(
                openai_error("upstream_error", "provider_unavailable", message), status_code=503
            )
        return Response(response.content, response.status_code, _pass(response))

    async def status(request: Request) -> Response:
        return JSONResponse(
            {
                "provider": payer.provider.base_url,
                "npub": payer.provider.npub,
                "balance_msat": await payer.wallet.balance_msat(),
                "blocked": payer.blocked,
                "problems": payer.problems,
            }
        )

    routes = [Route("/v1" + p, paid, methods=["POST"]) for p in PATHS]
    routes += [
        Route("/v1/models", models, methods=["GET"]),
        Route("/proxy/status", status, methods=["GET"]),
    ]
    return Starlette(routes=routes)


async def _finish(payer: PayingClient, opened: Opened) -> Response:
    response = opened.response
    content = await response.aread()
    await response.aclose()
    change = response.headers.get("x-cashu", "")
    refund = None
    with contextlib.suppress(ValueError, AttributeError):
        refund = json.loads(content).get("error", {}).get("refund")
        if refund is not None:  # the refund is ours now: do not show the local client a token
            data = json.loads(content)
            data["error"].pop("refund", None)
            content = json.dumps(data).encode()
    token = change if change.startswith("cashu") else refund if isinstance(refund, str) else None
    cost = response.headers.get("x-cost-msat")
    receipt = await payer.settle(opened, int(cost) if cost and cost.isdigit() else None, token)
    headers = {**_pass(response), **receipt_headers(receipt)}
    headers.pop("content-type", None)
    media = response.headers.get("content-type", "application/json")
    return Response(content, response.status_code, headers, media_type=media)


async def run_proxy(
    payer: PayingClient,
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    ready: asyncio.Future[int] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve the proxy until ``stop`` is set (or forever); ``ready`` gets the port."""
    from nodeprov.http.app import bind, serve

    sock = bind(host, port)
    bound = int(sock.getsockname()[1])
    if ready is not None and not ready.done():
        ready.set_result(bound)
    logger.info("proxy for %s on http://%s:%s/v1", payer.provider.base_url, host, bound)
    await serve(create_proxy_app(payer), sock, stop or asyncio.Event())


def describe(payer: PayingClient, port: int) -> Mapping[str, Any]:
    return {"proxy": f"http://127.0.0.1:{port}/v1", "provider": payer.provider.base_url}
