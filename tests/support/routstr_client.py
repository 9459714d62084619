"""A client that behaves like Routstr's TypeScript SDK (``@routstr/sdk``), for tests.

Written here from that SDK's public documentation and source (its ``RoutstrClient``,
``ProviderManager.getRequiredSatsForModel``, ``BalanceManager`` and ``errorTypes``), not
copied: the same request shapes, the same token sizing and the same reactions to errors, so a
test can tell whether an unmodified Routstr client works against this node.

- Token sizing (:func:`required_sats`): the larger of a component estimate (prompt text at 2.84
  characters a token, plus ``max_tokens`` at the completion price and the request price, times
  1.05) and the routstr-core gate it mirrors (``max_cost`` discounted by the unused prompt and
  completion budgets, 1 % tolerance, prompt at 3 characters a token over the whole body, times
  1.05), capped at ``sats_pricing.max_cost``; a token is minted for ``ceil`` of that.
- ``xcashu`` mode: each request pays with ``X-Cashu``; the change comes from the response's
  ``X-Cashu`` header, or later from ``POST /v1/wallet/refund`` with the paying token. On an
  error it receives the ``X-Cashu`` header's token, else its own token back, and drops a token
  the node reports as ``token_already_spent``.
- ``apikeys`` mode: the first token is the bearer key; ``GET /v1/wallet/info`` gives the key to
  keep using (``api_key``). A 402 of ``type=insufficient_quota``, ``code=insufficient_balance``
  tops up the shortfall (at least 21 % of the request, times 1.4) with ``POST /v1/wallet/topup``
  and retries (twice at most). ``POST /v1/wallet/refund`` pays the key out; ``"No balance to
  refund"`` means there is nothing left.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

TOLERANCE = 0.99  # routstr-core's default tolerance_percentage (1 %), which the SDK assumes
MARGIN = 1.05
TOPUP_MARGIN = 1.4
TOPUP_MIN_FRACTION = 0.21
MAX_RETRIES = 2


class Wallet(Protocol):
    """The client's own ecash: mint a token of ``sats``, receive one (its value, or raise)."""

    async def __call__(self, amount: int) -> str: ...

    async def redeem(self, token: str) -> int: ...


def _string_chars(node: Any) -> int:
    """Every string in a JSON tree, keys included (the gate's prompt measure)."""
    if isinstance(node, str):
        return len(node)
    if isinstance(node, list):
        return sum(_string_chars(v) for v in node)
    if isinstance(node, dict):
        return sum(len(str(k)) + _string_chars(v) for k, v in node.items())
    return 0


def _message_text_chars(messages: list[Any]) -> int:
    """Billed text of chat messages: string contents and text parts (no JSON envelope)."""
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(
                len(p["text"])
                for p in content
                if isinstance(p, dict)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
            )
    return total


def _gate_sats(model: dict[str, Any], pricing: dict[str, Any], body: dict[str, Any]) -> float:
    max_cost = pricing["max_cost"]
    prompt, completion = pricing.get("prompt") or 0, pricing.get("completion") or 0
    gate = max(1, math.floor(max_cost * 1000 * TOLERANCE))
    allowance = (pricing.get("max_prompt_cost") or 0) * TOLERANCE
    if model.get("context_length"):
        allowance = model["context_length"] * prompt * TOLERANCE
    tokens = _string_chars(body) // 3
    if tokens > 0 and allowance - tokens * prompt > 0:
        gate -= math.floor((allowance - tokens * prompt) * 1000)
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > 0 and completion > 0:
        unused = (pricing.get("max_completion_cost") or 0) * TOLERANCE - max_tokens * completion
        if unused > 0:
            gate -= math.floor(unused * 1000)
    return max(gate, 1) / 1000


def required_sats(model: dict[str, Any], body: dict[str, Any]) -> float:
    """What the SDK sends for ``body`` to ``model`` (an entry of ``GET /v1/models``), in sats."""
    pricing = model.get("sats_pricing")
    if not pricing:
        return 0
    if not pricing.get("max_completion_cost"):
        return float(pricing.get("max_cost") or 50)
    messages = body.get("messages")
    chars = _message_text_chars(messages) if isinstance(messages, list) and messages else None
    if isinstance(body.get("tools"), list) and body["tools"]:
        chars = (chars or 0) + len(json.dumps(body["tools"], separators=(",", ":")))
    tokens = math.ceil(chars / 2.84) if chars is not None else 10_000
    completion = pricing["max_completion_cost"]
    if isinstance(body.get("max_tokens"), int) and pricing.get("completion"):
        completion = pricing["completion"] * body["max_tokens"]
    component = (
        (pricing.get("prompt") or 0) * tokens + completion + (pricing.get("request") or 0)
    ) * MARGIN
    estimate = max(component, _gate_sats(model, pricing, body) * MARGIN)
    return float(min(estimate, pricing["max_cost"]))


def core_error(r: httpx.Response) -> dict[str, Any]:
    """The ``{type, code, message}`` a Routstr client reads from an error body (or empties)."""
    try:
        data = r.json()
    except ValueError:
        return {"message": r.text}
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return dict(data["error"])
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, dict) and isinstance(detail.get("error"), dict):
        return dict(detail["error"])
    return {"message": detail} if isinstance(detail, str) else {}


@dataclass
class Outcome:
    """What one request came to: the answer, what the client's wallet gave and got back."""

    response: httpx.Response
    sent_sats: int = 0
    received_sats: int = 0
    error: dict[str, Any] = field(default_factory=dict)
    body_text: str = ""

    @property
    def ok(self) -> bool:
        return self.response.is_success


