"""Relay pool over websockets: reconnect, NIP-11 limits, NIP-42 AUTH, OK tracking, dedup.

One task per relay (``relay_conn``) owns its connection; the wire format lives in ``messages``.
Pool state (subscriptions, pending publishes) outlives connections and is replayed on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from nodeprov.nostr import messages as m
from nodeprov.nostr.relay_conn import RelayConnection, Signer, backoff_delay, http_url
from nodeprov.nostr.subscription import (
    Publish,
    PublishResult,
    RelayOutcome,
    Subscription,
    Verifier,
)

__all__ = [
    "PublishResult",
    "RelayOutcome",
    "RelayPool",
    "Signer",
    "Subscription",
    "Verifier",
    "backoff_delay",
    "http_url",
]


class RelayPool:
    """Several relays as one: publish to all, subscribe across all, each event once."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        sign: Signer | None = None,
        max_queue: int = 1000,
        dedup_size: int = 10_000,
        connect_timeout: float = 10.0,
        nip11_timeout: float = 3.0,
        ping_interval: float = 20.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 60.0,
        auth_wait: float = 0.5,
        resubscribe_overlap: int = 60,
        recycle_throttled: bool = True,
        logger: logging.Logger | None = None,
    ) -> None:
        self.log = logger or logging.getLogger(__name__)
        self.sign = sign
        self.max_queue = max_queue
        self.dedup_size = dedup_size
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.backoff = (backoff_base, backoff_cap)
        self.auth_wait = auth_wait
        self.overlap = resubscribe_overlap
        self.recycle_throttled = recycle_throttled
        self.rng = random.Random()
        self.http = httpx.AsyncClient(timeout=nip11_timeout)
        self.subs: dict[str, Subscription] = {}
        self.publishes: set[Publish] = set()
        self.stats: dict[str, int] = {"received": 0, "dropped": 0, "invalid": 0, "duplicates": 0}
        self.relays: dict[str, RelayConnection] = {
            url: RelayConnection(self, url) for url in dict.fromkeys(urls)
        }
        self._extra: set[asyncio.Future[Any]] = set()
        self._closed = False

    def track(self, fut: asyncio.Future[Any]) -> None:
        self._extra.add(fut)
        fut.add_done_callback(self._extra.discard)

    def start(self) -> None:
        """Start one connection task per relay (idempotent; needs a running loop)."""
        if self._closed:
            raise RuntimeError("RelayPool is closed")
        for relay in self.relays.values():
            if relay.task is None:
                relay.task = asyncio.create_task(relay.run(), name=f"relay {relay.url}")

    async def __aenter__(self) -> RelayPool:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def publish(
        self,
        event: Mapping[str, Any],
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - the per-call deadline is part of the API
    ) -> PublishResult:
        """Send ``event`` to every relay (also ones connecting within ``timeout``); collect OKs."""
        self.start()
        pub = Publish(dict(m.validate_event(dict(event))), set(self.relays))
        self.publishes.add(pub)
        try:
            for relay in self.relays.values():
                relay.put(("EVENT", pub))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pub.done.wait(), timeout)
        finally:
            self.publishes.discard(pub)
        for url in list(pub.pending):
            why = "no OK within timeout" if self.relays[url].connected else "not connected"
            pub.settle(url, RelayOutcome("no_answer", why))
        return PublishResult(pub.event["id"], {u: pub.outcomes[u] for u in self.relays})

    def subscribe(
        self,
        filters: Sequence[m.Filter | Mapping[str, Any]],
        sub_id: str | None = None,
        *,
        verify: Verifier | None = None,
        max_queue: int | None = None,
        overlap: int | None = None,
    ) -> Subscription:
        """Open a subscription on every relay (now and after each reconnect)."""
        self.start()
        sub_id = sub_id or f"np{random.getrandbits(48):012x}"
        if sub_id in self.subs:
            raise ValueError(f"subscription {sub_id!r} already active")
        sub = Subscription(
            self,
            sub_id,
            [m.filter_json(f) for f in filters],
            verify=verify,
            max_queue=max_queue or self.max_queue,
            dedup_size=self.dedup_size,
            overlap=self.overlap if overlap is None else overlap,
        )
        self.subs[sub_id] = sub
        for relay in self.relays.values():
            relay.put(("REQ", sub))
        return sub

    async def unsubscribe(self, sub: Subscription | str) -> None:
        """Close a subscription on every relay and end its iterator."""
        sub_id = sub if isinstance(sub, str) else sub.sub_id
        found = self.subs.pop(sub_id, None)
        if found is None:
            return
        found.closed = True
        found._notify()
        for relay in self.relays.values():
            relay.put(("CLOSE", sub_id))

    def status(self) -> dict[str, dict[str, Any]]:
        """Per relay: connected, last_error, reconnects, auth, NIP-11 limits and counters."""
        return {
            r.url: {
                "connected": r.connected,
                "last_error": r.last_error,
                "reconnects": r.reconnects,
                "auth": r.auth,
                "limits": dataclasses.asdict(r.limits),
                "last_notice": r.last_notice,
                **r.stats,
            }
            for r in self.relays.values()
        }

    async def close(self) -> None:
        """Stop every relay task, end every subscription, answer pending publishes."""
        if self._closed:
            return
        self._closed = True
        tasks = [r.task for r in self.relays.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._extra:
            await asyncio.gather(*self._extra, return_exceptions=True)
        for sub in list(self.subs.values()):
            await self.unsubscribe(sub)
        for pub in self.publishes:
            pub.done.set()
        await self.http.aclose()
