"""``ask``: one chat request to a provider, paid from the client wallet, over Nostr or HTTP.

Over Nostr the request is a ``nodeprov/1`` job in a NIP-17 DM carrying a token; the reply
(joined from parts if split) brings the answer, the cost and the change. Over HTTP it is a
``POST /v1/chat/completions`` with ``X-Cashu``. Both keep the change and check it against
the quote the same way (:class:`nodeprov.client.pay.PayingClient`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeprov.client.pay import PayingClient, Payment, Receipt
from nodeprov.client.provider import ProviderDown, ProviderError
from nodeprov.errors import InvalidJobMessage, NodeprovError
from nodeprov.nostr.relay_pool import RelayPool, Subscription
from nodeprov.protocol import nip59
from nodeprov.protocol.dm_jobs import join_parts, parse_part
from nodeprov.protocol.nip19 import decode_pubkey
from nodeprov.protocol.nostr_event import Event, Keys

KEY_FILE = "nostr.key"
CHAT_PATH = "/chat/completions"


@dataclass
class Answer:
    """The reply text, the full OpenAI body and what the request cost."""

    text: str
    body: dict[str, Any]
    receipt: Receipt
    via: str
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        r = self.receipt
        return {
            "answer": self.text,
            "via": self.via,
            "cost_msat": r.cost_msat,
            "paid_msat": r.paid_msat,
            "change_msat": r.change_msat,
            "problems": self.problems,
        }


def chat_body(prompt: str, model: str, max_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def answer_text(body: Any) -> str:
    try:
        return str(body["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        return ""


def client_keys(folder: Path) -> Keys:
    """The client's Nostr key (made on first use, kept in the wallet folder)."""
    path = folder / KEY_FILE
    if path.exists():
        return Keys.parse(path.read_text())
    keys = Keys.generate()
    try:  # 0600 from creation, never overwriting a key made concurrently
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return Keys.parse(path.read_text())
    with os.fdopen(fd, "w") as file:
        file.write(keys.nsec + "\n")
    return keys


async def ask_http(payer: PayingClient, body: dict[str, Any]) -> Answer:
    """The chat request over HTTP with ``X-Cashu``."""
    response, receipt = await payer.complete(CHAT_PATH, body)
    data = json.loads(response.content) if response.content else {}
    if response.status_code >= 400:
        message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        raise ProviderError(f"the provider answered {response.status_code}: {message}")
    return Answer(answer_text(data), data, receipt, "http", list(receipt.problems))


async def ask_nostr(
    payer: PayingClient,
    body: dict[str, Any],
    keys: Keys,
    relays: tuple[str, ...],
    *,
    wait: float = 60.0,
) -> Answer:
    """The chat request as a NIP-17 DM job to the provider's npub on ``relays``."""
    npub = payer.provider.npub
    if not npub:
        raise ProviderError("the provider has no Nostr key")
    provider_key = decode_pubkey(npub)
    quote = payer.quote(CHAT_PATH, body)
    pool = RelayPool(relays, connect_timeout=10.0, backoff_cap=2.0)
    since = int(time.time()) - nip59.TWO_DAYS - 60
    try:
        sub = pool.subscribe([{"kinds": [nip59.GIFT_WRAP_KIND], "#p": [keys.public_key],
                               "since": since}])  # fmt: skip
        await sub.wait_eose(10.0)
        payment = await payer.pay_quote(quote) if quote is not None else None
        for attempt in (1, 2):
            ident = uuid.uuid4().hex
            reply = await _exchange(pool, sub, keys, provider_key, ident, body, payment, wait)
            if reply is None:
                receipt = Receipt(payer.paid_msat(payment))
                if payment is not None:
                    receipt.change_msat = await payer.recover(payment, None)
                raise ProviderDown(
                    f"no reply from {npub} within {wait:.0f} s on {', '.join(relays)}"
                    + (f"; {receipt.change_msat} msat came back" if payment else "")
                )
            receipt = Receipt(payer.paid_msat(payment))
            if reply.get("type") == "response":
                cost = reply.get("cost_msat")
                cost = cost if isinstance(cost, int) and not isinstance(cost, bool) else None
                change = reply.get("change") if isinstance(reply.get("change"), str) else None
                await payer.check(payment, receipt, cost, change)
                out = reply.get("body") if isinstance(reply.get("body"), dict) else {}
                assert isinstance(out, dict)
                return Answer(answer_text(out), out, receipt, "nostr", list(receipt.problems))
            refund = reply.get("refund") if isinstance(reply.get("refund"), str) else None
            if payment is not None:
                await payer.check(payment, receipt, None, refund, failed=True)
            error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            assert isinstance(error, dict)
            creq = reply.get("payment_request")
            if attempt == 2 or not isinstance(creq, str) or not creq:
                raise ProviderError(f"the provider refused: {error.get('message', reply)}")
            payment = await payer.pay_request(creq, quote)
        raise AssertionError("unreachable")
    finally:
        await pool.close()


async def _exchange(
    pool: RelayPool,
    sub: Subscription,
    keys: Keys,
    provider_key: str,
    ident: str,
    body: dict[str, Any],
    payment: Payment | None,
    wait: float,
) -> dict[str, Any] | None:
    """Send one job DM and wait for its reply (parts joined); None on timeout."""
    message: dict[str, Any] = {"type": "request", "id": ident,
                               "endpoint": "/v1" + CHAT_PATH, "body": body}  # fmt: skip
    if payment is not None:
        message["cashu"] = payment.token
    for event in nip59.build_dm(keys, provider_key, json.dumps(message), self_copy=False):
        result = await pool.publish(event.to_dict(), timeout=10.0)
        if not result.ok:
            raise ProviderDown(f"no relay accepted the DM: {result.relays}")
    parts: dict[int, str] = {}
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        try:
            _, raw = await asyncio.wait_for(anext(sub), left)
        except (TimeoutError, StopAsyncIteration):
            return None
        text = _open(raw, keys, provider_key)
        if text is None:
            continue
        try:
            part = parse_part(text)
            if part is not None:
                if part.id == ident:
                    parts[part.part] = text
                    if len(parts) == part.of:
                        text = join_parts(list(parts.values()))
                    else:
                        continue
                else:
                    continue
            reply = json.loads(text)
        except (InvalidJobMessage, ValueError):
            continue
        if isinstance(reply, dict) and reply.get("id") == ident:
            return reply
    return None


def _open(raw: dict[str, Any], keys: Keys, provider_key: str) -> str | None:
    """The DM text of a gift wrap from the provider (None for anything else)."""
    try:
        opened = nip59.unwrap(Event.from_dict(raw), keys)
    except NodeprovError:
        return None
    if opened.sender_pubkey != provider_key or opened.rumor.kind != nip59.DM_KIND:
        return None
    return opened.rumor.content
