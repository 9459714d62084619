"""Funding keys over Lightning: an invoice from the node's mint, then a poll for the key.

``POST /v1/wallet/lightning {amount, api_key?, expires_at?, refund_address?, mint?}`` ->
``{quote_id, invoice, amount, amount_msat, expires_at, mint, api_key?}`` (``amount`` in
sats; ``api_key``: the new key, in this answer only, usable once the invoice is paid);
``GET /v1/wallet/lightning/{quote_id}`` -> its state and, once paid, the balance (msat).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute

from nodeprov.errors import InvalidRequest
from nodeprov.http.auth import bearer
from nodeprov.http.context import (
    JSON,
    context,
    new_key_options,
    read_params,
)
from nodeprov.protocol.json_input import int_param


def _amount(params: dict[str, Any]) -> int:
    name = "amount" if "amount" in params else "amount_sats"
    amount = int_param(params, name)
    if amount is None:
        raise InvalidRequest("'amount' must be a positive whole number of sats")
    return amount


def _api_key(params: dict[str, Any], request: Request) -> str | None:
    key = params.get("api_key")
    if key is None:
        credential = bearer(request.headers)
        key = credential if credential and credential.startswith("sk-") else None
    if key is not None and (not isinstance(key, str) or not key.startswith("sk-")):
        raise InvalidRequest("'api_key' must be an API key (sk-…)")
    return key


async def create_invoice(request: Request) -> Response:
    ctx = context(request)
    params = await read_params(request)
    amount = _amount(params)
    api_key = _api_key(params, request)
    expires_at, address = new_key_options(params)
    mint = params.get("mint")
    if mint is not None and (not isinstance(mint, str) or mint.rstrip("/") not in ctx.mints):
        raise InvalidRequest(f"'mint' must be one of the accepted mints: {', '.join(ctx.mints)}")
    quote = await ctx.funding.create(
        amount,
        api_key=api_key,
        expires_at=expires_at,
        refund_address=address,
        mint_url=mint.rstrip("/") if mint else None,
    )
    body: dict[str, Any] = {
        "quote_id": quote.id,
        "invoice": quote.invoice,
        "amount": quote.amount,
        "amount_msat": quote.amount_msat,
        "expires_at": quote.expires_at,
        "mint": quote.mint_url,
    }
    if quote.api_key is not None:
        body["api_key"] = quote.api_key  # the only copy: the node keeps its hash
    return JSON(body)


async def invoice_status(request: Request) -> Response:
    status = await context(request).funding.status(request.path_params["quote_id"])
    body: dict[str, Any] = {
        "quote_id": status.id,
        "state": status.state,
        "paid": status.state == "paid",
        "amount": status.amount,
        "amount_msat": status.amount_msat,
        "expires_at": status.expires_at,
        "new_key": status.new_key,
    }
    if status.api_key is not None:
        body["api_key"] = status.api_key
    if status.balance_msat is not None:
        body["balance"] = status.balance_msat
    return JSON(body)


ROUTES = [
    HttpRoute("/v1/wallet/lightning", create_invoice, methods=["POST"]),
    HttpRoute("/v1/wallet/lightning/{quote_id}", invoice_status, methods=["GET"]),
]
