"""An ``X-Cashu`` token's mint swap runs beside the upstream call, and what that may cost.

The mint sits behind a proxy the test can pause (new connections hang until resumed), so
"the upstream call started before the swap finished" is proven by events: the fake upstream
records the request while the node cannot reach the mint. No stopwatch anywhere.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from nodeprov.core.payments import Payer
from nodeprov.protocol.cashu_token import Token, parse_token, serialize_token
from tests.support.fake_upstream import FakeUpstream, expected_usage
from tests.support.http_node import Node, chat_cost, start_node, upstream_fixture  # noqa: F401  (fixtures)
from tests.support.services import MintHandle
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import until

CHAT = {
    "model": "fake-chat",
    "messages": [{"role": "user", "content": "tell me"}],
    "max_tokens": 16,
}
TOKEN_SAT = 40


@dataclass
class SlowMint:
    """The node, and the proxy between it and the mint (``hold()`` / ``release()`` the mint)."""

    node: Node
    proxy: TcpProxy

    def hold(self) -> None:
        """From now on the node's mint calls hang (until :meth:`release`)."""
        self.proxy.drop_connections()  # a kept-alive connection would slip past the pause
        self.proxy.pause()

    def release(self) -> None:
        self.proxy.resume()

    async def pending_receives(self) -> int:
        row = await self.node.core.ledger.db.fetchone(
            "SELECT COUNT(*) FROM wallet_ops WHERE kind = 'receive' AND state = 'pending'"
        )
        return int(row[0]) if row else 0


async def slow_mint_node(
    tmp_path: Path,
    mint: MintHandle,
    upstream: FakeUpstream,
    tcp_proxy: Callable[..., TcpProxy],
    **options: Any,
) -> SlowMint:
    proxy = tcp_proxy(mint.url)
    node = await start_node(tmp_path, [mint.url], upstream, routes={mint.url: proxy.url}, **options)
    return SlowMint(node, proxy)


@pytest.fixture
async def slow(
    tmp_path: Path, mint: MintHandle, upstream: FakeUpstream, tcp_proxy: Callable[..., TcpProxy]
) -> AsyncIterator[SlowMint]:
    """A node whose mint traffic goes through a pausable proxy; its books audit clean after."""
    started = await slow_mint_node(tmp_path, mint, upstream, tcp_proxy)
    try:
        yield started
        started.release()
        await started.node.wait_idle()
        await started.node.core.assert_books_balance()
    finally:
        started.release()
        upstream.open_gate()
        await started.node.stop()


def note_of(lines: list[str]) -> dict[str, Any]:
    """The ``: nodeprov {...}`` settlement note of a relayed stream."""
    [note] = [line for line in lines if line.startswith(": nodeprov ")]
    found: dict[str, Any] = json.loads(note[len(": nodeprov ") :])
    return found


async def post(node: Node, token: str, body: dict[str, Any] = CHAT) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.post(
            node.base + "/chat/completions", json=body, headers={"X-Cashu": token}
        )


def overlap(node: Node) -> Any:
    return node.core.payments.overlap


# ------------------------------------------------------------------------- a good token


