"""The node's upstream HTTP client against a scripted HTTP/1.1 server on loopback.

Each test's server runs a script per connection (read a request, answer with chosen bytes,
close or not), so keep-alive reuse, a connection the server closed, framing and caps are
exercised exactly; order, never a stopwatch, proves what arrives when.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeprov.config import Upstream
from nodeprov.errors import UpstreamError, UpstreamUnavailable
from nodeprov.upstream import Upstreams, iter_stream
from nodeprov.upstream_http import HttpClient, Timeouts
from nodeprov.upstream_wire import RemoteProtocolError
from tests.support.waiting import until

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
TIMEOUTS = Timeouts(connect=10, read=30, write=30, pool=30)


class Server:
    """Counts connections and requests; ``script(reader, writer, connection_number)``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return body


@asynccontextmanager
async def serving(script: Callable[[Server], Script]) -> AsyncIterator[Server]:
    server = Server(lambda r, w, n: script(server)(r, w, n))
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}/v1"
    async with listener:
        yield server


def client_for(server: Server, **kw: float) -> HttpClient:
    return HttpClient(server.url, headers={}, timeouts=TIMEOUTS, max_connections=8, **kw)


async def post(client: HttpClient, body: bytes = b"{}") -> bytes:
    response = await client.send(client.build("POST", "chat/completions", {}, body))
    assert response.status_code == 200
    return response.content


def answer_then(after: str) -> Callable[[Server], Script]:
    """Answer the first request of each connection; then close ("close"), or drop the
    second request unanswered ("drop-second")."""

    def script(server: Server) -> Script:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await server.read_request(r)
            w.write(OK)
            await w.drain()
            if after == "drop-second":
                await server.read_request(r)  # read it, then close without a byte of answer
            return

        return run

    return script


async def test_a_kept_alive_connection_that_dies_unanswered_is_retried_once_on_a_fresh_one() -> (
    None
):
    async with serving(answer_then("drop-second")) as server:
        client = client_for(server)
        try:
            assert await post(client) == b'{"ok":true}'
            assert await post(client) == b'{"ok":true}'  # the reused connection dropped it
        finally:
            await client.aclose()
    assert server.connections == 2
    assert len(server.requests) == 3


async def test_a_connection_the_server_closed_while_idle_leaves_the_pool() -> None:
    async with serving(answer_then("close")) as server:
        client = client_for(server)
        try:
            await post(client)
            await until(lambda: client.connections == 0, what="the closed connection left")
            assert await post(client) == b'{"ok":true}'
        finally:
            await client.aclose()
    assert (server.connections, len(server.requests)) == (2, 2)


async def test_a_fresh_connection_closed_unanswered_is_an_upstream_error_not_a_retry() -> None:
    def script(server: Server) -> Script:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await server.read_request(r)

        return run

    async with serving(script) as server:
        up = Upstream(name="s", base_url=server.url, models=("m",))
        async with Upstreams([up], lambda _m: True) as ups:
            with pytest.raises(UpstreamError) as info:
                await ups.send(ups.route("m"), "POST", "chat/completions", json={})
    assert info.value.status == 502 and "broke the connection" in info.value.message
    assert len(server.requests) == 1


def answering(*responses: bytes, keep_open: bool = True) -> Callable[[Server], Script]:
    """Answer each request on a connection with the next of ``responses`` (then hang)."""

    def script(server: Server) -> Script:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            for response in responses:
                await server.read_request(r)
                w.write(response)
                await w.drain()
            if keep_open:
                await r.read()  # until the client closes

        return run

    return script


async def test_connection_close_is_honoured() -> None:
    closing = OK.replace(b"Content-Length", b"Connection: close\r\nContent-Length")
    async with serving(answering(closing)) as server:
        client = client_for(server)
        try:
            await post(client)
            await post(client)
        finally:
            await client.aclose()
    assert server.connections == 2


async def test_keep_alive_reuses_one_connection_and_idle_expiry_ends_it() -> None:
    async with serving(answering(OK, OK, OK)) as server:
        client = client_for(server)
        try:
            for _ in range(3):
                await post(client)
        finally:
            await client.aclose()
        assert server.connections == 1
        expiring = client_for(server, keepalive_expiry=0)
        try:
            await post(expiring)
            await post(expiring)
        finally:
            await expiring.aclose()
        assert server.connections == 3


@pytest.mark.parametrize(
    "response",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"ok":true}',
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4\r\n{"ok\r\n7\r\n":true}\r\n0\r\n\r\n',
    ],
    ids=["content-length", "chunked"],
)
async def test_framed_bodies_are_read_whole(response: bytes) -> None:
    async with serving(answering(response, response)) as server:
        client = client_for(server)
        try:
            assert await post(client) == b'{"ok":true}'
            assert await post(client) == b'{"ok":true}'
        finally:
            await client.aclose()
    assert server.connections == 1


