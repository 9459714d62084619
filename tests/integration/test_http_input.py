"""Hostile HTTP input: a clear 400/405 before anything is held, charged or swapped.

Each test checks the books after the bad request: the key's balance is intact, an
``X-Cashu`` token is still unspent at the mint, and the upstream was never called.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from nodeprov.config import HttpSection
from nodeprov.http.app import bind, serve
from tests.conftest import TokenMaker
from tests.support.fake_upstream import FakeUpstream
from tests.support.http_node import (  # noqa: F401  (fixtures)
    MAX_BODY,
    Node,
    node_fixture,
    upstream_fixture,
)
from tests.support.waiting import until

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def assert_400(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"type", "code", "message"}
    return dict(error)


async def new_key(node: Node, token: str) -> str:
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.post("/wallet/create", json={"cashu_token": token})
    assert r.status_code == 200, r.text
    return str(r.json()["api_key"])


async def chunked(data: bytes) -> AsyncIterator[bytes]:
    """A body without Content-Length (httpx sends it with Transfer-Encoding: chunked)."""
    for i in range(0, len(data), 7):
        yield data[i : i + 7]


async def test_deeply_nested_json_is_400_and_charges_nothing(
    node: Node, make_token: TokenMaker, upstream: FakeUpstream
) -> None:
    key = await new_key(node, await make_token(20))
    token = await make_token(20)
    calls = len(upstream.requests)
    nested = b"[" * 3000 + b"]" * 3000
    nested_object = b'{"model": "fake-chat", "messages": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        for body in (nested, nested_object):
            for headers in ({"Authorization": f"Bearer {key}"}, {"X-Cashu": token}):
                r = await http.post(
                    "/chat/completions",
                    content=body,
                    headers={**headers, "Content-Type": "application/json"},
                )
                assert_400(r)
            r = await http.post(
                "/wallet/create", content=body, headers={"Content-Type": "application/json"}
            )
            assert_400(r)
    assert (await node.account(key)).balance_msat == 20_000
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}
    assert len(upstream.requests) == calls


async def test_deeply_nested_multipart_upload_is_400(node: Node, make_token: TokenMaker) -> None:
    token = await make_token(20)
    depth = 1100  # past the parser's recursion limit, within the test node's body limit
    body = b"".join(
        b"--%x\r\nContent-Type:multipart/x;boundary=%x\r\n\r\n" % (i, i + 1) for i in range(depth)
    )
    body += b"x\r\n" + b"".join(b"--%x--\r\n" % i for i in reversed(range(depth)))
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        r = await http.post(
            "/audio/transcriptions",
            content=body,
            headers={"Content-Type": "multipart/form-data; boundary=0", "X-Cashu": token},
        )
    assert_400(r)
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}


async def test_integers_out_of_range_are_400_and_take_no_token(
    node: Node, make_token: TokenMaker
) -> None:
    token = await make_token(10)
    key = await new_key(node, await make_token(20))
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        r = await http.post("/wallet/create", json={"cashu_token": token, "expires_at": 10**20})
        assert_400(r)
        r = await http.post("/wallet/create", params={"cashu_token": token, "expires_at": 10**20})
        assert_400(r)
        r = await http.post(
            "/wallet/lightning", json={"amount": 10**20}, headers={"Authorization": "Bearer x"}
        )
        assert_400(r)
        for field in ("max_tokens", "seed", "n"):
            r = await http.post("/chat/completions", json={**CHAT, field: 10**20}, headers=auth)
            assert_400(r)
        r = await http.post("/wallet/withdraw", json={"amount": 10**20}, headers=auth)
        assert_400(r)
        r = await http.post(
            "/chat/completions",
            content=b'{"model": "fake-chat", "temperature": 1e999, "messages": []}',
            headers={**auth, "Content-Type": "application/json"},
        )
        assert_400(r)
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}
    assert (await node.account(key)).balance_msat == 20_000


async def test_chunked_body_is_read_like_one_with_content_length(
    node: Node, make_token: TokenMaker
) -> None:
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        body = json.dumps({"cashu_token": await make_token(10)}).encode()
        r = await http.post(
            "/wallet/create", content=chunked(body), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 200, r.text
        key = r.json()["api_key"]
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        r = await http.post(
            "/wallet/withdraw", content=chunked(json.dumps({"amount": 3000}).encode()), headers=auth
        )
        assert r.status_code == 200, r.text
        assert r.json()["msats"] == 3000
        assert await make_token.redeem(r.json()["token"]) == 3
        r = await http.post(
            "/chat/completions", content=chunked(json.dumps(CHAT).encode()), headers=auth
        )
        assert r.status_code == 200, r.text
        r = await http.post("/wallet/withdraw", content=chunked(b"{not json"), headers=auth)
        assert_400(r)
    account = await node.account(key)
    assert 0 < account.balance_msat < 7000


@pytest.mark.parametrize(
    "path",
    [
        "/wallet/create",
        "/balance/create",
        "/wallet/topup",
        "/balance/topup",
        "/wallet/withdraw",
        "/wallet/refund",
        "/balance/refund",
        "/wallet/lightning",
        "/chat/completions",
    ],
)
async def test_state_changes_only_by_post(node: Node, make_token: TokenMaker, path: str) -> None:
    token = await make_token(5)
    key = await new_key(node, await make_token(5))
    params = {"cashu_token": token, "initial_balance_token": token, "amount": "1"}
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.get(path, params=params, headers={"Authorization": f"Bearer {key}"})
    error = assert_400(r, 405)
    assert error["code"] == "method_not_allowed"
    assert "POST" in r.headers["allow"]
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}
    assert (await node.account(key)).balance_msat == 5000


@pytest.mark.parametrize(
    "messages",
    [
        [1],
        ["hello"],
        [None],
        [{"content": "no role"}],
        [{"role": 7, "content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": {"text": "an object"}}],
        [{"role": "user", "content": [1, 2]}],
        [{"role": "user", "content": [{"text": "part without type"}]}],
        {"role": "user", "content": "not a list"},
    ],
)
async def test_malformed_messages_are_400_before_anything_is_held(
    node: Node, make_token: TokenMaker, upstream: FakeUpstream, messages: Any
) -> None:
    key = await new_key(node, await make_token(20))
    token = await make_token(20)
    calls = len(upstream.requests)
    client = openai.AsyncOpenAI(base_url=node.base, api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="fake-chat", messages=messages, max_tokens=8)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        for stream in (False, True):
            body = {**CHAT, "messages": messages, "stream": stream}
            assert_400(await http.post("/chat/completions", json=body, headers={"X-Cashu": token}))
    assert len(upstream.requests) == calls
    assert (await node.account(key)).balance_msat == 20_000
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/chat/completions", "stream", 1),
        ("/chat/completions", "stream", "true"),
        ("/chat/completions", "stream", [1]),
        ("/completions", "stream", "x"),
        ("/chat/completions", "stream_options", "include_usage"),
        ("/completions", "stream_options", [True]),
    ],
)
async def test_a_non_boolean_stream_flag_is_400_before_the_upstream(
    node: Node, make_token: TokenMaker, upstream: FakeUpstream, path: str, field: str, value: Any
) -> None:
    """``stream`` must be a boolean and ``stream_options`` an object: a truthy non-boolean
    would make the upstream stream while the node reads JSON (502, upstream work unpaid)."""
    key = await new_key(node, await make_token(20))
    token = await make_token(20)
    body: dict[str, Any] = {**CHAT, field: value}
    if path == "/completions":
        body = {"model": "fake-chat", "prompt": "hi", "max_tokens": 8, field: value}
    calls = len(upstream.requests)
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        error = assert_400(
            await http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
        )
        assert field in error["message"]
        assert_400(await http.post(path, json=body, headers={"X-Cashu": token}))
    assert len(upstream.requests) == calls
    assert (await node.account(key)).balance_msat == 20_000
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}


async def test_valid_message_shapes_still_pass(node: Node, make_token: TokenMaker) -> None:
    key = await new_key(node, await make_token(50))
    client = openai.AsyncOpenAI(base_url=node.base, api_key=key, max_retries=0)
    shapes: list[Any] = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [
            {"role": "user", "content": "call it"},
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
    ]
    for messages in shapes:
        answer = await client.chat.completions.create(
            model="fake-chat", messages=messages, max_tokens=8
        )
        assert answer.choices[0].message.content


def _half_open(url: str, partial: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    if partial:
        sock.sendall(partial)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """Block until the server closes ``sock`` (EOF or reset); False if it never does."""
    sock.settimeout(60)  # a guard against hanging the suite, not a timing assertion
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


async def test_header_timeout_closes_half_open_requests(node: Node) -> None:
    """Slowloris: partial request lines and headers are cut off, real requests still served;
    so is a request that announces a body and stops sending it."""
    assert node.config.http.header_timeout_seconds <= 2
    assert node.config.http.body_idle_timeout_seconds <= 2
    partials = [
        b"",
        b"GET /v1/info HT",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
        b"POST /v1/wallet/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{",
        b"POST /v1/wallet/withdraw HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\n{\r\n",
    ]
    socks = [_half_open(node.url, partials[i % len(partials)]) for i in range(60)]
    async with httpx.AsyncClient(base_url=node.base) as http:
        assert (await http.get("/info")).status_code == 200
    closed = await asyncio.gather(*(asyncio.to_thread(_closed_by_server, s) for s in socks))
    assert all(closed)
    # A keep-alive connection that starts a second request but never finishes it: cut too.
    sock = _half_open(node.url, b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(30)  # the node runs on this event loop: block in a thread
    assert (await asyncio.to_thread(sock.recv, 65536)).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /v1/info HTTP/1.1\r\nHos")
    assert await asyncio.to_thread(_closed_by_server, sock)


async def test_oversized_request_headers_are_431_and_the_connection_closes(node: Node) -> None:
    """Request line and headers past ``http.max_header_bytes`` are answered 431 and the
    connection is closed: the server never buffers an unbounded header block."""
    limit = node.config.http.max_header_bytes
    sock = _half_open(node.url, b"GET /v1/info HTTP/1.1\r\nHost: x\r\n")
    sock.settimeout(30)  # the node runs on this event loop: block in a thread
    # No blank line: the headers never end, they only grow past the limit.
    await asyncio.to_thread(sock.sendall, b"X-Filler: " + b"a" * limit + b"\r\n")
    answer = await asyncio.to_thread(sock.recv, 65536)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    assert await asyncio.to_thread(_closed_by_server, sock)
    # Headers just under the limit are still served.
    async with httpx.AsyncClient(base_url=node.base) as http:
        r = await http.get("/info", headers={"X-Filler": "a" * (limit - 1024)})
    assert r.status_code == 200


async def test_oversized_headers_that_end_in_one_chunk_are_431_too(node: Node) -> None:
    """A whole request whose header block (past the limit) arrives at once, blank line and
    all, is refused like one that trickles in: the limit counts header bytes, not chunks."""
    limit = node.config.http.max_header_bytes
    request = b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * limit + b"\r\n\r\n"
    sock = _half_open(node.url, request)
    sock.settimeout(30)
    answer = await asyncio.to_thread(sock.recv, 65536)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]


@pytest.mark.parametrize("trusted", [(), ("127.0.0.1",)])
async def test_forwarded_for_is_believed_only_from_configured_proxies(
    trusted: tuple[str, ...],
) -> None:
    """With no ``http.forwarded_allow_ips`` the client address is the peer's, whatever
    X-Forwarded-For says (else anyone on a same-host proxy could name any address, and
    rotate it past the admin throttle); a configured proxy's header is believed."""

    async def client_address(scope: Any, receive: Any, send: Any) -> None:
        body = scope["client"][0].encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    sock = bind("127.0.0.1", 0)
    stop = asyncio.Event()
    http = HttpSection(forwarded_allow_ips=trusted)
    server = asyncio.create_task(serve(client_address, sock, stop, http))
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        async with httpx.AsyncClient() as client:
            await until(lambda: _answers(client, url))
            r = await client.get(url, headers={"X-Forwarded-For": "192.0.2.7"})
        assert r.text == ("192.0.2.7" if trusted else "127.0.0.1")
    finally:
        stop.set()
        await server


