"""The X-Cashu swap overlap under attack: double spends, callers leaving, pooled connections.

Real mint (behind the pausable proxy of ``test_xcashu_overlap``), real fake upstream, real
ledger; what happens when is decided by events, never by a stopwatch.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from nodeprov.core.overlap import TRIP_AFTER
from nodeprov.core.payments import Payer
from nodeprov.protocol.cashu_token import Token, parse_token, serialize_token
from nodeprov.upstream_http import Response as UpstreamResponse
from tests.integration.test_xcashu_overlap import (
    CHAT,
    TOKEN_SAT,
    SlowMint,
    overlap,
    post,
    slow,  # noqa: F401  (fixture)
)
from tests.support.fake_upstream import FakeUpstream
from tests.support.http_node import chat_cost, start_node, upstream_fixture  # noqa: F401  (fixture)
from tests.support.services import MintHandle
from tests.support.waiting import until


async def test_one_token_in_two_overlapped_requests_pays_once_and_the_other_is_refused(
    slow: SlowMint,  # noqa: F811
    upstream: FakeUpstream,
    make_token,
) -> None:
    """The same token sent twice at once, both starting their upstream call before either
    swap is confirmed: exactly one is answered and charged, the other gets the error it
    gets without the overlap (already spent), and the operator earns one job's cost."""
    node = slow.node
    token = await make_token(TOKEN_SAT)
    operator = await node.operator_msat()
    before = len(upstream.requests)
    slow.hold()
    tasks = [asyncio.create_task(post(node, token)) for _ in range(2)]
    await until(lambda: len(upstream.requests) >= before + 2, what="both upstream calls")
    assert overlap(node).started == 2
    slow.release()
    answers = await asyncio.gather(*tasks)
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 400], [r.text for r in answers]
    [good] = [r for r in answers if r.status_code == 200]
    [bad] = [r for r in answers if r.status_code == 400]
    assert bad.json()["error"]["code"] == "token_already_spent"
    assert "x-cashu" not in bad.headers
    cost = chat_cost(good.json()["usage"])
    assert await make_token.redeem(good.headers["x-cashu"]) == TOKEN_SAT - -(-cost // 1000)
    await node.wait_idle()
    assert await node.operator_msat() == operator + -(-cost // 1000) * 1000
    assert overlap(node).open_starts("127.0.0.1") == 0


async def test_a_caller_cancelled_as_its_streamed_answer_arrives_gives_the_connection_back(
    tmp_path: Path, mint: MintHandle, upstream: FakeUpstream, make_token
) -> None:
    """The swap is confirmed, the caller waits for the upstream's streamed answer, and is
    cancelled (client gone, shutdown) in the same loop turn as that answer arrives: the
    answer's connection goes back to the pool. With one connection allowed, a leaked one
    would make every later request a 503 upstream_busy."""
    node = await start_node(
        tmp_path,
        [mint.url],
        upstream,
        upstream_options={"max_connections": 1, "pool_wait_seconds": Decimal(2)},
    )
    try:
        ups = node._upstreams
        route = ups.route("fake-chat")
        token = await make_token(TOKEN_SAT)
        job = node.core.payments.job(
            Payer("request_token", token), "fake-chat", CHAT, client="10.0.0.9"
        )
        runner: asyncio.Task[None] | None = None

        async def call() -> UpstreamResponse:
            await until(lambda: job._charge is not None, what="the swap confirmed")
            body = {**CHAT, "stream": True}
            answer = await ups.send(route, "POST", "chat/completions", json=body, stream=True)
            assert runner is not None
            asyncio.get_running_loop().call_soon(runner.cancel)  # leaves as the answer lands
            return answer

        async def run() -> None:
            async with job:
                await job.start(call, discard=UpstreamResponse.aclose)

        runner = asyncio.create_task(run())
        with pytest.raises(asyncio.CancelledError):
            await runner
        await node.wait_idle()  # nothing charged: the token came back as claimable change
        [change] = await node.core.payments.claim_change(token)
        assert await make_token.redeem(change) == TOKEN_SAT
        answer = await ups.send(route, "POST", "chat/completions", json=CHAT)
        assert answer.status_code == 200
        await node.core.assert_books_balance()
    finally:
        await node.stop()


def forged(token: str, secret: str) -> str:
    """``token``'s first proof under another secret, its DLEQ dropped: a proof the mint never
    signed, that only the mint can tell apart (anyone can make any number of these)."""
    parsed = parse_token(token)
    proof = replace(parsed.proofs[0], secret=secret, dleq=None)
    return serialize_token(Token(parsed.mint, parsed.unit, (proof,)))


async def test_forged_proofs_cost_the_operator_a_bounded_number_of_upstream_calls(
    slow: SlowMint,  # noqa: F811
    upstream: FakeUpstream,
    make_token,
) -> None:
    """Forged proofs cost nothing to make and each has new secrets, so neither the ledger nor
    the memory of failed swaps knows them: each may start one upstream call (then cancelled).
    After TRIP_AFTER failed swaps in a window the overlap is off node-wide for a while, so a
    flood of them starts no more. They get the same error as without the overlap and are
    never charged."""
    node = slow.node
    real = await make_token(8)
    gate = overlap(node)
    before = len(upstream.requests)
    operator = await node.operator_msat()
    codes = set()
    for _ in range(TRIP_AFTER + 5):
        r = await post(node, forged(real, secrets.token_hex(32)))
        assert r.status_code == 400, r.text
        codes.add(r.json()["error"]["code"])
    assert len(codes) == 1
    assert await node.operator_msat() == operator
    assert gate.started <= TRIP_AFTER, f"{gate.started} upstream calls started"
    assert len(upstream.requests) <= before + TRIP_AFTER
    assert gate.tripped and gate.trips == 1
