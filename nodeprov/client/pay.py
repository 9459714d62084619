"""Paying a provider over HTTP with ``X-Cashu``: size the token, pay 402s, take change once.

Each request is quoted with the node's own pricing rules over the provider's listed prices
and paid with a token worth that maximum (plus the provider's input fee on receiving it).
Afterwards the cost the provider reports and the change it returns are checked against the
quote: overcharging, missing change and spent change are recorded as problems, and an
overcharging provider is refused from then on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from nodeprov.client.provider import Overcharged, Provider, ProviderDown, ProviderError
from nodeprov.client.wallet import ClientWallet
from nodeprov.core.money import Unit, check_unit, from_msat_ceil, to_msat
from nodeprov.core.pricing import Endpoint
from nodeprov.errors import InsufficientBalance, InvalidRequest, NodeprovError
from nodeprov.protocol.cashu_token import parse_token
from nodeprov.protocol.payment_request import decode_payment_request

logger = logging.getLogger(__name__)

PATHS: dict[str, Endpoint] = {
    "/chat/completions": "chat",
    "/completions": "completions",
    "/embeddings": "embeddings",
    "/images/generations": "images",
    "/audio/speech": "speech",
}
DEFAULT_CAP_MSAT = 1_000_000


@dataclass
class Payment:
    """A token sent for one request and what the provider can credit from it."""

    token: str
    mint: str
    unit: Unit
    amount: int
    credit_msat: int
    quote_msat: int | None


@dataclass
class Receipt:
    """The outcome of one paid request: paid, cost reported, change back, problems seen."""

    paid_msat: int = 0
    cost_msat: int | None = None
    change_msat: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def spent_msat(self) -> int:
        return self.paid_msat - self.change_msat


@dataclass
class Opened:
    """A provider response (body not read yet) and the payment it carries."""

    response: httpx.Response
    payment: Payment | None
    receipt: Receipt


class PayingClient:
    """Sends OpenAI requests to one provider, each paid from the client wallet."""

    def __init__(
        self,
        wallet: ClientWallet,
        provider: Provider,
        http: httpx.AsyncClient,
        *,
        cap_msat: int = DEFAULT_CAP_MSAT,
    ) -> None:
        self.wallet = wallet
        self.provider = provider
        self.http = http
        self.cap_msat = cap_msat
        self.pricer = provider.pricer()
        self.blocked: str | None = None
        self.problems: list[str] = []

    def quote(self, path: str, body: Mapping[str, Any]) -> int | None:
        """The most ``body`` can cost at the listed prices, in msat (None: not priced)."""
        endpoint = PATHS.get(path)
        model = body.get("model")
        if endpoint is None or not isinstance(model, str) or model not in self.provider.prices:
            return None
        return self.pricer.max_cost(model, body, endpoint).total_msat

    async def _pay(self, need_msat: int, mints: tuple[str, ...], units: tuple[str, ...]) -> Payment:
        if need_msat > self.cap_msat:
            raise InsufficientBalance(
                f"the request may cost {need_msat} msat, above the cap of {self.cap_msat} msat"
            )
        mint, unit = await self.wallet.pick_pool(need_msat, mints, units)
        value = from_msat_ceil(need_msat, unit)
        sent = await self.wallet.pay(value, mint, unit, ref=self.provider.base_url)
        fee = self.wallet.input_fee(mint, parse_token(sent.token).proofs)
        return Payment(sent.token, mint, unit, sent.amount, to_msat(sent.amount - fee, unit), None)

    async def pay_quote(self, quote_msat: int) -> Payment:
        payment = await self._pay(quote_msat, self.provider.mints, self.provider.units)
        payment.quote_msat = quote_msat
        return payment

    async def pay_request(self, creq: str, quote_msat: int | None) -> Payment:
        """Pay a NUT-18 request as asked (amount, unit, mint), within the cap and the quote."""
        request = decode_payment_request(creq)
        if request.amount is None:
            raise ProviderError("the provider's payment request names no amount")
        unit = check_unit(request.unit or "sat")
        asked = to_msat(request.amount, unit)
        if quote_msat is not None and asked > to_msat(from_msat_ceil(quote_msat, unit), unit):
            raise self._overcharged(
                f"the provider asks {asked} msat, more than the {quote_msat} msat its prices allow"
            )
        payment = await self._pay(asked, request.mints or self.provider.mints, (unit,))
        payment.quote_msat = quote_msat if quote_msat is not None else asked
        return payment

    def _overcharged(self, message: str, receipt: Receipt | None = None) -> Overcharged:
        self.blocked = f"{self.provider.base_url} overcharged and is refused: {message}"
        self.problems.append(message)
        if receipt is not None:
            receipt.problems.append(message)
        logger.warning("%s", self.blocked)
        return Overcharged(message)

    # --- requests -------------------------------------------------------------------

    async def open(self, path: str, body: Mapping[str, Any]) -> Opened:
        """Send ``body`` paid (paying a 402 once); the caller reads and then settles."""
        if self.blocked:
            raise Overcharged(self.blocked)
        if path not in PATHS:
            raise InvalidRequest(f"{path} is not a paid OpenAI route this proxy knows")
        quote = self.quote(path, body)
        payment = await self.pay_quote(quote) if quote is not None else None
        for attempt in (1, 2):
            response = await self._send(path, body, payment)
            if not _asks_payment(response):
                return Opened(response, payment, Receipt(self.paid_msat(payment)))
            data = _json(await response.aread())
            await response.aclose()
            refund = _refund(response, data)
            if payment is not None:
                await self.recover(payment, refund)
            creq = response.headers.get("x-cashu", "")
            if attempt == 2 or not creq.startswith("creq"):
                raise ProviderError(f"the provider refused the payment: {_message(data)}")
            payment = await self.pay_request(creq, quote)
        raise AssertionError("unreachable")

    @staticmethod
    def paid_msat(payment: Payment | None) -> int:
        return to_msat(payment.amount, payment.unit) if payment else 0

    async def _send(
        self, path: str, body: Mapping[str, Any], payment: Payment | None
    ) -> httpx.Response:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if payment is not None:
            headers["x-cashu"] = payment.token
        request = self.http.build_request(
            "POST", self.provider.api + path, content=json.dumps(body), headers=headers
        )
        try:
            return await self.http.send(request, stream=True)
        except httpx.TransportError as exc:
            if payment is not None:
                await self.recover(payment, None)
            raise ProviderDown(
                f"the provider at {self.provider.base_url} is unreachable: "
                f"{exc or type(exc).__name__}"
            ) from None

    async def recover(self, payment: Payment, refund: str | None) -> int:
        """After a failed request: take the refund, else take our token back if unspent."""
        if refund:
            return (await self.wallet.take_change(refund, ref="refund")).credited_msat
        result = await self.wallet.take_change(payment.token, ref="reclaim")
        if result.status == "received":
            return result.credited_msat
        claimed = await self.claim(payment)
        if not claimed:
            lost = to_msat(payment.amount, payment.unit)
            self.problems.append(f"the provider kept {lost} msat of a failed request, no refund")
        return claimed

    async def claim(self, payment: Payment) -> int:
        """Change the provider keeps claimable (``GET /v1/wallet/change``), taken once."""
        if not self.provider.base_url:
            return 0
        try:
            response = await self.http.get(
                self.provider.api + "/wallet/change", headers={"x-cashu": payment.token}
            )
            tokens = response.json().get("tokens") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return 0
        credited = 0
        for token in tokens if isinstance(tokens, list) else ():
            if isinstance(token, str):
                result = await self.wallet.take_change(token, ref="change")
                credited += result.credited_msat
        return credited

    async def settle(self, opened: Opened, cost_msat: int | None, change: str | None) -> Receipt:
        """Take the change of an HTTP response; check it and the cost against the quote."""
        failed = opened.response.status_code >= 400
        return await self.check(opened.payment, opened.receipt, cost_msat, change, failed=failed)

    async def check(
        self,
        payment: Payment | None,
        receipt: Receipt,
        cost_msat: int | None,
        change: str | None,
        *,
        failed: bool = False,
    ) -> Receipt:
        """Take ``change`` once; record overcharges, missing and spent change as problems."""
        receipt.cost_msat = cost_msat
        if payment is None:
            return receipt
        if failed:
            receipt.change_msat = await self.recover(payment, change)
            return receipt
        quote = payment.quote_msat
        owed = None
        if cost_msat is not None:
            charged = to_msat(from_msat_ceil(cost_msat, payment.unit), payment.unit)
            owed = max(0, payment.credit_msat - charged)
            if quote is not None and cost_msat > quote:
                self._overcharged(
                    f"the provider charged {cost_msat} msat, more than the quoted maximum "
                    f"{quote} msat",
                    receipt,
                )
        given = 0
        if change:
            result = await self.wallet.take_change(change, ref="change")
            if result.status == "spent":
                self._problem(receipt, f"{result.message} ({_value(change)} msat lost)")
            elif result.status == "invalid":
                self._problem(receipt, result.message)
            else:
                given = _value(change)
                receipt.change_msat += result.credited_msat
        elif owed is None or owed > 0:
            receipt.change_msat += await self.claim(payment)
            given = receipt.change_msat
            if not given and owed:
                self._problem(receipt, f"the provider returned no change ({owed} msat owed)")
        slack = await self._swap_fee_slack(payment)
        if owed is not None and given and given + slack < owed:
            self._overcharged(
                f"the provider returned {given} msat change, {owed} msat are owed", receipt
            )
        return receipt

    async def _swap_fee_slack(self, payment: Payment) -> int:
        """What a mint fee on the provider's change swap may take (the change pays it)."""
        ppk = (await self.wallet.active_keyset(payment.mint, payment.unit)).fee_ppk
        return to_msat(-(-len(parse_token(payment.token).proofs) * 2 * ppk // 1000), payment.unit)

    def _problem(self, receipt: Receipt, message: str) -> None:
        logger.warning("%s: %s", self.provider.base_url, message)
        receipt.problems.append(message)
        self.problems.append(message)

    async def complete(self, path: str, body: Mapping[str, Any]) -> tuple[httpx.Response, Receipt]:
        """A non-streamed request: the response (body read) and its settled receipt."""
        opened = await self.open(path, body)
        await opened.response.aread()
        await opened.response.aclose()
        change = _change_header(opened.response)
        refund = _refund(opened.response, _json(opened.response.content))
        receipt = await self.settle(opened, _cost(opened.response), change or refund)
        return opened.response, receipt

    async def relay_stream(self, opened: Opened) -> AsyncIterator[bytes]:
        """The provider's SSE bytes as they come, without nodeprov's change lines.

        The change is taken before ``data: [DONE]`` is passed on, so a client that has
        read the whole stream sees the wallet already settled.
        """
        pending = b""
        settled = done = False
        try:
            async for chunk in opened.response.aiter_raw():
                pending += chunk
                cut = pending.rfind(b"\n") + 1
                if not cut or done:
                    pending = pending[cut:] if done else pending
                    continue
                out = bytearray()
                skip_blank = False
                for line in pending[:cut].splitlines(keepends=True):
                    text = line.rstrip(b"\r\n")
                    if done:
                        break
                    if text.startswith(b": nodeprov "):
                        info = _json(text[len(b": nodeprov ") :])
                        await self.settle(opened, _int(info.get("cost_msat")), info.get("change"))
                        settled = skip_blank = True
                        continue
                    if skip_blank and not text:
                        skip_blank = False
                        continue
                    if text == b"data: [DONE]":
                        if not settled:
                            await self.settle(opened, None, None)
                            settled = True
                        done = True
                    out += line
                pending = pending[cut:]
                if out:
                    yield bytes(out)
        finally:
            await opened.response.aclose()
            if not settled:
                await self.settle(opened, None, None)


def _asks_payment(response: httpx.Response) -> bool:
    """A 402, or a NUT-24 400 refusing a token too small, with a payment request to pay."""
    if response.status_code == 402:
        return True
    return response.status_code == 400 and response.headers.get("x-cashu", "").startswith("creq")


def _json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _cost(response: httpx.Response) -> int | None:
    try:
        return int(response.headers["x-cost-msat"])
    except (KeyError, ValueError):
        return None


def _change_header(response: httpx.Response) -> str | None:
    value = response.headers.get("x-cashu", "").strip()
    return value if value.startswith("cashu") else None


def _refund(response: httpx.Response, data: Mapping[str, Any]) -> str | None:
    error = data.get("error")
    refund = error.get("refund") if isinstance(error, Mapping) else None
    return refund if isinstance(refund, str) else _change_header(response)


def _message(data: Mapping[str, Any]) -> str:
    error = data.get("error")
    message = error.get("message") if isinstance(error, Mapping) else None
    return str(message or "402 payment required")


def _value(token: str) -> int:
    """A token's face value in msat (0 when unreadable)."""
    try:
        parsed = parse_token(token)
        return to_msat(parsed.amount, check_unit(parsed.unit))
    except (NodeprovError, ValueError):
        return 0