async def _answers(client: httpx.AsyncClient, url: str) -> bool:
    try:
        await client.get(url)
    except httpx.TransportError:
        return False
    return True


async def test_a_trickled_body_is_cut_off_at_the_total_body_deadline() -> None:
    """A body sent a byte at a time never pauses for ``body_idle_timeout_seconds``; the
    whole-body deadline (``body_timeout_seconds``) still closes the connection."""

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    stop = asyncio.Event()
    http = HttpSection(body_idle_timeout_seconds=30, body_timeout_seconds=1)
    server = asyncio.create_task(serve(echo, sock, stop, http))

    def trickle() -> bool:
        """Send a 1000-byte body a byte per 0.1 s; True once the server closed on it."""
        conn = socket.create_connection(("127.0.0.1", port))
        try:
            conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            for _ in range(200):  # 20 s of body, far past the 1 s deadline
                conn.sendall(b"x")
                time.sleep(0.1)
                try:
                    if conn.recv(1, socket.MSG_DONTWAIT) == b"":
                        return True
                except BlockingIOError:
                    continue
            return False
        except OSError:
            return True  # reset by the server
        finally:
            conn.close()

    try:
        async with httpx.AsyncClient() as client:
            await until(lambda: _answers(client, f"http://127.0.0.1:{port}/"))
        assert await asyncio.to_thread(trickle)
    finally:
        stop.set()
        await server


