"""RelayPool against real relays: nostr-relay (shared and private) and a tiny scripted relay.

The scripted relay (``ScriptedRelay``, websockets on 127.0.0.1) covers what nostr-relay cannot
do: answer AUTH with OK, reply ``auth-required:``, announce NIP-11 limits, flood a subscription.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from websockets.datastructures import Headers
from websockets.legacy.server import WebSocketServer, WebSocketServerProtocol, serve

from nodeprov.nostr.relay_pool import RelayPool, Subscription
from tests.support.nostr_keys import Keys, verify_event
from tests.support.services import RELAY_BIN, RelayHandle, ServiceStartError, free_port
from tests.support.tcp_proxy import dead_url

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {
    "backoff_base": 0.05,
    "backoff_cap": 0.5,
    "connect_timeout": 5.0,
    "auth_wait": 0.3,
}


async def wait_until(cond: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def drain(sub: Subscription, quiet: float = 0.3) -> list[tuple[str, dict[str, Any]]]:
    """Everything the subscription yields until it stays quiet for ``quiet`` seconds.

    Only for what is already queued (e.g. stored events before EOSE) or to show that nothing
    more comes: for live events use :func:`collect`, which waits for them.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    while True:
        try:
            out.append(await asyncio.wait_for(anext(sub), quiet))
        except TimeoutError:
            return out


async def collect(
    sub: Subscription, n: int, within: float = 30.0, quiet: float = 0.3
) -> list[tuple[str, dict[str, Any]]]:
    """The next ``n`` items (waiting for each as long as needed), then any extras."""
    out = [await asyncio.wait_for(anext(sub), within) for _ in range(n)]
    return out + await drain(sub, quiet)


def tagged(keys: Keys, tag: str, content: str = "hi", **kw: Any) -> dict[str, Any]:
    return keys.event(content, tags=[["t", tag]], **kw)


# ------------------------------------------------------------------------ nostr-relay tests


async def test_publish_and_read_back(relay: RelayHandle) -> None:
    keys, tag = Keys.generate(), uuid.uuid4().hex
    async with RelayPool([relay.url], **FAST) as pool:
        event = tagged(keys, tag)
        result = await pool.publish(event, timeout=10)
        assert result.accepted == [relay.url] and result.ok, result
        sub = pool.subscribe([{"#t": [tag]}], verify=verify_event)
        assert await sub.wait_eose(10)
        assert await drain(sub) == [(relay.url, event)]
        again = await pool.publish(event, timeout=10)  # "duplicate:" is still accepted
        assert again.accepted == [relay.url]
        assert pool.status()[relay.url]["connected"] is True


async def test_two_relays_deliver_each_event_once(
    relay: RelayHandle, relay_factory: Callable[..., RelayHandle]
) -> None:
    other = relay_factory()
    keys, tag = Keys.generate(), uuid.uuid4().hex
    async with RelayPool([relay.url, other.url], **FAST) as pool:
        stored = [tagged(keys, tag, f"old {i}") for i in range(3)]
        for event in stored:
            result = await pool.publish(event, timeout=10)
            assert sorted(result.accepted) == sorted([relay.url, other.url]), result
        sub = pool.subscribe([{"authors": [keys.pubkey], "#t": [tag]}])
        assert await sub.wait_eose(10)
        live = [tagged(keys, tag, f"live {i}") for i in range(2)]
        for event in live:
            assert len((await pool.publish(event, timeout=10)).accepted) == 2
        # A live event may reach us after its OK: wait for all five, and for the second
        # relay's copies to be dropped, instead of taking what came within a fixed time.
        got = [event["id"] for _, event in await collect(sub, 5, quiet=0.5)]
        assert sorted(got) == sorted(e["id"] for e in stored + live)
        await wait_until(lambda: pool.stats["duplicates"] >= 5)  # the second relay's copies


