"""A fast OpenAI-wire upstream for the benchmarks: raw HTTP/1.1 on asyncio (uvloop if present).

    python -m bench._upstream --port 0 [--latency-ms 0] [--chunks 16] [--gap-ms 1]
                              [--slow-chunks 600] [--slow-gap-ms 1000]

Prints ``http://127.0.0.1:PORT/v1`` once it listens and runs until SIGTERM/SIGINT (or until
the process that started it dies).
It answers ``GET /v1/models`` and ``POST /v1/chat/completions``: JSON with ``usage``, or SSE
(``stream: true``): a role chunk, ``--chunks`` word chunks ``--gap-ms`` apart, a finish chunk,
a usage chunk and ``data: [DONE]``. The model ``bench-slow`` streams ``--slow-chunks`` chunks
``--slow-gap-ms`` apart (for holding many streams open). ``--latency-ms`` delays every answer
(and a stream's first chunk). Keep-alive; no pipelining; kept small so it is never the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import Any, cast

from bench._common import die_with_parent, run

SLOW_MODEL = "bench-slow"
MODELS = ("bench-chat", SLOW_MODEL)
_MODELS_BODY = json.dumps(
    {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "bench"} for m in MODELS]}
).encode()
_USAGE = {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}


def _head(status: int, content_type: str, length: int | None) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode()
    )


def _json_answer(status: int, body: bytes) -> bytes:
    return _head(status, "application/json", len(body)) + body


def _chat_body(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "one two three four"},
                    "finish_reason": "stop",
                }
            ],
            "usage": _USAGE,
        }
    ).encode()


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return _sse(json.dumps(event).encode())


def _sse(data: bytes) -> bytes:
    payload = b"data: " + data + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Settings:
    """What the server answers with (from the command line)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.latency = args.latency_ms / 1000
        self.chunks: int = args.chunks
        self.gap = args.gap_ms / 1000
        self.slow_chunks: int = args.slow_chunks
        self.slow_gap = args.slow_gap_ms / 1000


class Upstream(asyncio.Protocol):
    """One client connection: parse a request, answer it, repeat (keep-alive)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None:
            self._next()

    def _next(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4 : end + 4 + length]
        self.buffer = self.buffer[end + 4 + length :]
        method, path = head[0].split(" ")[:2]
        self._answer(method, path, body)

    def _answer(self, method: str, path: str, body: bytes) -> None:
        assert self.transport is not None
        if method == "GET" and path.endswith("/models"):
            self.transport.write(_json_answer(200, _MODELS_BODY))
            return self._next()
        if method != "POST" or not path.endswith("/chat/completions"):
            self.transport.write(_json_answer(404, b'{"error": {"message": "not found"}}'))
            return self._next()
        try:
            request = json.loads(body)
            model = str(request.get("model", ""))
            stream = bool(request.get("stream"))
        except (ValueError, AttributeError):
            self.transport.write(_json_answer(400, b'{"error": {"message": "bad json"}}'))
            return self._next()
        if not stream and not self.settings.latency:
            self.transport.write(_json_answer(200, _chat_body(model)))
            return self._next()
        self.task = asyncio.get_running_loop().create_task(self._slow(model, stream))

    async def _slow(self, model: str, stream: bool) -> None:
        try:
            if self.settings.latency:
                await asyncio.sleep(self.settings.latency)
            if stream:
                await self._stream(model)
            elif self.transport is not None:
                self.transport.write(_json_answer(200, _chat_body(model)))
        finally:
            self.task = None
        if self.transport is not None:
            self._next()

    async def _stream(self, model: str) -> None:
        slow = model == SLOW_MODEL
        chunks = self.settings.slow_chunks if slow else self.settings.chunks
        gap = self.settings.slow_gap if slow else self.settings.gap
        if self.transport is None:
            return
        self.transport.write(
            _head(200, "text/event-stream", None)
            + _chunk(model, {"role": "assistant", "content": ""})
        )
        for i in range(chunks):
            if gap:
                await asyncio.sleep(gap)
            if self.transport is None:
                return
            self.transport.write(_chunk(model, {"content": f"w{i} "}))
        if self.transport is None:
            return
        usage = {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks}
        tail = _chunk(model, {}, "stop")
        last = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "model": model}
        tail += _sse(json.dumps({**last, "choices": [], "usage": usage}).encode())
        tail += _sse(b"[DONE]") + b"0\r\n\r\n"
        self.transport.write(tail)


async def serve(args: argparse.Namespace) -> None:
    """Listen, print the base URL, serve until SIGTERM/SIGINT arrives."""
    settings = Settings(args)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Upstream(settings), "127.0.0.1", args.port, backlog=4096
    )
    port = server.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{port}/v1", flush=True)
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--gap-ms", type=float, default=1.0)
    parser.add_argument("--slow-chunks", type=int, default=600)
    parser.add_argument("--slow-gap-ms", type=float, default=1000.0)
    args = parser.parse_args()
    die_with_parent()
    run(serve(args))


if __name__ == "__main__":
    main()
