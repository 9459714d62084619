"""The one charge lifecycle every paid endpoint enters: hold -> run -> settle or cancel -> change.

    async with payments.job(payer, model, body, endpoint, ref=ref) as job:
        answer = await upstream(...)                  # may raise: nothing is charged
        settled = await job.settle(answer["usage"])   # actual cost, change, balance

The rules, all here and nowhere else:

- **Hold.** Entering holds the most the job can cost (:meth:`Pricer.max_cost`); a bad request
  (including a prompt larger than the model's context) is refused before anything is held.
- **Lease.** While the job runs, a background task renews the hold's lease every third of
  ``ledger.hold_timeout_seconds``, so the sweeper never releases a live job's hold.
- **Settle.** The cost comes from the upstream's ``usage``. Unreadable usage: the hold, the
  most the payer agreed to. Streams count their output with :meth:`Job.output`; a stream
  that ended early (``complete=False``) is charged ``max(cost of reported usage, cost of what
  was produced)`` (prompt as reported, else its bound, plus one token per content chunk),
  and nothing if it produced nothing. No payer is charged above its hold (the ledger's
  overrun rule).
- **Cancel.** An error inside the block cancels: nothing is charged and a per-request token
  comes back whole (minus mint fees) as change; a :class:`NodeprovError` is re-raised as
  :class:`PaymentFailed` carrying that refund. Leaving the block without settling also
  cancels. Cancelling and settling are shielded from the caller's cancellation.
- **Reference.** With ``ref`` (``dm:<event id>``) the settle records the job's outcome (cost,
  and the ``result`` the caller keeps with it) in the same transaction, and a second settle
  with that ref charges nothing: a resumed job reads :meth:`Payments.outcome` instead.
  Entering a job with a ref first releases holds an interrupted run of it left.
- **Hand-over.** A streamed answer outlives the request handler: :meth:`Job.hand_over` makes
  the block's end leave the job open; the new owner must settle or cancel it.
- **Overlap.** A per-request token's job entered with a ``client`` may leave the block's
  entry with its token appraised but not yet swapped (:class:`Pending`, when
  :mod:`nodeprov.core.overlap` allows it); the caller then starts its upstream call through
  :meth:`Job.start`, which runs the swap and hold beside it and returns the upstream's
  answer only once the hold is in place. A swap that fails cancels the upstream call and
  its error goes out as it would have without overlap; an upstream failure waits for the
  swap and then cancels as above (the token comes back whole). A caller cancelled during the
  swap (client gone, shutdown) does not cut the swap off: it lands, then the job cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from nodeprov.core.pricing import Cost, Endpoint, Pricer, UsageUnavailable
from nodeprov.errors import InsufficientBalance, NodeprovError, PriceUnavailable

if TYPE_CHECKING:
    from nodeprov.core.ledger import Hold, Ledger
    from nodeprov.core.wallet import Sent

logger = logging.getLogger(__name__)
T = TypeVar("T")

STREAMED: tuple[Endpoint, ...] = ("chat", "completions")

PayerKind = Literal["api_key", "token_key", "request_token", "npub"]
Channel = Literal["http", "nostr"]


@dataclass(frozen=True)
class Payer:
    """Who pays for a job, with what credential (an API key, a token, or a pubkey), and
    the channel the job came by (recorded with its charge)."""

    kind: PayerKind
    credential: str
    channel: Channel = "http"


@dataclass(frozen=True)
class Settled:
    """What a finished job cost and what the payer gets back."""

    cost: Cost
    charged_msat: int
    change: Sent | None
    balance_msat: int | None


@dataclass(frozen=True)
class JobOutcome:
    """A settled job as recorded under its reference."""

    ref: str
    charged_msat: int
    cost: Cost
    result: Any


class PaymentFailed(NodeprovError):
    """Wraps an error raised after money was taken, carrying the refund token for the client."""

    def __init__(self, error: NodeprovError, refund: Sent | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.refund = refund
        self.status = error.status  # type: ignore[misc]
        self.type = error.type  # type: ignore[misc]
        self.code = error.code  # type: ignore[misc]


class Charge(Protocol):
    """What the lifecycle needs of an authorized job's hold (``payments.Charge``)."""

    hold: Hold
    max_cost: Cost
    closed: bool

    async def cancel(self) -> Sent | None: ...


@dataclass(frozen=True)
class Pending:
    """A per-request token that can pay, appraised but not swapped yet (no money moved).

    ``confirm`` swaps it and holds ``max_cost`` (giving back the client's overlap slot
    however it ends); ``abandon`` gives the slot back when ``confirm`` is never run.
    """

    max_cost: Cost
    confirm: Callable[[], Awaitable[Charge]]
    abandon: Callable[[], None]
    cancelled: Callable[[], None]  # counts an upstream call cancelled because the swap failed