async def test_rejections_are_reported_and_the_throttled_connection_is_replaced(
    relay: RelayHandle, relay_factory: Callable[..., RelayHandle]
) -> None:
    small = relay_factory(max_event_size=100)
    keys = Keys.generate()
    async with RelayPool([relay.url, small.url], **FAST) as pool:
        big = keys.event("x" * 500)
        result = await pool.publish(big, timeout=10)
        assert result.accepted == [relay.url]
        assert "280 characters" in result.rejected[small.url]
        bad_sig = {**keys.event("forged"), "sig": "11" * 64}
        good1, good2 = keys.event("one"), keys.event("two")
        # Three in flight on one connection: nostr-relay answers the bad one with an empty id,
        # so matching must go by order for it and by id for the others.
        results = await asyncio.gather(
            *(pool.publish(e, timeout=15) for e in (good1, bad_sig, good2))
        )
        assert [small.url in r.accepted for r in results] == [True, False, True]
        assert "Bad signature" in results[1].rejected[small.url]
        # The throttled connection was dropped for a fresh one, which takes the next event.
        # (Counted, not timed: a stopwatch bound fails by chance on a busy machine.)
        await wait_until(lambda: pool.status()[small.url]["connected"], 30)
        assert pool.status()[small.url]["reconnects"] >= 1
        three = await pool.publish(keys.event("three"), timeout=10)
        assert sorted(three.accepted) == sorted([relay.url, small.url]), three


async def test_reconnect_resubscribes_without_duplicates(relay: RelayHandle) -> None:
    keys, tag = Keys.generate(), uuid.uuid4().hex
    async with RelayPool([relay.url], **FAST) as pool:
        sub = pool.subscribe([{"#t": [tag]}])
        assert await sub.wait_eose(10)
        first = tagged(keys, tag, "before")
        assert (await pool.publish(first, timeout=10)).ok
        assert [e["id"] for _, e in await collect(sub, 1)] == [first["id"]]
        relay.stop()
        await wait_until(lambda: not pool.status()[relay.url]["connected"])
        down = await pool.publish(tagged(keys, tag, "while down"), timeout=0.3)
        assert down.no_answer == [relay.url]
        relay.start()
        await wait_until(lambda: pool.status()[relay.url]["connected"], 15)
        assert pool.status()[relay.url]["reconnects"] >= 1
        second = tagged(keys, tag, "after")
        assert (await pool.publish(second, timeout=10)).ok
        got = [e["id"] for _, e in await collect(sub, 1, quiet=0.5)]
        assert got == [second["id"]]  # the resubscription re-sent `first`; dedup dropped it
        assert pool.stats["duplicates"] >= 1


async def test_auth_with_nostr_relay(relay_factory: Callable[..., RelayHandle]) -> None:
    # The relay must know its own URL, so the port is picked before it starts; another
    # process may take it in between ("address already in use"): then try another port.
    for attempt in range(3):
        port = free_port()
        url = f"ws://127.0.0.1:{port}"
        auth = {"enabled": True, "relay_urls": [url], "actions": {"save": "w", "query": "a"}}
        try:
            private = relay_factory(port=port, extra_config={"authentication": auth})
            break
        except ServiceStartError as exc:
            if attempt == 2 or "address already in use" not in str(exc).lower():
                raise
    writer = Keys.generate()
    role_set = ["role", "set", "-p", writer.pubkey, "-r", "w"]
    # Blocking is fine here: nothing else runs on the loop yet.
    subprocess.run(  # noqa: ASYNC221
        [str(RELAY_BIN), "-c", str(private.config_path), *role_set],
        cwd=private.workdir,
        check=True,
        capture_output=True,
        timeout=60,
    )
    async with RelayPool([url], **FAST) as anonymous:
        result = await anonymous.publish(writer.event("anon"), timeout=10)
        assert "restricted" in result.rejected[url]
        assert anonymous.status()[url]["auth"] == "challenged"
    async with RelayPool([url], sign=writer.async_sign, **FAST) as pool:
        event = writer.event("authed")
        result = await pool.publish(event, timeout=10)
        assert result.accepted == [url], result
        # nostr-relay never answers AUTH with OK, so the state stays "sent".
        assert pool.status()[url]["auth"] == "sent"


