"""API keys and balances (Routstr's shapes, amounts in msat), all through ``core.payments``.

``/v1/wallet/*`` plus Routstr's ``/v1/balance/create|info|topup|refund`` aliases and its
account-info root (``GET /v1/balance/``). A key is ``Authorization: Bearer sk-…`` (a token used
as a key works too); a NIP-98 ``Authorization: Nostr …`` header names its signer's npub
account (the one DM deposits fund), shown with ``npub``/``pubkey`` where a key shows
``api_key``; an npub account not seen yet has balance 0. ``POST …/refund`` with
``X-Cashu: <the token that paid>`` returns that payment's change instead, as Routstr clients
collect it. A child key (``child_key_routes``) reads its own balance; it may not top up,
withdraw or refund (403).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route as HttpRoute

from nodeprov.core.account_moves import mask_key
from nodeprov.core.child_keys import ChildKey
from nodeprov.core.ledger import Account
from nodeprov.core.payments import Payer
from nodeprov.errors import (
    ChildKeyNotAllowed,
    InsufficientBalance,
    InvalidRequest,
    NothingToRefund,
    RefundPending,
    TokenTooSmall,
    Unauthorized,
)
from nodeprov.http.auth import account_holder
from nodeprov.http.child_key_routes import ROUTES as CHILD_KEY_ROUTES
from nodeprov.http.child_key_routes import child_balance, child_of, children_of
from nodeprov.http.context import (
    JSON,
    HttpContext,
    context,
    new_key_options,
    read_params,
)
from nodeprov.protocol.cashu_token import parse_token
from nodeprov.protocol.json_input import int_param
from nodeprov.protocol.nip19 import npub_encode


async def _who(ctx: HttpContext, request: Request) -> tuple[Payer, Account | ChildKey]:
    """Who ``Authorization`` names: an account (a key, a token as key, an npub), or a child."""
    payer = await account_holder(request)
    if payer is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer sk-…'")
    if payer.kind == "npub":
        # Seen without being opened: looking at a balance leaves no empty account behind.
        account_id = "npub:" + payer.credential
        return payer, await ctx.payments.account(account_id) or _unseen(account_id)
    try:
        account_id = await ctx.payments.account_for(payer)
    except Unauthorized:
        child = await child_of(ctx, payer)  # a child key has no account of its own
        if child is None:
            raise
        return payer, child
    account = await ctx.payments.account(account_id)
    if account is None:
        raise Unauthorized("Unknown API key")
    return payer, account


async def _account(ctx: HttpContext, request: Request) -> tuple[Payer, Account]:
    """The account that ``Authorization`` names, for a move of money (403 for a child key)."""
    payer, found = await _who(ctx, request)
    if isinstance(found, ChildKey):
        raise ChildKeyNotAllowed(
            "a child key cannot top up, withdraw or refund: only its parent key can"
        )
    return payer, found


def _unseen(account_id: str) -> Account:
    """An npub account no deposit has opened yet: everything 0."""
    return Account(
        id=account_id, kind="npub", balance_msat=0, reserved_msat=0, total_deposited_msat=0,
        total_spent_msat=0, created_at=0, last_used_at=None, expires_at=None,
        refund_address=None, revoked=False,
    )  # fmt: skip


def _holder(payer: Payer, *, full: bool) -> dict[str, Any]:
    """Who the account is: the key (masked unless ``full``), or the NIP-98 signer."""
    if payer.kind == "npub":
        return {"npub": npub_encode(payer.credential), "pubkey": payer.credential}
    return {"api_key": payer.credential if full else mask_key(payer.credential)}


def _view(account: Account) -> dict[str, Any]:
    return {
        "balance": account.balance_msat,
        "available": account.available_msat,
        "reserved": account.reserved_msat,
        "total_deposited": account.total_deposited_msat,
        "total_spent": account.total_spent_msat,
        "last_used": account.last_used_at,
        "created_at": account.created_at or None,  # None: an npub no deposit opened yet
        "expires_at": account.expires_at,
        "refund_address": account.refund_address,
    }


def _token_field(params: dict[str, Any]) -> str:
    token = params.get("cashu_token") or params.get("initial_balance_token")
    if not isinstance(token, str) or not token.strip():
        raise InvalidRequest("'cashu_token' is required")
    return token.strip()


async def create(request: Request) -> Response:
    ctx = context(request)
    params = await read_params(request)
    token = _token_field(params)
    expires_at, address = new_key_options(params)
    api_key, account = await ctx.payments.create_key(
        token, expires_at=expires_at, refund_address=address
    )
    return JSON(
        {
            "api_key": api_key,
            "balance": account.balance_msat,
            "created_at": account.created_at,
            "expires_at": account.expires_at,
            "refund_address": account.refund_address,
        }
    )


async def balance(request: Request) -> Response:
    ctx = context(request)
    payer, found = await _who(ctx, request)
    if isinstance(found, ChildKey):
        return JSON(await child_balance(ctx, found, mask_key(payer.credential)))
    if payer.kind != "npub":
        await ctx.payments.note_key_hint(found.id, payer.credential)
    children = await children_of(ctx, found)
    return JSON({**_holder(payer, full=False), **_view(found), **children})


async def info(request: Request) -> Response:
    """Account info with the full key: the bearer already holds it, and clients that
    bootstrap with a token read ``api_key`` back to use as their key (as Routstr's do)."""
    ctx = context(request)
    payer, found = await _who(ctx, request)
    if isinstance(found, ChildKey):
        return JSON(await child_balance(ctx, found, payer.credential))
    children = await children_of(ctx, found)
    return JSON({**_holder(payer, full=True), **_view(found), **children})


async def topup(request: Request) -> Response:
    ctx = context(request)
    params = await read_params(request)
    token = _token_field(params)
    payer, account = await _account(ctx, request)
    if payer.kind == "npub":
        # Once per signed event (its id is the deposit's reference), as a DM deposit is.
        event_id = request.state.nip98_event_id
        received = await ctx.payments.deposit(account.id, token, "nip98:" + event_id)
    else:
        received = await ctx.payments.topup(account.id, token)
    _, after = await _account(ctx, request)
    return JSON({"msats": received.credited_msat, **_view(after)})


MAX_IDEMPOTENCY_KEY = 255


async def refund(request: Request) -> Response:
    """Routstr's refund: a payment's change (``X-Cashu``) or a key's whole balance."""
    cashu = request.headers.get("x-cashu")
    if cashu is not None and cashu.strip():
        return await _payment_change(context(request), cashu.strip())
    _, account = await _account(context(request), request)
    if account.available_msat > 0:
        try:
            return await withdraw(request)
        except TokenTooSmall:
            pass  # less than one unit of the mint (or than its fee): it stays on the key
    if account.reserved_msat > 0:
        # Routstr's words: its clients keep the key for a later sweep when they read them.
        raise RefundPending("Cannot refund key. There are ongoing requests for this api key.")
    raise NothingToRefund()


async def _payment_change(ctx: HttpContext, token: str) -> Response:
    tokens = await ctx.payments.claim_change(token)
    if not tokens:
        if await ctx.payments.payment_in_flight(token):
            raise RefundPending("The job this token paid for is still running; retry shortly")
        raise NothingToRefund()
    # Normally one; several only if a payment's change was issued in parts. The last is the
    # newest; all are listed, since a merged token would fail if any part was received.
    change = tokens[-1]
    parsed = parse_token(change)
    # Routstr states the amount as a string, under the unit's name.
    amount = {"sats" if parsed.unit == "sat" else "msats": str(parsed.amount)}
    return JSON({"token": change, **amount, "tokens": tokens}, headers={"X-Cashu": change})


async def withdraw(request: Request) -> Response:
    ctx = context(request)
    # The refund aliases always pay out everything (Routstr's meaning); a body is ignored.
    params = await read_params(request) if request.url.path.endswith("withdraw") else {}
    amount = int_param(params, "amount")
    mint, unit = params.get("mint"), params.get("unit")
    if mint is not None and (not isinstance(mint, str) or mint.rstrip("/") not in ctx.mints):
        raise InvalidRequest(f"'mint' must be one of the accepted mints: {', '.join(ctx.mints)}")
    if unit is not None and unit not in ctx.config.wallet.units:
        raise InvalidRequest(f"'unit' must be one of {', '.join(ctx.config.wallet.units)}")
    idempotency_key = request.headers.get("idempotency-key", "")
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY or not idempotency_key.isprintable():
        raise InvalidRequest(
            f"'Idempotency-Key' must be at most {MAX_IDEMPOTENCY_KEY} printable characters"
        )
    _, account = await _account(ctx, request)
    if account == _unseen(account.id):  # an npub with nothing yet: 402, as an empty key gets
        raise InsufficientBalance.of(0, amount or 1)
    # A repeated withdraw with the same key returns the first token (its answer was lost).
    ref = f"http:{account.id}:{idempotency_key}" if idempotency_key else ""
    sent = await ctx.payments.withdraw(
        account.id, amount, mint_url=mint.rstrip("/") if mint else None, unit=unit, ref=ref
    )
    return JSON(
        {
            "token": sent.token,
            "amount": sent.amount,
            "unit": sent.unit,
            "mint": sent.mint_url,
            "msats": sent.debited_msat,
        }
    )


async def change(request: Request) -> Response:
    ctx = context(request)
    token = request.headers.get("x-cashu") or request.query_params.get("token")
    if not token or not token.strip():
        raise InvalidRequest("send the original token in X-Cashu or ?token=")
    tokens = await ctx.payments.claim_change(token.strip())
    return JSON({"tokens": tokens})


ROUTES = [
    HttpRoute("/v1/wallet/create", create, methods=["POST"]),
    HttpRoute("/v1/balance/create", create, methods=["POST"]),
    HttpRoute("/v1/wallet/balance", balance, methods=["GET"]),
    HttpRoute("/v1/wallet/info", info, methods=["GET"]),
    HttpRoute("/v1/balance/info", info, methods=["GET"]),
    HttpRoute("/v1/balance/", info, methods=["GET"]),
    HttpRoute("/v1/wallet/", info, methods=["GET"]),
    HttpRoute("/v1/wallet/topup", topup, methods=["POST"]),
    HttpRoute("/v1/balance/topup", topup, methods=["POST"]),
    HttpRoute("/v1/wallet/withdraw", withdraw, methods=["POST"]),
    HttpRoute("/v1/wallet/refund", refund, methods=["POST"]),
    HttpRoute("/v1/balance/refund", refund, methods=["POST"]),
    HttpRoute("/v1/wallet/change", change, methods=["GET"]),
    *CHILD_KEY_ROUTES,
]