def _multipart(*parts: tuple[str, bytes]) -> bytes:
    body = b""
    for name, value in parts:
        body += b'--b\r\nContent-Disposition: form-data; name="%s"' % name.encode()
        if name == "file":
            body += b'; filename="a.wav"\r\nContent-Type: audio/wav'
        body += b"\r\n\r\n" + value + b"\r\n"
    return body + b"--b--\r\n"


async def test_a_repeated_form_field_that_is_not_utf8_is_decoded_like_a_single_one(
    node: Node, make_token: TokenMaker
) -> None:
    """Repeated text fields are decoded like single ones, undecodable bytes replaced (it
    was a 500): ``language`` sent twice, once as raw bytes, is read and the job served."""
    token = await make_token(20)
    body = _multipart(
        ("file", b"x" * 2000),
        ("model", b"fake-whisper"),
        ("language", b"en"),
        ("language", b"\xff\xfe"),
    )
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        r = await http.post(
            "/audio/transcriptions",
            content=body,
            headers={"Content-Type": "multipart/form-data; boundary=b", "X-Cashu": token},
        )
    assert r.status_code == 200, r.text
    assert r.json()["text"] and r.headers["X-Cashu"]  # served, charged, change returned


async def test_a_lone_surrogate_in_refund_address_is_400_and_takes_no_token(
    node: Node, make_token: TokenMaker
) -> None:
    token = await make_token(20)
    raw = b'{"cashu_token": "%s", "refund_address": "a\\ud800@example.com"}' % token.encode()
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        r = await http.post(
            "/wallet/create", content=raw, headers={"Content-Type": "application/json"}
        )
        assert_400(r)
        # An address the refund could not reach is refused the same way.
        body = {"cashu_token": token, "refund_address": "user@localhost:x"}
        assert_400(await http.post("/wallet/create", json=body))
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}


