"""The demo upstream: a tiny OpenAI-compatible server with canned answers, for ``--dev`` only.

It never calls out. Every reply starts with ``[demo]``, responses carry ``X-Demo-Upstream: 1``
and ``system_fingerprint: "nodeprov-demo"``, and models are ``owned_by: "nodeprov-demo"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import nodeprov.devstack.openai_wire as wire

log = logging.getLogger(__name__)

OWNER = "nodeprov-demo"
HEADERS = {"X-Demo-Upstream": "1"}
# Canned answers; one is picked from the hash of the prompt, so the same prompt gets the same one.
ANSWERS = (
    "[demo] Hello from the nodeprov demo upstream. This is a canned answer, not a real model:"
    " it proves the payment path works end to end.",
    "[demo] Canned reply: your sats paid for this sentence. Point [[upstreams]] at a real"
    " OpenAI-compatible server to sell real answers.",
    "[demo] This node is running its embedded dev stack: a FakeWallet mint, a local relay and"
    " this demo upstream. No external service was called.",
)


def answer_for(body: dict[str, Any], chat: bool) -> tuple[str, ...]:
    """The canned answer's words for a chat or completions body (deterministic)."""
    prompt = body.get("messages") if chat else body.get("prompt")
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True, default=str).encode()).digest()
    return tuple(ANSWERS[digest[0] % len(ANSWERS)].split())


class DemoUpstream:
    """The demo server's routes; ``serve`` runs it on a bound socket until ``stop``."""

    def __init__(self, models: Sequence[str]) -> None:
        self.models = tuple(dict.fromkeys([*models, "demo-embed"]))
        self._seq = 0
        post = ["POST"]
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=post),
                Route("/v1/completions", self._completions, methods=post),
                Route("/v1/embeddings", self._embeddings, methods=post),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    async def _json(self, request: Request) -> dict[str, Any] | Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return wire.error_response(
                400, "We could not parse the JSON body of your request.", "invalid_request_error"
            )
        return body

    async def _text(self, request: Request, chat: bool) -> Response:
        body = await self._json(request)
        if isinstance(body, Response):
            return body
        key = "messages" if chat else "prompt"
        if body.get(key) is None:
            return wire.error_response(
                400, f"Missing required parameter: '{key}'.", "invalid_request_error"
            )
        full = answer_for(body, chat)
        usage = wire.usage_for(body, "chat" if chat else "completions", len(full))
        words = full[: usage["completion_tokens"]]
        finish = "length" if len(words) < len(full) else "stop"
        self._seq += 1
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-demo-{self._seq}",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "system_fingerprint": OWNER,
        }
        log.info(
            "demo upstream: canned %s answer for %s (%d prompt + %d completion tokens)",
            "streamed" if body.get("stream") else "non-streamed",
            head["model"],
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            events = wire.stream_events(head, chat, words, finish, usage if include else None)
            return StreamingResponse(_drip(events), media_type="text/event-stream", headers=HEADERS)
        out = wire.completion_body(head, chat, " ".join(words), finish, usage)
        return JSONResponse(out, headers=HEADERS)

    async def _chat(self, request: Request) -> Response:
        return await self._text(request, chat=True)

    async def _completions(self, request: Request) -> Response:
        return await self._text(request, chat=False)

    async def _embeddings(self, request: Request) -> Response:
        body = await self._json(request)
        if isinstance(body, Response):
            return body
        usage = wire.usage_for(body, "embeddings", 0)
        return JSONResponse(wire.embeddings_body(body, usage), headers=HEADERS)

    async def _models(self, request: Request) -> Response:
        return JSONResponse(wire.models_list(self.models, OWNER), headers=HEADERS)


async def _drip(events: list[tuple[bool, bytes]]) -> AsyncIterator[bytes]:
    for is_word, event in events:
        if is_word:
            await asyncio.sleep(0.02)  # a visible stream, still fast
        yield event
    yield wire.DONE


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (raises OSError when the port is taken)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # NODELAY
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class DemoServer:
    """The demo upstream served by uvicorn on ``sock`` in the daemon's event loop."""

    def __init__(self, upstream: DemoUpstream, sock: socket.socket) -> None:
        self.upstream = upstream
        self.sock = sock
        config = uvicorn.Config(
            upstream.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self.server = _Server(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Serve in a task; return once uvicorn says it started."""
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name="demo")
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self.task.done() or time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError("the demo upstream did not start")
            await asyncio.sleep(0.01)
        log.info("demo upstream (canned answers, not a real LLM) listening")

    async def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
        self.sock.close()
