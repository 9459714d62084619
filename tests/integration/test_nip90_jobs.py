"""NIP-90 kind 5050 jobs end to end: a nostr-sdk customer, the real relay, the real mint (its
FakeWallet pays invoices at once), the ledger on both engines, the fake upstream."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from nodeprov.core.money import ceil_div
from tests.conftest import TokenMaker
from tests.support.fake_openai import Behaviour
from tests.support.fake_upstream import FakeUpstream, expected_usage
from tests.support.nip90_node import Customer, Dvm, status, tag
from tests.support.nostr_client import (  # noqa: F401  (fixtures)
    CHAT_MODEL,
    HELD_MODEL,
    DmNode,
    chat_cost,
    dm_node_fixture,
    dm_upstream_fixture,
    npub_balance,
    start_dm_node,
    wait_idle,
)
from tests.support.services import MintHandle, RelayHandle
from tests.support.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ledger_backend")]

PROMPT = "what is the capital of france"


def body_of(prompt: str = PROMPT, max_tokens: int = 8) -> dict[str, object]:
    """The chat body a job with ``prompt`` and ``max_tokens`` runs as (for its exact cost)."""
    return {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
    }


def job_tags(prompt: str = PROMPT, max_tokens: int = 8) -> list[list[str]]:
    return [
        ["i", prompt, "text"],
        ["param", "model", CHAT_MODEL],
        ["param", "max_tokens", str(max_tokens)],
        ["param", "temperature", "0.5"],
    ]


async def price_of(node: DmNode, max_tokens: int = 8) -> int:
    return node.core.pricer.max_cost(CHAT_MODEL, body_of(max_tokens=max_tokens), "chat").total_msat


@pytest.fixture
async def dvm(node: DmNode) -> AsyncIterator[Dvm]:
    service = await Dvm(node).start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def customer(node: DmNode, relay: RelayHandle) -> AsyncIterator[Customer]:
    peer = await Customer([relay.url], node.keys.public_key).connect()
    try:
        yield peer
    finally:
        await peer.close()


async def deposit(customer: Customer, make_token: TokenMaker, sats: int) -> None:
    """Fund the customer's npub account by a DM deposit (as any DM client does)."""
    token = await make_token(sats)
    reply = await customer.ask(json.dumps({"type": "deposit", "id": "d", "cashu": token}))
    assert reply.json["type"] == "balance", reply.json


async def test_cashu_tag_pays_and_change_comes_back_in_a_dm(
    node: DmNode, dvm: Dvm, customer: Customer, make_token: TokenMaker
) -> None:
    token = await make_token(100)
    job = await customer.job(*job_tags(), ["bid", "50000"], ["cashu", token])
    result = await customer.wait(job, "result")
    cost = chat_cost(expected_usage(body_of()))
    assert result["content"]
    assert tag(result, "amount") == [str(cost)]
    assert tag(result, "e") == [job] and tag(result, "p") == [customer.pubkey]
    assert tag(result, "i") == [PROMPT, "text"]
    assert json.loads(tag(result, "request")[0])["id"] == job  # type: ignore[index]
    statuses = [status(e) for e in await customer.answers(job)]
    assert "processing" in statuses and "success" in statuses
    dms = await until(customer.dms, what="the change DM")
    change = dms[0].rsplit(" ", 1)[1]
    assert await make_token.redeem(change) == 100 - ceil_div(cost, 1000)


async def test_npub_balance_pays_when_no_token_is_sent(
    node: DmNode, dvm: Dvm, customer: Customer, make_token: TokenMaker
) -> None:
    await deposit(customer, make_token, 64)
    job = await customer.job(*job_tags())
    result = await customer.wait(job, "result")
    cost = chat_cost(expected_usage(body_of()))
    assert tag(result, "amount") == [str(cost)]
    assert await npub_balance(node, customer.pubkey) == 64_000 - cost