LONE = "\ud800"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", {"model": f"nope{LONE}", "messages": MESSAGES}),
        ("/chat/completions", {**CHAT, "messages": [{"role": "user", "content": f"hi {LONE}"}]}),
        ("/chat/completions", {**CHAT, "messages": [{"role": "\udfff", "content": "hi"}]}),
        ("/chat/completions", {**CHAT, LONE: 1}),
        ("/embeddings", {"model": "fake-embed", "input": LONE}),
    ],
)
@pytest.mark.parametrize("escaped", [True, False])
async def test_lone_surrogates_in_json_are_400_before_anything_is_held(
    node: Node,
    make_token: TokenMaker,
    upstream: FakeUpstream,
    path: str,
    body: dict[str, Any],
    escaped: bool,
) -> None:
    """A lone UTF-16 surrogate (``\\ud800``, escaped or as raw bytes) is not text: 400."""
    token = await make_token(20)
    calls = len(upstream.requests)
    raw = json.dumps(body, ensure_ascii=escaped).encode("utf-8", "surrogatepass")
    headers = {"Content-Type": "application/json", "X-Cashu": token}
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        r = await http.post(path, content=raw, headers=headers)
    assert_400(r)
    assert len(upstream.requests) == calls
    assert set(await make_token.proof_states(token)) == {"UNSPENT"}
    # A surrogate pair (an emoji, escaped) is text and still served.
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        ok = b'{"model": "fake-embed", "input": "\\ud83d\\ude00"}'
        r = await http.post(
            "/embeddings",
            content=ok,
            headers={"Content-Type": "application/json", "X-Cashu": token},
        )
    assert r.status_code == 200, r.text


async def test_large_bodies_on_a_kept_alive_connection_are_not_counted_as_headers(
    node: Node, make_token: TokenMaker
) -> None:
    """Only header bytes count toward ``http.max_header_bytes``: a body larger than it,
    arriving in big chunks (and refused 413 unread), never turns into a 431."""
    limit = node.config.http.max_header_bytes
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (limit + MAX_BODY)}]}
    async with httpx.AsyncClient(base_url=node.base, timeout=30) as http:
        for _ in range(3):  # the same connection, again and again
            assert (await http.post("/chat/completions", json=big)).status_code == 413
            assert (await http.get("/info")).status_code == 200
