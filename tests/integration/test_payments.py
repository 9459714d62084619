"""The payment pipeline against a real mint: every payer kind, refunds, change, concurrency."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from nodeprov.core.ledger import OPERATOR
from nodeprov.core.payments import Payer, PaymentFailed, Settled, api_key_account
from nodeprov.errors import (
    InsufficientBalance,
    PaymentTooSmall,
    TokenAlreadySpent,
    Unauthorized,
    UpstreamError,
)
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint
from tests.support.core import TEST_MODEL, Core, build_core
from tests.support.services import MintHandle

pytestmark = pytest.mark.usefixtures("ledger_backend")

BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
USAGE = {"prompt_tokens": 10, "completion_tokens": 20}
COST = 1000 + 2 * 10 + 5 * 20  # TEST_MODEL: 1000/request + 2/input token + 5/output token
FEE_PPK = 100  # fee_mint's input fee


@pytest.fixture
async def core(tmp_path: Path, mint: MintHandle, fee_mint: MintHandle) -> AsyncIterator[Core]:
    built = await build_core(tmp_path / "ledger.sqlite3", [mint.url, fee_mint.url])
    try:
        yield built
        await built.assert_books_balance()
    finally:
        await built.close()


def job(usage: Mapping[str, Any] = USAGE, result: str = "ok", delay: float = 0.0) -> Any:
    async def run() -> tuple[str, Mapping[str, Any]]:
        if delay:
            await asyncio.sleep(delay)
        return result, usage

    return run


async def failing_job() -> tuple[str, Mapping[str, Any]]:
    raise UpstreamError("the upstream returned 500")


def input_fee(token: str, ppk: int) -> int:
    return -(-len(parse_token(token).proofs) * ppk // 1000)


async def balance(core: Core, account_id: str) -> int:
    account = await core.ledger.account(account_id)
    assert account is not None
    assert account.reserved_msat == 0
    return account.balance_msat


# --- API keys ---------------------------------------------------------------------------


async def test_api_key_pays_the_exact_cost(core: Core, make_token, mint: MintHandle) -> None:
    assert core.pricer.actual_cost(TEST_MODEL, USAGE).total_msat == COST
    api_key, account = await core.payments.create_key(await make_token(100, mint=mint))
    assert api_key.startswith("sk-")
    assert account.id == api_key_account(api_key) and account.balance_msat == 100_000

    result, settled = await core.payments.run(Payer("api_key", api_key), TEST_MODEL, BODY, job())
    assert result == "ok"
    assert settled.charged_msat == settled.cost.total_msat == COST
    assert settled.change is None
    assert settled.balance_msat == 100_000 - COST
    assert await balance(core, account.id) == 100_000 - COST
    assert await balance(core, OPERATOR) == COST

    await core.payments.run(Payer("api_key", api_key), TEST_MODEL, BODY, job())
    assert await balance(core, account.id) == 100_000 - 2 * COST
    assert await balance(core, OPERATOR) == 2 * COST


async def test_unknown_api_key(core: Core) -> None:
    with pytest.raises(Unauthorized):
        await core.payments.run(Payer("api_key", "sk-nope"), TEST_MODEL, BODY, job())


async def test_api_key_upstream_failure_charges_nothing(
    core: Core, make_token, mint: MintHandle
) -> None:
    api_key, account = await core.payments.create_key(await make_token(50, mint=mint))
    with pytest.raises(PaymentFailed) as info:
        await core.payments.run(Payer("api_key", api_key), TEST_MODEL, BODY, failing_job)
    assert info.value.refund is None
    assert info.value.status == 502 and isinstance(info.value.error, UpstreamError)
    assert await balance(core, account.id) == 50_000
    assert await balance(core, OPERATOR) == 0


async def test_api_key_insufficient_balance(core: Core, make_token, mint: MintHandle) -> None:
    api_key, account = await core.payments.create_key(await make_token(1, mint=mint))
    max_cost = core.pricer.max_cost(TEST_MODEL, BODY).total_msat
    with pytest.raises(InsufficientBalance) as info:
        await core.payments.run(Payer("api_key", api_key), TEST_MODEL, BODY, job())
    assert info.value.status == 402
    assert info.value.message == (
        f"Insufficient balance. Current: 1 sats, Required: {-(-max_cost // 1000)} sats "
        f"(1000 msat available, {max_cost} msat required)"
    )  # the request's fee alone takes the 1000 msat: no max_tokens would fit
    assert await balance(core, account.id) == 1_000


async def test_a_refusal_suggests_the_max_tokens_that_would_fit(
    core: Core, make_token, mint: MintHandle
) -> None:
    api_key, account = await core.payments.create_key(await make_token(2, mint=mint))
    payer = Payer("api_key", api_key)
    big = {**BODY, "max_tokens": 1000}
    with pytest.raises(InsufficientBalance) as info:
        await core.payments.run(payer, TEST_MODEL, big, job())
    fits = core.pricer.fitting_max_tokens(TEST_MODEL, big, "chat", 2_000)
    assert fits is not None and 0 < fits < 1000
    assert info.value.message.endswith(f" With max_tokens at most {fits} the request would fit.")
    assert info.value.details["max_tokens"] == fits
    with pytest.raises(InsufficientBalance):
        await core.payments.run(payer, TEST_MODEL, {**big, "max_tokens": fits + 1}, job())
    _, settled = await core.payments.run(payer, TEST_MODEL, {**big, "max_tokens": fits}, job())
    assert settled.charged_msat == COST and await balance(core, account.id) == 2_000 - COST
    # A token too small for the request is told the same, and stays the sender's.
    with pytest.raises(PaymentTooSmall) as small:
        await core.payments.run(
            Payer("request_token", await make_token(2, mint=mint)), TEST_MODEL, big, job()
        )
    assert small.value.message.endswith(f" With max_tokens at most {fits} the request would fit.")


async def test_create_key_with_a_spent_token_leaves_no_account(
    core: Core, make_token, mint: MintHandle
) -> None:
    token = await make_token(10, mint=mint)
    await make_token.redeem(token)
    with pytest.raises(TokenAlreadySpent):
        await core.payments.create_key(token)
    assert [a.id for a in await core.ledger.accounts("api_key")] == []


async def test_topup(core: Core, make_token, mint: MintHandle) -> None:
    _, account = await core.payments.create_key(await make_token(10, mint=mint))
    received = await core.payments.topup(account.id, await make_token(7, unit="msat", mint=mint))
    assert received.credited_msat == 7
    assert await balance(core, account.id) == 10_007
    with pytest.raises(Unauthorized):
        await core.payments.topup("key:unknown", await make_token(1, mint=mint))


@pytest.mark.parametrize("unit", ["sat", "msat"])
async def test_withdraw_returns_a_redeemable_token(
    core: Core, make_token, mint: MintHandle, unit: str
) -> None:
    amount = 100 if unit == "sat" else 100_000
    api_key, account = await core.payments.create_key(
        await make_token(amount, unit=unit, mint=mint)
    )
    await core.payments.run(Payer("api_key", api_key), TEST_MODEL, BODY, job())
    left = 100_000 - COST
    sent = await core.payments.withdraw(account.id)
    assert sent.unit == unit and sent.fee == 0
    if unit == "sat":
        # Whole sats only: the msat below one sat stay on the account.
        assert sent.amount == left // 1000 and sent.debited_msat == left // 1000 * 1000
        assert await balance(core, account.id) == left % 1000
    else:
        assert sent.amount == sent.debited_msat == left
        assert await balance(core, account.id) == 0
    assert await make_token.redeem(sent.token) == sent.amount


async def test_withdraw_more_than_available(core: Core, make_token, mint: MintHandle) -> None:
    _, account = await core.payments.create_key(await make_token(10, mint=mint))
    with pytest.raises(InsufficientBalance):
        await core.payments.withdraw(account.id, 10_001)
    with pytest.raises(Unauthorized):
        await core.payments.withdraw("key:unknown")
    sent = await core.payments.withdraw(account.id, 4_000)
    assert await make_token.redeem(sent.token) == 4
    assert await balance(core, account.id) == 6_000


async def test_withdraw_with_input_fees(core: Core, make_token, fee_mint: MintHandle) -> None:
    token = await make_token(100, mint=fee_mint)
    fee_in = input_fee(token, FEE_PPK)
    _, account = await core.payments.create_key(token)
    assert account.balance_msat == (100 - fee_in) * 1000
    sent = await core.payments.withdraw(account.id)
    assert sent.debited_msat == (100 - fee_in) * 1000
    assert sent.amount + sent.fee == 100 - fee_in
    redeemed = await make_token.redeem(sent.token)
    assert redeemed == sent.amount - input_fee(sent.token, FEE_PPK)
    assert await balance(core, account.id) == 0


# --- token as key -----------------------------------------------------------------------


async def test_token_as_key_redeems_once_then_debits(
    core: Core, make_token, mint: MintHandle
) -> None:
    token = await make_token(100, mint=mint)
    payer = Payer("token_key", token)
    account_id = "token:" + token_fingerprint(parse_token(token))
    _, first = await core.payments.run(payer, TEST_MODEL, BODY, job())
    assert first.balance_msat == 100_000 - COST and first.change is None
    assert await make_token.proof_states(token) == ["SPENT"] * len(parse_token(token).proofs)
    _, second = await core.payments.run(payer, TEST_MODEL, BODY, job())
    assert second.balance_msat == 100_000 - 2 * COST
    assert await balance(core, account_id) == 100_000 - 2 * COST
    deposits = [t for t in await core.ledger.transactions(account_id) if t["kind"] == "deposit"]
    assert len(deposits) == 1


async def test_token_as_key_concurrent_first_uses_credit_once(
    core: Core, make_token, mint: MintHandle
) -> None:
    token = await make_token(100, mint=mint)
    payer = Payer("token_key", token)
    account_id = "token:" + token_fingerprint(parse_token(token))
    results = await asyncio.gather(
        *(core.payments.run(payer, TEST_MODEL, BODY, job()) for _ in range(2)),
        return_exceptions=True,
    )
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert await balance(core, account_id) == 100_000 - 2 * COST
    deposits = [t for t in await core.ledger.transactions(account_id) if t["kind"] == "deposit"]
    assert [t["delta_msat"] for t in deposits] == [100_000]


async def test_token_as_key_that_is_spent(core: Core, make_token, mint: MintHandle) -> None:
    token = await make_token(10, mint=mint)
    await make_token.redeem(token)
    for _ in range(2):  # and again: the failed first use must not leave a usable account
        with pytest.raises(TokenAlreadySpent):
            await core.payments.run(Payer("token_key", token), TEST_MODEL, BODY, job())


# --- per-request tokens -----------------------------------------------------------------


@pytest.mark.parametrize(("unit", "amount"), [("sat", 100), ("msat", 100_000), ("msat", 5_555)])
async def test_request_token_change(
    core: Core, make_token, mint: MintHandle, unit: str, amount: int
) -> None:
    token = await make_token(amount, unit=unit, mint=mint)
    result, settled = await core.payments.run(
        Payer("request_token", token), TEST_MODEL, BODY, job()
    )
    assert result == "ok" and settled.charged_msat == COST
    assert settled.change is not None and settled.balance_msat is None
    change = settled.change
    assert change.unit == unit and change.fee == 0
    if unit == "sat":
        expected = amount - -(-COST // 1000)
        operator = -(-COST // 1000) * 1000  # the msat below a sat go to the operator
    else:
        expected = amount - COST
        operator = COST
    assert change.amount == expected
    assert await make_token.redeem(change.token) == expected
    assert await balance(core, OPERATOR) == operator
    account_id = "req:" + token_fingerprint(parse_token(token))
    assert await balance(core, account_id) == 0
    # The change token is what claim_change hands out for the original token.
    assert await core.payments.claim_change(token) == [change.token]


async def test_request_token_used_twice_is_refused(
    core: Core, make_token, mint: MintHandle
) -> None:
    token = await make_token(20, mint=mint)
    await core.payments.run(Payer("request_token", token), TEST_MODEL, BODY, job())
    with pytest.raises(TokenAlreadySpent):
        await core.payments.run(Payer("request_token", token), TEST_MODEL, BODY, job())
    assert await balance(core, OPERATOR) == 2_000


@pytest.mark.parametrize("unit", ["sat", "msat"])
async def test_request_token_upstream_failure_refunds_whole_token(
    core: Core, make_token, mint: MintHandle, unit: str
) -> None:
    amount = 50 if unit == "sat" else 5_000
    token = await make_token(amount, unit=unit, mint=mint)
    with pytest.raises(PaymentFailed) as info:
        await core.payments.run(Payer("request_token", token), TEST_MODEL, BODY, failing_job)
    failed = info.value
    assert failed.status == 502 and failed.code == "upstream_error"
    assert failed.refund is not None
    assert failed.refund.amount == amount and failed.refund.unit == unit
    assert await make_token.redeem(failed.refund.token) == amount
    assert await balance(core, OPERATOR) == 0
    assert await core.payments.claim_change(token) == [failed.refund.token]


async def test_request_token_too_small_for_max_cost_is_refused_before_any_swap(
    core: Core, make_token, mint: MintHandle
) -> None:
    max_cost = core.pricer.max_cost(TEST_MODEL, BODY).total_msat
    assert max_cost > 1_000
    token = await make_token(1, mint=mint)
    with pytest.raises(PaymentTooSmall) as info:
        await core.payments.run(Payer("request_token", token), TEST_MODEL, BODY, job())
    assert info.value.status == 400 and info.value.code == "token_too_small"
    assert info.value.message.startswith(
        f"Insufficient payment. Current: 1 sats, Required: {-(-max_cost // 1000)} sats"
    )
    assert info.value.details["required_msat"] == max_cost
    assert await core.ledger.db.fetchall("SELECT id FROM wallet_ops") == []
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}
    assert await make_token.redeem(token) == 1
    assert await balance(core, OPERATOR) == 0


async def test_request_token_msat_too_small(core: Core, make_token, mint: MintHandle) -> None:
    token = await make_token(999, unit="msat", mint=mint)
    with pytest.raises(PaymentTooSmall) as info:
        await core.payments.run(Payer("request_token", token), TEST_MODEL, BODY, job())
    assert info.value.status == 400
    assert "worth 999 msat" in info.value.message
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}
    assert await make_token.redeem(token) == 999


async def test_request_token_with_input_fees(core: Core, make_token, fee_mint: MintHandle) -> None:
    token = await make_token(100, mint=fee_mint)
    fee_in = input_fee(token, FEE_PPK)
    assert fee_in > 0
    _, settled = await core.payments.run(Payer("request_token", token), TEST_MODEL, BODY, job())
    change = settled.change
    assert change is not None
    # Token = mint's input fee + what the job cost (rounded up to a sat) + change + swap fee.
    assert fee_in + -(-COST // 1000) + change.amount + change.fee == 100
    redeemed = await make_token.redeem(change.token)
    assert redeemed == change.amount - input_fee(change.token, FEE_PPK)
    assert await balance(core, OPERATOR) == -(-COST // 1000) * 1000


async def test_request_token_with_input_fees_upstream_failure(
    core: Core, make_token, fee_mint: MintHandle
) -> None:
    token = await make_token(4_000, unit="msat", mint=fee_mint)
    fee_in = input_fee(token, FEE_PPK)
    with pytest.raises(PaymentFailed) as info:
        await core.payments.run(Payer("request_token", token), TEST_MODEL, BODY, failing_job)
    assert isinstance(info.value.error, UpstreamError)
    refund = info.value.refund
    assert refund is not None
    assert refund.amount + refund.fee == 4_000 - fee_in
    assert await make_token.redeem(refund.token) == refund.amount - input_fee(refund.token, FEE_PPK)
    assert await balance(core, OPERATOR) == 0


async def test_request_token_overrun_is_charged_at_most_its_hold(
    core: Core, make_token, mint: MintHandle
) -> None:
    """The upstream reports more output than max_tokens allowed: the token pays its quote."""
    token = await make_token(3, mint=mint)
    hold = core.pricer.max_cost(TEST_MODEL, BODY).total_msat
    usage = {"prompt_tokens": 10, "completion_tokens": 300}  # 1000 + 20 + 1500 = 2520 msat
    assert hold < 2_520
    _, settled = await core.payments.run(
        Payer("request_token", token), TEST_MODEL, BODY, job(usage)
    )
    assert settled.cost.total_msat == 2_520 and settled.charged_msat == hold
    change = 3 - -(-hold // 1000)
    assert (settled.change.amount if settled.change else 0) == change
    assert await balance(core, OPERATOR) == 3_000 - change * 1000


async def test_claim_change_of_an_unknown_token(core: Core, make_token, mint: MintHandle) -> None:
    with pytest.raises(Unauthorized):
        await core.payments.claim_change(await make_token(1, mint=mint))


async def test_cancelled_job_keeps_change_claimable(
    core: Core, make_token, mint: MintHandle
) -> None:
    """A client that disconnects mid-job (task cancelled) can still claim its whole token."""
    token = await make_token(30, mint=mint)
    started = asyncio.Event()

    async def slow() -> tuple[str, Mapping[str, Any]]:
        started.set()
        await asyncio.sleep(30)
        return "never", USAGE

    task = asyncio.create_task(
        core.payments.run(Payer("request_token", token), TEST_MODEL, BODY, slow)
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [change] = await core.payments.claim_change(token)
    assert await make_token.redeem(change) == 30
    assert await balance(core, OPERATOR) == 0


async def test_two_claims_of_the_same_change_at_once_both_answer_with_it(
    core: Core, make_token, mint: MintHandle
) -> None:
    """A client that claims again while its first claim is still paying out (a retry, a
    resumed DM) gets the one change token, never an error; it is paid out once."""
    token = await make_token(30, mint=mint)
    await core.payments.begin(Payer("request_token", token), TEST_MODEL, BODY)
    # The process running the job died: nobody closes it, and its lease lapses.
    assert await core.ledger.release_stale_holds(at=2**40) == 1
    first, second = await asyncio.gather(
        core.payments.claim_change(token), core.payments.claim_change(token)
    )
    assert first == second and len(first) == 1
    assert await make_token.redeem(first[0]) == 30
    assert await balance(core, OPERATOR) == 0


async def test_claims_at_once_give_the_operator_the_msat_rest_once(
    core: Core, make_token, mint: MintHandle
) -> None:
    """Change of 28.5 sat claimed twice at once: 28 sat to the client, 500 msat to the
    operator, once (not twice from the client's change)."""
    token = await make_token(30, mint=mint)
    charge = await core.payments.begin(Payer("request_token", token), TEST_MODEL, BODY)
    await core.ledger.settle(charge.hold, 1500, "job")  # settled; its change not paid yet
    first, second = await asyncio.gather(
        core.payments.claim_change(token), core.payments.claim_change(token)
    )
    assert first == second and len(first) == 1
    assert await make_token.redeem(first[0]) == 28
    assert await balance(core, OPERATOR) == 1500 + 500
    assert await balance(core, charge.account_id) == 0


# --- npub accounts --------------------------------------------------------------------


async def test_npub_account(core: Core, make_token, mint: MintHandle) -> None:
    pubkey = secrets.token_hex(32)
    account_id = "npub:" + pubkey
    with pytest.raises(InsufficientBalance):
        await core.payments.run(Payer("npub", pubkey), TEST_MODEL, BODY, job())
    await core.wallet.receive(await make_token(10, mint=mint), account_id, "npub")
    _, settled = await core.payments.run(Payer("npub", pubkey), TEST_MODEL, BODY, job())
    assert settled.charged_msat == COST and settled.change is None
    assert settled.balance_msat == 10_000 - COST
    with pytest.raises(PaymentFailed) as info:
        await core.payments.run(Payer("npub", pubkey), TEST_MODEL, BODY, failing_job)
    assert info.value.refund is None
    assert await balance(core, account_id) == 10_000 - COST


# --- concurrency ------------------------------------------------------------------------


async def test_concurrent_runs_never_overdraw(core: Core, make_token, mint: MintHandle) -> None:
    max_cost = core.pricer.max_cost(TEST_MODEL, BODY).total_msat
    api_key, account = await core.payments.create_key(
        await make_token(50 * max_cost, unit="msat", mint=mint)
    )
    payer = Payer("api_key", api_key)
    usages = [{"prompt_tokens": i % 7, "completion_tokens": i % 100} for i in range(100)]
    decided = 0
    everyone_decided = asyncio.Event()
    lowest: list[int] = []

    def one_decided() -> None:
        nonlocal decided
        decided += 1
        if decided == 100:
            everyone_decided.set()

    async def gated_job(usage: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
        # Every hold is taken (or refused) before any job settles.
        one_decided()
        await everyone_decided.wait()
        current = await core.ledger.account(account.id)
        assert current is not None
        lowest.append(current.available_msat)
        return "ok", usage

    async def one(usage: Mapping[str, Any]) -> Settled:
        try:
            return (await core.payments.run(payer, TEST_MODEL, BODY, lambda: gated_job(usage)))[1]
        except InsufficientBalance:
            one_decided()
            raise

    results = await asyncio.gather(*(one(u) for u in usages), return_exceptions=True)
    settled = [r for r in results if isinstance(r, Settled)]
    refused = [r for r in results if not isinstance(r, Settled)]
    assert len(settled) == 50
    assert all(isinstance(r, InsufficientBalance) for r in refused)
    assert min(lowest) >= 0
    charged = sum(s.charged_msat for s in settled)
    assert charged == sum(s.cost.total_msat for s in settled)
    assert await balance(core, account.id) == 50 * max_cost - charged
    assert await balance(core, OPERATOR) == charged
