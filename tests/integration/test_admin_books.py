"""What the dashboard reads from the books (real mint, real ledger): channels, earnings, groups."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nodeprov.core import admin_queries as queries
from nodeprov.core.ledger import OPERATOR
from nodeprov.core.payments import Payer, api_key_account
from tests.support.core import TEST_MODEL, Core, build_core
from tests.support.services import MintHandle

BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
USAGE = {"prompt_tokens": 10, "completion_tokens": 20}
COST = 1000 + 2 * 10 + 5 * 20  # TEST_MODEL: 1000/request + 2/input token + 5/output token


@pytest.fixture
async def core(tmp_path: Path, mint: MintHandle) -> AsyncIterator[Core]:
    built = await build_core(tmp_path / "ledger.sqlite3", [mint.url])
    try:
        yield built
        await built.assert_books_balance()
    finally:
        await built.close()


async def paid(core: Core, payer: Payer, ref: str | None = None) -> None:
    async with core.payments.job(payer, TEST_MODEL, BODY, ref=ref) as job:
        await job.settle(USAGE)


async def test_the_channel_and_model_of_every_request_are_recorded(
    core: Core, make_token: Any
) -> None:
    api_key, _ = await core.payments.create_key(await make_token(20))
    await paid(core, Payer("api_key", api_key))  # http is the default channel
    await paid(core, Payer("api_key", api_key, channel="http"))
    npub = "ab" * 32
    await core.payments.deposit("npub:" + npub, await make_token(10), "dm:deposit")
    # A DM job's charge carries its ref (dm:<event id>): the model is still the model.
    await paid(core, Payer("npub", npub, channel="nostr"), ref="dm:" + "cd" * 32)
    # A token paid over Nostr is a request token: its channel is what the DM says.
    await paid(core, Payer("request_token", await make_token(5), channel="nostr"))
    rows = await core.ledger.db.fetchall(
        "SELECT account_id, channel, model FROM transactions WHERE kind = 'charge' ORDER BY id"
    )
    assert [(r[1], r[2]) for r in rows] == [
        ("http", TEST_MODEL),
        ("http", TEST_MODEL),
        ("nostr", TEST_MODEL),
        ("nostr", TEST_MODEL),
    ]
    usage = await queries.usage_by_model(core.ledger)
    assert [(u.model, u.channel, u.requests, u.charged_msat) for u in usage] == [
        (TEST_MODEL, "http", 2, 2 * COST),
        (TEST_MODEL, "nostr", 2, 2 * COST),
    ]


async def test_earnings_split_into_charges_and_rounding_of_change(
    core: Core, make_token: Any
) -> None:
    api_key, _ = await core.payments.create_key(await make_token(20))
    await paid(core, Payer("api_key", api_key))
    # A sat token pays ceil(cost / 1000) sat: the msat below one sat go to the operator.
    await paid(core, Payer("request_token", await make_token(5)))
    await core.wallet.receive(await make_token(3), OPERATOR, "operator")
    earnings = await queries.earnings(core.ledger)
    rounding = 2000 - COST
    assert earnings.revenue_msat == 2 * COST  # what requests were charged
    assert earnings.rounding_msat == rounding
    assert earnings.earned_msat == 2 * COST + rounding
    assert earnings.deposited_msat == 3000
    assert earnings.paid_out_msat == 0
    operator = await core.ledger.account(OPERATOR)
    assert operator is not None and earnings.balance_msat == operator.balance_msat
    assert operator.balance_msat == 2 * COST + rounding + 3000


async def test_the_rows_of_one_request_form_one_group(core: Core, make_token: Any) -> None:
    api_key, _ = await core.payments.create_key(await make_token(20))
    await paid(core, Payer("api_key", api_key))
    token = await make_token(5)
    await paid(core, Payer("request_token", token))
    await paid(core, Payer("api_key", api_key))
    rows, _ = await queries.transactions_page(core.ledger, before=None, limit=50)
    groups = queries.group_requests(rows)
    kinds = [sorted(r["kind"] for r in g.rows) for g in groups]
    # Newest first: key request, token request (deposit, charge, earning, rounding both
    # ways, change), key request, then the key's own deposit.
    assert kinds == [
        ["charge", "earning"],
        ["change", "charge", "deposit", "earning", "rounding", "rounding"],
        ["charge", "earning"],
        ["deposit"],
    ]
    token_group = groups[1]
    assert token_group.request is not None and token_group.held_msat is not None
    assert token_group.charged_msat == COST and token_group.model == TEST_MODEL
    assert token_group.channel == "http"
    assert groups[0].request != groups[2].request  # two requests of one key stay apart
    assert groups[0].rows[0]["account_id"] in (api_key_account(api_key), OPERATOR)