class Pipeline(Protocol):
    """What the lifecycle needs of :class:`nodeprov.core.payments.Payments`."""

    ledger: Ledger
    pricer: Pricer
    renew_seconds: float | None

    async def authorize(
        self,
        payer: Payer,
        model: str,
        body: Mapping[str, Any],
        endpoint: Endpoint = ...,
        ref: str | None = ...,
        *,
        client: str | None = ...,
    ) -> Charge | Pending: ...

    async def _settle(
        self,
        charge: Any,
        cost: Cost,
        *,
        ref: str | None = ...,
        result: Any = ...,
        channel: Channel = ...,
    ) -> Settled: ...


class Job:
    """One paid job; use as ``async with payments.job(...) as job``."""

    def __init__(
        self,
        payments: Pipeline,
        payer: Payer,
        model: str,
        body: Mapping[str, Any],
        endpoint: Endpoint,
        ref: str | None,
        client: str | None = None,
    ) -> None:
        self.payments = payments
        self.payer = payer
        self.model = model
        self.body = body
        self.endpoint = endpoint
        self.ref = ref
        self.client = client
        self.produced = 0
        self._charge: Charge | None = None
        self._pending: Pending | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._handed_over = False
        self._settling = False  # a settle has started: a cancel must not undo it

    # --- the block ---------------------------------------------------------------

    async def __aenter__(self) -> Job:
        if self._charge is None and self._pending is None:
            if self.ref is not None:
                released = await self.payments.ledger.release_ref(self.ref)
                if released:
                    logger.info("job %s resumed: released %d earlier holds", self.ref, released)
            try:
                got = await self.payments.authorize(
                    self.payer, self.model, self.body, self.endpoint, self.ref, client=self.client
                )
            except InsufficientBalance as exc:
                raise self._suggesting(exc) from None
            if isinstance(got, Pending):
                self._pending = got
            else:
                self._hold(got)
        return self

    def _hold(self, charge: Charge) -> None:
        self._charge = charge
        self._renewer = asyncio.create_task(self._renew())

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pending is not None:  # never started: nothing was swapped
            self._pending.abandon()
            self._pending = None
        if exc is None and self._handed_over:
            return
        if self._charge is None:
            # No money was taken (the swap failed or never ran): the error goes out as is,
            # as it did when the swap came before the block.
            return
        refund = await self.cancel()
        if isinstance(exc, NodeprovError) and not isinstance(exc, PaymentFailed):
            raise PaymentFailed(exc, refund) from exc

    async def start(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        discard: Callable[[T], Awaitable[None]] | None = None,
    ) -> T:
        """Run the upstream ``call``; with a pending swap, beside it (see the module doc).

        Returns ``call``'s result once the job's hold is in place. ``discard`` releases a
        result that arrived for a swap that failed (e.g. closes a streamed response).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return await call()
        upstream = asyncio.ensure_future(call())
        confirm = asyncio.ensure_future(self._confirm(pending))
        try:
            # Shielded: a swap under way at the mint is seen through, so its outcome is known.
            await asyncio.shield(confirm)
        except BaseException:
            if not confirm.done():  # the caller is gone: the token goes back once it lands
                confirm.add_done_callback(self._cancel_late)
            swap_failed = (
                confirm.done() and not confirm.cancelled() and confirm.exception() is not None
            )
            if await _drop(upstream, discard) and swap_failed:
                pending.cancelled()
            raise
        try:
            return await upstream  # an upstream error now cancels the held job (a refund)
        except asyncio.CancelledError:
            # Cancelled as the answer landed: the task holds a result nobody will take (a
            # stream's pooled connection), so it is released here, not leaked.
            await _drop(upstream, discard)
            raise

    async def _confirm(self, pending: Pending) -> None:
        self._hold(await pending.confirm())

    def _cancel_late(self, confirm: asyncio.Future[None]) -> None:
        """A swap that landed after its caller left: release the hold, refund the token."""
        if confirm.cancelled() or confirm.exception() is not None:
            return
        task = asyncio.ensure_future(self._cancel_logged())
        _LATE.add(task)
        task.add_done_callback(_LATE.discard)

    async def _cancel_logged(self) -> None:
        try:
            await self.cancel()
        except Exception:
            logger.exception("refunding a job whose caller left during its swap failed")

    def _suggesting(self, refusal: InsufficientBalance) -> InsufficientBalance:
        """The refusal, naming the ``max_tokens`` that would make the hold fit (if any does)."""
        budget = refusal.details.get("token_msat", refusal.details.get("available_msat"))
        if type(budget) is not int:
            return refusal
        try:
            fits = self.payments.pricer.fitting_max_tokens(
                self.model, self.body, self.endpoint, budget
            )
        except NodeprovError:
            return refusal
        if fits is None:
            return refusal
        name = "max_completion_tokens" if "max_completion_tokens" in self.body else "max_tokens"
        return refusal.suggest_max_tokens(name, fits)

    def hand_over(self) -> Job:
        """Keep the job open past the block (a stream); the caller must settle or cancel it."""
        self._handed_over = True
        return self

    @property
    def max_cost(self) -> Cost:
        """The hold: the most this job can cost."""
        if self._pending is not None:
            return self._pending.max_cost
        return self._open().max_cost

    def output(self, chunks: int = 1) -> None:
        """Count content-bearing stream chunks (one output token each, at least)."""
        self.produced += chunks

    # --- closing -----------------------------------------------------------------

    async def settle(self, usage: Any, *, complete: bool = True, result: Any = None) -> Settled:
        """Charge by the rules above; ``result`` (JSON) is kept with the ``ref``'s outcome."""
        charge = self._open()
        cost = self._cost(charge, usage, complete)
        if cost is None:
            return Settled(Cost(0), 0, await self.cancel(), None)
        self._stop_renewing()
        self._settling = True
        return await asyncio.shield(
            self.payments._settle(
                charge, cost, ref=self.ref, result=result, channel=self.payer.channel
            )
        )

    async def cancel(self) -> Sent | None:
        """Charge nothing; a per-request token comes back whole. Safe to call twice."""
        self._stop_renewing()
        if self._charge is None or self._charge.closed or self._settling:
            return None
        return await asyncio.shield(self._charge.cancel())

    def _open(self) -> Charge:
        if self._charge is None:
            raise RuntimeError(
                "the job holds nothing: enter it (`async with payments.job(...)`) and, with a"
                " client, call the upstream through `job.start(...)`"
            )
        return self._charge

    # --- the cost rules ----------------------------------------------------------

    def _cost(self, charge: Charge, usage: Any, complete: bool) -> Cost | None:
        """The cost to charge; None when nothing is owed (a stream that produced nothing)."""
        if not complete and not self.produced:
            return None
        pricer = self.payments.pricer
        try:
            reported: Cost | None = pricer.actual_cost(self.model, usage, self.endpoint)
        except (UsageUnavailable, PriceUnavailable) as exc:
            reported = None
            if complete:
                logger.warning("%s: %s; settling at the hold", self.model, exc.message)
                return charge.max_cost
        made = self._produced_cost(charge, usage) if self.endpoint in STREAMED else None
        costs = [c for c in (reported, made) if c is not None]
        if not costs:
            return charge.max_cost
        return max(costs, key=lambda c: c.total_msat)

    def _produced_cost(self, charge: Charge, usage: Any) -> Cost | None:
        """Prompt (as reported, else its bound) plus one token per content chunk seen."""
        if not self.produced:
            return None
        pricer = self.payments.pricer
        bounds = pricer.token_bounds(self.model, self.body, self.endpoint)
        prompt = bounds.prompt_tokens
        if isinstance(usage, Mapping):
            for key in ("prompt_tokens", "input_tokens"):
                value = usage.get(key)
                if type(value) is int and value >= 0:
                    prompt = value
                    break
        produced = {
            "prompt_tokens": prompt,
            "completion_tokens": min(self.produced, bounds.completion_tokens),
        }
        try:
            return pricer.actual_cost(self.model, produced, self.endpoint)
        except PriceUnavailable:
            return charge.max_cost

    # --- the lease ---------------------------------------------------------------

    async def _renew(self) -> None:
        """Renew the hold's lease until the job closes (a crashed process stops renewing)."""
        charge = self._open()
        ledger = self.payments.ledger
        every = self.payments.renew_seconds or ledger.hold_timeout_seconds / 3
        while True:
            await asyncio.sleep(every)
            try:
                if not await ledger.renew(charge.hold):
                    logger.warning("hold %d lapsed and cannot reserve again", charge.hold.id)
            except Exception:
                logger.exception("renewing hold %d failed; retrying", charge.hold.id)

    def _stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None


# Refunds of jobs whose caller left mid-swap, kept referenced until they finish.
_LATE: set[asyncio.Future[None]] = set()


async def _drop(task: asyncio.Future[T], discard: Callable[[T], Awaitable[None]] | None) -> bool:
    """Cancel an upstream call whose swap failed; True if it was still running."""
    running = not task.done()
    task.cancel()
    await asyncio.wait({task})
    if task.cancelled():
        return running
    if task.exception() is None and discard is not None:
        with contextlib.suppress(Exception):
            await discard(task.result())
    return running


def encode_result(result: Any) -> str | None:
    """The JSON kept with an outcome (None when there is nothing to keep)."""
    if result is None:
        return None
    return json.dumps(result, ensure_ascii=False, separators=(",", ":"))


def decode_result(text: str | None) -> Any:
    if text is None:
        return None
    with contextlib.suppress(ValueError):
        return json.loads(text)
    return None
