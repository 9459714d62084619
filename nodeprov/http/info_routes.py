"""Free routes: ``GET /v1/models`` (priced models with msat and sats prices), one model by id
(``GET /v1/models/{id}``, the SDK's ``models.retrieve``) and ``/v1/info``."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute

from nodeprov.core.capabilities import node_capabilities
from nodeprov.errors import NodeprovError
from nodeprov.http.context import JSON, HttpContext, context


def model_entry(ctx: HttpContext, name: str, target: str) -> dict[str, Any]:
    """One OpenAI model object plus ``pricing_msat`` and Routstr's ``sats_pricing``."""
    price = ctx.pricer.price(target)
    entry: dict[str, Any] = {
        "id": name,
        "name": name,
        "object": "model",
        "created": 0,
        "owned_by": ctx.config.node.name,
        "context_length": price.context_tokens,
        "max_output_tokens": price.max_output_tokens,
    }
    try:
        entry["pricing_msat"] = ctx.pricer.prices_msat(target)
        entry["sats_pricing"] = ctx.pricer.sats_pricing(target)
    except NodeprovError:  # no exchange rate right now: list the model without prices
        entry["pricing_msat"] = entry["sats_pricing"] = None
    return entry


async def models(request: Request) -> Response:
    ctx = context(request)
    names = ctx.upstreams.models()
    data = [model_entry(ctx, name, ctx.upstreams.route(name).model) for name in names]
    return JSON({"object": "list", "data": data})


async def model(request: Request) -> Response:
    """One model as ``/v1/models`` lists it; an id not offered is a 404 ``model_not_found``."""
    ctx = context(request)
    name = request.path_params["model_id"]
    # Ids may hold "/" (org/model): the route takes the rest of the path as the id.
    return JSON(model_entry(ctx, name, ctx.upstreams.route(name).model))


async def info(request: Request) -> Response:
    ctx = context(request)
    node = ctx.config.node
    return JSON(
        {
            "name": node.name,
            "description": node.description,
            "version": ctx.version,
            "npub": ctx.npub,
            "relays": list(ctx.config.nostr.relays),
            "mints": list(ctx.mints),
            "units": list(ctx.config.wallet.units),
            "http_url": node.http_url or None,
            "onion_url": node.onion_url or None,
            "models": ctx.upstreams.models(),
            "capabilities": list(node_capabilities(ctx.config)),
        }
    )


ROUTES = [
    HttpRoute("/v1/models", models, methods=["GET"]),
    HttpRoute("/v1/models/{model_id:path}", model, methods=["GET"]),
    HttpRoute("/v1/info", info, methods=["GET"]),
]
