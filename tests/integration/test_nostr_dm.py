"""DM jobs end to end: nostr-sdk client, real relay, DM listener, real mint, fake upstream."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import nostr_sdk  # type: ignore[import-untyped]
import pytest

from nodeprov.protocol.cashu_token import parse_token
from nodeprov.protocol.payment_request import PaymentRequestPayload, build_payment_payload
from tests.conftest import TokenMaker
from tests.support.fake_upstream import FakeUpstream, expected_usage
from tests.support.nostr_client import (  # noqa: F401  (fixtures)
    CHAT_MODEL,
    HELD_MODEL,
    MODELS,
    DmNode,
    SdkClient,
    chat_cost,
    dm_node_fixture,
    dm_upstream_fixture,
    npub_balance,
    sdk_client_fixture,
    start_dm_node,
    wait_idle,
)
from tests.support.services import MintHandle, RelayHandle
from tests.support.waiting import until

pytestmark = pytest.mark.integration


def chat_body(text: str = "hello there node", model: str = CHAT_MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8}


def request(body: dict[str, Any], ident: str = "r1", cashu: str | None = None) -> str:
    msg: dict[str, Any] = {"type": "request", "id": ident, "endpoint": "/v1/chat/completions"}
    msg["body"] = body
    if cashu:
        msg["cashu"] = cashu
    return json.dumps(msg)


@pytest.mark.parametrize("nip", ["nip17", "nip04"])
async def test_request_with_token_gets_response_and_exact_change(
    node: DmNode, client: SdkClient, make_token: TokenMaker, nip: str
) -> None:
    token = await make_token(100)
    body = chat_body()
    reply = await client.ask(request(body, cashu=token), nip)
    assert reply.nip == nip
    data = reply.json
    assert data["type"] == "response" and data["id"] == "r1" and data["status"] == 200
    cost = chat_cost(expected_usage(body))
    assert data["cost_msat"] == cost
    assert data["body"]["choices"][0]["message"]["content"]
    assert data["balance_msat"] is None
    assert await make_token.redeem(data["change"]) == 100 - -(-cost // 1000)


async def test_plain_text_chat_with_pasted_token(
    node: DmNode, client: SdkClient, make_token: TokenMaker
) -> None:
    token = await make_token(50)
    reply = await client.ask(f"Hi there, here is money {token}")
    assert reply.nip == "nip17"
    assert "cost" in reply.text and "balance" in reply.text, reply.text
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Hi there, here is money"}],
    }
    cost = chat_cost(expected_usage(body))
    assert await npub_balance(node, client.pubkey) == 50_000 - cost
    # The history is part of the next prompt; /balance and /new answer without a model call.
    assert "Balance:" in (await client.ask("/balance")).text
    second = await client.ask("and again")
    assert "cost" in second.text
    assert (await client.ask("/new")).text.startswith("Started")


async def test_deposit_requests_from_balance_then_withdraw(
    node: DmNode, client: SdkClient, make_token: TokenMaker
) -> None:
    token = await make_token(64)
    dep = (await client.ask(json.dumps({"type": "deposit", "id": "d1", "cashu": token}))).json
    assert dep == {"type": "balance", "id": "d1", "balance_msat": 64_000}
    spent = 0
    for i in range(2):
        body = chat_body(f"question number {i}")
        data = (await client.ask(request(body, ident=f"q{i}"))).json
        assert data["type"] == "response", data
        spent += chat_cost(expected_usage(body))
        assert data["change"] is None and data["balance_msat"] == 64_000 - spent
    bal = (await client.ask(json.dumps({"type": "balance", "id": "b"}))).json
    assert bal["balance_msat"] == 64_000 - spent
    out = (await client.ask(json.dumps({"type": "withdraw", "id": "w"}))).json
    assert out["type"] == "withdrawal", out
    assert out["amount_msat"] == (64_000 - spent) // 1000 * 1000
    assert await make_token.redeem(out["cashu"]) == (64_000 - spent) // 1000
    info = (await client.ask(json.dumps({"type": "info", "id": "i"}), "nip04")).json
    assert {m["id"] for m in info["models"]} == set(MODELS)
    assert info["mints"] == list(node.ctx.mints)


async def test_nut18_payment_payload_is_a_deposit(
    node: DmNode, client: SdkClient, make_token: TokenMaker
) -> None:
    """A wallet answering our creqA sends a NUT-18 PaymentRequestPayload: it is a deposit."""
    token = parse_token(await make_token(21))
    payload = PaymentRequestPayload(
        mint=token.mint, unit=token.unit, proofs=token.proofs, id="pay-1", memo="for chat"
    )
    data = (await client.ask(build_payment_payload(payload))).json
    assert data == {"type": "balance", "id": "pay-1", "balance_msat": 21_000}
    assert await npub_balance(node, client.pubkey) == 21_000


async def test_unpaid_request_gets_payment_request(node: DmNode, client: SdkClient) -> None:
    data = (await client.ask(request(chat_body()))).json
    assert data["type"] == "error" and data["error"]["code"] == "insufficient_balance"
    assert data["payment_request"].startswith("creqA")
    plain = await client.ask("hello, can you help?")
    assert "creqA" in plain.text
    assert await npub_balance(node, client.pubkey) == 0


async def test_a_refused_dm_job_says_msat_and_the_max_tokens_that_fit_and_is_recorded_as_nostr(
    node: DmNode, client: SdkClient, make_token: TokenMaker
) -> None:
    deposit = json.dumps({"type": "deposit", "id": "d", "cashu": await make_token(2)})
    assert (await client.ask(deposit)).json["balance_msat"] == 2_000
    body = {**chat_body(), "max_tokens": 1000}
    data = (await client.ask(request(body, "big"))).json
    assert data["type"] == "error" and data["error"]["code"] == "insufficient_balance"
    fits = node.core.pricer.fitting_max_tokens(CHAT_MODEL, body, "chat", 2_000)
    assert fits is not None
    message = data["error"]["message"]
    need = node.core.pricer.max_cost(CHAT_MODEL, body, "chat").total_msat
    assert f"(2000 msat available, {need} msat required)" in message
    assert message.endswith(f" With max_tokens at most {fits} the request would fit.")
    data = (await client.ask(request({**body, "max_tokens": fits}, "fits"))).json
    assert data["type"] == "response", data
    rows = await node.core.ledger.db.fetchall(
        "SELECT channel, model FROM transactions WHERE kind = 'charge'"
    )
    assert [tuple(r) for r in rows] == [("nostr", CHAT_MODEL)]
    await wait_idle(node)


async def test_bad_input_gets_error_or_nothing(node: DmNode, client: SdkClient) -> None:
    data = (await client.ask('{"type": "request", "id": "x", "endpoint": "/v1/nope"}')).json
    assert data["type"] == "error" and data["error"]["code"] == "invalid_job_message"
    # Requests over nostr.max_content_bytes: tests/integration/test_nostr_dm_sizes.py.
    # A forged gift wrap (bad signature; a relay would refuse it, so it is handed over
    # directly) and a stale kind 4 (via the relay) get no reply, no charge and no crash.
    forged = json.loads(client.nip17("hi").as_json())
    forged["sig"] = ("0" if forged["sig"][0] != "0" else "1") + forged["sig"][1:]
    dropped = node.listener.stats["dropped"]
    await node.listener.process(forged)
    assert node.listener.stats["dropped"] == dropped + 1
    node.listener.transport.max_age = -10_000  # everything counts as stale now
    await client.publish(client.nip04("old"))
    # Wait for the listener to see (and drop) it: a fixed pause could end before it arrives.
    await until(lambda: node.listener.stats["dropped"] == dropped + 2, what="stale DM dropped")
    assert await client.quiet(1.5) == []
    node.listener.transport.max_age = 24 * 3600
    # A kind 4 dated an hour ahead (signed, handed over directly: relays refuse those too).
    future = nostr_sdk.EventBuilder(
        nostr_sdk.Kind(4),
        nostr_sdk.nip04_encrypt(client.keys.secret_key(), client.node, "from the future"),
    )
    future = future.tags([nostr_sdk.Tag.parse(["p", client.node.to_hex()])])
    future = future.custom_created_at(nostr_sdk.Timestamp.from_secs(int(time.time()) + 3600))
    await node.listener.process(json.loads(future.finalize(client.keys).as_json()))
    assert node.listener.stats["dropped"] == dropped + 3
    assert (await client.ask('{"type": "balance", "id": "ok"}')).json["balance_msat"] == 0


async def test_same_event_twice_is_processed_once(
    node: DmNode, client: SdkClient, make_token: TokenMaker
) -> None:
    token = await make_token(32)
    await client.ask(json.dumps({"type": "deposit", "id": "d", "cashu": token}))
    event = client.nip17(request(chat_body(), ident="once"))
    await client.publish(event)
    first = await client.replies(1)
    assert first[0].json["type"] == "response"
    after = await npub_balance(node, client.pubkey)
    # Delivered again: directly, and to a fresh listener that re-reads from its watermark.
    await node.listener.process(json.loads(event.as_json()))
    assert node.listener.stats["duplicates"] == 1
    await node.stop_listener()
    await node.start_listener()
    await client.publish(event)
    # The fresh listener gets the event (from its watermark or live) and counts it as a
    # duplicate: wait for that rather than for a fixed time, then check nothing was sent.
    await until(lambda: node.listener.stats["duplicates"] >= 1, what="duplicate seen")
    assert await client.quiet(2.0) == []
    assert await npub_balance(node, client.pubkey) == after
    assert node.listener.stats["handled"] == 0


async def _in_upstream_call(upstream: FakeUpstream, arrivals: int) -> None:
    """Until a held request reached the closed gate: the job is inside its upstream call."""
    await until(lambda: upstream.held_arrivals > arrivals, what="job reached the upstream")


async def _holding(node: DmNode) -> bool:
    return (await node.core.ledger.open_holds())[0] > 0


async def test_restart_between_receipt_and_reply_npub(
    node: DmNode, client: SdkClient, make_token: TokenMaker, upstream: FakeUpstream
) -> None:
    token = await make_token(40)
    await client.ask(json.dumps({"type": "deposit", "id": "d", "cashu": token}))
    body = chat_body(model=HELD_MODEL)
    arrivals = upstream.held_arrivals
    upstream.close_gate()
    try:
        await client.send(request(body, ident="slow"))
        await _in_upstream_call(upstream, arrivals)
        await node.stop_listener(grace=0)  # cancels the job mid-upstream call
        assert await npub_balance(node, client.pubkey) == 40_000  # hold released, nothing charged
    finally:
        upstream.open_gate()
    await node.start_listener()
    data = (await client.replies(1, within=30))[0].json
    assert data["type"] == "response" and data["id"] == "slow"
    cost = chat_cost(expected_usage(body))
    assert data["balance_msat"] == 40_000 - cost
    assert await npub_balance(node, client.pubkey) == 40_000 - cost
    assert await client.quiet(1.0) == []


async def test_restart_between_receipt_and_reply_token(
    node: DmNode, client: SdkClient, make_token: TokenMaker, upstream: FakeUpstream
) -> None:
    token = await make_token(30)
    body = chat_body(model=HELD_MODEL)
    arrivals = upstream.held_arrivals
    upstream.close_gate()
    try:
        await client.send(request(body, ident="slowtok", cashu=token), "nip04")
        await _in_upstream_call(upstream, arrivals)
        # The token's swap runs beside the upstream call: restart once it holds the payment.
        await until(lambda: _holding(node), what="the job's hold")
        await node.stop_listener(grace=0)
    finally:
        upstream.open_gate()
    await node.start_listener()
    data = (await client.replies(1, within=30))[0].json
    assert data["type"] == "response", data
    cost = chat_cost(expected_usage(body))
    assert await make_token.redeem(data["change"]) == 30 - -(-cost // 1000)


async def test_two_withdraws_resumed_after_a_restart_each_deliver_their_own_token(
    node: DmNode, client: SdkClient, make_token: TokenMaker
) -> None:
    """Both withdrawals debit, then the node dies before it stores either reply: on resume,
    each DM finds its own token by its ref (``dm:<event id>``) and nothing is paid twice."""
    await client.ask(json.dumps({"type": "deposit", "id": "d", "cashu": await make_token(40)}))
    store_done = node.store.done

    async def killed(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the node died before storing the reply")

    node.store.done = killed  # type: ignore[method-assign]
    amounts = {"w1": 5_000, "w2": 7_000}
    event_ids = []
    for ident, amount in amounts.items():
        msg = {"type": "withdraw", "id": ident, "amount_msat": amount}
        event_ids.append(await client.send(json.dumps(msg)))
        left = 40_000 - sum(amounts[i] for i in amounts if i <= ident)

        async def debited(left: int = left) -> bool:
            return await npub_balance(node, client.pubkey) == left

        await until(debited, what=f"withdrawal {ident} debited")
    for event_id in event_ids:  # accepted, never done: no reply was stored or sent
        row = await node.store.get(event_id)
        assert row is not None and row.state == "accepted"
    node.store.done = store_done  # type: ignore[method-assign]
    await node.stop_listener()
    await node.start_listener()
    replies = {r.json["id"]: r.json for r in await client.replies(2, within=30)}
    assert set(replies) == set(amounts)
    for ident, amount in amounts.items():
        assert replies[ident]["type"] == "withdrawal"
        assert replies[ident]["amount_msat"] == amount
        assert await make_token.redeem(replies[ident]["cashu"]) == amount // 1000
    assert await npub_balance(node, client.pubkey) == 28_000


async def test_reply_survives_restart_after_the_job(
    node: DmNode, client: SdkClient, make_token: TokenMaker
) -> None:
    """Replies stored but not yet published are published by the next run (once)."""
    token = await make_token(20)
    await client.ask(json.dumps({"type": "deposit", "id": "d", "cashu": token}))
    sent = node.listener.transport.send

    async def lost(*args: Any, **kwargs: Any) -> bool:
        return False

    node.listener.transport.send = lost  # type: ignore[method-assign]
    event_id = await client.send(json.dumps({"type": "balance", "id": "later"}))
    deadline = time.monotonic() + 10
    while (row := await node.store.get(event_id)) is None or row.state != "done":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    node.listener.transport.send = sent  # type: ignore[method-assign]
    await node.stop_listener()
    await node.start_listener()
    assert (await client.replies(1))[0].json == {
        "type": "balance", "id": "later", "balance_msat": 20_000,
    }  # fmt: skip


async def test_relay_restart_mid_run(
    node: DmNode, client: SdkClient, relay: RelayHandle, make_token: TokenMaker
) -> None:
    token = await make_token(40)
    await client.ask(json.dumps({"type": "deposit", "id": "d", "cashu": token}))
    relay.stop()
    await asyncio.sleep(0.5)
    relay.start()
    for i in range(2):
        reply = None
        for _attempt in range(3):  # the client (not the node) may need a moment to reconnect
            try:
                reply = await client.ask(
                    request(chat_body(f"after restart {i}"), f"a{i}"), within=10
                )
                break
            except AssertionError:
                await client.client.connect()
        assert reply is not None and reply.json["type"] == "response"


async def test_reply_goes_to_senders_dm_relays(
    node: DmNode, relay_factory: Any, make_token: TokenMaker, relay: RelayHandle
) -> None:
    inbox = relay_factory()
    peer = await SdkClient([relay.url], node.keys.public_key).connect()
    reader = await SdkClient([inbox.url], node.keys.public_key).connect()
    try:
        await peer.publish_dm_relays([inbox.url])
        await peer.send('{"type": "balance", "id": "where"}')
        reader.keys = peer.keys  # read the inbox relay as the same person
        got = await reader.replies(1)
        assert got[0].json["id"] == "where"
    finally:
        await peer.close()
        await reader.close()


async def test_large_reply_is_split_into_parts(
    node: DmNode, client: SdkClient, make_token: TokenMaker
) -> None:
    token = await make_token(100)
    big = "word " * 9000
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": big}], "max_tokens": 4}
    await client.ask(json.dumps({"type": "deposit", "id": "d", "cashu": token}))
    reply = await client.ask(json.dumps({"type": "info", "id": "i"}))
    assert reply.json["type"] == "info"
    # An embeddings reply for a long input is large: 8 floats per input, many inputs.
    emb = {"model": "fake-embed", "input": ["some words here"] * 700}
    msg = {"type": "request", "id": "e", "endpoint": "/v1/embeddings", "body": emb}
    data = await client.ask(json.dumps(msg), within=30)
    assert len(data.raw) > 1, "expected a reply in parts"
    assert data.json["type"] == "response" and len(data.json["body"]["data"]) == 700
    del body


async def test_rate_limit_and_concurrency_cap(
    tmp_path: Path,
    relay: RelayHandle,
    mint: MintHandle,
    upstream: FakeUpstream,
    make_token: TokenMaker,
) -> None:
    node = await start_dm_node(
        tmp_path, [relay.url], [mint.url], upstream,
        rate_limit_per_minute=3, max_concurrent_jobs_per_sender=1,
    )  # fmt: skip
    peer = await SdkClient([relay.url], node.keys.public_key).connect()
    try:
        token = await make_token(30)
        await peer.ask(json.dumps({"type": "deposit", "id": "d", "cashu": token}))
        # Two jobs at once: the second is refused while the first runs. The first is held
        # in its upstream call until the second's answer is in, so the order is fixed (a
        # fixed pause and a slow model raced: s2 could arrive first, or after s1 finished).
        arrivals = upstream.held_arrivals
        upstream.close_gate()
        try:
            await peer.send(request(chat_body(model=HELD_MODEL), ident="s1"))
            await _in_upstream_call(upstream, arrivals)
            second = (await peer.ask(request(chat_body(model=HELD_MODEL), ident="s2"))).json
        finally:
            upstream.open_gate()
        assert second["id"] == "s2" and second["error"]["code"] == "rate_limited"
        first = (await peer.replies(1, within=30))[0].json
        assert first["id"] == "s1" and first["type"] == "response"
        third = (await peer.ask('{"type": "balance", "id": "b3"}')).json
        assert third["type"] == "balance"
        fourth = (await peer.ask('{"type": "balance", "id": "b4"}')).json
        assert fourth["error"]["code"] == "rate_limited"
        await wait_idle(node)
        assert (await node.core.ledger.audit()).ok
    finally:
        await peer.close()
        await node.close()


async def test_a_busy_upstream_is_an_error_dm_and_charges_nothing(
    tmp_path: Path,
    relay: RelayHandle,
    mint: MintHandle,
    upstream: FakeUpstream,
    make_token: TokenMaker,
) -> None:
    """The DM path sends through the same pool: past ``pool_wait_seconds`` with every
    connection busy, the job is an error DM ``upstream_busy`` and nothing is charged."""
    node = await start_dm_node(
        tmp_path, [relay.url], [mint.url], upstream,
        upstream_options={"max_connections": 1, "pool_wait_seconds": Decimal("0.05")},
    )  # fmt: skip
    peer = await SdkClient([relay.url], node.keys.public_key).connect()
    try:
        await peer.ask(json.dumps({"type": "deposit", "id": "d", "cashu": await make_token(30)}))
        arrivals = upstream.held_arrivals
        upstream.close_gate()
        try:
            await peer.send(request(chat_body(model=HELD_MODEL), ident="s1"))
            await _in_upstream_call(upstream, arrivals)  # it holds the only connection
            second = (await peer.ask(request(chat_body(), ident="s2"))).json
        finally:
            upstream.open_gate()
        assert second["id"] == "s2" and second["error"]["code"] == "upstream_busy"
        first = (await peer.replies(1, within=30))[0].json
        assert first["id"] == "s1" and first["type"] == "response"
        await wait_idle(node)
        cost = chat_cost(expected_usage(chat_body(model=HELD_MODEL)))
        assert await npub_balance(node, peer.pubkey) == 30_000 - cost
        assert (await node.core.ledger.audit()).ok
    finally:
        await peer.close()
        await node.close()