async def test_a_body_until_close_is_read_whole() -> None:
    body = b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100_000
    async with serving(answering(body, keep_open=False)) as server:
        client = client_for(server)
        try:
            assert await post(client) == b"x" * 100_000
            assert client.connections == 0  # never reused: its end was the close
        finally:
            await client.aclose()


async def test_stream_chunks_arrive_as_they_are_sent() -> None:
    go_on = asyncio.Event()

    def script(server: Server) -> Script:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            await server.read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")
            await w.drain()
            await go_on.wait()  # the client has chunk 1 before chunk 2 exists
            w.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
            await w.drain()
            await r.read()

        return run

    async with serving(script) as server:
        client = client_for(server)
        try:
            request = client.build("POST", "chat/completions", {}, b"{}")
            response = await client.send(request, stream=True)
            chunks = response.aiter_bytes()
            assert await anext(chunks) == b"data: 1"
            go_on.set()
            assert [c async for c in chunks] == [b"data: 2"]
            assert client.connections == 1  # ended cleanly: kept for reuse
        finally:
            await client.aclose()


async def test_a_huge_response_head_is_refused_as_a_broken_upstream() -> None:
    huge = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n"
    async with serving(answering(huge)) as server:
        client = client_for(server)
        try:
            with pytest.raises(RemoteProtocolError, match="larger than"):
                await post(client)
        finally:
            await client.aclose()


async def test_an_error_body_is_read_only_up_to_its_cap() -> None:
    """A 500 announcing 100 MB sends 100 kB and then nothing: the error is still reported."""
    head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100000000\r\n\r\n"
    async with serving(answering(head + b'{"error": {"message": "boom"}}' + b" " * 100_000)) as s:
        up = Upstream(name="s", base_url=s.url, models=("m",), timeout_seconds=Decimal(300))
        async with Upstreams([up], lambda _m: True) as ups:
            with pytest.raises(UpstreamError) as info:
                await ups.send(ups.route("m"), "POST", "chat/completions", json={}, stream=True)
    assert "500" in info.value.message and "boom" in info.value.message


async def test_a_large_request_body_is_sent_whole() -> None:
    def script(server: Server) -> Script:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
            body = await server.read_request(r)
            text = str(len(body)).encode()
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
            await w.drain()
            await r.read()

        return run

    async with serving(script) as server:
        client = client_for(server)
        try:
            assert await post(client, b"a" * 5_000_000) == b"5000000"
        finally:
            await client.aclose()


async def test_a_stream_cut_mid_body_raises_while_iterating() -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"
    async with serving(answering(cut, keep_open=False)) as server:
        up = Upstream(name="s", base_url=server.url, models=("m",))
        async with Upstreams([up], lambda _m: True) as ups:
            response = await ups.send(ups.route("m"), "POST", "x", json={}, stream=True)
            got = []
            with pytest.raises(UpstreamError, match="broke the connection"):
                async for chunk in iter_stream(response, "s"):
                    got.append(chunk)
            await response.aclose()
    assert b"".join(got) == b"only part"


def self_signed(tmp_path: Path, host: str) -> tuple[Path, Path]:
    """A certificate for ``host`` signed by its own key (cert and key files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_https_with_sni_and_certificate_checks(tmp_path: Path) -> None:
    """An https upstream is reached with SNI and its certificate checked: trusted, the
    request goes through; untrusted (the default context), it is unreachable."""
    cert, key = self_signed(tmp_path, "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    names: list[str | None] = []

    def record(_sock: object, name: str | None, _ctx: object) -> None:
        names.append(name)

    server_ctx.sni_callback = record  # type: ignore[assignment]
    tls_server = Server(lambda r, w, n: answering(OK, OK)(tls_server)(r, w, n))
    listener = await asyncio.start_server(tls_server.handle, "127.0.0.1", 0, ssl=server_ctx)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        trusting = ssl.create_default_context(cafile=str(cert))
        client = HttpClient(
            f"https://localhost:{port}/v1",
            headers={},
            timeouts=TIMEOUTS,
            max_connections=2,
            ssl_context=trusting,
        )
        try:
            assert await post(client) == b'{"ok":true}'
            assert await post(client) == b'{"ok":true}'
        finally:
            await client.aclose()
        assert names == ["localhost"] and tls_server.connections == 1
        up = Upstream(name="s", base_url=f"https://localhost:{port}/v1", models=("m",))
        async with Upstreams([up], lambda _m: True) as ups:
            with pytest.raises(UpstreamUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await ups.send(ups.route("m"), "POST", "chat/completions", json={})
