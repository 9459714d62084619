"""What each ``nodeprov/1`` DM does, through ``core.payments`` (and ``wallet.receive``) only.

Handlers return one reply JSON; the listener splits, stores and sends it. ``resumed`` means
an earlier run accepted the same event and stopped before replying: nothing is paid twice.
A job is settled under the reference ``dm:<event id>`` with its answer in the same ledger
transaction, so a run killed between that settle and the listener's ``done`` record
replies from the recorded outcome when it resumes (:func:`earlier_outcome`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodeprov.config import Config
from nodeprov.core.money import ceil_div
from nodeprov.core.payments import Payer, PaymentFailed, Payments, Settled
from nodeprov.core.pricing import Endpoint
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
    """Available msat of the sender's npub account."""
    return await ctx.payments.balance(account_of(sender))


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


async def run_job(
    ctx: DmContext,
    payer: Payer,
    path: str,
    body: Mapping[str, Any],
    ref: str | None = None,
    client: str | None = None,
) -> tuple[dict[str, Any], Settled]:
    """Hold, call the upstream, settle: the same lifecycle as HTTP (no charge on failure).

    With ``ref`` the upstream's answer is kept with the job's outcome, so a resumed DM
    replies from it (:func:`earlier_outcome`) instead of running and paying again. With
    ``client`` (the sender) a token's swap may run beside the upstream call.
    """
    endpoint, upstream_path = PATHS[path]
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string")
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    route = ctx.upstreams.route(model)
    job = ctx.payments.job(payer, route.model, body, endpoint, ref=ref, client=client)
    async with job:
        response = await job.start(
            lambda: ctx.upstreams.send(route, "POST", upstream_path, json=body)
        )
        try:
            data = json.loads(response.content)
        except ValueError:
            raise UpstreamError("the upstream sent an unreadable answer") from None
        if not isinstance(data, dict):
            raise UpstreamError("the upstream sent an unreadable answer")
        settled = await job.settle(data.get("usage"), result=data)
    return data, settled


@dataclass(frozen=True)
class Earlier:
    """A DM job an interrupted run already settled: its answer, cost, change and balance."""

    data: dict[str, Any]
    charged_msat: int
    change: str | None
    balance_msat: int | None


async def earlier_outcome(ctx: DmContext, ref: str, payer: Payer) -> Earlier | None:
    """The outcome of job ``ref`` if an earlier run settled it (then nothing is paid again)."""
    outcome = await ctx.payments.outcome(ref)
    if outcome is None:
        return None
    data = outcome.result if isinstance(outcome.result, dict) else {}
    if payer.kind == "request_token":
        change = await latest_change(ctx, payer.credential)
        return Earlier(data, outcome.charged_msat, change, None)
    return Earlier(data, outcome.charged_msat, None, await balance_of(ctx, payer.credential))


# Resumes a DM job can go through; each pays with the change the one before it left.
MAX_RESUMES = 16


async def latest_change(ctx: DmContext, token: str) -> str | None:
    """The change owed for ``token`` now: each resume of a job paid with it paid with the
    change the run before left, so follow change the node itself spent to its end."""
    current: str | None = None
    paid_with = token
    for _ in range(MAX_RESUMES):
        try:
            tokens = await ctx.payments.claim_change(paid_with)
        except Unauthorized:
            return current  # ``paid_with`` paid for nothing here: it is the client's change
        if not tokens:
            return None
        current = paid_with = tokens[-1]
    return current


async def payer_for_resumed_token(ctx: DmContext, token: str) -> Payer:
    """A token an interrupted run already took: pay with the change it refunded (claimable)."""
    try:
        await ctx.payments.claim_change(token)
    except Unauthorized:
        raise TokenAlreadySpent("this token was already spent") from None
    change = await latest_change(ctx, token)
    if change is None:
        raise TokenAlreadySpent("this token was already used for a job here")
    return Payer("request_token", change, "nostr")


async def handle_request(
    ctx: DmContext, sender: str, msg: dm_jobs.JobRequest, event_id: str, resumed: bool
) -> str:
    payer = (
        Payer("request_token", msg.cashu, "nostr") if msg.cashu else Payer("npub", sender, "nostr")
    )
    ref = "dm:" + event_id
    try:
        earlier = await earlier_outcome(ctx, ref, payer) if resumed else None
        if earlier is not None:
            return dm_jobs.response_reply(
                msg.id,
                earlier.data,
                earlier.charged_msat,
                change=earlier.change,
                balance_msat=earlier.balance_msat,
            )
        try:
            data, settled = await run_job(ctx, payer, msg.endpoint, msg.body, ref, "npub:" + sender)
        except TokenAlreadySpent:
            if not (resumed and msg.cashu):
                raise
            payer = await payer_for_resumed_token(ctx, msg.cashu)
            data, settled = await run_job(ctx, payer, msg.endpoint, msg.body, ref)
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


async def deposit(ctx: DmContext, sender: str, token: str, ref: str) -> int:
    """Credit ``token`` to the sender's account once per ``ref`` (the DM); msat credited.

    A DM resumed after a restart finds its earlier deposit by ``ref`` and reports it again.
    """
    received = await ctx.payments.deposit(account_of(sender), token, ref)
    return received.credited_msat


async def handle_withdraw(ctx: DmContext, sender: str, msg: dm_jobs.Withdraw, ref: str) -> str:
    """Pay the sender's balance out once per ``ref`` (the DM): a resumed DM gets its own token."""
    sent = await ctx.payments.withdraw(account_of(sender), msg.amount_msat, ref=ref)
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
    resumed: bool,
) -> str:
    """The reply JSON for one job message (errors become ``error`` replies)."""
    ident = msg.id if not isinstance(msg, PaymentRequestPayload) else (msg.id or "")
    try:
        if isinstance(msg, dm_jobs.JobRequest):
            return await handle_request(ctx, sender, msg, event_id, resumed)
        if isinstance(msg, dm_jobs.Deposit | PaymentRequestPayload):
            token = (
                msg.cashu if isinstance(msg, dm_jobs.Deposit) else serialize_token(msg.to_token())
            )
            await deposit(ctx, sender, token, "dm:" + event_id)
            return dm_jobs.balance_reply(ident, await balance_of(ctx, sender))
        if isinstance(msg, dm_jobs.BalanceQuery):
            return dm_jobs.balance_reply(ident, await balance_of(ctx, sender))
        if isinstance(msg, dm_jobs.Withdraw):
            return await handle_withdraw(ctx, sender, msg, "dm:" + event_id)
        units = list(ctx.config.wallet.units)
        return dm_jobs.info_reply(ident, models_listing(ctx), list(ctx.mints), units)
    except NodeprovError as exc:
        return dm_jobs.error_reply(ident, exc)
