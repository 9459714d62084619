"""The paid OpenAI routes with JSON bodies: chat, completions, embeddings, images, speech.

Order of checks (no money moves before the last): JSON body, model routed, payer present,
max cost priced (bad ``max_tokens``, a prompt over the context etc. is a 400), then the
charge lifecycle (``payments.job``) holds it. Upstream failure cancels the charge (a
per-request token comes back in ``X-Cashu``). Speech is read whole before settling, so an
upstream failure mid-body charges nothing. An ``X-Cashu`` token's swap may run beside the
upstream call (``job.start``; the client is its address): no byte of the answer leaves
before the swap is confirmed, and a failed swap cancels the call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute

from nodeprov.core.charges import Job
from nodeprov.core.payments import Payer
from nodeprov.core.pricing import Endpoint
from nodeprov.errors import InvalidRequest, UpstreamError
from nodeprov.http.auth import address_key, paying
from nodeprov.http.billing import cost_headers, payment_required
from nodeprov.http.context import HttpContext, context, read_body, read_json
from nodeprov.http.streaming import SSERelay, with_usage
from nodeprov.upstream import Route, forwardable
from nodeprov.upstream_http import Response as UpstreamResponse

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


async def paid_job(
    ctx: HttpContext,
    request: Request,
    model: str,
    body: Mapping[str, Any],
    endpoint: Endpoint,
    *,
    overlap: bool = False,
) -> Job:
    """The charge lifecycle of this request (402 if it names no payer; priced first).

    A NIP-98 payer is verified here (401 naming the failed check; its event is spent).

    ``overlap``: the caller sends through ``job.start``, so a token's swap may run beside it.
    """
    request.state.model = model  # for the request metrics
    payer: Payer | None = await paying(request)
    if payer is None:
        raise payment_required(ctx, model, body, endpoint)
    client = client_of(request) if overlap else None
    return ctx.payments.job(payer, model, body, endpoint, client=client)


def client_of(request: Request) -> str | None:
    """Who asks, for the per-client overlap limit: the address, an IPv6 one by its /64 (one
    host usually has a whole /64, and must not get a limit per address in it)."""
    return address_key(request.client.host) if request.client is not None else None


async def send(
    ctx: HttpContext, route: Route, path: str, request: Request, **kwargs: Any
) -> UpstreamResponse:
    """The upstream's answer (its errors end the job: nothing charged, refund in the error)."""
    return await ctx.upstreams.send(route, "POST", path, headers=request.headers, **kwargs)


def usage_of(endpoint: Endpoint, body: Mapping[str, Any], content: bytes) -> Any:
    """The usage to settle from a JSON answer (images: counted; speech: the input's length)."""
    if endpoint == "speech":
        return {"characters": len(body.get("input") or "")}
    try:
        data = json.loads(content)
    except ValueError:
        raise UpstreamError("the upstream sent an unreadable answer") from None
    if not isinstance(data, dict):
        raise UpstreamError("the upstream sent an unreadable answer")
    if endpoint == "images":
        images = data.get("data")
        count = len(images) if isinstance(images, list) else None
        return {"n": count, "size": body.get("size"), "quality": body.get("quality")}
    return data.get("usage")


async def openai_job(request: Request) -> Response:
    ctx = context(request)
    endpoint, path = PATHS[request.url.path]
    body = await read_json(request)
    streamed = endpoint in ("chat", "completions") and body.get("stream") is True
    route: Route = ctx.upstreams.route(model_of(body))
    forward = with_usage(body) if streamed else body
    # Forwarded unchanged: the client's own bytes go upstream, not encoded again.
    raw = forwardable(route, body, await read_body(request)) if forward is body else None
    async with await paid_job(ctx, request, route.model, body, endpoint, overlap=True) as job:
        if streamed:
            upstream = await job.start(
                lambda: send(ctx, route, path, request, json=forward, raw_json=raw, stream=True),
                discard=UpstreamResponse.aclose,
            )
            return SSERelay(job.hand_over(), upstream, route.upstream)  # type: ignore[return-value]
        response = await job.start(lambda: send(ctx, route, path, request, json=body, raw_json=raw))
        settled = await job.settle(usage_of(endpoint, body, response.content))
    media = response.headers.get("content-type", "application/json")
    return Response(response.content, headers=cost_headers(settled), media_type=media)


ROUTES = [HttpRoute(path, openai_job, methods=["POST"]) for path in PATHS]