async def test_a_conversation_in_a_messages_input_reaches_the_model(
    node: DmNode, dvm: Dvm, customer: Customer, make_token: TokenMaker, upstream: FakeUpstream
) -> None:
    await deposit(customer, make_token, 64)
    history = [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    job = await customer.job(
        ["i", json.dumps(history), "text", "", "messages"], *job_tags("And of Italy?")
    )
    result = await customer.wait(job, "result")
    sent = [r.json for r in list(upstream.requests) if isinstance(r.json, dict)]
    asked = next(b for b in reversed(sent) if b.get("messages", [{}])[-1:] == [
        {"role": "user", "content": "And of Italy?"}
    ])  # fmt: skip
    assert asked["messages"] == [*history, {"role": "user", "content": "And of Italy?"}]
    body = {**body_of("And of Italy?"), "messages": asked["messages"]}
    assert tag(result, "amount") == [str(chat_cost(expected_usage(body)))]


async def test_unpaid_job_offers_an_invoice_and_runs_once_it_is_paid(
    node: DmNode, dvm: Dvm, customer: Customer
) -> None:
    price = await price_of(node)
    job = await customer.job(*job_tags())
    offer = await customer.wait(job, "payment-required")
    amount = tag(offer, "amount")
    assert amount is not None and amount[0] == str(price) and amount[1].startswith("lnbc")
    # The FakeWallet mint marks the invoice paid: the node mints, credits and runs the job.
    result = await customer.wait(job, "result")
    cost = chat_cost(expected_usage(body_of()))
    assert tag(result, "amount") == [str(cost)]
    assert await npub_balance(node, customer.pubkey) == ceil_div(price, 1000) * 1000 - cost


async def test_token_too_small_is_not_taken_and_an_invoice_is_offered(
    node: DmNode, dvm: Dvm, customer: Customer, make_token: TokenMaker
) -> None:
    price = await price_of(node)
    token = await make_token(ceil_div(price, 1000) - 1)
    job = await customer.job(*job_tags(), ["cashu", token])
    offer = await customer.wait(job, "payment-required")
    assert "still yours" in tag(offer, "status")[1]  # type: ignore[index]
    assert tag(offer, "amount")[0] == str(price)  # type: ignore[index]
    result = await customer.wait(job, "result")
    cost = chat_cost(expected_usage(body_of()))
    assert tag(result, "amount") == [str(cost)]
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}
    assert await npub_balance(node, customer.pubkey) == ceil_div(price, 1000) * 1000 - cost


async def test_bid_below_the_price_is_refused_and_nothing_is_taken(
    node: DmNode, dvm: Dvm, customer: Customer, make_token: TokenMaker
) -> None:
    price = await price_of(node)
    token = await make_token(100)
    job = await customer.job(*job_tags(), ["bid", str(price - 1)], ["cashu", token])
    answer = await customer.finished(job)
    assert status(answer) == "error"
    assert str(price) in tag(answer, "status")[1]  # type: ignore[index]
    assert tag(answer, "amount") == [str(price)]
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}
    assert await npub_balance(node, customer.pubkey) == 0


async def test_duplicate_request_is_answered_once(
    node: DmNode, dvm: Dvm, customer: Customer, make_token: TokenMaker
) -> None:
    await deposit(customer, make_token, 64)
    job = await customer.job(*job_tags())
    await customer.wait(job, "result")
    assert dvm.jobs is not None

    async def answered() -> bool:
        row = await dvm.jobs.store.get(job)  # type: ignore[union-attr]
        return row is not None and row.state == "sent"

    await until(answered, what="the answer recorded as sent")
    # The same event again (as a second relay or a redelivery hands it over): no second job.
    dvm.jobs.stats["duplicates"] = 0
    await dvm.jobs.process(json.loads(json.dumps(await _request_event(customer, job))))
    assert dvm.jobs.stats["duplicates"] == 1
    results = [e for e in await customer.answers(job) if e["kind"] == 6050]
    assert len(results) == 1
    cost = chat_cost(expected_usage(body_of()))
    assert await npub_balance(node, customer.pubkey) == 64_000 - cost


async def _request_event(customer: Customer, job: str) -> dict[str, object]:
    result = await customer.wait(job, "result")
    event: dict[str, object] = json.loads(tag(result, "request")[0])  # type: ignore[index]
    return event


async def test_restart_between_payment_and_result_answers_once(
    node: DmNode, dvm: Dvm, customer: Customer
) -> None:
    await dvm.stop()
    await dvm.start(poll_seconds=3600)  # asks the mint about the invoice only at the start
    job = await customer.job(*job_tags())
    await customer.wait(job, "payment-required")
    await dvm.stop()  # the invoice is paid (FakeWallet) while the node is down
    await dvm.start(poll_seconds=0.05)
    result = await customer.wait(job, "result")
    cost = chat_cost(expected_usage(body_of()))
    assert tag(result, "amount") == [str(cost)]
    price = await price_of(node)
    assert await npub_balance(node, customer.pubkey) == ceil_div(price, 1000) * 1000 - cost
    assert len([e for e in await customer.answers(job) if e["kind"] == 6050]) == 1


async def test_upstream_failure_charges_nothing_and_refunds_the_token(
    node: DmNode, dvm: Dvm, customer: Customer, make_token: TokenMaker, upstream: FakeUpstream
) -> None:
    token = await make_token(100)
    upstream.behaviour = Behaviour(fail=500)
    try:
        job = await customer.job(*job_tags(), ["cashu", token])
        answer = await customer.finished(job)
    finally:
        upstream.behaviour = Behaviour()
    assert status(answer) == "error"
    dms = await until(customer.dms, what="the refund DM")
    assert "nothing was charged" in dms[0]
    assert await make_token.redeem(dms[0].rsplit(" ", 1)[1]) == 100


async def test_encrypted_params_get_an_encrypted_result(
    node: DmNode, dvm: Dvm, customer: Customer, make_token: TokenMaker
) -> None:
    token = await make_token(50)  # inside the encrypted params: not public on the relays
    secret = customer.encrypt([*job_tags(), ["cashu", token]])
    job = await customer.job(["encrypted"], content=secret)
    result = await customer.wait(job, "result")
    assert tag(result, "encrypted") == [] and tag(result, "i") is None
    assert customer.decrypt(result["content"])
    cost = chat_cost(expected_usage(body_of()))
    assert tag(result, "amount") == [str(cost)]
    dms = await until(customer.dms, what="the change DM")
    assert await make_token.redeem(dms[0].rsplit(" ", 1)[1]) == 50 - ceil_div(cost, 1000)


