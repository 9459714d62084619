"""The client side of the payments model test (``tests/integration/test_payments_model.py``).

What the model knows without asking the node: the published price of ``TEST_MODEL`` and the
hold of the one request body the clients send; the jobs and holds it expects; the clients'
own books; and a link to the mint that a test can break in the middle of a swap.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from hypothesis import event

from nodeprov.core.charges import Job
from nodeprov.core.payments import api_key_account
from nodeprov.daemon import recover
from nodeprov.protocol.cashu_token import parse_token, token_fingerprint
from tests.support.cashu_client import TokenFactory, import_cashu
from tests.support.core import Core, build_core

LEASE = 120  # seconds a hold's lease lasts
NPUB = "ab" * 32  # the one Nostr client: its account is funded by deposits only

# TEST_PRICE in msat: per request, per input token, per output token.
PER_REQUEST, PER_INPUT, PER_OUTPUT = 1000, 2, 5
# The prompt bound of BODY's one message: 8 template tokens for it and 8 for the reply, plus
# the bytes of its text ("role", "user", "content", "hi").
PROMPT_BOUND = 16 + len("roleusercontenthi")


def body(max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


def hold_for(max_tokens: int) -> int:
    return PER_REQUEST + PER_INPUT * PROMPT_BOUND + PER_OUTPUT * max_tokens


def cost_of(prompt: int, completion: int) -> int:
    return PER_REQUEST + PER_INPUT * prompt + PER_OUTPUT * completion


def token_value(token: str) -> int:
    """A token's value as the client's own wallet library reads it."""
    return int(import_cashu().deserialize_token_from_string(token).amount)


class MintLink(httpx.AsyncBaseTransport):
    """The node's connection to the mint, which a test can break at the next swap.

    The swap's request is lost (the mint never sees it) or its answer is (the mint did the
    swap); either way the link stays down after, as if the network went, until ``heal``.
    """

    def __init__(self, down: bool = False) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._armed: bool | None = None  # at the next swap: True, the answer is lost
        self.fired = down

    def break_next_swap(self, answer_lost: bool) -> None:
        self._armed, self.fired = answer_lost, False

    def heal(self) -> None:
        self._armed, self.fired = None, False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.fired:
            raise httpx.ConnectError("the mint is unreachable", request=request)
        if self._armed is not None and request.url.path.endswith("/v1/swap"):
            answer_lost, self._armed, self.fired = self._armed, None, True
            if answer_lost:
                response = await self._inner.handle_async_request(request)
                await response.aread()
                await response.aclose()
                raise httpx.ReadError("the connection dropped before the answer", request=request)
            raise httpx.ConnectError("the connection dropped", request=request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Running:
    """A job the node is running: its hold as the model sees it."""

    job: Job
    kind: str
    account: str
    hold: int
    lease_until: int
    max_tokens: int
    ref: str | None = None
    token: str | None = None  # the per-request token that pays it
    open: bool = True  # False: the lease lapsed (reserves nothing, still settleable)


@dataclass
class Orphan:
    """The hold of a job whose process crashed: nobody renews or closes it."""

    account: str
    hold: int
    lease_until: int
    ref: str | None
    open: bool = True


@dataclass
class Books:
    """The clients' side: what they paid in and what came back to them."""

    paid_in: int = 0  # msat of tokens the node took
    back: int = 0  # msat of tokens the node handed out (redeemed or held unspent)
    fees: int = 0  # msat the mint kept as input fees, on the node's swaps
    held: list[str] = field(default_factory=list)  # tokens received, not yet redeemed


