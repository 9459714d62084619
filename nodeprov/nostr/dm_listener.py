"""The DM listener: kinds 1059 and 4 addressed to the node -> handlers -> replies, each once.

Exactly once, also across restarts: the gift wrap (or kind 4) id is recorded as accepted
before any work, the replies are stored before they are published, and a ``since``
watermark (with overlap; two days more for back-dated gift wraps) resumes the subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable

from nodeprov.errors import InvalidJobMessage, NodeprovError, RequestTooLarge
from nodeprov.nostr.chat import ChatSessions, handle_plain
from nodeprov.nostr.dm_handlers import DmContext, RateLimited, handle_json
from nodeprov.nostr.dm_store import JobRow
from nodeprov.nostr.dm_transport import DmTransport, Dropped, Incoming, split_for, split_plain
from nodeprov.nostr.relay_pool import RelayPool
from nodeprov.protocol import dm_jobs, nip04, nip59
from nodeprov.protocol.payment_request import PaymentRequestPayload, parse_payment_payload

log = logging.getLogger(__name__)

OVERLAP_SECONDS = 600
WATERMARK_SECONDS = 30.0
RETRY_SECONDS = 30.0
STOP_GRACE_SECONDS = 10.0


def _parse(text: str) -> dm_jobs.ClientMessage | PaymentRequestPayload | dm_jobs.PlainText:
    """A job message, a NUT-18 payment payload (a deposit), or plain text."""
    stripped = text.strip()
    if stripped.startswith("{") and '"proofs"' in stripped:
        with contextlib.suppress(NodeprovError, ValueError, TypeError):
            obj = json.loads(stripped)
            if isinstance(obj, dict) and "type" not in obj:
                return parse_payment_payload(obj)
    return dm_jobs.parse_client_message(text)


class DmListener:
    """Runs until stopped; ``close(grace)`` lets in-flight jobs finish (or cancels them)."""

    def __init__(self, ctx: DmContext, pool: RelayPool, transport: DmTransport) -> None:
        self.ctx = ctx
        self.pool = pool
        self.transport = transport
        self.store = ctx.store
        nostr = ctx.config.nostr
        self.sessions = ChatSessions(nostr.chat_history_turns)
        self.rate = nostr.rate_limit_per_minute
        self.cap = nostr.max_concurrent_jobs_per_sender
        self.max_bytes = nostr.max_content_bytes
        self._recent: dict[str, deque[float]] = defaultdict(deque)
        self._running: dict[str, int] = defaultdict(int)
        self._inflight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = defaultdict(int)

    # --- lifecycle ---------------------------------------------------------------

    async def filters(self) -> list[dict[str, object]]:
        """REQ filters from the stored watermark (first start: now), minus the overlap."""
        mark = await self.store.watermark()
        base = (int(time.time()) if mark is None else mark) - OVERLAP_SECONDS
        me = [self.ctx.keys.public_key]
        out: list[dict[str, object]] = [
            {"kinds": [nip59.GIFT_WRAP_KIND], "#p": me, "since": max(0, base - nip59.TWO_DAYS)}
        ]
        if self.ctx.config.nostr.accept_nip04:
            out.append({"kinds": [nip04.KIND], "#p": me, "since": max(0, base)})
        return out

    async def run(self, stop: asyncio.Event) -> None:
        """Subscribe and handle DMs until ``stop``; then let in-flight jobs finish briefly."""
        sub = self.pool.subscribe(await self.filters(), overlap=nip59.TWO_DAYS + OVERLAP_SECONDS)
        halt = asyncio.Event()  # helpers finish their step and end (never cancelled mid-write)
        helpers = [
            asyncio.create_task(self._every(WATERMARK_SECONDS, self._mark, halt)),
            asyncio.create_task(self._every(RETRY_SECONDS, self.resend_unsent, halt)),
        ]
        await self.resend_unsent()
        try:
            async with contextlib.aclosing(sub.until(stop)) as events:
                async for raw in events:
                    self._spawn(raw)
        finally:
            halt.set()
            await asyncio.gather(*helpers, return_exceptions=True)
            await sub.close()
            await self.close(STOP_GRACE_SECONDS)

    async def close(self, grace: float) -> None:
        """Wait up to ``grace`` s for in-flight jobs, then cancel the rest (resumed on restart)."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=grace) if grace > 0 else (
                set(), set(self._tasks))  # fmt: skip
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._mark()

    async def _every(
        self, seconds: float, step: Callable[[], Awaitable[None]], stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
            if stop.is_set():
                return
            try:
                await step()
            except Exception:
                log.exception("DM listener housekeeping failed")

    async def _mark(self) -> None:
        """Advance the watermark to now (events older than it minus the overlap are done)."""
        now = int(time.time())
        await self.store.set_watermark(now)
        # Older events fail the freshness check, so their ids need not be kept.
        keep = nip59.TWO_DAYS + self.transport.max_age + 2 * OVERLAP_SECONDS
        await self.store.prune(now - keep)

    def _spawn(self, raw: dict[str, object]) -> None:
        task = asyncio.create_task(self.process(raw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one event ---------------------------------------------------------------

    async def process(self, raw: dict[str, object]) -> None:
        """Handle one event end to end; never raises (bad input is a log line or error DM)."""
        try:
            incoming = self.transport.open(raw)
        except Dropped as exc:
            self.stats["dropped"] += 1
            log.info("DM %s dropped: %s", str(raw.get("id", "?"))[:12], exc)
            return
        except Exception:
            log.exception("DM %s could not be opened", str(raw.get("id", "?"))[:12])
            return
        if incoming.event_id in self._inflight:
            self.stats["duplicates"] += 1
            return
        self._inflight.add(incoming.event_id)
        try:
            await self._process(incoming)
        except Exception:
            log.exception("DM %s from %s failed", incoming.event_id[:12], incoming.sender[:12])
        finally:
            self._inflight.discard(incoming.event_id)

    async def _process(self, inc: Incoming) -> None:
        row = await self.store.accept(inc.event_id, inc.sender, inc.nip, inc.reply_to)
        resumed = False
        if row is not None:
            if row.state == "sent":
                self.stats["duplicates"] += 1
                log.info("DM %s already answered", inc.event_id[:12])
                return
            if row.state == "done":
                await self._deliver(row.event_id, row.nip, row.sender, list(row.replies),
                                    row.reply_to or inc.reply_to)  # fmt: skip
                return
            resumed = True
            log.info("resuming DM %s accepted before a restart", inc.event_id[:12])
        limited = None if resumed else self._admit(inc.sender)
        if limited is not None:
            replies = self._error_replies(inc, limited)
        else:
            self._running[inc.sender] += 1
            try:
                replies = await self._handle(inc, resumed)
            finally:
                self._running[inc.sender] -= 1
                if not self._running[inc.sender]:
                    del self._running[inc.sender]
        await self.store.done(inc.event_id, replies)
        self.stats["handled"] += 1
        await self._deliver(inc.event_id, inc.nip, inc.sender, replies, inc.reply_to)

    def _admit(self, sender: str) -> RateLimited | None:
        """Rate limit per minute and concurrent-job cap, per sender."""
        if self._running.get(sender, 0) >= self.cap:
            return RateLimited(f"at most {self.cap} jobs at a time; wait for a reply")
        if self.rate <= 0:
            return None
        now = time.monotonic()
        recent = self._recent[sender]
        while recent and recent[0] < now - 60:
            recent.popleft()
        if len(recent) >= self.rate:
            return RateLimited(f"at most {self.rate} messages per minute; slow down")
        recent.append(now)
        return None

    def _error_replies(self, inc: Incoming, error: NodeprovError) -> list[str]:
        ident = dm_jobs.message_id(inc.text)
        if ident is None and not inc.text.strip().startswith("{"):
            return split_plain(inc.nip, f"Error: {error.message}")
        return split_for(inc.nip, dm_jobs.error_reply(ident, error))

    async def _handle(self, inc: Incoming, resumed: bool) -> list[str]:
        if len(inc.text.encode("utf-8")) > self.max_bytes:
            too_big = RequestTooLarge(f"DM content is larger than {self.max_bytes} bytes")
            return self._error_replies(inc, too_big)
        try:
            msg = _parse(inc.text)
        except InvalidJobMessage as exc:
            return self._error_replies(inc, exc)
        if isinstance(msg, dm_jobs.PlainText):
            text = await handle_plain(
                self.ctx, self.sessions, inc.sender, msg.text, inc.event_id, resumed
            )
            return split_plain(inc.nip, text)
        reply = await handle_json(self.ctx, inc.sender, msg, inc.event_id, resumed)
        return split_for(inc.nip, reply)

    async def _deliver(
        self, event_id: str, nip: str, sender: str, replies: list[str], reply_to: str
    ) -> None:
        assert nip in ("nip17", "nip04")
        if await self.transport.send(nip, sender, replies, reply_to):  # type: ignore[arg-type]
            await self.store.sent(event_id)
            self.stats["replied"] += 1
        else:
            log.warning("reply to DM %s not delivered yet; will retry", event_id[:12])

    async def resend_unsent(self) -> None:
        """Publish stored replies that no relay accepted yet (also those of a previous run)."""
        rows: list[JobRow] = await self.store.unsent()
        for row in rows:
            if row.event_id in self._inflight:
                continue
            self._inflight.add(row.event_id)
            try:
                await self._deliver(
                    row.event_id, row.nip, row.sender, list(row.replies), row.reply_to or ""
                )
            finally:
                self._inflight.discard(row.event_id)