class RoutstrStyleClient:
    """One provider (``base_url`` without ``/v1``), one wallet, ``xcashu`` or ``apikeys``."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, wallet: Wallet, mode: str) -> None:
        self.http, self.base, self.wallet, self.mode = (
            http,
            base_url.rstrip("/") + "/",
            wallet,
            mode,
        )
        self.api_key: str | None = None
        self.models: dict[str, dict[str, Any]] = {}
        self.sent_sats = 0
        self.received_sats = 0

    async def load_models(self) -> None:
        r = await self.http.get(self.base + "v1/models")
        self.models = {m["id"]: m for m in r.json()["data"]}

    async def _send(self, sats: int) -> str:
        self.sent_sats += sats
        return await self.wallet(sats)

    async def _receive(self, token: str | None) -> int:
        if not token or not token.startswith("cashu"):
            return 0  # a NUT-18 request in X-Cashu (402) is not ecash: nothing to receive
        try:
            amount = await self.wallet.redeem(token)
        except Exception:  # spent or invalid: the SDK logs it and goes on
            return 0
        self.received_sats += amount
        return amount

    async def chat(self, body: dict[str, Any], *, stream: bool = False) -> Outcome:
        """POST /v1/chat/completions the way the SDK routes a request."""
        body = {**body, "stream": stream}
        sats = math.ceil(required_sats(self.models[body["model"]], body))
        if self.mode == "xcashu":
            return await self._xcashu(body, sats)
        return await self._apikeys(body, sats)

    async def _post(
        self, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[httpx.Response, str]:
        async with self.http.stream(
            "POST", self.base + "v1/chat/completions", json=body, headers=headers
        ) as r:
            text = (await r.aread()).decode()
        return r, text

    async def _xcashu(self, body: dict[str, Any], sats: int) -> Outcome:
        token = await self._send(sats)
        r, text = await self._post(body, {"X-Cashu": token})
        outcome = Outcome(r, sats, body_text=text)
        if r.is_success:
            if "text/event-stream" in r.headers.get("content-type", ""):
                # The SDK's refund sweep: the change of a stream is fetched afterwards.
                outcome.received_sats = await self.refund_payment(token)
            else:
                outcome.received_sats = await self._receive(r.headers.get("x-cashu"))
            return outcome
        outcome.error = core_error(r)
        if outcome.error.get("type") == "token_already_spent":
            return outcome  # the token is gone: drop it, do not try to receive it
        got = await self._receive(r.headers.get("x-cashu"))
        if got == 0 and r.headers.get("x-cashu") != token:
            got = await self._receive(token)
        outcome.received_sats = got
        return outcome

    async def refund_payment(self, token: str) -> int:
        """``POST /v1/wallet/refund`` with ``X-Cashu: <the paying token>``; receive the change."""
        r = await self.http.post(
            self.base + "v1/wallet/refund",
            headers={"X-Cashu": token, "Content-Type": "application/json"},
        )
        return await self._receive(r.json().get("token")) if r.is_success else 0

    async def _apikeys(self, body: dict[str, Any], sats: int) -> Outcome:
        sent = 0
        if self.api_key is None:
            self.api_key = await self._send(sats)  # the bootstrap key is a token
            sent = sats
        outcome = Outcome(httpx.Response(500), sent)
        for attempt in range(MAX_RETRIES + 1):
            r, text = await self._post(body, {"Authorization": f"Bearer {self.api_key}"})
            outcome.response, outcome.body_text = r, text
            if r.is_success:
                await self.info()  # replaces a bootstrap token with the node's key
                return outcome
            outcome.error = core_error(r)
            local = (outcome.error.get("type"), outcome.error.get("code")) == (
                "insufficient_quota",
                "insufficient_balance",
            )
            if r.status_code != 402 or not local or attempt == MAX_RETRIES:
                return outcome
            info = await self.info()
            available = (info["balance"] - info.get("reserved", 0)) / 1000
            shortfall = max(0.0, sats - available)
            if shortfall <= 0:
                return outcome  # the SDK fails over: its own estimate says the key is enough
            amount = math.ceil(max(shortfall, TOPUP_MIN_FRACTION * sats) * TOPUP_MARGIN)
            outcome.sent_sats += await self.topup(amount)
        return outcome

    async def info(self) -> dict[str, Any]:
        """``GET /v1/wallet/info``: balance and reserved in msat, and the key to keep using."""
        r = await self.http.get(
            self.base + "v1/wallet/info", headers={"Authorization": f"Bearer {self.api_key}"}
        )
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        if self.api_key and self.api_key.startswith("cashu") and data.get("api_key"):
            self.api_key = data["api_key"]
        return data

    async def topup(self, sats: int) -> int:
        token = await self._send(sats)
        r = await self.http.post(
            self.base + "v1/wallet/topup",
            json={"cashu_token": token},
            headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
        )
        if not r.is_success:
            if core_error(r).get("type") != "token_already_spent":
                await self._receive(token)
            return sats
        return sats

    async def refund_key(self) -> tuple[bool, str]:
        """``POST /v1/wallet/refund`` with the key: (refunded?, the message when not)."""
        r = await self.http.post(
            self.base + "v1/wallet/refund",
            headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
        )
        if r.is_success:
            await self._receive(r.json().get("token"))
            self.api_key = None
            return True, ""
        message = str(core_error(r).get("message", ""))
        if message == "No balance to refund":
            self.api_key = None  # the SDK removes the key: nothing is left on it
        return False, message
