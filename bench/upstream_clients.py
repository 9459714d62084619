"""CPU per request and requests/s of HTTP clients against one fast local upstream.

    .venv/bin/python bench/upstream_clients.py [--requests N] [--concurrency 1,32] [--streams N]

Compares the node's own upstream client (``nodeprov.upstream_http``) with httpx (its
transport tuned: no proxy look-up, TCP_NODELAY, a pool as large as the concurrency) and
aiohttp's client. Each client runs in a process of its own (pinned to CPU 0 when there are
two), sending the same chat request as JSON and parsing the JSON answer, over kept-alive
connections, to a minimal asyncio HTTP/1.1 server in another process (pinned to CPU 1).
CPU per request is the client process's CPU time over the requests; every client is
measured in the same run, so the numbers compare even on a busy machine. Then each client
opens ``--streams`` streams at once (the server holds them all open until the last one
arrived): the RSS each open stream adds, and errors. Not run by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BODY = {
    "model": "fake-chat",
    "messages": [{"role": "user", "content": "hello there, how are you?"}],
    "max_tokens": 16,
}
ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "fake-chat",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "This is a reply of a few words."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17},
    }
).encode()
CLIENTS = ("nodeprov", "aiohttp", "httpx")


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu})


# --- the upstream: answers every request with the same JSON, keep-alive --------------------


# Streams: the server sends a first SSE chunk, then holds every stream until ``N`` are open
# (``POST /v1/stream/N``), then sends the rest: the client measures with all N open.
FIRST = b'data: {"choices":[{"delta":{"content":"first"}}]}\n\n'
REST = b'data: {"choices":[{"delta":{"content":" rest"}}]}\n\ndata: [DONE]\n\n'
_held: list[Any] = []


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Server(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buffer = b""

    def _stream(self, wanted: int) -> None:
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + _chunk(FIRST)
        )
        _held.append(self.transport)
        if len(_held) >= wanted:
            for transport in _held:
                transport.write(_chunk(REST) + b"0\r\n\r\n")
            _held.clear()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower() + b"\r\n"
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length :]
            path = head.split(b" ", 2)[1]
            if path.startswith(b"/v1/stream/"):
                self._stream(int(path.rsplit(b"/", 1)[1]))
                continue
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                % len(ANSWER)
                + ANSWER
            )


async def _serve() -> None:
    _pin(1)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = await loop.create_server(_Server, sock=sock, backlog=1024)
    print(sock.getsockname()[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    server.close()


# --- the clients -----------------------------------------------------------------------


async def _drive(post: Any, requests: int, concurrency: int) -> dict[str, float]:
    await post()  # warm up: connect once
    per = requests // concurrency

    async def worker() -> None:
        for _ in range(per):
            data = await post()
            assert data["usage"]["total_tokens"] == 17

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done = per * concurrency
    return {"cpu_ms": cpu / done * 1000, "rps": done / wall}


async def _run_client(name: str, url: str, requests: int, concurrency: int) -> dict[str, float]:
    if name == "nodeprov":
        from nodeprov.upstream_http import HttpClient, Timeouts

        client = HttpClient(
            url,
            headers={"Authorization": "Bearer k"},
            timeouts=Timeouts(connect=10, read=30, write=30, pool=30),
            max_connections=concurrency,
        )
        headers = {"Content-Type": "application/json"}

        async def post_ours() -> Any:
            request = client.build("POST", "chat/completions", headers, json.dumps(BODY).encode())
            return (await client.send(request)).json()

        try:
            return await _drive(post_ours, requests, concurrency)
        finally:
            await client.aclose()
    if name == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(
            base_url=url, connector=connector, headers={"Authorization": "Bearer k"}
        ) as session:

            async def post_aiohttp() -> Any:
                async with session.post("chat/completions", json=BODY) as response:
                    return await response.json()

            return await _drive(post_aiohttp, requests, concurrency)
    import httpx

    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    )
    async with httpx.AsyncClient(
        base_url=url, transport=transport, trust_env=False, headers={"Authorization": "Bearer k"}
    ) as hclient:

        async def post_httpx() -> Any:
            return (await hclient.post("chat/completions", json=BODY)).json()

        return await _drive(post_httpx, requests, concurrency)


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _streams(name: str, url: str, count: int) -> dict[str, float]:
    """Open ``count`` streams at once; RSS per open stream (KiB) and errors."""
    path = f"stream/{count}"
    firsts = 0
    all_open = asyncio.Event()
    peak: list[int] = []

    def opened() -> None:
        nonlocal firsts
        firsts += 1
        if firsts == count:
            peak.append(_rss_kib())
            all_open.set()

    async def check(body: bytes) -> None:
        assert body.endswith(b"data: [DONE]\n\n"), body

    if name == "nodeprov":
        from nodeprov.upstream_http import HttpClient, Timeouts

        client = HttpClient(
            url,
            headers={},
            timeouts=Timeouts(connect=30, read=60, write=30, pool=30),
            max_connections=count,
        )

        async def one_ours() -> None:
            response = await client.send(client.build("POST", path, {}, b"{}"), stream=True)
            got = b""
            async for chunk in response.aiter_bytes():
                if not got:
                    opened()
                got += chunk
            await check(got)

        one: Any = one_ours
        closing: Any = client.aclose
    elif name == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            base_url=url, connector=aiohttp.TCPConnector(limit=count), read_bufsize=2**16
        )

        async def one_aiohttp() -> None:
            async with session.post(path, data=b"{}") as response:
                got = b""
                async for chunk in response.content.iter_any():
                    if not got:
                        opened()
                    got += chunk
                await check(got)

        one, closing = one_aiohttp, session.close
    else:
        import httpx

        hclient = httpx.AsyncClient(
            base_url=url,
            trust_env=False,
            timeout=60,
            limits=httpx.Limits(max_connections=count, max_keepalive_connections=count),
        )

        async def one_httpx() -> None:
            async with hclient.stream("POST", path, content=b"{}") as response:
                got = b""
                async for chunk in response.aiter_bytes():
                    if not got:
                        opened()
                    got += chunk
                await check(got)

        one, closing = one_httpx, hclient.aclose
    base = _rss_kib()
    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    await closing()
    errors = sum(isinstance(r, BaseException) for r in results)
    per = (peak[0] - base) / count if peak else float("nan")
    return {"kib_per_stream": per, "errors": errors}


def _measure(name: str, url: str, requests: int, concurrency: int) -> dict[str, float]:
    args = ["--client", name, "--url", url, "--requests", str(requests)]
    out = subprocess.run(
        [sys.executable, __file__, *args, "--concurrency", str(concurrency)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def _measure_streams(name: str, url: str, count: int) -> dict[str, float]:
    args = ["--client", name, "--url", url, "--requests", "0", "--streams", str(count)]
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        return {"kib_per_stream": float("nan"), "errors": count}
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per client")
    parser.add_argument("--streams", type=int, default=1000, help="open at once (0: skip)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve())
        return
    if args.client:
        _pin(0)
        if args.streams and args.requests == 0:
            result = asyncio.run(_streams(args.client, args.url, args.streams))
        else:
            result = asyncio.run(
                _run_client(args.client, args.url, args.requests, int(args.concurrency))
            )
        print(json.dumps(result))
        return
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/v1/"
        print(f"{args.requests} requests per run, best of {args.rounds} alternating rounds")
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            best: dict[str, dict[str, float]] = {}
            for _ in range(args.rounds):
                for name in CLIENTS:
                    r = _measure(name, url, args.requests, concurrency)
                    if name not in best or r["cpu_ms"] < best[name]["cpu_ms"]:
                        best[name] = r
            base = best["httpx"]["cpu_ms"]
            for name in CLIENTS:
                r = best[name]
                print(
                    f"concurrency {concurrency:>3}  {name:<9} {r['cpu_ms']:6.3f} ms CPU/request"
                    f"  {r['rps']:7.0f} req/s  ({base / r['cpu_ms']:4.1f}x less CPU than httpx)"
                )
        if args.streams:
            for name in CLIENTS:
                r = _measure_streams(name, url, args.streams)
                print(
                    f"{args.streams} open streams  {name:<9} {r['kib_per_stream']:6.1f} KiB RSS"
                    f" per stream  {int(r['errors'])} errors"
                )
    finally:
        if server.stdin:
            server.stdin.close()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
