"""The HTTP clients' operations: keys, tokens as keys, X-Cashu, streams, wallet routes.

Each operation sends real requests to the node and writes what the client saw into the
books. An answer lost to a fault (:class:`~tests.soak.world.Lost`) widens the books instead
of guessing; the final drain settles it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from typing import Any

import httpx

from tests.soak.faucet import token_msat
from tests.soak.stack import job_cost
from tests.soak.world import EXACT_MODELS, Lost, World, XCashuPayment, max_cost


@dataclass
class ChatAnswer:
    status: int
    cost_msat: int | None  # what the node said it charged (None: not said)
    change: str | None
    usage: dict[str, Any] | None
    complete: bool  # the whole answer arrived
    refund: str | None = None
    error: dict[str, Any] | None = None


async def send_chat(
    world: World, body: dict[str, Any], headers: dict[str, str], disconnect_after: int | None = None
) -> ChatAnswer:
    """POST a chat completion and read the answer (a stream to its end, or ``disconnect_after``
    data events and then hang up)."""
    url = world.stack.url + "/v1/chat/completions"
    try:
        if not body.get("stream"):
            response = await world.http.post(url, json=body, headers=headers)
            return _plain_answer(response)
        async with world.http.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return _plain_answer(response)
            return await _stream_answer(response, disconnect_after)
    except (httpx.TransportError, json.JSONDecodeError) as exc:
        raise Lost(f"{type(exc).__name__}: {exc}") from exc


def _plain_answer(response: httpx.Response) -> ChatAnswer:
    data = response.json()
    cost = response.headers.get("x-cost-msat")
    change = response.headers.get("x-cashu")
    if response.status_code == 200:
        return ChatAnswer(200, int(cost) if cost else None, change, data.get("usage"), True)
    error = data.get("error", {}) if isinstance(data, dict) else {}
    refund = error.get("refund") or (change if change and change.startswith("cashu") else None)
    return ChatAnswer(response.status_code, None, None, None, False, refund, error)


async def _stream_answer(response: httpx.Response, disconnect_after: int | None) -> ChatAnswer:
    events = 0
    usage: dict[str, Any] | None = None
    note: dict[str, Any] | None = None
    done = False
    error: dict[str, Any] | None = None
    async for line in response.aiter_lines():
        if line.startswith(": nodeprov "):
            note = json.loads(line[len(": nodeprov ") :])
        elif line == "data: [DONE]":
            done = True
        elif line.startswith("data: ") and not done:
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]
                continue
            events += 1
            usage = chunk.get("usage") or usage
            if disconnect_after is not None and events >= disconnect_after:
                raise Lost(f"the client hung up after {events} events")
    if note is None:
        raise Lost("the stream ended without the node's closing note")
    cost = note.get("cost_msat")
    return ChatAnswer(200, cost, note.get("change"), usage, done and error is None, None, error)


def check_cost(world: World, what: str, body: dict[str, Any], answer: ChatAnswer) -> int:
    """The cost the node reported, checked against the advertised prices; returns it."""
    cost = answer.cost_msat
    if cost is None:
        world.books.violation("no_cost_reported", f"{what}: a paid answer without its cost")
        return 0
    bound = max_cost(body)
    exact = body["model"] in EXACT_MODELS and answer.complete and answer.usage
    if exact and answer.usage is not None and cost != job_cost(answer.usage):
        world.books.violation(
            "charged_not_as_advertised",
            f"{what}: usage {answer.usage} costs {job_cost(answer.usage)} msat at the "
            f"advertised prices, the node charged {cost}",
        )
    elif not 0 <= cost <= bound:
        world.books.violation("charged_over_hold", f"{what}: charged {cost} msat, max {bound}")
    world.books.answered += 1
    world.books.charged_msat += cost
    return cost


def check_unpaid(world: World, what: str, answer: ChatAnswer) -> None:
    if answer.cost_msat:
        world.books.violation("failed_job_charged", f"{what}: status {answer.status} charged")


# --- operations ---------------------------------------------------------------------------


async def create_key(world: World) -> None:
    token = await world.token(world.rng.randint(20, 300))
    msat = world.books.hand_over(token)
    for _ in range(20):
        try:
            response = await world.http.post(
                world.stack.url + "/v1/wallet/create", json={"cashu_token": token}
            )
        except httpx.TransportError:
            await asyncio.sleep(1.0)  # the node is restarting: the same token again is safe
            continue
        if response.status_code == 200:
            data = response.json()
            world.books.taken_by_node(token, "key created")
            if data["balance"] != msat:
                world.books.violation(
                    "key_credited_wrong", f"a {msat} msat token made a key of {data['balance']}"
                )
            if data["api_key"] not in world.keys:  # a retry may return the same key
                world.books.account("key:" + data["api_key"]).credit(data["balance"])
                world.keys.append(data["api_key"])
            return
        if response.status_code in (502, 503):
            await asyncio.sleep(1.0)  # the mint is down: retry the same token
            continue
        world.books.violation("create_refused", f"{response.status_code} {response.text[:200]}")
        return
    # Never answered: the token may be on either side; the end tells.


async def key_chat(world: World, key: str | None = None, disconnect: bool = False) -> None:
    if not world.keys:
        return await create_key(world)
    key = key or world.rng.choice(world.keys)
    body = world.chat_body(stream=True if disconnect else None)
    account = world.books.account("key:" + key)
    cut = world.rng.randint(1, 3) if disconnect else None
    try:
        answer = await send_chat(world, body, {"Authorization": f"Bearer {key}"}, cut)
    except Lost:
        account.debit(0, certain=False, at_most=max_cost(body))
        return
    if answer.status == 200:
        account.debit(check_cost(world, "key chat", body, answer))
    else:
        check_unpaid(world, "key chat", answer)


async def concurrent_key_chats(world: World) -> None:
    """Several requests on one key at once: they must never overdraw it."""
    if not world.keys:
        return await create_key(world)
    key = world.rng.choice(world.keys)
    await asyncio.gather(*(key_chat(world, key) for _ in range(world.rng.randint(2, 6))))


async def topup(world: World) -> None:
    if not world.keys:
        return await create_key(world)
    key = world.rng.choice(world.keys)
    token = await world.token(world.rng.randint(5, 100))
    msat = world.books.hand_over(token)
    account = world.books.account("key:" + key)
    try:
        response = await world.http.post(
            world.stack.url + "/v1/wallet/topup",
            json={"cashu_token": token},
            headers={"Authorization": f"Bearer {key}"},
        )
    except httpx.TransportError:
        account.credit(msat, certain=False)
        return
    if response.status_code == 200:
        world.books.taken_by_node(token, "topped up")
        account.credit(response.json()["msats"])
    elif response.status_code in (400, 401, 402):
        world.books.returned(token, f"topup: {response.status_code} {response.text[:200]}")
    elif response.status_code == 503:
        account.credit(msat, certain=False)  # the mint may have swapped it: recovery credits
    else:
        world.books.violation("topup_failed", f"{response.status_code} {response.text[:200]}")


async def withdraw(world: World, key: str | None = None, amount: int | None = None) -> None:
    if not world.keys:
        return await create_key(world)
    key = key or world.rng.choice(world.keys)
    unit = world.rng.choice(("sat", "msat"))
    body: dict[str, Any] = {"unit": unit}
    body["amount"] = amount if amount is not None else world.rng.randint(1000, 30_000)
    await _withdraw(world, "key:" + key, key, body)


async def _withdraw(world: World, account: str, credential: str, body: dict[str, Any]) -> None:
    """A withdrawal retried with its Idempotency-Key until the node answers."""
    headers = {"Authorization": f"Bearer {credential}", "Idempotency-Key": secrets.token_hex(8)}
    for _ in range(60):
        try:
            response = await world.http.post(
                world.stack.url + "/v1/wallet/withdraw", json=body, headers=headers
            )
        except httpx.TransportError:
            await asyncio.sleep(1.0)
            continue
        if response.status_code == 503:
            await asyncio.sleep(1.0)
            continue
        if response.status_code == 200:
            data = response.json()
            got = token_msat(data["token"])
            if got != data["msats"]:
                world.books.violation("withdrawal_short", f"debited {data['msats']}, token {got}")
            world.books.receive(data["token"], got, "key withdrawal")
            world.books.account(account).debit(data["msats"])
        elif response.status_code not in (400, 402) and not _no_pool(response):
            world.books.violation("withdraw_failed", f"{response.status_code} {response.text}")
        return
    world.books.violation("withdraw_never_answered", f"{account}: 60 tries")


def _no_pool(response: httpx.Response) -> bool:
    """The node holds the amount, but not in proofs of the unit asked for (a clear refusal)."""
    return response.status_code == 400 and "withdrawal_too_large" in response.text


async def token_key_chat(world: World) -> None:
    """A token used as the key: the first use redeems it, later uses pay from it."""
    reuse = bool(world.token_keys) and world.rng.random() < 0.6
    token = world.rng.choice(world.token_keys) if reuse else await world.token(50)
    account = world.books.account("tok:" + token)
    if not reuse:
        msat = world.books.hand_over(token)
        account.credit(msat, certain=False)  # certain once an answer shows it was redeemed
        world.token_keys.append(token)
    body = world.chat_body()
    try:
        answer = await send_chat(world, body, {"Authorization": f"Bearer {token}"})
    except Lost:
        account.debit(0, certain=False, at_most=max_cost(body))
        return
    if answer.status == 200:
        if token in world.books.unknown:
            world.books.taken_by_node(token, "token key answered")
            account.lo += world.books.taken[token]
        account.debit(check_cost(world, "token-as-key chat", body, answer))
    else:
        check_unpaid(world, "token-as-key chat", answer)


async def xcashu_chat(world: World, disconnect: bool = False) -> None:
    """Pay per request with an X-Cashu token (NUT-24); change comes back with the answer."""
    unit = world.rng.choice(("sat", "sat", "msat"))
    too_small = world.rng.random() < 0.05
    amount = 1 if too_small else world.rng.randint(3, 12)
    token = await world.token(amount * 1000 if unit == "msat" else amount, unit)
    payment = XCashuPayment(token, world.books.hand_over(token), unit)
    world.xcashu.append(payment)
    body = world.chat_body(stream=True if disconnect else None)
    cut = world.rng.randint(1, 3) if disconnect else None
    try:
        answer = await send_chat(world, body, {"X-Cashu": token}, cut)
    except Lost:
        return  # claimed at the end with the original token
    if answer.status == 200:
        world.books.taken_by_node(token, "X-Cashu answered")
        payment.cost_msat = check_cost(world, "X-Cashu chat", body, answer)
        if answer.change:
            world.books.receive(answer.change, token_msat(answer.change), "X-Cashu change")
        return
    check_unpaid(world, "X-Cashu chat", answer)
    if answer.refund:
        world.books.taken_by_node(token, "X-Cashu refunded")
        world.books.receive(answer.refund, token_msat(answer.refund), "X-Cashu refund")
        if token_msat(answer.refund) != payment.msat:
            world.books.violation(
                "refund_short",
                f"X-Cashu {body['model']} stream={bool(body.get('stream'))}: status "
                f"{answer.status} {answer.error}: refunded {token_msat(answer.refund)} of "
                f"{payment.msat} msat",
            )
        payment.cost_msat = 0
    # Otherwise the token may have been swapped with its refund kept claimable (the mint
    # went away): the end claims it with the original token like a NUT-24 wallet would.


async def stream_disconnect(world: World) -> None:
    """A client that hangs up mid-stream."""
    choice = world.rng.random()
    if choice < 0.5:
        await key_chat(world, disconnect=True)
    else:
        await xcashu_chat(world, disconnect=True)


async def balance(world: World) -> None:
    if not world.keys:
        return await create_key(world)
    key = world.rng.choice(world.keys)
    try:
        response = await world.http.get(
            world.stack.url + "/v1/wallet/balance", headers={"Authorization": f"Bearer {key}"}
        )
    except httpx.TransportError:
        return
    if response.status_code != 200:
        world.books.violation("balance_failed", f"{response.status_code} {response.text[:200]}")
