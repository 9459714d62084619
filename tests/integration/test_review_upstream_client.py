"""Hostile or odd upstream answers against the pooled client: caps, framing, reuse, slots.

Same scripted loopback server as ``test_upstream_client``; each test says what the client
must do with bytes an upstream should not send, and that its pool keeps working after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from nodeprov.upstream_http import HttpClient, Timeouts
from nodeprov.upstream_wire import MAX_HEAD_BYTES, RemoteProtocolError
from tests.integration.test_upstream_client import OK, Script, Server, answering, post, serving
from tests.support.waiting import until

# A short read timeout: a client that waits for it instead of refusing fails the test fast.
SHORT = Timeouts(connect=10, read=5, write=30, pool=5)


def client_for(server: Server, max_connections: int = 8) -> HttpClient:
    return HttpClient(server.url, headers={}, timeouts=SHORT, max_connections=max_connections)


def sending_then_hanging(*parts: bytes) -> Callable[[Server], Script]:
    """Read the request, write ``parts`` one write each, then keep the connection open."""

    def script(server: Server) -> Script:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await server.read_request(r)
            for part in parts:
                w.write(part)
                await w.drain()
            await r.read()

        return run

    return script


async def test_a_header_line_that_never_ends_is_refused_at_the_head_cap() -> None:
    """One header value of megabytes, sent in pieces and never ended: the head cap holds
    (the parser buffers a header until its line ends, so counting whole headers let it grow)."""
    piece = b"a" * 65_536
    parts = [b"HTTP/1.1 200 OK\r\nX-Big: "] + [piece] * 32  # 2 MiB and counting
    async with serving(sending_then_hanging(*parts)) as server:
        client = client_for(server)
        try:
            with pytest.raises(RemoteProtocolError, match="larger than"):
                await post(client)
        finally:
            await client.aclose()


async def test_endless_interim_responses_are_refused_at_the_head_cap() -> None:
    """1xx answers never end a request: an upstream sending them forever is cut at the cap
    (each one used to start the count again, so the wait had no bound)."""
    interim = b"HTTP/1.1 100 Continue\r\nX-Pad: " + b"p" * 1000 + b"\r\n\r\n"
    count = 2 * MAX_HEAD_BYTES // len(interim)
    async with serving(sending_then_hanging(*[interim] * count)) as server:
        client = client_for(server)
        try:
            with pytest.raises(RemoteProtocolError, match="larger than"):
                await post(client)
        finally:
            await client.aclose()


async def test_a_101_switching_protocols_is_a_broken_upstream() -> None:
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nzz"
    async with serving(sending_then_hanging(upgrade)) as server:
        client = client_for(server)
        try:
            with pytest.raises(RemoteProtocolError):
                await post(client)
        finally:
            await client.aclose()


async def test_the_start_of_a_second_response_after_the_answer_is_not_kept_for_reuse() -> None:
    """An upstream that writes more than its answer (here: the start of another response in
    the same write) leaves the connection's framing unknown: it is closed, and the next
    request goes on a fresh connection instead of reading the rest as its answer."""

    def script(server: Server) -> Script:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await server.read_request(r)
            if n > 1:
                w.write(OK)
                await w.drain()
                await r.read()
                return
            w.write(OK + b"HTTP/1.1 200 OK\r\nContent-Le")
            await w.drain()
            await server.read_request(r)  # a request sent on this connection again
            w.write(b"ngth: 6\r\n\r\nsmuggl")
            await w.drain()
            await r.read()

        return run

    async with serving(script) as server:
        client = client_for(server)
        try:
            assert await post(client) == b'{"ok":true}'
            assert await post(client) == b'{"ok":true}'
        finally:
            await client.aclose()
    assert server.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
    ],
    ids=["204", "304", "chunked-trailers", "100-continue"],
)
async def test_bodiless_and_trailered_answers_keep_the_connection_in_step(answer: bytes) -> None:
    """Three requests on one connection after each odd-but-valid answer: each gets its own."""
    async with serving(answering(answer, OK, OK)) as server:
        client = client_for(server)
        try:
            first = await client.send(client.build("POST", "x", {}, b"{}"))
            assert first.status_code in (200, 204, 304)
            assert await post(client) == b'{"ok":true}'
            assert await post(client) == b'{"ok":true}'
        finally:
            await client.aclose()
    assert server.connections == 1


async def test_cancelled_and_failed_requests_give_their_pool_slots_back() -> None:
    """With one connection allowed: requests cancelled while waiting for the head, in the
    middle of a body, while waiting in line for the pool, and requests that failed, each
    leave the slot free, so the next request still gets through (no 503 busy for ever)."""
    head_then_part = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart"

    def script(server: Server) -> Script:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            while True:
                body = await server.read_request(r)
                if body == b"hang":
                    await r.read()
                    return
                if body == b"half":
                    w.write(head_then_part)
                    await w.drain()
                    await r.read()
                    return
                if body == b"broken":
                    w.write(b"NOT HTTP\r\n\r\n")
                    await w.drain()
                    return
                w.write(OK)
                await w.drain()

        return run

    async with serving(script) as server:
        client = client_for(server, max_connections=1)
        try:
            for body in (b"hang", b"half"):
                arrived = len(server.requests)
                task = asyncio.create_task(post(client, body))
                await until(lambda n=arrived: len(server.requests) > n, what="the request")
                # and a second one waiting in line for the only connection
                waiting = asyncio.create_task(post(client, b"{}"))
                await until(lambda: client.waiting == 1, what="one in line")
                waiting.cancel()
                task.cancel()
                for t in (task, waiting):
                    with pytest.raises(asyncio.CancelledError):
                        await t
            with pytest.raises(RemoteProtocolError):
                await post(client, b"broken")
            assert client.waiting == 0
            assert await post(client) == b'{"ok":true}'
            assert client.connections == 1
        finally:
            await client.aclose()