# ------------------------------------------------------------------------- scripted relay


class ScriptedRelay:
    """A minimal NIP-01/42 relay: stores events, demands AUTH if asked, can flood a REQ."""

    def __init__(self, *, require_auth: bool = False, flood: int = 0, limits: Any = None) -> None:
        self.require_auth = require_auth
        self.flood = flood
        self.limits = limits
        self.events: list[dict[str, Any]] = []
        self.received: list[list[Any]] = []
        self.auth_events: list[dict[str, Any]] = []
        self.server: WebSocketServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def _nip11(
        self, path: str, headers: Headers
    ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        if headers.get("Accept") != "application/nostr+json":
            return None
        doc: dict[str, Any] = {"name": "scripted"}
        if self.limits is not None:
            doc["limitation"] = self.limits
        return 200, [("Content-Type", "application/nostr+json")], json.dumps(doc).encode()

    async def start(self) -> None:
        self.server = await serve(self._handle, "127.0.0.1", 0, process_request=self._nip11)
        self.port = next(iter(self.server.sockets)).getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, ws: WebSocketServerProtocol) -> None:
        challenge, authed = secrets.token_hex(8), False
        async for raw in ws:
            msg = json.loads(raw)
            self.received.append(msg)
            need_auth = self.require_auth and not authed
            if msg[0] == "AUTH":
                ev = msg[1]
                tags = {t[0]: t[1] for t in ev["tags"]}
                authed = (
                    verify_event(ev)
                    and ev["kind"] == 22242
                    and tags.get("challenge") == challenge
                    and tags.get("relay") == self.url
                )
                self.auth_events.append(ev)
                await ws.send(json.dumps(["OK", ev["id"], authed, "" if authed else "invalid"]))
            elif msg[0] == "EVENT" and need_auth:
                await ws.send(json.dumps(["AUTH", challenge]))
                await ws.send(json.dumps(["OK", msg[1]["id"], False, "auth-required: sign in"]))
            elif msg[0] == "EVENT":
                self.events.append(msg[1])
                await ws.send(json.dumps(["OK", msg[1]["id"], True, ""]))
            elif msg[0] == "REQ" and need_auth:
                await ws.send(json.dumps(["AUTH", challenge]))
                await ws.send(json.dumps(["CLOSED", msg[1], "auth-required: sign in"]))
            elif msg[0] == "REQ":
                await self._answer_req(ws, msg[1])

    async def _answer_req(self, ws: WebSocketServerProtocol, sub_id: str) -> None:
        for ev in self.events:
            await ws.send(json.dumps(["EVENT", sub_id, ev]))
        for i in range(self.flood):
            if i % 500 == 0:
                await ws.send('["EVENT", "garbage"]')  # malformed frames must not hurt
            digest = hashlib.sha256(str(i).encode()).hexdigest()
            ev = {"id": digest, "pubkey": "ab" * 32, "created_at": 1_700_000_000 + i, "kind": 1}
            ev |= {"tags": [], "content": str(i), "sig": "cd" * 64}
            await ws.send(json.dumps(["EVENT", sub_id, ev]))
        await ws.send(json.dumps(["EOSE", sub_id]))


@pytest_asyncio.fixture
async def scripted() -> AsyncIterator[Callable[..., Any]]:
    started: list[ScriptedRelay] = []

    async def make(**kw: Any) -> ScriptedRelay:
        srv = ScriptedRelay(**kw)
        await srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        await srv.stop()


