"""What each ``nodeprov/1`` DM does, through ``core.payments`` (and ``wallet.receive``) only.

Handlers return one reply JSON; the listener splits, stores and sends it. ``resumed`` means
an earlier run accepted the same event and stopped before replying: nothing is paid twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodeprov.config import Config
from nodeprov.core.money import ceil_div
from nodeprov.core.payments import Payer, PaymentFailed, Payments, Settled
from nodeprov.core.pricing import Endpoint, UsageUnavailable
from nodeprov.errors import (
    InsufficientBalance,
    InvalidRequest,
    NodeprovError,
    TokenAlreadySpent,
    Unauthorized,
    UpstreamError,
)
from nodeprov.nostr.dm_store import DmStore
from nodeprov.protocol import dm_jobs
from nodeprov.protocol.cashu_token import serialize_token
from nodeprov.protocol.nip19 import Profile, nprofile_encode
from nodeprov.protocol.nostr_event import Keys
from nodeprov.protocol.payment_request import (
    PaymentRequest,
    PaymentRequestPayload,
    Transport,
    encode_payment_request,
)
from nodeprov.upstream import Upstreams

log = logging.getLogger(__name__)

PATHS: dict[str, tuple[Endpoint, str]] = {
    "/v1/chat/completions": ("chat", "chat/completions"),
    "/v1/completions": ("completions", "completions"),
    "/v1/embeddings": ("embeddings", "embeddings"),
}


class RateLimited(NodeprovError):
    """A sender exceeded the per-minute DM limit or the concurrent-job cap."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limited"
    retryable = True


@dataclass
class DmContext:
    """What DM handlers need: settings, the payment pipeline, upstreams, our keys, the store."""

    config: Config
    payments: Payments
    upstreams: Upstreams
    keys: Keys
    store: DmStore

    @property
    def mints(self) -> tuple[str, ...]:
        return tuple(m.rstrip("/") for m in self.config.wallet.mints)


def account_of(sender: str) -> str:
    """The ledger account of an npub (as ``Payer("npub", hex)`` opens it)."""
    return "npub:" + sender


async def balance_of(ctx: DmContext, sender: str) -> int:
    """Available msat of the sender's npub account (opened if new)."""
    account_id = await ctx.payments.account_for(Payer("npub", sender))
    account = await ctx.payments.ledger.account(account_id)
    return account.available_msat if account is not None else 0


def payment_request(ctx: DmContext, required_msat: int) -> str:
    """A NUT-18 ``creqA`` for ``required_msat``, payable by NIP-17 DM to this node."""
    unit = "sat" if "sat" in ctx.config.wallet.units else "msat"
    amount = ceil_div(required_msat, 1000) if unit == "sat" else required_msat
    target = nprofile_encode(Profile(ctx.keys.public_key, tuple(ctx.config.nostr.relays[:3])))
    transport = Transport("nostr", target, (("n", "17"),))
    return encode_payment_request(
        PaymentRequest(
            amount=max(1, amount),
            unit=unit,
            mints=ctx.mints,
            description="nodeprov deposit",
            transports=(transport,),
        )
    )


def missing_msat(exc: InsufficientBalance) -> int:
    """What a payer lacks (required minus available), at least 1 msat."""
    required = exc.details.get("required_msat")
    available = exc.details.get("available_msat") or 0
    if not isinstance(required, int):
        return 1000
    return max(1, required - int(available))


def _usage_or_hold(ctx: DmContext, model: str, body: Any, endpoint: Endpoint, usage: Any) -> Any:
    """The upstream's usage, or (missing/malformed) one that prices to exactly the hold."""
    try:
        ctx.payments.pricer.actual_cost(model, usage, endpoint)
        return usage
    except UsageUnavailable as exc:
        log.warning("%s: %s; settling at the hold", model, exc.message)
        bounds = ctx.payments.pricer.token_bounds(model, body, endpoint)
        return {
            "prompt_tokens": bounds.prompt_tokens,
            "completion_tokens": bounds.completion_tokens,
        }


async def run_job(
    ctx: DmContext, payer: Payer, path: str, body: Mapping[str, Any]
) -> tuple[dict[str, Any], Settled]:
    """Hold, call the upstream, settle: the same pipeline as HTTP (no charge on failure)."""
    endpoint, upstream_path = PATHS[path]
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string")
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    route = ctx.upstreams.route(model)
    charge = await ctx.payments.begin(payer, route.model, body, endpoint)
    try:
        response = await ctx.upstreams.send(route, "POST", upstream_path, json=body)
        data = json.loads(response.content)
        if not isinstance(data, dict):
            raise UpstreamError("the upstream sent an unreadable answer")
    except (NodeprovError, ValueError) as exc:
        error = exc if isinstance(exc, NodeprovError) else UpstreamError("unreadable answer")
        raise PaymentFailed(error, await charge.cancel()) from None
    except BaseException:
        await asyncio.shield(charge.cancel())
        raise
    usage = _usage_or_hold(ctx, route.model, body, endpoint, data.get("usage"))
    return data, await asyncio.shield(charge.settle(usage))


