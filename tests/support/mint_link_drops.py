"""A link to the mint that drops in the middle of a swap, for the payments model test (a
mixin of its machine).

The link drops while the node swaps (receiving a token, paying a withdrawal or change): the
mint never saw the swap, or did it and its answer was lost, and the node cannot tell which.
Then the node crashes and starts again (the mint back by then, or only later), or stays up
until the mint is back. Once recovery settled the swap the client retries, as a real client
would, and must get exactly what it paid for: credited once, paid out once.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import rule

from nodeprov.core.payments import Payer, api_key_account
from nodeprov.errors import MintUnavailable, TokenAlreadySpent
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint
from tests.support.core import TEST_MODEL
from tests.support.payments_model import ModelState, body, cost_of

AFTER = ("a crash", "a crash, the mint back later", "the mint comes back")


class MintLinkDrops(ModelState):
    """The rule; the machine provides ``_start``, ``refunded`` and the change claim."""

    @rule(
        move=st.sampled_from(
            ["create_key", "topup", "deposit", "token_key", "request", "withdraw", "change"]
        ),
        lost=st.sampled_from(["request", "answer"]),
        sats=st.integers(1, 20),
        which=st.integers(0, 9),
        then=st.sampled_from(AFTER),
    )
    def the_link_to_the_mint_drops_in_a_swap(
        self, move: str, lost: str, sats: int, which: int, then: str
    ) -> None:
        """The link to the mint drops during a swap: the mint never saw it (the request was
        lost) or did it (the answer was lost), and the node cannot learn which. Then the node
        crashes and starts again (the mint back by then, or only later), or stays up until the
        mint is back. Once recovery settled the swap, the client's retry gets exactly what it
        paid for."""
        self.crashes += 1
        self.then = then
        event(f"the link drops in a swap: {move}, the {lost} lost; {then}")
        getattr(self, "_drop_in_" + move)(lost == "answer", sats, which)

    def after_the_link_dropped(self) -> None:
        """What happens after the link dropped (``then``), up to the swap settled."""
        if self.then == "the mint comes back":  # no crash: the periodic recovery settles it
            self.link.heal()
            self.run(self.core.wallet.recover(older_than=int(time.time())))
        else:
            self.restart(mint_down=self.then == "a crash, the mint back later")

    def _drop_in_create_key(self, landed: bool, sats: int, which: int) -> None:
        token = self.fresh(sats)
        self.link.break_next_swap(landed)
        with pytest.raises(MintUnavailable):
            self.run(self.core.payments.create_key(token))
        self.after_the_link_dropped()
        assert self.unspent(token) is not landed
        api_key, account = self.run(self.core.payments.create_key(token))  # the retry
        assert api_key not in self.keys and account.id == api_key_account(api_key)
        self.keys.append(api_key)
        self.create_tokens.append(token)
        self.credit(account.id, token)

    def _drop_in_topup(self, landed: bool, sats: int, which: int) -> None:
        account = api_key_account(self.keys[which % len(self.keys)])
        token = self.fresh(sats)
        self.link.break_next_swap(landed)
        with pytest.raises(MintUnavailable):
            self.run(self.core.payments.topup(account, token))
        self.after_the_link_dropped()
        if landed:  # recovery credited it: the token is spent, a retry is refused
            with pytest.raises(TokenAlreadySpent):
                self.run(self.core.payments.topup(account, token))
        else:
            assert self.unspent(token)
            self.run(self.core.payments.topup(account, token))
        self.credit(account, token)

    def _drop_in_deposit(self, landed: bool, sats: int, which: int) -> None:
        accounts = [a for a in self.accounts() if not a.startswith("token:")]
        account = accounts[which % len(accounts)]
        token, ref = self.fresh(sats), f"dm:crash{self.crashes}"
        self.link.break_next_swap(landed)
        with pytest.raises(MintUnavailable):
            self.run(self.core.payments.deposit(account, token, ref))
        with pytest.raises(MintUnavailable):  # the DM delivered again, while the swap is unsettled
            self.run(self.core.payments.deposit(account, token, ref))
        self.after_the_link_dropped()
        received = self.run(self.core.payments.deposit(account, token, ref))  # the resumed DM
        assert received.credited_msat == self.worth(token)
        self.deposits[(ref, account)] = self.worth(token)
        self.credit(account, token)

    def _drop_in_token_key(self, landed: bool, sats: int, which: int) -> None:
        token = self.fresh(sats)
        payer = Payer("token_key", token)
        self.link.break_next_swap(landed)
        with pytest.raises(MintUnavailable):
            self.run(self.core.payments.job(payer, TEST_MODEL, body(1)).__aenter__())
        self.after_the_link_dropped()
        assert self.unspent(token) is not landed
        account = self.run(self.core.payments.account_for(payer))  # the retry redeems it once
        assert account == "token:" + token_fingerprint(parse_token(token))
        self.token_keys.append(token)
        self.credit(account, token)

    def _drop_in_request(self, landed: bool, sats: int, which: int) -> None:
        token = self.fresh(max(sats, 2))  # enough for the job, so the node swaps it
        account = "req:" + token_fingerprint(parse_token(token))
        job = self.core.payments.job(Payer("request_token", token), TEST_MODEL, body(1))
        self.link.break_next_swap(landed)
        with pytest.raises(MintUnavailable):
            self.run(job.__aenter__())
        self.after_the_link_dropped()
        if not landed:  # the token is the client's still
            assert self.unspent(token)
            return
        # The node holds the token's value for a job that never ran: all of it is change.
        self.request_tokens.append(token)
        self.change[account] = []
        self.credit(account, token)
        self.a_client_claims_its_change(len(self.request_tokens) - 1)

    def _drop_in_withdraw(self, landed: bool, sats: int, which: int) -> None:
        enough = (self.fee_bound() + 1) * 1000  # more than a swap's fee
        accounts = [a for a in self.accounts() if self.available(a) >= enough]
        if not accounts:
            return
        account = accounts[which % len(accounts)]
        ref = f"dm:crash{self.crashes}"
        self.link.break_next_swap(landed)
        try:
            sent = self.run(self.core.payments.withdraw(account, ref=ref))
        except MintUnavailable:
            with pytest.raises(MintUnavailable):  # asked again while the swap is unsettled
                self.run(self.core.payments.withdraw(account, ref=ref))
            self.after_the_link_dropped()
            # Landed: the token recovery kept for this ref; else the balance came back and
            # this withdraws it again.
            sent = self.run(self.core.payments.withdraw(account, ref=ref))
        else:  # the node had the exact proofs: no swap was needed
            event("the link drops in a swap: withdraw needed no swap")
            self.link.heal()
        value = self.available(account) // 1000
        self.balance[account] -= value * 1000
        self.withdrawals[(ref, account)] = sent.token
        self.receive_back(sent.token, value)
        self.redeem(sent.token)

    def _drop_in_change(self, landed: bool, sats: int, which: int) -> None:
        running = self._start("request", which, sats, 1, None)
        if running is None:
            return
        self.running.remove(running)
        self.link.break_next_swap(landed)
        settled = self.run(running.job.settle({"prompt_tokens": 1, "completion_tokens": 1}))
        self.run(running.job.__aexit__(None, None, None))
        charged = min(cost_of(1, 1), running.hold)
        assert settled.charged_msat == charged
        self.balance[running.account] -= charged
        self.earned += charged
        if not self.link.fired:  # no swap (exact proofs, or nothing to give back)
            event("the link drops in a swap: change needed no swap")
            self.link.heal()
            self.refunded(running.account, settled.change)
            return
        assert settled.change is None  # kept claimable
        self.after_the_link_dropped()
        # Landed or not, recovery put the change back on the account: claimed, it comes once.
        self.a_client_claims_its_change(self.request_tokens.index(running.token))
        assert self.available(running.account) == 0
