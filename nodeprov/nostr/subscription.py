"""What the pool hands back: per-relay publish outcomes and de-duplicating subscriptions."""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = ["Publish", "PublishResult", "RelayOutcome", "Subscription", "Verifier"]

Verifier = Callable[[dict[str, Any]], bool]
Outcome = Literal["accepted", "rejected", "refused", "no_answer"]


@dataclass(frozen=True, slots=True)
class RelayOutcome:
    """What one relay did with a published event."""

    status: Outcome
    reason: str = ""


@dataclass(slots=True)
class PublishResult:
    """Per-relay outcome of ``RelayPool.publish``."""

    event_id: str
    relays: dict[str, RelayOutcome]

    @property
    def accepted(self) -> list[str]:
        return [u for u, o in self.relays.items() if o.status == "accepted"]

    @property
    def rejected(self) -> dict[str, str]:
        """Relays that refused the event (also locally, by NIP-11 limits) and why."""
        return {u: o.reason for u, o in self.relays.items() if o.status in ("rejected", "refused")}

    @property
    def no_answer(self) -> list[str]:
        return [u for u, o in self.relays.items() if o.status == "no_answer"]

    @property
    def ok(self) -> bool:
        return bool(self.accepted)


@dataclass(eq=False)
class Publish:
    event: dict[str, Any]
    pending: set[str]
    outcomes: dict[str, RelayOutcome] = field(default_factory=dict)
    auth_retried: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self, url: str, outcome: RelayOutcome) -> None:
        if url in self.pending:
            self.pending.discard(url)
            self.outcomes[url] = outcome
            if not self.pending:
                self.done.set()


class RelayState(Protocol):
    """What a subscription reads of one relay connection."""

    url: str
    tried: bool
    connected: bool


class PoolRelays(Protocol):
    """What a subscription needs of its pool (:class:`RelayPool` is one)."""

    @property
    def relays(self) -> Mapping[str, RelayState]: ...

    async def unsubscribe(self, sub: Subscription) -> None: ...


class Subscription:
    """Events of one REQ across all relays, each event id once; ``async for url, event in sub``."""

    def __init__(
        self,
        pool: PoolRelays,
        sub_id: str,
        filters: list[dict[str, Any]],
        *,
        verify: Verifier | None,
        max_queue: int,
        dedup_size: int,
        overlap: int,
    ) -> None:
        self.pool = pool
        self.sub_id = sub_id
        self.filters = filters
        self.verify = verify
        self.overlap = overlap
        self.last_seen: dict[str, int] = {}  # relay -> newest created_at delivered or caught up
        self.eose: set[str] = set()
        self.closed_by: dict[str, str] = {}  # relay -> CLOSED reason
        self.dropped = 0
        self.closed = False
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._max_queue = max_queue
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedup_size = dedup_size
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def _offer(self, url: str, event: dict[str, Any]) -> str:
        """Queue ``event`` unless seen or badly signed; return what happened (for stats)."""
        created = event["created_at"]
        if created > self.last_seen.get(url, -1):
            self.last_seen[url] = created
        eid = event["id"]
        if eid in self._seen:
            self._seen.move_to_end(eid)
            return "duplicates"
        if self.verify is not None and not self.verify(event):
            return "invalid"  # not marked seen: a forged copy must not hide the real event
        self._seen[eid] = None
        if len(self._seen) > self._dedup_size:
            self._seen.popitem(last=False)
        result = "received"
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()  # drop oldest: a flood must not grow memory
            self.dropped += 1
            result = "dropped"
        self._queue.append((url, event))
        self._wake.set()
        return result

    def _notify(self) -> None:
        self._changed.set()
        self._wake.set()

    def __aiter__(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        return self

    async def __anext__(self) -> tuple[str, dict[str, Any]]:
        while not self._queue:
            if self.closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        return self._queue.popleft()

    async def until(self, stop: asyncio.Event) -> AsyncGenerator[dict[str, Any], None]:
        """The events, until ``stop`` is set or the subscription closes."""
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                nxt = asyncio.ensure_future(anext(self))
                await asyncio.wait({nxt, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await nxt
                    return
                try:
                    _, raw = nxt.result()
                except StopAsyncIteration:
                    return
                yield raw
        finally:
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping

    def _eose_complete(self) -> bool:
        return all(
            r.url in self.eose or r.url in self.closed_by or (r.tried and not r.connected)
            for r in self.pool.relays.values()
        )

    async def wait_eose(self, timeout: float) -> bool:  # noqa: ASYNC109 - API asks for it
        """True once every reachable relay sent EOSE (or CLOSED) for this subscription."""
        try:
            async with asyncio.timeout(timeout):
                while not self._eose_complete():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        await self.pool.unsubscribe(self)