async def _payer_for_resumed_token(ctx: DmContext, token: str) -> Payer:
    """A token an interrupted run already took: pay with the change it refunded (claimable)."""
    try:
        tokens = await ctx.payments.claim_change(token)
    except Unauthorized:
        raise TokenAlreadySpent("this token was already spent") from None
    if not tokens:
        raise TokenAlreadySpent("this token was already used for a job here")
    return Payer("request_token", tokens[-1])


async def handle_request(
    ctx: DmContext, sender: str, msg: dm_jobs.JobRequest, resumed: bool
) -> str:
    payer = Payer("request_token", msg.cashu) if msg.cashu else Payer("npub", sender)
    try:
        try:
            data, settled = await run_job(ctx, payer, msg.endpoint, msg.body)
        except TokenAlreadySpent:
            if not (resumed and msg.cashu):
                raise
            payer = await _payer_for_resumed_token(ctx, msg.cashu)
            data, settled = await run_job(ctx, payer, msg.endpoint, msg.body)
    except PaymentFailed as exc:
        refund = exc.refund.token if exc.refund else None
        creq = None
        if isinstance(exc.error, InsufficientBalance):
            creq = payment_request(ctx, missing_msat(exc.error))
        return dm_jobs.error_reply(msg.id, exc.error, refund=refund, payment_request=creq)
    except InsufficientBalance as exc:
        creq = payment_request(ctx, missing_msat(exc))
        return dm_jobs.error_reply(msg.id, exc, payment_request=creq)
    return dm_jobs.response_reply(
        msg.id,
        data,
        settled.charged_msat,
        change=settled.change.token if settled.change else None,
        balance_msat=settled.balance_msat,
    )


async def deposit(ctx: DmContext, sender: str, token: str, ref: str, resumed: bool) -> int:
    """Credit ``token`` to the sender's account once (``ref`` ties it to the DM); msat credited."""
    if resumed and await ctx.store.deposit_done(ref):
        return 0
    received = await ctx.payments.wallet.receive(token, account_of(sender), "npub", ref=ref)
    return received.credited_msat


async def handle_withdraw(
    ctx: DmContext, sender: str, msg: dm_jobs.Withdraw, since: int, resumed: bool
) -> str:
    account_id = await ctx.payments.account_for(Payer("npub", sender))
    if resumed:
        found = await ctx.store.withdrawal_since(account_id, since)
        if found is not None:
            return dm_jobs.withdrawal_reply(msg.id, found[0], found[1])
    sent = await ctx.payments.withdraw(account_id, msg.amount_msat)
    return dm_jobs.withdrawal_reply(msg.id, sent.token, sent.debited_msat)


def models_listing(ctx: DmContext) -> list[dict[str, Any]]:
    """Every routable model with its msat prices (None when no exchange rate is available)."""
    out: list[dict[str, Any]] = []
    for name in ctx.upstreams.models():
        target = ctx.upstreams.route(name).model
        try:
            pricing: dict[str, int] | None = ctx.payments.pricer.prices_msat(target)
        except NodeprovError:
            pricing = None
        out.append({"id": name, "pricing": pricing})
    return out


async def handle_json(
    ctx: DmContext,
    sender: str,
    msg: dm_jobs.ClientMessage | PaymentRequestPayload,
    event_id: str,
    since: int,
    resumed: bool,
) -> str:
    """The reply JSON for one job message (errors become ``error`` replies)."""
    ident = msg.id if not isinstance(msg, PaymentRequestPayload) else (msg.id or "")
    try:
        if isinstance(msg, dm_jobs.JobRequest):
            return await handle_request(ctx, sender, msg, resumed)
        if isinstance(msg, dm_jobs.Deposit | PaymentRequestPayload):
            token = (
                msg.cashu if isinstance(msg, dm_jobs.Deposit) else serialize_token(msg.to_token())
            )
            await deposit(ctx, sender, token, "dm:" + event_id, resumed)
            return dm_jobs.balance_reply(ident, await balance_of(ctx, sender))
        if isinstance(msg, dm_jobs.BalanceQuery):
            return dm_jobs.balance_reply(ident, await balance_of(ctx, sender))
        if isinstance(msg, dm_jobs.Withdraw):
            return await handle_withdraw(ctx, sender, msg, since, resumed)
        units = list(ctx.config.wallet.units)
        return dm_jobs.info_reply(ident, models_listing(ctx), list(ctx.mints), units)
    except NodeprovError as exc:
        return dm_jobs.error_reply(ident, exc)
