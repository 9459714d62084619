"""Child keys over HTTP (Routstr's ``/child-key`` shapes), through ``core.child_keys``.

``POST /v1/wallet/child-key {count?, balance_limit?, validity_date?, label?}`` (a parent's
``Authorization: Bearer sk-…``) -> ``{api_keys, count, cost_msats, cost_sats, parent_balance,
parent_balance_sats, child_keys}``: the new keys, shown in this answer only.
``DELETE /v1/wallet/child-key/{id}`` revokes one. ``/v1/balance/…`` are aliases. Only an API
key makes children (a token used as a key is refused before it is redeemed); a child may read
its balance and pay for jobs, nothing else.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute

from nodeprov.core.child_keys import ChildKey, check_parent
from nodeprov.core.ledger import Account, now
from nodeprov.core.payments import Payer, api_key_account
from nodeprov.errors import ChildKeyNotAllowed, Unauthorized
from nodeprov.http.auth import account_holder
from nodeprov.http.context import JSON, HttpContext, context, read_params
from nodeprov.protocol.child_keys import parse_child_key_request, spendable_msat

MISSING_KEY = "Missing API key: send 'Authorization: Bearer sk-…'"


async def child_of(ctx: HttpContext, payer: Payer) -> ChildKey | None:
    """The child key ``payer`` is, if it is one (an ``sk-…`` key with no account)."""
    if payer.kind != "api_key":
        return None
    return await ctx.payments.children.by_key(payer.credential)


async def child_balance(ctx: HttpContext, child: ChildKey, shown_key: str) -> dict[str, Any]:
    """A child's own balance call: what it may spend now, its limit, spent and expiry; 401
    if it, or its parent, is revoked or expired."""
    parent = await ctx.payments.children.usable(child)
    spendable = spendable_msat(
        parent.available_msat, child.limit_msat, child.spent_msat, child.reserved_msat
    )
    return {
        **child.view(now()),
        "api_key": shown_key,
        "is_child": True,
        "parent_key_preview": parent.key_hint,
        "balance": spendable,
        "available": spendable,
        "expires_at": child.expires_at,
    }


async def children_of(ctx: HttpContext, account: Account) -> dict[str, Any]:
    """What a parent's balance call adds: ``is_child`` and its ``child_keys``."""
    children = await ctx.payments.children.of_parent(account.id)
    at = now()
    return {"is_child": False, "child_keys": [c.view(at) for c in children]}


async def _parent(ctx: HttpContext, request: Request) -> str:
    """The account of the parent key in ``Authorization`` (refusing children and tokens)."""
    payer = await account_holder(request)
    if payer is None:
        raise Unauthorized(MISSING_KEY)
    if payer.kind != "api_key":
        # Refused before account_for, which would redeem a token on its first use.
        raise ChildKeyNotAllowed(
            "only an API key (sk-…) can have child keys: turn a token into one with "
            "POST /v1/wallet/create first"
        )
    account_id = api_key_account(payer.credential)
    if await ctx.payments.account(account_id) is None:
        if await ctx.payments.children.by_key(payer.credential) is not None:
            raise ChildKeyNotAllowed(
                "a child key cannot make or revoke child keys: only its parent key can"
            )
        raise Unauthorized("Unknown or revoked API key")
    return account_id


async def create(request: Request) -> Response:
    ctx = context(request)
    params = await read_params(request)
    parent_id = await _parent(ctx, request)
    options = parse_child_key_request(params, now())
    check_parent(await ctx.payments.account(parent_id), now())
    made = await ctx.payments.children.create_many(
        parent_id,
        options.count,
        limit_msat=options.limit_msat,
        expires_at=options.expires_at,
        label=options.label,
    )
    parent = await ctx.payments.account(parent_id)
    balance = parent.balance_msat if parent is not None else 0
    at = now()
    return JSON(
        {
            "api_keys": [key for key, _ in made],
            "count": len(made),
            "cost_msats": 0,  # this node makes child keys for free
            "cost_sats": 0,
            "parent_balance": balance,
            "parent_balance_sats": balance // 1000,
            # The only time a child's key is shown: the node keeps its hash.
            "child_keys": [{**child.view(at), "api_key": key} for key, child in made],
        }
    )


async def revoke(request: Request) -> Response:
    ctx = context(request)
    parent_id = await _parent(ctx, request)
    child, _ = await ctx.payments.children.revoke(
        request.path_params["child_id"], parent_id=parent_id
    )
    return JSON(child.view(now()))


ROUTES = [
    HttpRoute("/v1/wallet/child-key", create, methods=["POST"]),
    HttpRoute("/v1/balance/child-key", create, methods=["POST"]),
    HttpRoute("/v1/wallet/child-key/{child_id}", revoke, methods=["DELETE"]),
    HttpRoute("/v1/balance/child-key/{child_id}", revoke, methods=["DELETE"]),
]
