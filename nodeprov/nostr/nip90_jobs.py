"""NIP-90 text generation (kind 5050) over the DM channel's core: request -> feedback -> result.

Requests that name this node (``p``) are answered once, also across restarts (the request is
recorded before any work; the signed answer is stored before it is published; a job that
waits for an invoice keeps its quote id). Payment, through the one pipeline
(``core.payments`` via :func:`~nodeprov.nostr.dm_handlers.run_job`), is a ``cashu`` tag's
token (change and refunds go back in an encrypted DM), else the customer's npub account;
when that does not cover the job's price, a ``payment-required`` feedback offers a bolt11
invoice of the node's mint that credits the account, and the job runs once it is paid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import Any

from nodeprov.core.lightning_funding import LightningFunding, QuoteNotFound
from nodeprov.core.money import ceil_div
from nodeprov.core.payments import Payer, PaymentFailed
from nodeprov.errors import InvalidRequest, NodeprovError, PaymentTooSmall, TokenAlreadySpent
from nodeprov.nostr.chat import default_model
from nodeprov.nostr.dm_handlers import (
    DmContext,
    balance_of,
    earlier_outcome,
    payer_for_resumed_token,
    run_job,
)
from nodeprov.nostr.nip90_store import Nip90Row, Nip90Store
from nodeprov.nostr.relay_pool import RelayPool
from nodeprov.protocol import nip04, nip90
from nodeprov.protocol.nostr_event import Event, EventTemplate, sign_event, verify_event

log = logging.getLogger(__name__)

OVERLAP_SECONDS = 600
WATERMARK_SECONDS = 30.0
POLL_SECONDS = 5.0
STOP_GRACE_SECONDS = 10.0
KEEP_SECONDS = 3 * 24 * 3600  # answered requests remembered (a replay older is out of `since`)
CHAT = "/v1/chat/completions"


class Nip90Jobs:
    """Subscribes to kind 5050 requests for ``ctx.keys`` and answers each once.

    ``poll_seconds``: how often a job waiting for its invoice asks the mint about it.
    """

    def __init__(
        self,
        ctx: DmContext,
        pool: RelayPool,
        store: Nip90Store,
        funding: LightningFunding,
        *,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.ctx = ctx
        self.pool = pool
        self.store = store
        self.funding = funding
        self.poll_seconds = poll_seconds
        self._inflight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: set[asyncio.Task[Any]] = set()  # jobs waiting for their invoice
        nostr = ctx.config.nostr
        self.rate = nostr.rate_limit_per_minute
        self._recent: dict[str, deque[float]] = defaultdict(deque)
        self.stats: dict[str, int] = {"handled": 0, "duplicates": 0, "dropped": 0}

    # --- lifecycle -----------------------------------------------------------------

    async def filters(self) -> list[dict[str, object]]:
        """The REQ filter from the stored watermark (first start: now), minus the overlap."""
        mark = await self.store.watermark()
        base = (int(time.time()) if mark is None else mark) - OVERLAP_SECONDS
        return [{"kinds": [nip90.REQUEST_KIND], "#p": [self.ctx.keys.public_key],
                 "since": max(0, base)}]  # fmt: skip

    async def run(self, stop: asyncio.Event) -> None:
        """Resume unfinished jobs, then answer requests until ``stop``."""
        sub = self.pool.subscribe(await self.filters(), overlap=OVERLAP_SECONDS)
        for row in await self.store.unfinished():
            self._spawn(self._resume(row))
        marker = asyncio.create_task(self._mark_every(stop))
        try:
            async with contextlib.aclosing(sub.until(stop)) as events:
                async for raw in events:
                    self._spawn(self.process(raw))
        finally:
            await asyncio.gather(marker, return_exceptions=True)
            await sub.close()
            await self.close()

    async def close(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Give running jobs ``grace`` s, then cancel them; jobs waiting for their invoice are
        cancelled at once. Either kind resumes at the next start."""
        for task in list(self._waiting):
            task.cancel()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.store.set_watermark(int(time.time()))

    async def _mark_every(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATERMARK_SECONDS)
            if stop.is_set():
                return
            try:
                now = int(time.time())
                await self.store.set_watermark(now)
                await self.store.prune(now - KEEP_SECONDS)
                for row in await self.store.unfinished():
                    if row.state == "done":  # answered, but no relay took it yet: again
                        await self._resume(row)
            except Exception:
                log.exception("NIP-90 housekeeping failed")

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one request ---------------------------------------------------------------

    async def process(self, raw: dict[str, Any]) -> None:
        """Handle one delivered event end to end; never raises."""
        try:
            await self._process(raw)
        except Exception:
            log.exception("NIP-90 event %s failed", str(raw.get("id", "?"))[:12])

    async def _process(self, raw: dict[str, Any]) -> None:
        try:
            event = Event.from_dict(raw)
        except NodeprovError as exc:
            self.stats["dropped"] += 1
            log.info("NIP-90 event dropped: %s", exc.message)
            return
        if event.kind != nip90.REQUEST_KIND or not verify_event(event):
            self.stats["dropped"] += 1
            return
        if self.ctx.keys.public_key not in event.tag_values("p"):
            self.stats["dropped"] += 1
            return
        if event.id in self._inflight:
            self.stats["duplicates"] += 1
            return
        self._inflight.add(event.id)
        try:
            row = await self.store.accept(event.id, event.pubkey, event.to_json())
            if row is None:
                await self._answer(event, False, None, ())
            elif row.state == "sent":
                self.stats["duplicates"] += 1
                log.info("NIP-90 job %s already answered", event.id[:12])
            else:
                await self._continue(row)
        finally:
            self._inflight.discard(event.id)

    async def _resume(self, row: Nip90Row) -> None:
        """Carry on with a job an earlier run left (at start)."""
        if row.event_id in self._inflight:
            return
        self._inflight.add(row.event_id)
        try:
            await self._continue(row)
        finally:
            self._inflight.discard(row.event_id)

    async def _continue(self, row: Nip90Row) -> None:
        event = Event.from_json(row.request)
        if row.state == "done":
            await self._publish_answer(event.id, list(row.replies))
            return
        log.info("resuming NIP-90 job %s (%s)", event.id[:12], row.state)
        await self._answer(event, True, row.quote_id, row.replies)

    async def _answer(
        self, event: Event, resumed: bool, quote_id: str | None, offered: tuple[dict[str, Any], ...]
    ) -> None:
        """Run the job and publish its answer, stored first; never raises."""
        try:
            for published in offered:  # the invoice offer an earlier run may not have sent
                await self.pool.publish(published)
            replies = await self._handle(event, resumed, quote_id)
            signed = [sign_event(t, self.ctx.keys.secret_key).to_dict() for t in replies]
            await self.store.done(event.id, signed)
            self.stats["handled"] += 1
            await self._publish_answer(event.id, signed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("NIP-90 job %s failed", event.id[:12])

    async def _publish_answer(self, event_id: str, events: list[dict[str, Any]]) -> None:
        ok = True
        for event in events:
            result = await self.pool.publish(event)
            ok = ok and result.ok
        if ok:
            await self.store.sent(event_id)
        else:
            log.warning("answer to NIP-90 job %s not accepted by any relay yet", event_id[:12])

    async def _send_now(self, template: EventTemplate) -> dict[str, Any]:
        signed = sign_event(template, self.ctx.keys.secret_key).to_dict()
        await self.pool.publish(signed)
        return signed

    def _dm(self, customer: str, text: str, reply_to: str) -> EventTemplate:
        dm = nip04.build_dm(self.ctx.keys, customer, text, reply_to)
        return EventTemplate(dm.kind, dm.tags, dm.content)

    async def _handle(
        self, event: Event, resumed: bool, quote_id: str | None
    ) -> list[EventTemplate]:
        """The events that answer ``event`` (feedback, result, DMs), the job run and paid."""
        keys = self.ctx.keys
        try:
            req = nip90.parse_request(
                event, keys.public_key, lambda c: nip04.decrypt(c, keys.secret_key, event.pubkey)
            )
            model = req.model or default_model(self.ctx)
            if not model:
                raise InvalidRequest("name a model: ['param', 'model', '<id>']")
            body = req.chat_body(model)
            route = self.ctx.upstreams.route(body["model"])
            price = self.ctx.payments.pricer.max_cost(route.model, body, "chat").total_msat
        except NodeprovError as exc:
            return [nip90.feedback(event, "error", exc.message)]
        if req.bid_msat is not None and req.bid_msat < price:
            why = f"your bid of {req.bid_msat} msat is below this job's price of {price} msat"
            return [nip90.feedback(event, "error", why, amount_msat=price)]
        if not resumed and self._limited(event.pubkey):
            why = f"at most {self.rate} job requests per minute; slow down"
            return [nip90.feedback(event, "error", why)]
        npub = Payer("npub", event.pubkey, "nostr")
        # A job that waits for its invoice is paid from the account the invoice credits.
        payer = Payer("request_token", req.cashu, "nostr") if req.cashu and not quote_id else npub
        settled_before = resumed and await self.ctx.payments.outcome("nip90:" + event.id)
        unpaid = quote_id is None and payer.kind == "npub" and not settled_before
        if unpaid and await balance_of(self.ctx, event.pubkey) < price:
            return await self._by_invoice(event, req, body, price)
        if quote_id is not None:
            return await self._after_payment(event, req, body, quote_id)
        await self._send_now(nip90.feedback(event, "processing"))
        try:
            return await self._run(event, req, body, payer, resumed)
        except PaymentTooSmall as exc:  # a token that cannot pay: refused untouched (NUT-24)
            return await self._by_invoice(event, req, body, price, exc.message)

    async def _by_invoice(
        self, event: Event, req: nip90.JobRequest, body: dict[str, Any], price: int,
        note: str = "",
    ) -> list[EventTemplate]:  # fmt: skip
        """Offer an invoice for ``price``; once paid, run the job from the npub account."""
        try:
            quote_id = await self._offer_invoice(event, price, note)
        except NodeprovError as exc:
            return [nip90.feedback(event, "error", exc.message, amount_msat=price)]
        return await self._after_payment(event, req, body, quote_id)

    async def _after_payment(
        self, event: Event, req: nip90.JobRequest, body: dict[str, Any], quote_id: str
    ) -> list[EventTemplate]:
        state = await self._wait_paid(quote_id)
        if state != "paid":
            return [nip90.feedback(event, "error", f"the invoice was not paid ({state})")]
        await self._send_now(nip90.feedback(event, "processing"))
        return await self._run(event, req, body, Payer("npub", event.pubkey, "nostr"), True)

    def _limited(self, customer: str) -> bool:
        """Per-customer requests per minute (``nostr.rate_limit_per_minute``, as for DMs):
        every unpaid request opens an invoice at the mint."""
        if self.rate <= 0:
            return False
        now = time.monotonic()
        for who in [w for w, times in self._recent.items() if times[-1] < now - 60]:
            del self._recent[who]  # nobody asked for a minute: forget them
        recent = self._recent[customer]
        while recent and recent[0] < now - 60:
            recent.popleft()
        if len(recent) >= self.rate:
            return True
        recent.append(now)
        return False

    async def _offer_invoice(self, event: Event, price: int, note: str = "") -> str:
        """Offer a bolt11 invoice for ``price`` crediting the customer's account; its quote."""
        quote = await self.funding.create_for_npub(event.pubkey, ceil_div(price, 1000))
        info = f"pay the invoice ({quote.amount} sat, credited to your balance here) to run it"
        info = f"{note}: {info}" if note else info
        template = nip90.feedback(event, "payment-required", info, amount_msat=price,
                                  bolt11=quote.invoice)  # fmt: skip
        signed = sign_event(template, self.ctx.keys.secret_key).to_dict()
        await self.store.awaiting(event.id, quote.id, [signed])
        await self.pool.publish(signed)
        return quote.id

    async def _wait_paid(self, quote_id: str) -> str:
        """Poll the quote (minting it once paid) until it is paid, expired or failed.

        A mint cut off by a stop stays ``pending``; the daemon's start-up recovery and its
        funding poll settle it, and the next look here sees it paid.
        """
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            return await self._poll_quote(quote_id)
        finally:
            self._waiting.discard(task)

    async def _poll_quote(self, quote_id: str) -> str:
        while True:
            await asyncio.sleep(self.poll_seconds)  # the customer needs a moment to pay
            try:
                status = await self.funding.status(quote_id)
            except QuoteNotFound:
                return "failed"
            except NodeprovError as exc:
                log.warning("invoice %s not checked: %s", quote_id, exc.message)
            else:
                if status.state in ("paid", "expired", "failed"):
                    return status.state

    async def _run(
        self,
        event: Event,
        req: nip90.JobRequest,
        body: dict[str, Any],
        payer: Payer,
        resumed: bool,
    ) -> list[EventTemplate]:
        ctx, ref = self.ctx, "nip90:" + event.id
        try:
            earlier = await earlier_outcome(ctx, ref, payer) if resumed else None
            if earlier is not None:
                data, charged, change = earlier.data, earlier.charged_msat, earlier.change
            else:
                try:
                    data, settled = await run_job(ctx, payer, CHAT, body, ref)
                except TokenAlreadySpent:
                    if not (resumed and req.cashu):
                        raise
                    payer = await payer_for_resumed_token(ctx, req.cashu)
                    data, settled = await run_job(ctx, payer, CHAT, body, ref)
                charged = settled.charged_msat
                change = settled.change.token if settled.change else None
        except PaymentTooSmall:
            raise  # a token refused untouched: the caller offers an invoice instead
        except PaymentFailed as exc:
            out = [nip90.feedback(event, "error", exc.error.message)]
            if exc.refund is not None:
                text = f"Refund for NIP-90 job {event.id} (nothing was charged): {exc.refund.token}"
                out.append(self._dm(event.pubkey, text, event.id))
            return out
        except NodeprovError as exc:
            return [nip90.feedback(event, "error", exc.message)]
        encrypt: Callable[[str], str] | None = None
        if req.encrypted:
            keys = ctx.keys

            def encrypt(text: str) -> str:
                return nip04.encrypt(text, keys.secret_key, event.pubkey)

        out = [
            nip90.result(event, nip90.answer_text(data), charged, encrypt=encrypt),
            nip90.feedback(event, "success", amount_msat=charged),
        ]
        if change is not None:
            text = f"Change from NIP-90 job {event.id} ({charged} msat charged): {change}"
            out.append(self._dm(event.pubkey, text, event.id))
        return out
