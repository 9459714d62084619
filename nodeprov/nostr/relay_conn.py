"""One relay connection of the pool: its task reconnects, replays pool state, matches OKs, AUTHs.

Frames are built and parsed by ``messages``; this is the asyncio side only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.exceptions import WebSocketException
from websockets.legacy.client import WebSocketClientProtocol, connect

from nodeprov.nostr import messages as m
from nodeprov.nostr.subscription import Publish, RelayOutcome, Subscription

__all__ = ["RelayConnection", "backoff_delay", "http_url"]

_DEFAULT_MAX_SIZE = 2**20 + 2**16
_MAX_SIZE_CAP = 2**24
_IN_FLIGHT_CAP = 1000


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, never above ``cap``."""
    ceiling = min(cap, base * 2.0 ** min(attempt, 30))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def http_url(ws_url: str) -> str:
    """The NIP-11 address of a relay: ``ws``→``http``, ``wss``→``https``."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))


Signer = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class PoolState(Protocol):
    """What a connection reads and updates of its pool (:class:`RelayPool` is one)."""

    log: logging.Logger
    sign: Signer | None
    connect_timeout: float
    ping_interval: float
    backoff: tuple[float, float]
    auth_wait: float
    recycle_throttled: bool
    rng: random.Random
    http: httpx.AsyncClient
    subs: dict[str, Subscription]
    publishes: set[Publish]
    stats: dict[str, int]

    def track(self, fut: asyncio.Future[Any]) -> None: ...


_Out = tuple[Literal["REQ", "CLOSE", "EVENT", "AUTH"], Any]


class RelayConnection:
    """Connection state of one relay; ``run()`` is its task."""

    def __init__(self, pool: PoolState, url: str) -> None:
        self.pool = pool
        self.url = url
        self.log = pool.log
        self.connected = False
        self.ready = False  # connected and pool state replayed
        self.tried = False
        self.last_error: str | None = None
        self.reconnects = 0
        self.connects = 0
        self.auth = "none"  # none | challenged | sent | ok | failed: ...
        self.limits = m.RelayLimits()
        self.stats: dict[str, int] = {"received": 0, "dropped": 0, "invalid": 0, "duplicates": 0}
        self.last_notice = ""
        self._challenge: str | None = None
        self._answered: str | None = None
        self._challenged = asyncio.Event()
        self._auth_id: str | None = None
        self._auth_waiting: list[Publish | Subscription] = []
        self._in_flight: deque[tuple[str, Publish]] = deque()
        self._outbox: asyncio.Queue[_Out] = asyncio.Queue()
        self._ws: WebSocketClientProtocol | None = None
        self._recycle = False
        self.task: asyncio.Task[None] | None = None

    def put(self, item: _Out, *, early: bool = False) -> None:
        """Queue a frame on the live connection; state not sent now is replayed by ``_flush``."""
        if self.ready or (early and self.connected):
            self._outbox.put_nowait(item)

    # ---------------------------------------------------------------------------- session

    async def run(self) -> None:
        attempt = 0
        while True:
            connects = self.connects
            try:
                await self._session()
            except (OSError, TimeoutError, WebSocketException) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.log.info("relay %s: %s", self.url, self.last_error)
            except Exception as exc:  # a bug must cost a reconnect, not the relay task
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.log.exception("relay %s: unexpected error", self.url)
            finally:
                attempt = 0 if self.connects > connects else attempt
                self.tried = True
                self._disconnected()
            if self._recycle:
                self._recycle = False
                continue  # shedding a throttled connection: reconnect at once
            await asyncio.sleep(backoff_delay(attempt, *self.pool.backoff, self.pool.rng))
            attempt += 1

    async def _fetch_limits(self) -> m.RelayLimits:
        headers = {"Accept": "application/nostr+json"}
        try:
            response = await self.pool.http.get(http_url(self.url), headers=headers)
            return m.RelayLimits.from_nip11(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            self.log.debug("relay %s: no NIP-11 document (%s)", self.url, exc)
            return m.RelayLimits()

    async def _session(self) -> None:
        self.limits = await self._fetch_limits()
        max_size = _DEFAULT_MAX_SIZE
        if self.limits.max_message_length:
            # The announced limit is what the relay accepts; never go below the default for what
            # it sends (an old bigger event would close the socket with 1009 on every resubscribe).
            max_size = min(_MAX_SIZE_CAP, max(max_size, self.limits.max_message_length + 4096))
        ws = await connect(
            self.url,
            open_timeout=self.pool.connect_timeout,
            max_size=max_size,
            ping_interval=self.pool.ping_interval,
            ping_timeout=self.pool.ping_interval,
            close_timeout=2,
        )
        self._ws, self.connected, self.last_error = ws, True, None
        self.reconnects += 1 if self.connects else 0
        self.connects += 1
        self._outbox = asyncio.Queue()
        tasks = [asyncio.create_task(self._reader(ws)), asyncio.create_task(self._writer(ws))]
        try:
            if self.pool.sign is not None:
                # A relay sends its challenge right after the handshake: answer it before any
                # REQ/EVENT so that those already run authenticated. One that announced
                # auth_required gets longer, since nothing would work without it.
                wait = self.pool.auth_wait
                if self.limits.auth_required:
                    wait = max(wait, self.pool.connect_timeout)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._challenged.wait(), wait)
            elif self.limits.auth_required:
                self.log.warning("relay %s requires AUTH but the pool has no signer", self.url)
            self._flush()
            self.ready = True
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            if not self._recycle:
                self.last_error = f"closed by relay ({ws.close_code} {ws.close_reason})".strip()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)

    def _flush(self) -> None:
        """Replay pool state on a fresh connection: every subscription, every pending publish."""
        for sub in self.pool.subs.values():
            self._outbox.put_nowait(("REQ", sub))
        for pub in self.pool.publishes:
            if self.url in pub.pending:
                self._outbox.put_nowait(("EVENT", pub))

    def _disconnected(self) -> None:
        now = int(time.time())
        for sub in self.pool.subs.values():
            if self.url in sub.eose:  # live up to now: resume from here
                sub.last_seen[self.url] = max(sub.last_seen.get(self.url, 0), now)
            sub.eose.discard(self.url)
            sub.closed_by.pop(self.url, None)
            sub._notify()
        self.connected, self.ready, self._ws = False, False, None
        self.auth, self._challenge, self._answered, self._auth_id = "none", None, None, None
        self._challenged = asyncio.Event()
        self._auth_waiting.clear()
        self._in_flight.clear()

    # ----------------------------------------------------------------------------- writer

    async def _writer(self, ws: WebSocketClientProtocol) -> None:
        while True:
            kind, item = await self._outbox.get()
            if kind == "REQ":
                text = self._req_text(item)
            elif kind == "CLOSE":
                text = m.close_message(item)
            elif kind == "AUTH":
                text = await self._auth_text(item)
            else:
                text = self._event_text(item)
            if text is not None:
                await ws.send(text)

    def _req_text(self, sub: Subscription) -> str | None:
        if sub.closed or self.pool.subs.get(sub.sub_id) is not sub:
            return None
        cap = self.limits.max_subscriptions
        if cap is not None and list(self.pool.subs).index(sub.sub_id) >= cap:
            sub.closed_by[self.url] = f"refused: relay allows {cap} subscriptions"
            sub._notify()
            return None
        sub.eose.discard(self.url)
        sub.closed_by.pop(self.url, None)
        filters = m.resume_filters(sub.filters, sub.last_seen.get(self.url), sub.overlap)
        return m.req_message(sub.sub_id, filters)

    def _event_text(self, pub: Publish) -> str | None:
        if self.url not in pub.pending:
            return None
        refusal = self.limits.refuse_event(pub.event)
        if refusal is not None:
            pub.settle(self.url, RelayOutcome("refused", refusal))
            return None
        self._in_flight.append((pub.event["id"], pub))
        if len(self._in_flight) > _IN_FLIGHT_CAP:
            self._in_flight.popleft()  # a relay that never answers must not grow this
        return m.event_message(pub.event)

    async def _auth_text(self, challenge: str) -> str | None:
        if self.pool.sign is None or challenge != self._challenge or challenge == self._answered:
            return None  # one AUTH per challenge, however many rejections asked for it
        self._answered = challenge
        template = m.auth_template(self.url, challenge, int(time.time()))
        try:
            signed = await self.pool.sign(template)
        except Exception as exc:
            self.auth = f"failed: signer raised {type(exc).__name__}: {exc}"
            self.log.warning("relay %s: AUTH %s", self.url, self.auth)
            return None
        self._auth_id, self.auth = signed.get("id"), "sent"
        return m.auth_message(signed)

    # ----------------------------------------------------------------------------- reader

    async def _reader(self, ws: WebSocketClientProtocol) -> None:
        count = 0
        async for raw in ws:
            try:
                msg = m.parse_relay_message(raw)
            except m.MessageError as exc:
                self.stats["invalid"] += 1
                self.log.debug("relay %s: bad message: %s", self.url, exc)
                continue
            self._handle(msg)
            count += 1
            if count % 256 == 0:
                await asyncio.sleep(0)  # a flood must not starve the rest of the loop

    def _handle(self, msg: m.RelayMessage) -> None:
        if isinstance(msg, m.RelayEvent):
            sub = self.pool.subs.get(msg.sub_id)
            if sub is not None:
                what = sub._offer(self.url, msg.event)
                self.stats[what] += 1
                self.pool.stats[what] += 1
                if what == "dropped":
                    self.stats["received"] += 1
                    self.pool.stats["received"] += 1
        elif isinstance(msg, m.RelayOk):
            self._on_ok(msg)
        elif isinstance(msg, m.RelayEose):
            sub = self.pool.subs.get(msg.sub_id)
            if sub is not None:
                sub.eose.add(self.url)
                sub._notify()
        elif isinstance(msg, m.RelayClosed):
            self._on_closed(msg)
        elif isinstance(msg, m.RelayAuth):
            self._challenge = msg.challenge
            self.auth = "challenged"
            self._challenged.set()
            self.put(("AUTH", msg.challenge), early=True)
        else:
            self.last_notice = msg.message
            self.log.info("relay %s NOTICE: %s", self.url, msg.message)

    def _on_ok(self, ok: m.RelayOk) -> None:
        if ok.event_id and ok.event_id == self._auth_id:
            self.auth = "ok" if ok.accepted else f"failed: {ok.message}"
            waiting, self._auth_waiting = self._auth_waiting, []
            for item in waiting:
                if isinstance(item, Subscription):
                    if ok.accepted:
                        self.put(("REQ", item))
                    else:
                        item.closed_by[self.url] = self.auth
                        item._notify()
                elif ok.accepted:
                    self.put(("EVENT", item))
                else:
                    item.settle(self.url, RelayOutcome("rejected", self.auth))
            return
        pub = self._match(ok.event_id)
        if pub is None:
            return
        if ok.accepted or ok.prefix == "duplicate":
            # nostr-relay says `false, "duplicate: ..."`: the relay has the event all the same.
            pub.settle(self.url, RelayOutcome("accepted", ok.message))
        elif self._wants_auth(ok.prefix, pub):
            self._auth_waiting.append(pub)
        else:
            pub.settle(self.url, RelayOutcome("rejected", ok.message))
        if not ok.event_id and not ok.accepted and self.pool.recycle_throttled:
            # nostr-relay: an empty-id rejection means this connection is now throttled (the
            # delay doubles per rejection and applies to every later message): start afresh.
            self._recycle = True
        if self._recycle and not any(self.url in p.pending for _, p in self._in_flight):
            self._close_soon()

    def _match(self, event_id: str) -> Publish | None:
        """The publish an OK answers: by id, or the oldest in flight for an empty id."""
        if not event_id:
            return self._in_flight.popleft()[1] if self._in_flight else None
        for i, (eid, pub) in enumerate(self._in_flight):
            if eid == event_id:
                del self._in_flight[i]
                return pub
        return None

    def _wants_auth(self, prefix: str, item: Publish | Subscription) -> bool:
        """On ``auth-required:``: authenticate (once per item) and retry afterwards."""
        if prefix != "auth-required" or self.pool.sign is None or self.auth == "ok":
            return False
        if isinstance(item, Publish):
            if self.url in item.auth_retried:
                return False
            item.auth_retried.add(self.url)
        if self.auth == "challenged" and self._challenge is not None:
            self.put(("AUTH", self._challenge), early=True)
        return True

    def _on_closed(self, closed: m.RelayClosed) -> None:
        sub = self.pool.subs.get(closed.sub_id)
        if sub is None:
            return
        if self._wants_auth(closed.prefix, sub) and sub not in self._auth_waiting:
            self._auth_waiting.append(sub)
            return
        sub.closed_by[self.url] = closed.message
        sub._notify()

    def _close_soon(self) -> None:
        if self._ws is not None:
            ws, self._ws = self._ws, None
            task = asyncio.ensure_future(ws.close())
            self.pool.track(task)