async def test_stream_starts_upstream_before_the_swap_and_holds_output_until_it_lands(
    slow: SlowMint, upstream: FakeUpstream, make_token
) -> None:
    node = slow.node
    token = await make_token(TOKEN_SAT)
    operator = await node.operator_msat()
    before = len(upstream.requests)
    events: list[str] = []
    body = {**CHAT, "stream": True}

    async def client() -> tuple[int, list[str]]:
        async with (
            httpx.AsyncClient(timeout=60) as http,
            http.stream(
                "POST", node.base + "/chat/completions", json=body, headers={"X-Cashu": token}
            ) as r,
        ):
            events.append("answer")
            return r.status_code, [line async for line in r.aiter_lines()]

    slow.hold()
    task = asyncio.create_task(client())
    # The upstream is asked while the node cannot reach the mint: the swap has not finished.
    await until(lambda: len(upstream.requests) > before, what="the upstream call")
    await until(slow.pending_receives, what="the swap in flight")
    assert events == []  # nothing reaches the client before the swap is confirmed
    events.append("mint back")
    slow.release()
    status, lines = await task
    assert status == 200
    assert events == ["mint back", "answer"]
    cost = chat_cost(expected_usage(upstream.last_request.json))
    note = note_of(lines)
    assert note["cost_msat"] == cost  # charged once
    assert await make_token.redeem(note["change"]) == TOKEN_SAT - -(-cost // 1000)
    assert len(upstream.requests) == before + 1
    assert overlap(node).started == 1
    await node.wait_idle()
    assert await node.operator_msat() == operator + -(-cost // 1000) * 1000


async def test_plain_answer_waits_for_the_swap_too(
    slow: SlowMint, upstream: FakeUpstream, make_token
) -> None:
    node = slow.node
    token = await make_token(TOKEN_SAT)
    before = len(upstream.requests)
    slow.hold()
    task = asyncio.create_task(post(node, token))
    await until(lambda: len(upstream.requests) > before, what="the upstream call")
    await until(slow.pending_receives, what="the swap in flight")
    assert not task.done()
    slow.release()
    r = await task
    assert r.status_code == 200, r.text
    cost = chat_cost(r.json()["usage"])
    assert int(r.headers["x-cost-msat"]) == cost
    assert await make_token.redeem(r.headers["x-cashu"]) == TOKEN_SAT - -(-cost // 1000)


# ------------------------------------------------------------------------- a bad token


def first_proof_only(token: str) -> str:
    """A new token made of the first proof of ``token`` (another fingerprint, same proof)."""
    parsed = parse_token(token)
    return serialize_token(Token(parsed.mint, parsed.unit, parsed.proofs[:1]))


async def test_a_token_known_as_spent_never_starts_the_upstream(
    slow: SlowMint, upstream: FakeUpstream, make_token
) -> None:
    node = slow.node
    token = await make_token(TOKEN_SAT)  # 32 + 8: two proofs
    assert (await post(node, token)).status_code == 200
    assert overlap(node).started == 1
    before = len(upstream.requests)
    operator = await node.operator_msat()
    for again in (token, first_proof_only(token)):
        r = await post(node, again)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "token_already_spent"
    assert overlap(node).started == 1
    assert overlap(node).known_spent == 2
    assert len(upstream.requests) == before
    assert await node.operator_msat() == operator


async def test_an_unknown_spent_token_cancels_the_upstream_call_and_charges_nothing(
    slow: SlowMint, upstream: FakeUpstream, make_token
) -> None:
    node = slow.node
    token = await make_token(TOKEN_SAT)
    await make_token.redeem(token)  # spent at the mint, behind the node's back
    operator = await node.operator_msat()
    arrivals = upstream.held_arrivals
    usual = upstream.behaviour
    upstream.behaviour = replace(usual, held=True)  # every call waits at the closed gate
    upstream.close_gate()
    try:
        slow.hold()
        task = asyncio.create_task(post(node, token))
        await until(lambda: upstream.held_arrivals > arrivals, what="the upstream call")
        slow.release()
        r = await task  # answered while the upstream still holds the call: it was cancelled
    finally:
        upstream.behaviour = usual
        upstream.open_gate()
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "token_already_spent"
    assert "x-cashu" not in r.headers
    assert overlap(node).started == 1
    assert overlap(node).cancelled == 1
    await node.wait_idle()
    assert await node.operator_msat() == operator
    # Now it is known: the same token again starts nothing.
    before = len(upstream.requests)
    again = await post(node, token)
    assert again.status_code == 400
    assert overlap(node).started == 1
    assert len(upstream.requests) == before


async def test_a_token_the_mint_refused_is_remembered_and_starts_nothing_next_time(
    slow: SlowMint, upstream: FakeUpstream, make_token
) -> None:
    """A forged proof (another proof's signature, no DLEQ to catch it) is refused by the
    mint, not as spent: the ledger forgets it, the node's memory of failed swaps does not."""
    node = slow.node
    a, b = parse_token(await make_token(8)), parse_token(await make_token(8))
    forged = replace(a.proofs[0], C=b.proofs[0].C, dleq=None)
    token = serialize_token(Token(a.mint, a.unit, (forged,)))
    before = len(upstream.requests)
    first = await post(node, token)
    assert first.status_code == 400, first.text
    assert overlap(node).started == 1
    # The mint refused it as invalid, not spent: only the node's memory knows it now.
    assert not await node.core.wallet.seen_before(await node.core.wallet.appraise(token))
    second = await post(node, token)
    assert second.status_code == 400
    assert second.json()["error"]["code"] == first.json()["error"]["code"]
    assert overlap(node).started == 1
    assert overlap(node).known_spent == 1
    assert len(upstream.requests) <= before + 1


# ------------------------------------------------------------------------- the bounds


async def test_unconfirmed_starts_are_limited_per_client(
    slow: SlowMint, upstream: FakeUpstream, make_token
) -> None:
    node = slow.node
    limit = overlap(node).per_client
    tokens = [await make_token(TOKEN_SAT) for _ in range(limit + 1)]
    before = len(upstream.requests)
    slow.hold()
    tasks = [asyncio.create_task(post(node, t)) for t in tokens]
    await until(lambda: _at_least(slow, limit + 1), what="every swap in flight")
    # Each request decided before its swap: ``limit`` overlap, the extra one waits.
    assert overlap(node).started == limit
    assert overlap(node).waited == 1
    await until(lambda: len(upstream.requests) == before + limit, what="the overlapped calls")
    slow.release()
    answers = await asyncio.gather(*tasks)
    assert [r.status_code for r in answers] == [200] * (limit + 1)
    assert len(upstream.requests) == before + limit + 1
    for r in answers:
        cost = chat_cost(r.json()["usage"])
        assert await make_token.redeem(r.headers["x-cashu"]) == TOKEN_SAT - -(-cost // 1000)


async def _at_least(slow: SlowMint, count: int) -> bool:
    return await slow.pending_receives() >= count


async def test_switched_off_the_swap_comes_first(
    tmp_path: Path,
    mint: MintHandle,
    upstream: FakeUpstream,
    tcp_proxy: Callable[..., TcpProxy],
    make_token,
) -> None:
    slow = await slow_mint_node(tmp_path, mint, upstream, tcp_proxy, overlap_swap=False)
    node = slow.node
    try:
        token = await make_token(TOKEN_SAT)
        before = len(upstream.requests)
        slow.hold()
        task = asyncio.create_task(post(node, token, {**CHAT, "stream": True}))
        await until(slow.pending_receives, what="the swap in flight")
        assert len(upstream.requests) == before
        slow.release()
        r = await task
        assert r.status_code == 200
        assert len(upstream.requests) == before + 1
        assert overlap(node).started == 0
        await node.wait_idle()
        await node.core.assert_books_balance()
    finally:
        slow.release()
        await node.stop()


async def test_a_caller_gone_mid_swap_gets_its_token_back_once_the_swap_lands(
    slow: SlowMint, make_token
) -> None:
    """Cancelled while its swap is at the mint (a shutdown, a client gone): the swap is seen
    through, then the hold is released and the token's value issued as claimable change."""
    node = slow.node
    payments = node.core.payments
    token = await make_token(TOKEN_SAT)
    called = asyncio.Event()

    async def upstream_call() -> None:
        called.set()
        await asyncio.Event().wait()  # an upstream that never answers

    async def run() -> None:
        job = payments.job(Payer("request_token", token), "fake-chat", CHAT, client="10.0.0.1")
        async with job:
            await job.start(upstream_call)

    slow.hold()
    task = asyncio.create_task(run())
    await called.wait()
    await until(slow.pending_receives, what="the swap in flight")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    slow.release()
    await node.wait_idle()  # the swap landed, the hold was released, the change issued
    [change] = await payments.claim_change(token)
    assert await make_token.redeem(change) == TOKEN_SAT
    assert payments.overlap.open_starts("10.0.0.1") == 0


# ------------------------------------------------------------------------- upstream failure


@pytest.mark.parametrize("stream", [True, False])
async def test_upstream_failing_before_the_swap_lands_refunds_the_token(
    slow: SlowMint, upstream: FakeUpstream, make_token, stream: bool
) -> None:
    node = slow.node
    token = await make_token(TOKEN_SAT)
    operator = await node.operator_msat()
    before = len(upstream.requests)
    slow.hold()
    body = {**CHAT, "model": "fake-chat+fail-500", "stream": stream}
    task = asyncio.create_task(post(node, token, body))
    await until(lambda: len(upstream.requests) > before, what="the upstream call")
    await until(slow.pending_receives, what="the swap in flight")
    slow.release()
    r = await task
    assert r.status_code == 502, r.text
    assert await make_token.redeem(r.headers["x-cashu"]) == TOKEN_SAT  # whole: nothing charged
    assert overlap(node).started == 1
    await node.wait_idle()
    assert await node.operator_msat() == operator
