"""A model test of the ledger's hold lifecycle: random deposits, holds, renewals, settles,
releases, lapses and crashes, on a real SQLite file, checked against a model after every step.

The model is a few dictionaries; the rules it mirrors are the ledger's documented ones
(:mod:`nodeprov.core.holds`): a hold reserves from the available balance, a lease lapses
unless renewed, a lapsed hold reserves again on renewal if the balance allows, a settle
charges ``min(cost, hold, available)`` and never twice, a crash loses nothing committed.
After every step the audit holds and every balance, reservation and earning agrees.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from nodeprov.core import journal
from nodeprov.core.denominations import complete_split
from nodeprov.core.ledger import (
    OPERATOR,
    Hold,
    Ledger,
    add_asset,
    credit,
    ensure_account,
    open_ledger,
)
from nodeprov.errors import InsufficientBalance, LedgerError, Unauthorized
from nodeprov.protocol.cashu_token import Proof

MINT = "http://mint.invalid"
ACCOUNTS = ("key:a", "key:b", "npub:c")
LEASE = 120


@dataclass
class ModelHold:
    account: str
    amount: int
    lease_until: int
    open: bool = True  # False: lapsed (reserves nothing, still settleable)


class LedgerModel(RuleBasedStateMachine):
    holds = Bundle("holds")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "ledger.sqlite3"
        self.now = 1_800_000_000
        self.ledger = self.run(self._open())
        self.balance = dict.fromkeys(ACCOUNTS, 0)
        self.earned = 0
        self.live: dict[int, ModelHold] = {}  # hold id -> state, until settled or released

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    async def _open(self) -> Ledger:
        return await open_ledger(self.path, hold_timeout_seconds=LEASE, clock=lambda: self.now)

    def reserved(self, account: str) -> int:
        return sum(h.amount for h in self.live.values() if h.account == account and h.open)

    def available(self, account: str) -> int:
        return self.balance[account] - self.reserved(account)

    # --- rules ----------------------------------------------------------------------

    @initialize(amounts=st.lists(st.integers(1, 60_000), min_size=3, max_size=3))
    def every_account_starts_funded(self, amounts: list[int]) -> None:
        for account, amount in zip(ACCOUNTS, amounts, strict=True):
            self.deposit(account, amount)

    @rule(account=st.sampled_from(ACCOUNTS), amount=st.integers(1, 50_000))
    def deposit(self, account: str, amount: int) -> None:
        self.run(self._deposit(account, amount))
        self.balance[account] += amount

    async def _deposit(self, account: str, amount: int) -> None:
        proofs = [
            Proof(a, "00ffd48b8f5ecf80", secrets.token_hex(32), "02" + secrets.token_hex(32))
            for a in complete_split(amount)
        ]
        async with self.ledger.db.write() as conn:
            await ensure_account(conn, account, "api_key")
            await credit(conn, account, amount, "deposit", "model")
            await add_asset(conn, MINT, "msat", amount)
            op_id = await journal.insert_op(
                conn, kind="receive", state="done", mint_url=MINT, unit="msat",
                account_id=account, amount=amount, inputs=(), outputs=(),
            )  # fmt: skip
            await journal.store_proofs(conn, MINT, "msat", proofs, "unspent", op_id)

    @rule(target=holds, account=st.sampled_from(ACCOUNTS), amount=st.integers(0, 30_000))
    def hold(self, account: str, amount: int) -> Hold | None:
        try:
            held = self.run(self.ledger.hold(account, amount, "job"))
        except (InsufficientBalance, Unauthorized):
            assert self.available(account) < amount or self.balance[account] == 0
            return None
        assert self.available(account) >= amount
        self.live[held.id] = ModelHold(account, amount, self.now + LEASE)
        return held

    @rule(held=holds)
    def renew(self, held: Hold | None) -> None:
        if held is None:
            return
        renewed = self.run(self.ledger.renew(held))
        state = self.live.get(held.id)
        if state is None:
            assert not renewed
        elif state.open:
            assert renewed
            state.lease_until = self.now + LEASE
        elif self.available(state.account) >= state.amount:
            assert renewed
            state.open, state.lease_until = True, self.now + LEASE
        else:
            assert not renewed

    @rule(held=holds, cost=st.integers(0, 40_000))
    def settle(self, held: Hold | None, cost: int) -> None:
        if held is None:
            return
        state = self.live.pop(held.id, None)
        if state is None:
            try:
                self.run(self.ledger.settle(held, cost, "job"))
            except LedgerError:
                return
            raise AssertionError("a closed hold was settled again")
        available = self.available(state.account) + (state.amount if state.open else 0)
        charged = min(cost, state.amount, available)
        settlement = self.run(self.ledger.settle(held, cost, "job"))
        assert settlement.charged_msat == charged
        self.balance[state.account] -= charged
        self.earned += charged

    @rule(held=holds)
    def release(self, held: Hold | None) -> None:
        if held is None:
            return
        self.run(self.ledger.release(held))
        self.live.pop(held.id, None)

    @rule(seconds=st.integers(1, 300))
    def time_passes_and_the_sweeper_runs(self, seconds: int) -> None:
        self.now += seconds
        released = self.run(self.ledger.release_stale_holds())
        lapsing = [h for h in self.live.values() if h.open and h.lease_until <= self.now]
        assert released == len(lapsing)
        for state in lapsing:
            state.open = False

    @rule()
    def the_process_crashes_and_starts_again(self) -> None:
        """Everything committed survives; start-up releases only lapsed leases."""
        self.run(self.ledger.db.close())
        self.ledger = self.run(self._open())
        self.time_passes_and_the_sweeper_runs(1)

    # --- what must always hold ------------------------------------------------------

    @invariant()
    def books_agree_with_the_model(self) -> None:
        report = self.run(self.ledger.audit())
        assert report.ok, report
        for account in ACCOUNTS:
            found = self.run(self.ledger.account(account))
            got = (found.balance_msat, found.reserved_msat) if found else (0, 0)
            assert got == (self.balance[account], self.reserved(account)), account
        operator = self.run(self.ledger.account(OPERATOR))
        assert (operator.balance_msat if operator else 0) == self.earned
        count, held = self.run(self.ledger.open_holds())
        assert count == sum(1 for h in self.live.values() if h.open)
        assert held == sum(self.reserved(a) for a in ACCOUNTS)

    def teardown(self) -> None:
        self.run(self.ledger.db.close())
        self.loop.close()
        self.dir.cleanup()


# No shrinking: each example opens a real SQLite file, and shrinking a failure would take
# minutes; the failing run's steps are printed as they are.
LedgerModel.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)
test_ledger_model = LedgerModel.TestCase
