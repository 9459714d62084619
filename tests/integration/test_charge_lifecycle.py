"""The one charge lifecycle (``payments.job``): leases, lapses, the overrun rule, refs.

The ledger runs on a fake clock the tests move; a running job renews its lease in real time
(every few milliseconds here), so "time passing" is a clock step, never a sleep.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from nodeprov.core.ledger import OPERATOR
from nodeprov.core.payments import Payer, api_key_account
from nodeprov.daemon import recover
from tests.support.core import TEST_MODEL, Core, build_core
from tests.support.services import MintHandle

pytestmark = pytest.mark.usefixtures("ledger_backend")

BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
USAGE = {"prompt_tokens": 10, "completion_tokens": 20}
COST = 1000 + 2 * 10 + 5 * 20  # TEST_MODEL: 1000/request + 2/input token + 5/output token
LEASE = 30


class Clock:
    """The ledger's clock, in whole seconds; tests move it forward."""

    def __init__(self) -> None:
        self.t = int(time.time())

    def __call__(self) -> int:
        return self.t

    def advance(self, seconds: int) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def open_core(path: Path, mint: MintHandle, clock: Clock, renew: float) -> Core:
    return await build_core(path, [mint.url], lease_seconds=LEASE, clock=clock, renew_seconds=renew)


@pytest.fixture
async def core(tmp_path: Path, mint: MintHandle, clock: Clock) -> AsyncIterator[Core]:
    """Jobs renew their lease every 20 ms (real time)."""
    built = await open_core(tmp_path / "ledger.sqlite3", mint, clock, renew=0.02)
    try:
        yield built
        await built.assert_books_balance()
    finally:
        await built.close()


@pytest.fixture
async def stalled(tmp_path: Path, mint: MintHandle, clock: Clock) -> AsyncIterator[Core]:
    """Jobs never get to renew during a test: their lease lapses when the clock moves."""
    built = await open_core(tmp_path / "ledger.sqlite3", mint, clock, renew=3600.0)
    try:
        yield built
        await built.assert_books_balance()
    finally:
        await built.close()


async def funded_key(core: Core, make_token: Any, mint: MintHandle) -> str:
    api_key, _ = await core.payments.create_key(await make_token(100, mint=mint))
    return api_key


async def reserved(core: Core, account_id: str) -> int:
    account = await core.ledger.account(account_id)
    assert account is not None
    return account.reserved_msat


async def wait_renewed_past(core: Core, at: int) -> None:
    """Until every open hold's lease runs past ``at`` (the job renewed it); a guard, not a timer."""
    deadline = time.monotonic() + 30
    while True:
        row = await core.ledger.db.fetchone(
            "SELECT COUNT(*) FROM holds WHERE NOT (state = 'open' AND lease_expires_at > ?)",
            (at,),
        )
        if row is not None and row[0] == 0:
            return
        assert time.monotonic() < deadline, "the running job never renewed its lease"
        await asyncio.sleep(0.01)


# --- leases ---------------------------------------------------------------------------


async def test_running_job_renews_its_lease_so_the_sweeper_leaves_it_alone(
    core: Core, clock: Clock, make_token: Any, mint: MintHandle
) -> None:
    api_key = await funded_key(core, make_token, mint)
    account_id = api_key_account(api_key)
    hold = core.pricer.max_cost(TEST_MODEL, BODY).total_msat
    started, finish = asyncio.Event(), asyncio.Event()

    async def work() -> int:
        async with core.payments.job(Payer("api_key", api_key), TEST_MODEL, BODY) as job:
            started.set()
            await finish.wait()
            return (await job.settle(USAGE)).charged_msat

    task = asyncio.create_task(work())
    await started.wait()
    clock.advance(10 * LEASE)  # far past the lease the hold was taken with
    await wait_renewed_past(core, clock())
    assert await core.ledger.release_stale_holds() == 0
    assert await reserved(core, account_id) == hold
    finish.set()
    assert await task == COST
    account = await core.ledger.account(account_id)
    assert account is not None
    assert (account.balance_msat, account.reserved_msat) == (100_000 - COST, 0)


async def test_lapsed_lease_is_released_and_the_late_job_still_pays(
    stalled: Core, clock: Clock, make_token: Any, mint: MintHandle
) -> None:
    core = stalled
    api_key = await funded_key(core, make_token, mint)
    account_id = api_key_account(api_key)
    async with core.payments.job(Payer("api_key", api_key), TEST_MODEL, BODY) as job:
        clock.advance(LEASE + 1)
        assert await core.ledger.release_stale_holds() == 1  # the sweep: nobody renewed it
        assert await reserved(core, account_id) == 0
        settled = await job.settle(USAGE)
    assert settled.charged_msat == COST  # never "a hold of zero" for free
    account = await core.ledger.account(account_id)
    assert account is not None
    assert (account.balance_msat, account.reserved_msat) == (100_000 - COST, 0)
    assert await core.ledger.db.fetchall("SELECT * FROM holds") == []


