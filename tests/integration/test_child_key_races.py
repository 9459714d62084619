"""Child keys in the ledger: concurrent holds never overdraw the parent nor pass a child's limit.

The parent and several children hold at the same time through the one hold path
(``Ledger.hold``, as ``Payments`` does for every paid request), on SQLite and PostgreSQL;
what each was granted is checked against the parent's balance and each child's limit, then
every hold settles or is released, again concurrently, and the books must audit clean.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from nodeprov.core.child_keys import ChildKeys
from nodeprov.core.expiry import ExpiryRefunder
from nodeprov.core.ledger import Hold
from nodeprov.core.payments import api_key_account
from nodeprov.errors import AccountExpired, InsufficientBalance, Unauthorized
from tests.support.core import Core, build_core
from tests.support.services import MintHandle

pytestmark = pytest.mark.usefixtures("ledger_backend")

HOLD = 1_000  # msat per hold
REQUESTS = 240


async def funded_parent(core: Core, make_token: Any, sats: int) -> tuple[str, str]:
    key, account = await core.payments.create_key(await make_token(sats))
    return key, account.id


async def try_hold(core: Core, account_id: str) -> Hold | None:
    try:
        return await core.ledger.hold(account_id, HOLD, "race")
    except InsufficientBalance:
        return None


@pytest.fixture
async def core(tmp_path: Path, mint: MintHandle) -> Any:
    built = await build_core(tmp_path / "ledger.sqlite3", [mint.url])
    try:
        yield built
        await built.assert_books_balance()
    finally:
        await built.close()


@pytest.mark.parametrize("sats", [100, 200], ids=["parent_binds", "limits_bind"])
async def test_concurrent_holds_by_a_parent_and_its_children_respect_every_bound(
    core: Core, make_token: Any, sats: int
) -> None:
    _, parent_id = await funded_parent(core, make_token, sats=sats)  # room for `sats` holds
    children = ChildKeys(core.ledger)
    limits = [7 * HOLD, 30 * HOLD, None, 20 * HOLD + 500]
    made = [await children.create(parent_id, limit_msat=limit) for limit in limits]
    payers = [parent_id] + [api_key_account(key) for key, _ in made]
    order = [payers[i % len(payers)] for i in range(REQUESTS)]  # 48 requests each
    random.Random(15).shuffle(order)
    granted = await asyncio.gather(*(try_hold(core, payer) for payer in order))
    by_payer = {payer: 0 for payer in payers}
    for payer, got in zip(order, granted, strict=True):
        by_payer[payer] += HOLD if got is not None else 0
    asked = REQUESTS // len(payers) * HOLD
    wanted = [asked] + [asked if limit is None else min(asked, limit // HOLD * HOLD)
                        for limit in limits]  # fmt: skip
    if sats * 1000 < sum(wanted):  # the parent's balance is the bound: all of it, no more
        assert sum(by_payer.values()) == sats * 1000
        for (_, child), limit in zip(made, limits, strict=True):
            assert limit is None or by_payer[child.key_account] <= limit
    else:  # each child's limit is its bound, exactly
        assert [by_payer[payer] for payer in payers] == wanted
    for _, child in made:
        now = await children.get(child.id)
        assert now is not None and now.reserved_msat == by_payer[child.key_account]
    parent = await core.ledger.account(parent_id)
    assert parent is not None and parent.reserved_msat == sum(by_payer.values())
    holds = [h for h in granted if h is not None]
    costs = [random.Random(h.id).randint(0, HOLD) for h in holds]
    await asyncio.gather(
        *(
            core.ledger.settle(h, cost) if h.id % 3 else core.ledger.release(h)
            for h, cost in zip(holds, costs, strict=True)
        )
    )
    charged = {payer: 0 for payer in payers}
    payer_of = {child.id: child.key_account for _, child in made}
    for h, cost in zip(holds, costs, strict=True):
        if h.id % 3:
            charged[payer_of[h.child_id] if h.child_id else parent_id] += cost
    parent = await core.ledger.account(parent_id)
    assert parent is not None and parent.reserved_msat == 0
    assert parent.balance_msat == sats * 1000 - sum(charged.values())
    for _, child in made:
        after = await children.get(child.id)
        assert after is not None and after.reserved_msat == 0
        assert after.spent_msat == charged[child.key_account]


async def test_a_childs_lapsed_hold_gives_its_limit_back_and_settles_within_it(
    tmp_path: Path, mint: MintHandle, make_token: Any
) -> None:
    clock = [1_900_000_000]
    core = await build_core(
        tmp_path / "ledger.sqlite3", [mint.url], lease_seconds=60, clock=lambda: clock[0]
    )
    try:
        _, parent_id = await funded_parent(core, make_token, sats=50)
        children = ChildKeys(core.ledger)
        key, child = await children.create(parent_id, limit_msat=3 * HOLD)
        first = await core.ledger.hold(api_key_account(key), 2 * HOLD, "slow")
        clock[0] += 61
        assert await core.ledger.release_stale_holds() == 1
        lapsed = await children.get(child.id)
        assert lapsed is not None and lapsed.reserved_msat == 0
        # Its limit is free again: another job takes it while the first still runs.
        second = await core.ledger.hold(api_key_account(key), 2 * HOLD, "fast")
        assert not await core.ledger.renew(first)  # no room to reserve again within the limit
        await core.ledger.settle(second, 2 * HOLD)
        settled = await core.ledger.settle(first, 2 * HOLD)  # it owes 2000; 1000 is left
        assert settled.charged_msat == HOLD and settled.written_off_msat == HOLD
        done = await children.get(child.id)
        assert done is not None and (done.spent_msat, done.reserved_msat) == (3 * HOLD, 0)
        await core.assert_books_balance()
    finally:
        await core.close()


async def test_refusals_say_why_a_child_cannot_hold(core: Core, make_token: Any) -> None:
    parent_key, parent_id = await funded_parent(core, make_token, sats=5)
    children = ChildKeys(core.ledger)
    key, child = await children.create(parent_id, limit_msat=2 * HOLD)
    account = api_key_account(key)
    with pytest.raises(InsufficientBalance) as over:
        await core.ledger.hold(account, 3 * HOLD, "big")
    assert over.value.details["available_msat"] == 2 * HOLD and "limit" in over.value.message
    with pytest.raises(InsufficientBalance) as poor:  # the parent has 5 sat, the child no limit
        _, free = await children.create(parent_id)
        await core.ledger.hold(free.key_account, 6 * HOLD, "big")
    assert poor.value.details["available_msat"] == 5 * HOLD
    await children.revoke(child.id, parent_id=parent_id)
    with pytest.raises(Unauthorized):
        await core.ledger.hold(account, HOLD, "revoked")
    _, later = await children.create(parent_id, expires_at=2_000_000_000)
    async with core.ledger.db.write() as conn:
        await conn.execute("UPDATE child_keys SET expires_at = 1 WHERE id = ?", (later.id,))
    with pytest.raises(AccountExpired):
        await core.ledger.hold(later.key_account, HOLD, "expired")
    async with core.ledger.db.write() as conn:  # the parent's time is up: its children stop
        await conn.execute("UPDATE accounts SET expires_at = 1 WHERE id = ?", (parent_id,))
    with pytest.raises(AccountExpired) as parent_expired:
        await core.ledger.hold(free.key_account, HOLD, "parent expired")
    assert "parent" in parent_expired.value.message
    assert (await core.ledger.account(api_key_account(parent_key))).reserved_msat == 0  # type: ignore[union-attr]


async def test_expiry_refunds_never_pay_anything_for_a_child(core: Core, make_token: Any) -> None:
    key, _ = await core.payments.create_key(
        await make_token(20), expires_at=2_000_000_000, refund_address="bob@127.0.0.1:1"
    )
    children = ChildKeys(core.ledger)
    _, child = await children.create(api_key_account(key), limit_msat=5 * HOLD, expires_at=10)
    refunder = ExpiryRefunder(core.wallet, private_hosts=True)
    # The child expired long ago, its parent not yet: nothing is due, for either.
    assert await refunder.round(at=1_999_999_999) == []
    assert await core.ledger.account(child.key_account) is None  # a child holds no balance
    # Once the parent expires, only the parent's balance is due (its address is unreachable
    # here, so the attempt fails and the balance stays): never anything for the child.
    later = await refunder.round(at=2_000_000_001)
    assert [r.account_id for r in later] == [api_key_account(key)]


async def test_the_audit_finds_a_child_whose_reservation_is_not_its_open_holds(
    core: Core, make_token: Any
) -> None:
    _, parent_id = await funded_parent(core, make_token, sats=5)
    _, child = await ChildKeys(core.ledger).create(parent_id, limit_msat=3 * HOLD)
    held = await core.ledger.hold(child.key_account, HOLD, "job")
    assert (await core.ledger.audit()).ok
    for reserved in (0, HOLD):  # broken, then as it was
        async with core.ledger.db.write() as conn:
            await conn.execute(
                "UPDATE child_keys SET reserved_msat = ? WHERE id = ?", (reserved, child.id)
            )
        report = await core.ledger.audit()
        assert report.ok == (reserved == HOLD)
        assert any(child.id in line for line in report.log_mismatches) == (reserved == 0)
    await core.ledger.release(held)
