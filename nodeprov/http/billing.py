"""How the HTTP channel shows money: 402 payment requests, cost headers, error bodies.

The settlement rules themselves (usage, the hold when usage is unreadable, what a stream
produced) live once in :mod:`nodeprov.core.charges`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from nodeprov.core.money import ceil_div
from nodeprov.core.payments import PaymentFailed, Settled
from nodeprov.core.pricing import Endpoint
from nodeprov.errors import InsufficientBalance, NodeprovError
from nodeprov.http.context import HttpContext
from nodeprov.protocol.payment_request import PaymentRequest, encode_payment_request

logger = logging.getLogger(__name__)


def payment_request(ctx: HttpContext, required_msat: int) -> str:
    """A NUT-18 ``creqA`` for ``required_msat`` in the first accepted unit (sat rounds up)."""
    unit = "sat" if "sat" in ctx.config.wallet.units else "msat"
    amount = ceil_div(required_msat, 1000) if unit == "sat" else required_msat
    return encode_payment_request(
        PaymentRequest(amount=max(1, amount), unit=unit, mints=ctx.mints, single_use=True)
    )


def payment_required(ctx: HttpContext, model: str, body: Any, endpoint: Endpoint) -> NodeprovError:
    """The 402 for a request without payment (its max cost priced first: bad input is a 400)."""
    cost = ctx.pricer.max_cost(model, body, endpoint)
    return unpaid(cost.total_msat)


def unpaid(required_msat: int) -> InsufficientBalance:
    return InsufficientBalance.of(0, required_msat)


def cost_fields(settled: Settled) -> dict[str, int]:
    return {
        "cost_msat": settled.charged_msat,
        "cost_input_msat": settled.cost.input_msat,
        "cost_output_msat": settled.cost.output_msat,
    }


def cost_headers(settled: Settled) -> dict[str, str]:
    """``X-Cost-*`` headers, plus the change token in ``X-Cashu`` for per-request payers."""
    headers = {
        "X-Cost-Msat": str(settled.charged_msat),
        "X-Cost-Input-Msat": str(settled.cost.input_msat),
        "X-Cost-Output-Msat": str(settled.cost.output_msat),
    }
    if settled.balance_msat is not None:
        headers["X-Balance-Msat"] = str(settled.balance_msat)
    if settled.change is not None:
        headers["X-Cashu"] = settled.change.token
    return headers


def error_body_and_headers(
    ctx: HttpContext, exc: NodeprovError
) -> tuple[dict[str, Any], dict[str, str]]:
    """The OpenAI error body and headers: 402 carries ``X-Cashu: creqA…``, refunds a token."""
    body = exc.to_openai()
    headers: dict[str, str] = {}
    inner = exc.error if isinstance(exc, PaymentFailed) else exc
    refund = exc.refund if isinstance(exc, PaymentFailed) else None
    if isinstance(inner, InsufficientBalance):
        required = inner.details.get("required_msat")
        if isinstance(required, int) and required > 0:
            headers["X-Cashu"] = payment_request(ctx, required)
        if refund is not None:
            body["error"]["refund"] = refund.token
    elif refund is not None:
        headers["X-Cashu"] = refund.token
    retry_after = inner.details.get("retry_after")
    if isinstance(retry_after, int | float):
        headers["Retry-After"] = str(max(0, math.ceil(retry_after)))  # never shorter than asked
    return body, headers
