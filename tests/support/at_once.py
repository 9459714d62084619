"""Requests that arrive at the same moment, for the payments model test (a mixin of its machine).

A client retries before the first answer came, a DM is delivered twice, one token is sent with
two requests, a withdrawal races a job on the same key. The node serialises what must be
serial: a token or a ref moves money once, and an account is never overdrawn. Which request
wins a race is the scheduler's choice; the model accepts every legal order and no other.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import rule

from nodeprov.core.payments import Payer, api_key_account
from nodeprov.errors import (
    InsufficientBalance,
    PaymentTooSmall,
    TokenAlreadySpent,
    TokenTooSmall,
)
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint
from tests.support.core import TEST_MODEL
from tests.support.payments_model import (
    LEASE,
    ModelState,
    Running,
    body,
    cost_of,
    hold_for,
)


def all_output(max_tokens: int) -> dict[str, int]:
    """Usage of a job that wrote all it was allowed to."""
    return {"prompt_tokens": 0, "completion_tokens": max_tokens}


class AtOnce(ModelState):
    """The race rule; the machine provides ``_settle`` and ``refunded``."""

    @rule(
        race=st.sampled_from(
            [
                "create_key",
                "deposit",
                "withdraw",
                "token_key",
                "request",
                "job_and_withdraw",
                "settle_and_claim",
                "claim",
            ]
        ),
        sats=st.integers(1, 8),
        which=st.integers(0, 9),
        max_tokens=st.integers(1, 300),
    )
    def the_same_request_arrives_twice_at_once(
        self, race: str, sats: int, which: int, max_tokens: int
    ) -> None:
        self.races += 1
        event(f"at once: {race}")
        getattr(self, "_twice_" + race)(sats, which, max_tokens)

    @staticmethod
    def balance_taken(sent: Any) -> int:
        return 0 if isinstance(sent, BaseException) else int(sent.debited_msat)

    def twice(self, first: Any, second: Any) -> list[Any]:
        async def both() -> list[Any]:
            return list(await asyncio.gather(first, second, return_exceptions=True))

        results: list[Any] = self.run(both())
        return results

    def _twice_create_key(self, sats: int, which: int, max_tokens: int) -> None:
        token = self.fresh(sats)
        payments = self.core.payments
        one, two = self.twice(payments.create_key(token), payments.create_key(token))
        assert one[0] == two[0], (one, two)  # the same key, funded once
        self.keys.append(one[0])
        self.create_tokens.append(token)
        self.credit(api_key_account(one[0]), token)

    def _twice_deposit(self, sats: int, which: int, max_tokens: int) -> None:
        accounts = [a for a in self.accounts() if not a.startswith("token:")]
        account = accounts[which % len(accounts)]
        token, ref = self.fresh(sats), f"dm:race{self.races}"
        payments = self.core.payments
        one, two = self.twice(
            payments.deposit(account, token, ref), payments.deposit(account, token, ref)
        )
        assert one.credited_msat == two.credited_msat == self.worth(token), (one, two)
        self.deposits[(ref, account)] = self.worth(token)
        self.credit(account, token)

    def _twice_withdraw(self, sats: int, which: int, max_tokens: int) -> None:
        enough = (self.fee_bound() + 1) * 1000  # more than a swap's fee
        accounts = [a for a in self.accounts() if self.available(a) >= enough]
        if not accounts:
            return
        account, ref = accounts[which % len(accounts)], f"dm:race{self.races}"
        payments = self.core.payments
        one, two = self.twice(
            payments.withdraw(account, ref=ref), payments.withdraw(account, ref=ref)
        )
        assert one.token == two.token, (one, two)  # one withdrawal, answered twice
        value = self.available(account) // 1000
        self.balance[account] -= value * 1000
        self.withdrawals[(ref, account)] = one.token
        self.receive_back(one.token, value)
        self.redeem(one.token)

    def _twice_token_key(self, sats: int, which: int, max_tokens: int) -> None:
        """A token's first two uses as a key at once: redeemed once, two holds if it covers them."""
        token = self.fresh(sats)
        account = "token:" + token_fingerprint(parse_token(token))
        self.token_keys.append(token)
        self.credit(account, token)
        self._two_jobs(Payer("token_key", token), account, max_tokens)

    def _two_jobs(self, payer: Payer, account: str, max_tokens: int) -> None:
        hold = hold_for(max_tokens)
        payments = self.core.payments
        jobs = [payments.job(payer, TEST_MODEL, body(max_tokens)) for _ in range(2)]
        results = self.twice(jobs[0].__aenter__(), jobs[1].__aenter__())
        entered = [job for job, result in zip(jobs, results, strict=True) if result is job]
        refused = [r for r in results if isinstance(r, InsufficientBalance)]
        fits = min(2, self.available(account) // hold)
        assert (len(entered), len(refused)) == (fits, 2 - fits), results
        for job in entered:
            running = Running(job, payer.kind, account, hold, self.now + LEASE, max_tokens)
            self.running.append(running)
        for job in entered:
            running = next(r for r in self.running if r.job is job)
            self.running.remove(running)
            self._settle(running, all_output(max_tokens))

    def _twice_request(self, sats: int, which: int, max_tokens: int) -> None:
        """One X-Cashu token on two requests at once: one is paid with it, the other refused;
        both refused unspent if it is too small for the request."""
        token = self.fresh(sats)
        account = "req:" + token_fingerprint(parse_token(token))
        payer = Payer("request_token", token)
        payments = self.core.payments
        jobs = [payments.job(payer, TEST_MODEL, body(max_tokens)) for _ in range(2)]
        results = self.twice(jobs[0].__aenter__(), jobs[1].__aenter__())
        hold = hold_for(max_tokens)
        if self.worth(token) < hold:
            assert all(isinstance(r, PaymentTooSmall) for r in results), results
            assert self.unspent(token)
            return
        spent = [r for r in results if isinstance(r, TokenAlreadySpent)]
        assert len(spent) == 1, results
        (result,) = [r for r in results if not isinstance(r, TokenAlreadySpent)]
        assert result in jobs, result
        self.request_tokens.append(token)
        self.change[account] = []
        self.credit(account, token)
        running = Running(result, "request", account, hold, self.now + LEASE, max_tokens)
        running.token = token
        self._settle(running, all_output(max_tokens))

    def _twice_job_and_withdraw(self, sats: int, which: int, max_tokens: int) -> None:
        """A job and a withdrawal of everything on one key at once: never both from one msat."""
        account_key = self.keys[which % len(self.keys)]
        account = api_key_account(account_key)
        hold, before = hold_for(max_tokens), self.available(account)
        payments = self.core.payments
        job = payments.job(Payer("api_key", account_key), TEST_MODEL, body(max_tokens))
        entered, sent = self.twice(job.__aenter__(), payments.withdraw(account))
        held = entered is job
        if held:  # the hold came first, or the withdrawal read the balance before it
            self.running.append(
                Running(job, "api_key", account, hold, self.now + LEASE, max_tokens)
            )
        else:
            assert isinstance(entered, InsufficientBalance), entered
        if isinstance(sent, BaseException):
            # Nothing to take (less than a sat, perhaps after the hold), or it read the
            # balance before the hold and its debit found the money held.
            assert isinstance(sent, TokenTooSmall | InsufficientBalance), sent
            if isinstance(sent, InsufficientBalance):
                assert held
            else:
                small = self.fee_bound()  # or, with input fees, the swap's fee eats it
                assert before // 1000 <= small or (held and (before - hold) // 1000 <= small)
            event(f"at once: the withdrawal failed: {type(sent).__name__}")
        else:
            value = sent.debited_msat // 1000
            # Withdrawn first (all of it) or after the hold (all that was left).
            legal = {before // 1000} | ({(before - hold) // 1000} if held else set())
            assert value in legal, (value, legal, held)
            if held:
                assert before - value * 1000 >= hold  # the hold was covered throughout
            self.balance[account] -= value * 1000
            self.receive_back(sent.token, value)
            self.redeem(sent.token)
        if not held:  # it never fit, or the withdrawal took what it needed first
            assert before < hold or before - self.balance_taken(sent) < hold
        if held:
            running = self.running.pop()
            self._settle(running, all_output(max_tokens))

    def _twice_settle_and_claim(self, sats: int, which: int, max_tokens: int) -> None:
        """A per-request job settles while its client claims the change: paid out once, to
        whichever asked first; the settle's change or the claim answers with it."""
        running = self._start("request", which, sats, max_tokens, None)
        if running is None:
            return
        self.running.remove(running)
        assert running.token is not None
        usage = all_output(max_tokens)
        settled, claimed = self.twice(
            running.job.settle(usage), self.core.payments.claim_change(running.token)
        )
        self.run(running.job.__aexit__(None, None, None))
        assert not isinstance(settled, BaseException) and not isinstance(claimed, BaseException)
        charged = min(cost_of(0, max_tokens), running.hold)
        assert settled.charged_msat == charged
        self.balance[running.account] -= charged
        self.earned += charged
        value = self.pay_out(running.account)
        issued = self.run(self.core.payments.claim_change(running.token))
        if value and issued:
            (change,) = issued  # once, whoever paid it out
            assert settled.change is None or settled.change.token == change
            assert claimed in ([], [change])
            self.change[running.account].append(change)
            self.receive_back(change, value)
        elif value:
            self.small_change(running.account, value)

    def _twice_claim(self, sats: int, which: int, max_tokens: int) -> None:
        """A client claims its change twice at once (a retry): both answers are the same."""
        if not self.request_tokens:
            return
        token = self.request_tokens[which % len(self.request_tokens)]
        account = "req:" + token_fingerprint(parse_token(token))
        claim = self.core.payments.claim_change
        one, two = self.twice(claim(token), claim(token))
        assert one == two, (one, two)
        if self.available(account) > 0 and self.reserved(account) == 0:
            value = self.pay_out(account)
            if value and len(one) == len(self.change[account]) + 1:
                self.change[account].append(one[-1])
                self.receive_back(one[-1], value)
            elif value:
                self.small_change(account, value)
        assert one == self.change[account]
