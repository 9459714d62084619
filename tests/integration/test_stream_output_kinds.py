"""Streams whose output is not ``content``: produced output is charged however it is named.

A client that reads the whole answer and hangs up before the usage chunk is charged for what
it was sent (prompt plus one token per output chunk), whichever delta field carried it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from nodeprov.http.app import bind, serve
from tests.support.http_node import Node, start_node
from tests.support.services import MintHandle


class DeltaUpstream:
    """An OpenAI-wire upstream that streams its output in a chosen ``delta`` field.

    It sends a role chunk, ``words`` output chunks, a finish chunk, then waits for
    ``gate`` before the usage chunk and ``[DONE]`` (a real upstream sends usage last).
    """

    def __init__(self, field: str, words: int = 40) -> None:
        self.field = field
        self.words = words
        self.gate = asyncio.Event()
        self.url = ""
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def delta(self, i: int) -> dict[str, Any]:
        if self.field == "function_call":
            return {"function_call": {"arguments": f'"w{i}" '}}
        if self.field == "audio":
            return {"audio": {"id": "a1", "data": "AAAA", "transcript": f"w{i} "}}
        return {self.field: f"w{i} "}

    async def chat(self, request: Request) -> StreamingResponse:
        body = await request.json()

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            data = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                    "model": body["model"], "choices": [choice], **extra}  # fmt: skip
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant"})
            for i in range(self.words):
                yield chunk(self.delta(i))
                await asyncio.sleep(0)
            yield chunk({}, "function_call" if self.field == "function_call" else "stop")
            await self.gate.wait()
            usage = {"prompt_tokens": 5, "completion_tokens": self.words, "total_tokens": 45}
            data = {"id": "c1", "object": "chat.completion.chunk", "created": 1,
                    "model": body["model"], "choices": [], "usage": usage}  # fmt: skip
            yield b"data: " + json.dumps(data).encode() + b"\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def start(self) -> DeltaUpstream:
        app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        # The socket already listens: connections wait in its backlog until serve runs.
        self._task = asyncio.create_task(serve(app, sock, self._stop))
        return self

    async def stop(self) -> None:
        self.gate.set()
        self._stop.set()
        if self._task is not None:
            await self._task


@pytest.mark.parametrize("field", ["function_call", "reasoning", "audio", "content"])
async def test_stream_output_outside_content_is_charged_when_client_leaves_before_usage(
    tmp_path: Path, mint: MintHandle, make_token: Any, field: str
) -> None:
    """Output is output whatever delta field carries it (legacy ``function_call``,
    ``reasoning`` as some servers name it, ``audio``): a client that reads the whole answer
    and hangs up before the usage chunk pays for what it was sent."""
    upstream = await DeltaUpstream(field).start()
    node: Node = await start_node(tmp_path, [mint.url], upstream)  # type: ignore[arg-type]
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(
                node.base + "/wallet/create", json={"cashu_token": await make_token(50)}
            )
            key = r.json()["api_key"]
            body = {
                "model": "fake-chat",
                "messages": [{"role": "user", "content": "call f"}],
                "max_tokens": 64,
                "stream": True,
            }
            if field == "function_call":
                body["functions"] = [{"name": "f", "parameters": {"type": "object"}}]
                body["function_call"] = {"name": "f"}
            received = 0
            async with http.stream(
                "POST", node.base + "/chat/completions", json=body,
                headers={"Authorization": f"Bearer {key}"},
            ) as stream:  # fmt: skip
                assert stream.status_code == 200
                async for line in stream.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    if choice["delta"].get(field):
                        received += 1
                    if choice["finish_reason"]:
                        break  # the whole answer is in; hang up before the usage chunk
        assert received == upstream.words
        await node.wait_idle()
        upstream.gate.set()
        account = await node.account(key)
        # The client got 40 output tokens; at the least the request fee and those tokens
        # are owed (1000 + 2 * prompt + 5 * 40 msat at the test price).
        assert account.total_spent_msat >= 1000 + 5 * upstream.words, account
        await node.core.assert_books_balance()
    finally:
        await node.stop()
        await upstream.stop()
