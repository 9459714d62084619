"""A model test of the payments core against the real mint: keys, deposits, jobs, change,
withdrawals, refunds, lapsed leases and crashes, checked against the client's own books.

The machine plays the clients. It mints real tokens at the test mint, pays the node with them
(create a key, top up, deposit by ref, a token as a key, a per-request token), runs jobs through
the one charge lifecycle (``payments.job``) that settle, fail upstream or outlive their lease,
withdraws, claims change, lets time pass and crashes the node between steps (close, reopen on
the same files, start-up recovery). Every token the node hands back is checked at the mint.

The model computes what each step must do from the published price (``TEST_PRICE``) and the
documented rules (holds, the overrun rule, change rounding), never from the node's answers.
After every step: the audit holds, the node's proofs are what its books say, every balance,
reservation and the operator's earnings agree with the model, and every msat the clients paid
in is back in their hands, on an account, or earned.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from nodeprov.core.ledger import OPERATOR
from nodeprov.core.payments import Payer, PaymentFailed, api_key_account
from nodeprov.errors import (
    InsufficientBalance,
    PaymentTooSmall,
    TokenAlreadySpent,
    TokenTooSmall,
    Unauthorized,
    UpstreamError,
)
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint
from tests.support.at_once import AtOnce
from tests.support.cashu_client import TokenFactory
from tests.support.core import TEST_MODEL
from tests.support.mint_link_drops import MintLinkDrops
from tests.support.payments_model import (
    LEASE,
    NPUB,
    PROMPT_BOUND,
    Running,
    body,
    cost_of,
    hold_for,
    token_value,
)
from tests.support.services import MintHandle

pytestmark = pytest.mark.usefixtures("ledger_backend")

DEPOSIT_REFS = ("dm:d1", "dm:d2", "dm:d3")
WITHDRAW_REFS = ("dm:w1", "dm:w2")
JOB_REFS = ("dm:j1", "dm:j2")
# Who pays a job (repeats weigh the draw): a key, a token as a key (new or used before), a
# pubkey's account (funded by deposits only) or a per-request token.
PAYERS = ("api_key", "api_key", "token_key", "new_token_key", "npub", "request", "request")


class PaymentsModel(MintLinkDrops, AtOnce, RuleBasedStateMachine):
    # --- paying in -------------------------------------------------------------------

    @initialize(sats=st.integers(5, 40))
    def a_client_creates_a_key(self, sats: int) -> None:
        token = self.fresh(sats)
        api_key, account = self.run(self.core.payments.create_key(token))
        assert account.id == api_key_account(api_key)
        assert api_key not in self.keys
        self.keys.append(api_key)
        self.credit(account.id, token)
        self.create_tokens.append(token)

    @rule(sats=st.integers(1, 40), again=st.booleans(), which=st.integers(0, 9))
    def create_key(self, sats: int, again: bool, which: int) -> None:
        """A new key; or the same token again (a retry): the same key, nothing credited."""
        if not again and len(self.keys) < 4:
            self.a_client_creates_a_key(sats)
            return
        token = self.create_tokens[which % len(self.create_tokens)]
        api_key, account = self.run(self.core.payments.create_key(token))
        assert api_key in self.keys
        assert account.balance_msat == self.balance[account.id]

    @rule(which=st.integers(0, 9), sats=st.integers(1, 20))
    def topup(self, which: int, sats: int) -> None:
        account = api_key_account(self.keys[which % len(self.keys)])
        token = self.fresh(sats)
        received = self.run(self.core.payments.topup(account, token))
        assert received.credited_msat == self.worth(token)
        self.credit(account, token)

    @rule(
        which=st.integers(0, 9),
        sats=st.integers(1, 20),
        ref=st.sampled_from(DEPOSIT_REFS),
        same_token=st.booleans(),
    )
    def deposit_by_ref(self, which: int, sats: int, ref: str, same_token: bool) -> None:
        """A DM deposit; a repeat of its ref (a resumed DM) credits nothing again."""
        accounts = [a for a in self.accounts() if not a.startswith("token:")]
        account = accounts[which % len(accounts)]
        first = self.deposits.get((ref, account))
        token = self.fresh(sats)
        received = self.run(self.core.payments.deposit(account, token, ref))
        if first is None:
            assert received.credited_msat == self.worth(token)
            self.deposits[(ref, account)] = self.worth(token)
            self.credit(account, token)
            if same_token:  # the DM is delivered again: the same token under the same ref
                again = self.run(self.core.payments.deposit(account, token, ref))
                assert again.credited_msat == self.worth(token)
            return
        assert received.credited_msat == first
        event("deposit: ref repeated with another token")
        # The node answered with the first deposit; this token is still the client's.
        assert self.run(self.client.proof_states(token)) == ["UNSPENT"] * len(
            parse_token(token).proofs
        )

    # --- jobs ------------------------------------------------------------------------

    def _start(
        self, payer: str, which: int, sats: int, max_tokens: int, ref: str | None
    ) -> Running | None:
        hold = hold_for(max_tokens)
        token: str | None = None
        if payer == "api_key":
            credential = self.keys[which % len(self.keys)]
            account, who = api_key_account(credential), Payer("api_key", credential)
        elif payer == "npub":
            account, who = "npub:" + NPUB, Payer("npub", NPUB)
        elif payer == "token_key" and self.token_keys:
            credential = self.token_keys[which % len(self.token_keys)]
            account, who = self.token_account(credential), Payer("token_key", credential)
        elif payer in ("token_key", "new_token_key"):
            credential = self.fresh(sats)
            account, who = self.token_account(credential), Payer("token_key", credential)
            self.token_keys.append(credential)
            self.credit(account, credential)  # redeemed on first use, whatever follows
        else:
            ref = None  # per-request tokens are not resumed by ref
            token = self.fresh(sats)
            account, who = (
                "req:" + token_fingerprint(parse_token(token)),
                Payer("request_token", token),
            )
        job = self.core.payments.job(who, TEST_MODEL, body(max_tokens), ref=ref)
        if ref is not None:
            # A resumed job's interrupted run is released first.
            for earlier in [r for r in self.running if r.ref == ref]:
                self.running.remove(earlier)
                earlier.job._stop_renewing()
            self.orphans = [o for o in self.orphans if o.ref != ref]
        try:
            self.run(job.__aenter__())
        except PaymentTooSmall:  # refused on what the token says, before any swap (NUT-24)
            assert token is not None and self.worth(token) < hold
            assert self.unspent(token)  # still the client's
            event("a per-request token too small for the hold is refused unspent")
            return None
        except InsufficientBalance:
            assert token is None and self.available(account) < hold
            event(f"{payer}: hold refused")
            return None
        if token is not None:
            self.request_tokens.append(token)
            self.change[account] = []
            self.credit(account, token)
        assert self.available(account) >= hold, (self.available(account), hold)
        running = Running(job, payer, account, hold, self.now + LEASE, max_tokens, ref, token)
        self.running.append(running)
        return running

    def refunded(self, account: str, sent: Any) -> None:
        """A per-request account's balance came back as ``sent`` (or as small change)."""
        value = self.pay_out(account)
        if sent is None:
            if value:
                self.small_change(account, value)
            return
        assert value
        self.change[account].append(sent.token)
        self.receive_back(sent.token, value)

    @precondition(lambda self: bool(self.running))
    @rule(
        which=st.integers(0, 9),
        ends=st.sampled_from(["settles", "settles", "fails upstream", "stream cut", "no usage"]),
        prompt=st.integers(0, PROMPT_BOUND + 10),
        completion=st.integers(0, 320),
        reported=st.booleans(),
    )
    def a_running_job_ends(
        self, which: int, ends: str, prompt: int, completion: int, reported: bool
    ) -> None:
        """Settled: charged what its usage costs at the price, at most its hold (and what is
        left). Failed upstream: nothing charged; a per-request token comes back whole. A
        stream cut short after ``completion`` content chunks, with its prompt reported or
        not; an answer without usage."""
        job = self.running.pop(which % len(self.running))
        if ends == "settles":
            self._settle(job, {"prompt_tokens": prompt, "completion_tokens": completion})
        elif ends == "stream cut":
            job.job.output(completion)
            self._settle(job, {"prompt_tokens": prompt} if reported else None, complete=False)
        elif ends == "no usage":
            self._settle(job, None)
        else:
            self._fail(job)

    @staticmethod
    def expected_cost(job: Running, usage: dict[str, int] | None, complete: bool) -> int | None:
        """The charge lifecycle's cost rules, from the price; None: nothing is owed."""
        whole = usage is not None and "completion_tokens" in usage
        reported = cost_of(usage["prompt_tokens"], usage["completion_tokens"]) if whole else None
        if complete:
            return job.hold if reported is None else reported  # no usage: the hold
        if not job.job.produced:
            return None  # a stream that produced nothing
        prompt = usage["prompt_tokens"] if usage is not None else PROMPT_BOUND
        made = cost_of(prompt, min(job.job.produced, job.max_tokens))
        return max(made, reported or 0)

    def _settle(self, job: Running, usage: dict[str, int] | None, complete: bool = True) -> None:
        """Close ``job`` (off the running list already) as the model expects."""
        cost = self.expected_cost(job, usage, complete)
        settled = self.run(job.job.settle(usage, complete=complete))
        self.run(job.job.__aexit__(None, None, None))
        if cost is None:
            event("a stream that produced nothing is not charged")
            assert settled.charged_msat == 0
            self._closed_unpaid(job, settled.change)
            return
        if job.ref is not None and job.ref in self.outcomes:
            assert settled.charged_msat == self.outcomes[job.ref]  # charged once, long ago
            event("a job ref settled again charges nothing")
        else:
            # A live hold's own reservation is available to it (the job is off the list).
            charged = min(cost, job.hold, self.available(job.account))
            event(
                f"settled: {'lapsed' if not job.open else 'live'}, charged "
                + ("cost" if charged == cost else "hold" if charged == job.hold else "rest")
            )
            assert settled.charged_msat == charged
            self.balance[job.account] -= charged
            self.earned += charged
            if job.ref is not None:
                self.outcomes[job.ref] = charged
        assert settled.cost.total_msat == cost
        event(f"settled: {job.kind}")
        if job.token is not None:
            self.refunded(job.account, settled.change)
        else:
            assert settled.change is None
            assert settled.balance_msat == self.available(job.account)

    def _closed_unpaid(self, job: Running, refund: Any) -> None:
        if job.token is not None:
            self.refunded(job.account, refund)
        else:
            assert refund is None

    def _fail(self, job: Running) -> None:
        failure = UpstreamError("the upstream answered 502")
        try:
            self.run(job.job.__aexit__(UpstreamError, failure, None))
        except PaymentFailed as failed:
            assert failed.error is failure
            refund = failed.refund
        else:
            raise AssertionError("an upstream failure must surface as PaymentFailed")
        event(f"upstream failure: {job.kind}")
        self._closed_unpaid(job, refund)

    @rule(
        payer=st.sampled_from(PAYERS),
        which=st.integers(0, 9),
        sats=st.integers(1, 6),
        max_tokens=st.integers(1, 300),
        usage=st.tuples(st.integers(0, PROMPT_BOUND), st.integers(0, 300)),
        ref=st.none() | st.sampled_from(JOB_REFS),
        ends=st.sampled_from(["settles", "fails upstream", "keeps running", "keeps running"]),
    )
    def a_job(
        self,
        payer: str,
        which: int,
        sats: int,
        max_tokens: int,
        usage: tuple[int, int],
        ref: str | None,
        ends: str,
    ) -> None:
        """A job enters the lifecycle (the node holds its most possible cost) and ends at once
        within its bounds, fails upstream, or keeps running across later steps."""
        running = self._start(payer, which, sats, max_tokens, ref)
        if running is None or ends == "keeps running":
            return
        self.running.remove(running)
        if ends == "settles":
            prompt, completion = usage[0], min(usage[1], max_tokens)
            self._settle(running, {"prompt_tokens": prompt, "completion_tokens": completion})
        else:
            self._fail(running)

    @rule(
        payer=st.sampled_from(PAYERS),
        which=st.integers(0, 9),
        sats=st.integers(2, 8),
        max_tokens=st.integers(1, 300),
        meanwhile=st.sampled_from(["nothing", "its balance is taken"]),
        ends=st.sampled_from(["renews, then settles", "settles", "fails upstream"]),
        completion=st.integers(0, 300),
    )
    def a_job_outlives_its_lease(
        self,
        payer: str,
        which: int,
        sats: int,
        max_tokens: int,
        meanwhile: str,
        ends: str,
        completion: int,
    ) -> None:
        """A job stalls past its lease: the sweeper releases its hold, the payer may spend the
        balance meanwhile (withdraw it, or claim a per-request token's change), and the job
        still ends: it settles what it owes from what is left (the rest written off), renews
        (holding again if it can), or fails upstream and is charged nothing."""
        running = self._start(payer, which, sats, max_tokens, None)
        if running is None:
            return
        self.time_passes_and_the_sweeper_runs(LEASE, renewed=False)
        assert not running.open
        if meanwhile == "its balance is taken":
            if running.token is not None:
                self.a_client_claims_its_change(self.request_tokens.index(running.token))
            else:
                self.withdraw(self.accounts().index(running.account), None, None)
        if ends == "renews, then settles":
            self.running_jobs_renew_their_leases()
        self.running.remove(running)
        if ends == "fails upstream":
            self._fail(running)
        else:
            completion = min(completion, max_tokens)
            self._settle(running, {"prompt_tokens": PROMPT_BOUND, "completion_tokens": completion})

    @rule(seconds=st.integers(1, 2 * LEASE), renewed=st.booleans())
    def time_passes_and_the_sweeper_runs(self, seconds: int, renewed: bool) -> None:
        """The running jobs renew their leases first, or (stalled) do not."""
        if renewed:
            self.running_jobs_renew_their_leases()
        self.now += seconds
        self.sweep()

    def running_jobs_renew_their_leases(self) -> None:
        """A lapsed hold reserves again if the balance allows (the ledger's renew rule)."""
        for job in self.running:
            renewed = self.run(self.core.ledger.renew(job.job._open().hold))
            if job.open or self.available(job.account) >= job.hold:
                assert renewed
                event("renewed " + ("a live lease" if job.open else "a lapsed lease"))
                job.open, job.lease_until = True, self.now + LEASE
            else:
                assert not renewed
                event("a lapsed job cannot reserve again")

    def sweep(self) -> None:
        released = self.run(self.core.ledger.release_stale_holds())
        lapsing = [h for h in self.holds() if h.open and h.lease_until <= self.now]
        assert released == len(lapsing)
        for held in lapsing:
            held.open = False
        if lapsing:
            event("leases lapsed")
        # The hold of a crashed job is gone for good once it lapsed.
        self.orphans = [o for o in self.orphans if o.open]

    @rule(
        which=st.integers(0, 9),
        way=st.sampled_from(["create_key", "topup", "deposit", "token_key", "request"]),
    )
    def a_token_the_node_took_is_sent_again(self, which: int, way: str) -> None:
        """A token pays once: sent again, any way, it is refused and nothing moves.

        Except where the token is the credential: creating a key again with its own token
        answers with that key, and a token used as a key pays from its account.
        """
        token = self.taken[which % len(self.taken)]
        if (way == "create_key" and token in self.create_tokens) or (
            way == "token_key" and token in self.token_keys
        ):
            return
        payments = self.core.payments
        account = api_key_account(self.keys[which % len(self.keys)])
        if way == "create_key":
            attempt = payments.create_key(token)
        elif way == "topup":
            attempt = payments.topup(account, token)
        elif way == "deposit":
            attempt = payments.deposit(account, token, f"dm:again{len(self.taken)}")
        else:
            payer = Payer("token_key" if way == "token_key" else "request_token", token)
            attempt = payments.job(payer, TEST_MODEL, body(1)).__aenter__()
        # Too small to pay even if it were new, a per-request token is refused for that first.
        too_small = way == "request" and self.worth(token) < hold_for(1)
        with pytest.raises(PaymentTooSmall if too_small else TokenAlreadySpent):
            self.run(attempt)

    @precondition(lambda self: bool(self.request_tokens))
    @rule(which=st.integers(0, 9))
    def a_client_claims_its_change(self, which: int) -> None:
        """After a crash the change of a per-request token is still claimable, once."""
        token = self.request_tokens[which % len(self.request_tokens)]
        account = "req:" + token_fingerprint(parse_token(token))
        issued = len(self.change[account])
        tokens = self.run(self.core.payments.claim_change(token))
        if self.available(account) > 0 and self.reserved(account) == 0:
            value = self.pay_out(account)
            event(f"change claimed: {value} sat")
            if value and len(tokens) == issued + 1:
                self.change[account].append(tokens[-1])
                self.receive_back(tokens[-1], value)
            elif value:
                self.small_change(account, value)
        assert tokens == self.change[account]

    # --- paying out ------------------------------------------------------------------

    @rule(
        which=st.integers(0, 9),
        amount=st.none() | st.integers(0, 30_000),
        ref=st.none() | st.sampled_from(WITHDRAW_REFS),
    )
    def withdraw(self, which: int, amount: int | None, ref: str | None) -> None:
        accounts = self.accounts()
        account = accounts[which % len(accounts)]
        payments = self.core.payments
        first = self.withdrawals.get((ref, account)) if ref else None
        wanted = self.available(account) if amount is None else amount
        try:
            sent = self.run(payments.withdraw(account, amount, ref=ref or ""))
        except Unauthorized:
            assert account not in self.balance
            event("withdraw: unknown account")
            return
        except InsufficientBalance:
            assert first is None and wanted > self.available(account)
            event("withdraw: more than available")
            return
        except TokenTooSmall:
            # Less than a sat, or (with input fees) so little that the swap's fee eats it.
            assert first is None and wanted // 1000 <= self.fee_bound()
            event("withdraw: too small")
            return
        if first is not None:
            assert sent.token == first  # the first withdrawal's token; nothing debited
            event("withdraw: ref repeated")
            return
        event(f"withdraw: {'all' if amount is None else 'part'}, ref {ref is not None}")
        assert account in self.balance and wanted <= self.available(account)
        value = wanted // 1000
        assert value > 0
        self.balance[account] -= value * 1000
        if ref:
            self.withdrawals[(ref, account)] = sent.token
        self.receive_back(sent.token, value)
        self.redeem(sent.token)

    @precondition(lambda self: any(token_value(t) > self.fee_in(t) for t in self.books.held))
    @rule()
    def the_client_redeems_what_it_holds(self) -> None:
        for token in list(self.books.held):
            self.redeem(token)

    # --- crashes ---------------------------------------------------------------------

    @precondition(lambda self: self.steps_since_crash >= 5)
    @rule()
    def the_node_crashes_and_starts_again(self) -> None:
        """Running jobs die with the process; their holds stay until their lease lapses."""
        if self.running:
            event("crash with jobs running")
        self.restart()

    # --- what must always hold ------------------------------------------------------

    @invariant()
    def books_agree_with_the_model(self) -> None:
        self.steps_since_crash += 1
        self.run(self.core.assert_books_balance())  # the audit, and proofs == books per mint
        ledger = self.core.ledger
        for account, balance in self.balance.items():
            found = self.run(ledger.account(account))
            got = (found.balance_msat, found.reserved_msat) if found else (0, 0)
            assert got == (balance, self.reserved(account)), account
        operator = self.run(ledger.account(OPERATOR))
        assert (operator.balance_msat if operator else 0) == self.earned
        count, held = self.run(ledger.open_holds())
        assert count == sum(1 for h in self.holds() if h.open)
        assert held == sum(h.hold for h in self.holds() if h.open)
        # Every msat the clients paid in is back with them, on an account, earned, or the
        # mint's fee.
        books = self.books
        assert books.paid_in == books.back + sum(self.balance.values()) + self.earned + books.fees


# No shrinking: every step talks to the real mint, and shrinking a failure would take minutes;
# the failing run's steps are printed as they are. Sized to take about 20 s on two cores; to
# hunt longer, raise max_examples and set derandomize=False (each run then tries new sequences).
SETTINGS = settings(
    max_examples=10,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)
FEE_SETTINGS = settings(SETTINGS, max_examples=5)


@pytest.mark.parametrize("mint_name", ["mint", "fee_mint"])
def test_payments_model(mint_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Against a mint without input fees, and one with them (100 ppk a proof)."""
    mint: MintHandle = request.getfixturevalue(mint_name)
    fee_ppk = 100 if mint_name == "fee_mint" else 0
    loop = asyncio.new_event_loop()
    client = TokenFactory(mint.url, "sat", tmp_path / "client")
    try:
        run_state_machine_as_test(
            lambda: PaymentsModel(loop, mint.url, client, fee_ppk),
            settings=SETTINGS if not fee_ppk else FEE_SETTINGS,
        )
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
