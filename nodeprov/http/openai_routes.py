"""The paid OpenAI routes with JSON bodies: chat, completions, embeddings, images, speech.

Order of checks (no money moves before the last): JSON body, model routed, payer present,
max cost priced (bad ``max_tokens`` etc. is a 400), then ``payments.begin`` holds it.
Upstream failure cancels the charge (a per-request token comes back in ``X-Cashu``).
Speech is read whole before settling, so an upstream failure mid-body charges nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute

from nodeprov.core.payments import Charge, Payer
from nodeprov.core.pricing import Endpoint
from nodeprov.errors import InvalidRequest, NodeprovError, UpstreamError
from nodeprov.http.auth import request_payer
from nodeprov.http.billing import cost_headers, fail, payment_required
from nodeprov.http.context import HttpContext, context, read_json
from nodeprov.http.streaming import SSERelay, with_usage
from nodeprov.upstream import Route

PATHS: dict[str, tuple[Endpoint, str]] = {
    "/v1/chat/completions": ("chat", "chat/completions"),
    "/v1/completions": ("completions", "completions"),
    "/v1/embeddings": ("embeddings", "embeddings"),
    "/v1/images/generations": ("images", "images/generations"),
    "/v1/audio/speech": ("speech", "audio/speech"),
}


def model_of(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string")
    return model


async def begin(
    ctx: HttpContext, request: Request, body: Mapping[str, Any], endpoint: Endpoint
) -> tuple[Route, Charge]:
    """Route the model, find the payer (402 if none), and hold the max cost."""
    route: Route = ctx.upstreams.route(model_of(body))
    request.state.model = route.model  # for the request metrics
    payer: Payer | None = request_payer(request.headers)
    if payer is None:
        raise payment_required(ctx, route.model, body, endpoint)
    charge = await ctx.payments.begin(payer, route.model, body, endpoint)
    return route, charge


async def call(
    ctx: HttpContext, charge: Charge, route: Route, path: str, request: Request, **kwargs: Any
) -> Any:
    """Send to the upstream; any failure cancels the charge (refund in the error)."""
    try:
        return await ctx.upstreams.send(route, "POST", path, headers=request.headers, **kwargs)
    except NodeprovError as exc:
        raise await fail(charge, exc) from exc
    except BaseException:
        with anyio.CancelScope(shield=True):
            await charge.cancel()
        raise


async def openai_job(request: Request) -> Response:
    ctx = context(request)
    endpoint, path = PATHS[request.url.path]
    body = await read_json(request)
    streamed = endpoint in ("chat", "completions") and body.get("stream") is True
    route, charge = await begin(ctx, request, body, endpoint)
    if streamed:
        upstream = await call(ctx, charge, route, path, request, json=with_usage(body), stream=True)
        relay = SSERelay(charge, upstream, body, route.upstream, ctx.pricer)
        return relay  # type: ignore[return-value]
    response = await call(ctx, charge, route, path, request, json=body)
    try:
        if endpoint == "speech":
            usage: Any = {"characters": len(body.get("input") or "")}
        else:
            data = json.loads(response.content)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            usage = data.get("usage")
            if endpoint == "images":
                images = data.get("data")
                count = len(images) if isinstance(images, list) else None
                usage = {"n": count, "size": body.get("size"), "quality": body.get("quality")}
    except ValueError:
        raise await fail(charge, UpstreamError("the upstream sent an unreadable answer")) from None
    settled = await charge.settle(usage)
    media = response.headers.get("content-type", "application/json")
    return Response(response.content, headers=cost_headers(settled), media_type=media)


ROUTES = [HttpRoute(path, openai_job, methods=["POST"]) for path in PATHS]