class ModelState:
    """The model's state and arithmetic, and the node it drives (opened, crashed, closed).

    The rules and the invariant are the test's (:class:`RuleBasedStateMachine` comes after
    this class in the test's bases, so ``__init__`` chains to it).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        mint_url: str,
        client: TokenFactory,
        fee_ppk: int = 0,
    ) -> None:
        super().__init__()
        self.loop, self.mint_url, self.client = loop, mint_url, client
        self.fee_ppk = fee_ppk  # the mint's input fee per proof, in parts per thousand
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "ledger.sqlite3"
        self.now = 1_800_000_000
        self.link = MintLink()
        self.core = self.run(self._open())
        self.balance: dict[str, int] = {}  # account id -> msat
        self.earned = 0
        self.keys: list[str] = []  # API keys
        self.create_tokens: list[str] = []  # the tokens that created them
        self.token_keys: list[str] = []  # tokens used as keys
        self.taken: list[str] = []  # every token the node took
        self.request_tokens: list[str] = []  # per-request tokens the node took
        self.change: dict[str, list[str]] = {}  # req account -> change tokens issued, in order
        self.deposits: dict[tuple[str, str], int] = {}  # (ref, account) -> msat credited
        self.withdrawals: dict[tuple[str, str], str] = {}  # (ref, account) -> token
        self.outcomes: dict[str, int] = {}  # job ref -> msat charged
        self.running: list[Running] = []
        self.orphans: list[Orphan] = []
        self.books = Books()
        self.steps_since_crash = 0  # crashes come between other steps, not one after another
        self.crashes = 0
        self.races = 0
        self.then = ""  # what follows a link dropped in a swap (``mint_link_drops.AFTER``)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _open(self, mint_down: bool = False) -> Core:
        # Jobs never renew on their own: a rule renews them, so a lease lapses only when the
        # model says it does. Each start has a new link to the mint (down: not back yet).
        self.link = MintLink(down=mint_down)
        return await build_core(
            self.path, [self.mint_url], lease_seconds=LEASE, clock=lambda: self.now,
            renew_seconds=3600.0, transport=self.link,
        )  # fmt: skip

    # --- the model's arithmetic -------------------------------------------------------

    def holds(self) -> list[Running | Orphan]:
        return [*self.running, *self.orphans]

    def reserved(self, account: str) -> int:
        return sum(h.hold for h in self.holds() if h.account == account and h.open)

    def available(self, account: str) -> int:
        return self.balance.get(account, 0) - self.reserved(account)

    def fee_in(self, token: str) -> int:
        """The mint's input fee to spend ``token`` (NUT-02: per proof, rounded up)."""
        proofs = len(import_cashu().deserialize_token_from_string(token).proofs)
        return -(-self.fee_ppk * proofs // 1000)

    def worth(self, token: str) -> int:
        """What the node credits for ``token``: its value less the mint's input fee, in msat."""
        return (token_value(token) - self.fee_in(token)) * 1000

    def credit(self, account: str, token: str) -> None:
        """The node took ``token`` for ``account``."""
        msat = self.worth(token)
        self.balance[account] = self.balance.get(account, 0) + msat
        self.books.paid_in += token_value(token) * 1000
        self.books.fees += token_value(token) * 1000 - msat
        self.taken.append(token)

    def unspent(self, token: str) -> bool:
        """Whether the mint says every proof of ``token`` is unspent."""
        return all(s == "UNSPENT" for s in self.run(self.client.proof_states(token)))

    def receive_back(self, token: str, value: int) -> None:
        """A token from the node for ``value`` sat of a balance: unspent at the mint, worth
        ``value`` (less the mint's fee, with input fees, when the node had to swap for it)."""
        got = token_value(token)
        assert 0 < got <= value if self.fee_ppk else got == value, (got, value)
        states = self.run(self.client.proof_states(token))
        assert states and all(s == "UNSPENT" for s in states), states
        self.books.back += got * 1000
        self.books.fees += (value - got) * 1000
        self.books.held.append(token)

    def fee_bound(self) -> int:
        """The most sat a payout's swap pays the mint (spending up to 64 proofs)."""
        return -(-self.fee_ppk * 64 // 1000)

    def small_change(self, account: str, value: int) -> None:
        """Change the mint's fee would eat: kept on the token's own account (a token as key)."""
        assert self.fee_ppk, "change was not paid out though no fee eats it"
        event("change the fee would eat is kept on the token's account")
        fingerprint = account.removeprefix("req:")
        token = next(
            t for t in self.request_tokens if self.token_account(t) == "token:" + fingerprint
        )
        self.balance["token:" + fingerprint] = (
            self.balance.get("token:" + fingerprint, 0) + value * 1000
        )
        if token not in self.token_keys:
            self.token_keys.append(token)

    def pay_out(self, account: str) -> int:
        """A per-request account's balance as change: whole sats, the msat rest to the operator."""
        left = self.available(account)
        self.balance[account] -= left
        self.earned += left % 1000
        return left // 1000

    def fresh(self, sats: int) -> str:
        """A new token of ``sats`` (one sat more with input fees, so it is worth something)."""
        return str(self.run(self.client.token(sats + (1 if self.fee_ppk else 0))))

    def accounts(self) -> list[str]:
        keys = [api_key_account(k) for k in self.keys]
        return [*keys, *(self.token_account(t) for t in self.token_keys), "npub:" + NPUB]

    @staticmethod
    def token_account(token: str) -> str:
        return "token:" + token_fingerprint(parse_token(token))

    def redeem(self, token: str) -> None:
        """Swap a token from the node into the client's wallet (its input fee is the client's).

        A token worth no more than that fee is kept as it is (checked unspent when it came):
        it can still pay, together with others.
        """
        if token_value(token) <= self.fee_in(token):
            return
        assert self.run(self.client.redeem(token)) == token_value(token) - self.fee_in(token)
        self.books.held.remove(token)

    def restart(self, mint_down: bool = False) -> None:
        """Close the node and open it again on its files; start-up recovery runs.

        ``mint_down``: the mint is still unreachable then, so interrupted swaps stay pending;
        it comes back, and the node's periodic recovery (``retry_recovery``) settles them.
        """
        for job in self.running:
            job.job._stop_renewing()
            self.orphans.append(Orphan(job.account, job.hold, job.lease_until, job.ref, job.open))
        self.running = []
        self.steps_since_crash = 0
        self.run(self.core.close())
        self.core = self.run(self._open(mint_down))
        self.run(recover(self.core))  # type: ignore[arg-type]
        if mint_down:
            self.link.heal()
            self.run(self.core.wallet.recover(older_than=int(time.time())))
        lapsing = [h for h in self.orphans if h.open and h.lease_until <= self.now]
        for held in lapsing:
            held.open = False
        self.orphans = [o for o in self.orphans if o.open]

    def teardown(self) -> None:
        for job in self.running:
            job.job._stop_renewing()
        self.run(self.core.close())
        self.dir.cleanup()