async def test_auth_required_then_retry_once(scripted: Callable[..., Any]) -> None:
    srv: ScriptedRelay = await scripted(require_auth=True)
    keys = Keys.generate()
    async with RelayPool([srv.url], **FAST) as anonymous:
        result = await anonymous.publish(keys.event("no signer"), timeout=5)
        assert result.rejected[srv.url].startswith("auth-required:")
    async with RelayPool([srv.url], sign=keys.async_sign, **FAST) as pool:
        event = keys.event("needs auth")
        result = await pool.publish(event, timeout=5)
        assert result.accepted == [srv.url], result
        assert pool.status()[srv.url]["auth"] == "ok"
        assert len(srv.auth_events) == 1 and srv.auth_events[0]["pubkey"] == keys.pubkey
    # A new connection is unauthenticated again: REQ -> CLOSED auth-required -> AUTH -> REQ.
    async with RelayPool([srv.url], sign=keys.async_sign, **FAST) as pool:
        sub = pool.subscribe([{"kinds": [1]}])
        assert await sub.wait_eose(5)
        assert [e["id"] for _, e in await drain(sub)] == [event["id"]]
        assert pool.status()[srv.url]["auth"] == "ok"


async def test_nip11_limits_are_respected(scripted: Callable[..., Any]) -> None:
    limits = {"max_content_length": 20, "max_subscriptions": 1, "max_message_length": 4000}
    srv: ScriptedRelay = await scripted(limits=limits)
    keys = Keys.generate()
    async with RelayPool([srv.url], **FAST) as pool:
        result = await pool.publish(keys.event("y" * 21), timeout=5)
        assert result.relays[srv.url].status == "refused"
        assert "max_content_length 20" in result.rejected[srv.url]
        assert (await pool.publish(keys.event("short"), timeout=5)).ok
        assert [m[1]["content"] for m in srv.received if m[0] == "EVENT"] == ["short"]
        first, second = pool.subscribe([{"kinds": [1]}]), pool.subscribe([{"kinds": [2]}])
        assert await first.wait_eose(5) and await second.wait_eose(5)
        assert "1 subscriptions" in second.closed_by[srv.url]
        assert pool.status()[srv.url]["limits"]["max_subscriptions"] == 1


async def test_flood_keeps_the_queue_bounded(scripted: Callable[..., Any]) -> None:
    srv: ScriptedRelay = await scripted(flood=5000)
    async with RelayPool([srv.url], max_queue=100, **FAST) as pool:
        sub = pool.subscribe([{"kinds": [1]}])
        assert await sub.wait_eose(20)
        assert len(sub) == 100
        assert sub.dropped == 4900 and pool.stats["dropped"] == 4900
        assert pool.status()[srv.url]["invalid"] == 10
        got = await drain(sub, 0.2)
        assert [int(e["content"]) for _, e in got] == list(range(4900, 5000))


async def test_close_leaves_no_tasks(relay: RelayHandle, scripted: Callable[..., Any]) -> None:
    srv: ScriptedRelay = await scripted()
    before = asyncio.all_tasks()
    dead = dead_url("ws")  # reserved, so nothing can start listening there meanwhile
    pool = RelayPool([relay.url, srv.url, dead], **FAST)
    sub = pool.subscribe([{"kinds": [1], "limit": 1}])
    assert await sub.wait_eose(10)
    # The live relays get 5 s to answer (1 s was a bet on the machine's load); the dead one
    # never does.
    assert (await pool.publish(Keys.generate().event("bye"), timeout=5)).no_answer == [dead]
    pending = asyncio.ensure_future(pool.publish(Keys.generate().event("late"), timeout=300))
    await asyncio.sleep(0.05)
    await pool.close()
    # close() answers waiting publishes at once: well before the publish's own 300 s timeout.
    late = await asyncio.wait_for(pending, 30)
    assert late.relays[dead].status == "no_answer"
    _ = [item async for item in sub]  # yields what was queued, then ends
    with pytest.raises(StopAsyncIteration):
        await anext(sub)
    await asyncio.sleep(0)
    leaked = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert not leaked, leaked
    assert pool.status()[dead]["last_error"]