async def test_readme_sample_runs_a_job_and_prints_the_change(
    node: DmNode, dvm: Dvm, relay: RelayHandle, make_token: TokenMaker
) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## NIP-90 jobs (kind 5050)", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    code = code.replace("ws://127.0.0.1:7777", relay.url).replace("demo-chat", CHAT_MODEL)
    env = {**os.environ, "NODE_NPUB": node.keys.npub, "TOKEN": await make_token(100)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].startswith("answer: ") and lines[0].endswith(
        f"charged msat: {chat_cost(expected_usage(body_of('What is Nostr?', 50)))}"
    )
    assert lines[1].startswith("Change from NIP-90 job")
    assert await make_token.redeem(lines[1].rsplit(" ", 1)[1]) > 0


async def test_request_from_two_relays_is_answered_once(
    tmp_path: Path,
    relay: RelayHandle,
    relay_factory: Callable[..., RelayHandle],
    mint: MintHandle,
    upstream: FakeUpstream,
    make_token: TokenMaker,
) -> None:
    relays = [relay.url, relay_factory().url]
    node = await start_dm_node(tmp_path, relays, [mint.url], upstream)
    service = await Dvm(node).start()
    peer = await Customer(relays, node.keys.public_key).connect()
    try:
        await deposit(peer, make_token, 64)
        job = await peer.job(*job_tags())  # published to both relays
        await peer.wait(job, "result")
        await wait_idle(node)
        assert len([e for e in await peer.answers(job) if e["kind"] == 6050]) == 1
        cost = chat_cost(expected_usage(body_of()))
        assert await npub_balance(node, peer.pubkey) == 64_000 - cost
        await node.core.assert_books_balance()
    finally:
        await peer.close()
        await service.stop()
        await node.close()


def held_tags(prompt: str = PROMPT) -> list[list[str]]:
    return [["i", prompt, "text"], ["param", "model", HELD_MODEL], ["param", "max_tokens", "8"]]


def held_body(prompt: str = PROMPT) -> dict[str, object]:
    return {**body_of(prompt), "model": HELD_MODEL}


async def test_restart_while_a_token_paid_job_runs_answers_once_with_change(
    node: DmNode, dvm: Dvm, customer: Customer, make_token: TokenMaker, upstream: FakeUpstream
) -> None:
    token = await make_token(30)
    arrivals = upstream.held_arrivals
    upstream.close_gate()
    try:
        job = await customer.job(*held_tags(), ["cashu", token])
        await until(lambda: upstream.held_arrivals > arrivals, what="the job in the upstream")
        await dvm.stop(grace=0)  # cancels the job mid-upstream call: the token comes back
    finally:
        upstream.open_gate()
    await dvm.start()
    result = await customer.wait(job, "result")
    cost = chat_cost(expected_usage(held_body()))
    assert tag(result, "amount") == [str(cost)]
    dms = await until(customer.dms, what="the change DM")
    assert len(dms) == 1
    assert await make_token.redeem(dms[0].rsplit(" ", 1)[1]) == 30 - ceil_div(cost, 1000)
    assert len([e for e in await customer.answers(job) if e["kind"] == 6050]) == 1


async def test_upstream_failure_on_the_npub_balance_charges_nothing(
    node: DmNode, dvm: Dvm, customer: Customer, make_token: TokenMaker, upstream: FakeUpstream
) -> None:
    await deposit(customer, make_token, 64)
    upstream.behaviour = Behaviour(fail=500)
    try:
        job = await customer.job(*job_tags())
        answer = await customer.finished(job)
    finally:
        upstream.behaviour = Behaviour()
    assert status(answer) == "error"
    assert await npub_balance(node, customer.pubkey) == 64_000


async def test_bad_request_gets_an_error_feedback_and_no_model_means_the_default(
    node: DmNode, dvm: Dvm, customer: Customer, make_token: TokenMaker
) -> None:
    await deposit(customer, make_token, 64)
    unknown = await customer.job(["i", PROMPT, "text"], ["param", "model", "no-such-model"])
    answer = await customer.finished(unknown)
    assert status(answer) == "error" and "no-such-model" in tag(answer, "status")[1]  # type: ignore[index]
    image = await customer.job(["i", "https://example.com/cat.png", "url"])
    assert "input type 'url'" in tag(await customer.finished(image), "status")[1]  # type: ignore[index]
    assert await npub_balance(node, customer.pubkey) == 64_000
    job = await customer.job(["i", PROMPT, "text"])  # nostr.default_model
    result = await customer.wait(job, "result")
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": PROMPT}]}
    cost = chat_cost(expected_usage(body))
    assert tag(result, "amount") == [str(cost)]
    assert await npub_balance(node, customer.pubkey) == 64_000 - cost