async def test_lapsed_lease_whose_balance_was_spent_meanwhile_writes_off_the_rest(
    stalled: Core, clock: Clock, make_token: Any, mint: MintHandle
) -> None:
    """What a lapsed job owes comes from what is left; the shortfall is logged as a write-off."""
    core = stalled
    api_key, _ = await core.payments.create_key(await make_token(2_000, unit="msat", mint=mint))
    account_id = api_key_account(api_key)
    async with core.payments.job(Payer("api_key", api_key), TEST_MODEL, BODY) as job:
        clock.advance(LEASE + 1)
        assert await core.ledger.release_stale_holds() == 1
        await core.payments.withdraw(account_id, 1_500)
        settled = await job.settle(USAGE)
    assert settled.charged_msat == 500
    charge = [t for t in await core.ledger.transactions(account_id) if t["kind"] == "charge"]
    assert [(t["delta_msat"], t["detail"]) for t in charge] == [(-500, f"writeoff={COST - 500}")]


async def test_a_lapsed_job_that_renews_reserves_again(
    core: Core, clock: Clock, make_token: Any, mint: MintHandle
) -> None:
    api_key = await funded_key(core, make_token, mint)
    account_id = api_key_account(api_key)
    hold = core.pricer.max_cost(TEST_MODEL, BODY).total_msat
    async with core.payments.job(Payer("api_key", api_key), TEST_MODEL, BODY) as job:
        clock.advance(LEASE + 1)
        await core.ledger.release_stale_holds()  # may or may not beat the renewal
        await wait_renewed_past(core, clock())
        assert await reserved(core, account_id) == hold
        assert (await job.settle(USAGE)).charged_msat == COST


async def test_startup_recovery_releases_only_lapsed_leases(
    stalled: Core, clock: Clock, make_token: Any, mint: MintHandle
) -> None:
    core = stalled
    account_id = api_key_account(await funded_key(core, make_token, mint))
    lapsing = await core.ledger.hold(account_id, 1_000)
    clock.advance(LEASE - 5)
    live = await core.ledger.hold(account_id, 2_000)  # another worker's job, still renewing
    clock.advance(10)
    await recover(core)  # type: ignore[arg-type]
    assert await reserved(core, account_id) == 2_000
    assert (await core.ledger.settle(live, 1_500)).charged_msat == 1_500
    assert (await core.ledger.settle(lapsing, 700)).charged_msat == 700


# --- the overrun rule -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["api_key", "npub", "token_key"])
async def test_no_payer_is_charged_above_its_hold(
    core: Core, make_token: Any, mint: MintHandle, kind: str
) -> None:
    """The hold is the quote: an upstream reporting more than it allowed is written off."""
    hold = core.pricer.max_cost(TEST_MODEL, BODY).total_msat
    usage = {"prompt_tokens": 10, "completion_tokens": 300}  # 1000 + 20 + 1500 = 2520 msat
    assert hold < 2_520
    token = await make_token(100, mint=mint)
    if kind == "api_key":
        payer = Payer("api_key", await funded_key(core, make_token, mint))
    elif kind == "npub":
        pubkey = secrets.token_hex(32)
        await core.wallet.receive(token, "npub:" + pubkey, "npub")
        payer = Payer("npub", pubkey)
    else:
        payer = Payer("token_key", token)
    async with core.payments.job(payer, TEST_MODEL, BODY) as job:
        settled = await job.settle(usage)
    assert settled.cost.total_msat == 2_520 and settled.charged_msat == hold
    assert settled.balance_msat == 100_000 - hold
    operator = await core.ledger.account(OPERATOR)
    assert operator is not None and operator.balance_msat == hold


# --- references -----------------------------------------------------------------------


async def test_a_settle_is_idempotent_on_its_reference(
    core: Core, make_token: Any, mint: MintHandle
) -> None:
    api_key = await funded_key(core, make_token, mint)
    payer = Payer("api_key", api_key)
    assert await core.payments.outcome("dm:abc") is None
    async with core.payments.job(payer, TEST_MODEL, BODY, ref="dm:abc") as job:
        first = await job.settle(USAGE, result={"answer": 42})
    async with core.payments.job(payer, TEST_MODEL, BODY, ref="dm:abc") as job:
        again = await job.settle(USAGE, result={"answer": 43})
    assert first.charged_msat == again.charged_msat == COST
    outcome = await core.payments.outcome("dm:abc")
    assert outcome is not None
    assert (outcome.charged_msat, outcome.result) == (COST, {"answer": 42})
    account = await core.ledger.account(api_key_account(api_key))
    assert account is not None
    assert (account.balance_msat, account.reserved_msat) == (100_000 - COST, 0)


async def test_a_job_left_without_settling_charges_nothing(
    core: Core, make_token: Any, mint: MintHandle
) -> None:
    token = await make_token(10, mint=mint)
    async with core.payments.job(Payer("request_token", token), TEST_MODEL, BODY):
        pass
    [change] = await core.payments.claim_change(token)
    assert await make_token.redeem(change) == 10
