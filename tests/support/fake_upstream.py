"""A real OpenAI-compatible HTTP server: the test suite's only stand-in (for the upstream LLM).

Starlette + uvicorn on 127.0.0.1 (a socket bound to port 0) on its own event loop in a daemon
thread, so it keeps answering while a test blocks its loop (the sync openai SDK).

    with FakeUpstream() as up:          # or up = FakeUpstream().start(); ...; up.stop()
        up.url                          # "http://127.0.0.1:PORT/v1"
        up.last_request.headers         # what reached the "upstream" (lowercase header names)

Behaviour: ``up.behaviour`` (a :class:`Behaviour`) is the server default; a request overrides it
with switches in its model name, ``+``-separated parts matched whole (``"m+drip-0.2+drop-3"``):

    fail-NNN   answer status NNN with an OpenAI error body (429 adds ``Retry-After: 1``)
    slow-S     wait S seconds before answering          drip-S   wait S s before each word chunk
    hang       never answer (until the server stops)    nousage  no ``usage`` anywhere
    held       wait while the gate is closed: ``up.close_gate()`` ... ``up.open_gate()``;
               ``up.held_arrivals`` counts the requests that reached the closed gate, so a
               test can wait until its request is inside the upstream call (no sleeps)
    drop-K     stream: cut the connection after K ``data:`` events (no terminating chunk)
    stall-K    stream: after K ``data:`` events send nothing more, keep the connection open
    pause-K    stream: after K ``data:`` events wait until ``up.resume_paused()``, then go on
    earlyusage stream: a usage chunk reporting 0 completion tokens right after the role chunk,
               and no usage chunk at the end (an upstream that reports usage early)
    jsononly   audio: only ``json`` and ``text`` answers; other formats get 400 (as some
               transcription models answer)

Usage rule (exact, see :func:`expected_usage`): words = ``len(text.split())``.
chat: prompt_tokens = sum over messages of (3 + words of its text; text parts of a list count,
other parts 0); completions: words of the prompt (a list: summed); embeddings: words per input
(token arrays: their length). completion_tokens = min(limit, 16) with limit =
``max_completion_tokens`` or ``max_tokens`` or 16; the reply is the first completion_tokens
words of :data:`REPLY_WORDS` (finish_reason "length" if limit < 16). A stream sends a role
chunk, one chunk per word, a finish chunk, and (``stream_options.include_usage``) a usage chunk
with empty choices, then ``data: [DONE]``. Audio: duration = bytes / 32000 s (16 kHz 16-bit
mono PCM), see :func:`expected_duration`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from nodeprov.devstack.openai_wire import DONE, completion_body, embeddings_body, models_list, sse
from tests.support.fake_openai import (
    MAX_COMPLETION,
    PNG,
    REPLY_WORDS,
    SPEECH_TYPES,
    Behaviour,
    DropConnection,
    completion_limit,
    error_response,
    expected_duration,
    expected_text,
    expected_usage,
    fail_response,
    parse_multipart,
    speech_audio,
    stream_events,
)

__all__ = [
    "REPLY_WORDS",
    "Behaviour",
    "FakeUpstream",
    "RecordedRequest",
    "expected_duration",
    "expected_text",
    "expected_usage",
]

LOOPBACK = "127.0.0.1"


@dataclass
class RecordedRequest:
    """One request as the server saw it; ``finished_at`` is ``time.monotonic()`` at its end."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    finished_at: float | None = None


# ----------------------------------------------------------------------------- server


class FakeUpstream:
    """The fake upstream server; ``api_key`` set means requests must carry it as Bearer."""

    def __init__(
        self,
        models: tuple[str, ...] = (
            "fake-chat",
            "fake-embed",
            "fake-image",
            "fake-whisper",
            "fake-tts",
        ),
        behaviour: Behaviour | None = None,
        api_key: str | None = None,
        model_list: list[dict[str, Any]] | None = None,
    ) -> None:
        self.models = models
        self.model_list = model_list  # served as GET /models' data instead of ``models``
        self.behaviour = behaviour or Behaviour()
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.port = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._server: uvicorn.Server | None = None
        self._seq = 0
        self._resume = threading.Event()
        self._gate: asyncio.Event | None = None  # set = open (the default)
        self.held_arrivals = 0
        post = ["POST"]
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=post),
                Route("/v1/completions", self._completions, methods=post),
                Route("/v1/embeddings", self._embeddings, methods=post),
                Route("/v1/images/generations", self._images, methods=post),
                Route("/v1/audio/transcriptions", self._transcribe, methods=post),
                Route("/v1/audio/translations", self._transcribe, methods=post),
                Route("/v1/audio/speech", self._speech, methods=post),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/files/{name}", self._file, methods=["GET"]),
            ]
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    @property
    def last_request(self) -> RecordedRequest:
        return self.requests[-1]

    # -------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> FakeUpstream:
        if self._thread is not None:
            return self
        # IPPROTO_TCP so asyncio sets TCP_NODELAY (else ~40 ms per keep-alive response).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind((LOOPBACK, 0))
        self._sock, self.port = sock, sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="none",  # its own loop in its thread; never a process-wide loop policy
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.01)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()

    async def _serve(self) -> None:
        assert self._server is not None and self._sock is not None
        self._stopping = asyncio.Event()
        self._gate = asyncio.Event()
        self._gate.set()
        await self._server.serve(sockets=[self._sock])

    def stop(self) -> None:
        """Stop serving; hanging and stalled requests are released. Idempotent."""
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop may have closed already
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._thread = self._server = self._sock = self._loop = None

    def close_gate(self) -> None:
        """From now on ``held`` requests wait (until :meth:`open_gate` or the server stops)."""
        self._set_gate(False)

    def open_gate(self) -> None:
        """Let waiting and future ``held`` requests through. Idempotent."""
        self._set_gate(True)

    def _set_gate(self, is_open: bool) -> None:
        assert self._loop is not None and self._gate is not None, "server not started"
        gate = self._gate

        async def flip() -> None:
            if is_open:
                gate.set()
            else:
                gate.clear()

        # Synchronous: the gate is in its new state when this returns.
        asyncio.run_coroutine_threadsafe(flip(), self._loop).result(10)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def resume_paused(self) -> None:
        """Let every stream waiting at its ``pause-K`` switch go on (and later ones pass)."""
        self._resume.set()

    def arm_pause(self) -> None:
        """Make the next ``pause-K`` streams wait again (until :meth:`resume_paused`)."""
        self._resume.clear()

    # ------------------------------------------------------------------- plumbing

    async def _sleep(self, seconds: float | None) -> bool:
        """Sleep (None: until stop), but wake when the server stops; True if it is stopping."""
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _pass_gate(self) -> bool:
        """Wait while the gate is closed (or until stop); True if the server is stopping."""
        assert self._gate is not None and self._stopping is not None
        if self._gate.is_set():
            return False
        self.held_arrivals += 1
        opened = asyncio.ensure_future(self._gate.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({opened, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            opened.cancel()
            stopping.cancel()
        return self._stopping.is_set()

    async def _begin(self, request: Request) -> tuple[RecordedRequest, Behaviour, Response | None]:
        """Record the request and apply auth, latency, hang and failure switches."""
        body = await request.body()
        rec = RecordedRequest(
            request.method,
            request.url.path,
            {k.lower(): v for k, v in request.headers.items()},
            body,
        )
        ctype = rec.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            rec.form, rec.files = parse_multipart(body, ctype)
        elif body:
            with contextlib.suppress(ValueError):
                rec.json = json.loads(body)
        self.requests.append(rec)
        doc = rec.json if isinstance(rec.json, dict) else rec.form
        b = self.behaviour.with_switches(str(doc.get("model", "")))
        if self.api_key and rec.headers.get("authorization") != f"Bearer {self.api_key}":
            return (
                rec,
                b,
                error_response(
                    401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key"
                ),
            )
        if b.hang and await self._sleep(None):
            return rec, b, error_response(503, "fake upstream is shutting down", "server_error")
        if b.held and await self._pass_gate():
            return rec, b, error_response(503, "fake upstream is shutting down", "server_error")
        if b.delay:
            await self._sleep(b.delay)
        if b.fail:
            return rec, b, fail_response(b.fail)
        if request.method == "POST" and not isinstance(rec.json, dict) and not rec.form:
            return (
                rec,
                b,
                error_response(
                    400,
                    "We could not parse the JSON body of your request.",
                    "invalid_request_error",
                ),
            )
        return rec, b, None

    def _done(self, rec: RecordedRequest, response: Response) -> Response:
        rec.finished_at = time.monotonic()
        return response

    def _next_id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}-fake-{self._seq}"

    async def _text(self, request: Request, chat: bool) -> Response:
        rec, b, early = await self._begin(request)
        if early is not None:
            return self._done(rec, early)
        body: dict[str, Any] = rec.json
        key = "messages" if chat else "prompt"
        if body.get(key) is None:
            return self._done(
                rec,
                error_response(
                    400,
                    f"Missing required parameter: '{key}'.",
                    "invalid_request_error",
                    "missing_required_parameter",
                ),
            )
        usage = expected_usage(body, "chat" if chat else "completions")
        words = REPLY_WORDS[: usage["completion_tokens"]]
        finish = "length" if completion_limit(body) < MAX_COMPLETION else "stop"
        head = {
            "id": self._next_id("chatcmpl" if chat else "cmpl"),
            "created": int(time.time()),
            "model": body.get("model", ""),
            "system_fingerprint": "fp_fake",
        }
        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage")) and b.usage
            if b.early_usage:
                events = stream_events(head, chat, words, finish, None)
                zero = {**usage, "completion_tokens": 0}
                obj = "chat.completion.chunk" if chat else "text_completion"
                events.insert(
                    1, (False, sse({**head, "object": obj, "choices": [], "usage": zero}))
                )
            else:
                events = stream_events(head, chat, words, finish, usage if include else None)
            return StreamingResponse(self._drip(rec, b, events), media_type="text/event-stream")
        out = completion_body(head, chat, " ".join(words), finish, usage if b.usage else None)
        return self._done(rec, JSONResponse(out))

    async def _drip(
        self, rec: RecordedRequest, b: Behaviour, events: list[tuple[bool, bytes]]
    ) -> AsyncIterator[bytes]:
        try:
            for sent, (is_word, event) in enumerate(events):
                if sent == b.drop_after:
                    raise DropConnection
                if sent == b.stall_after:
                    await self._sleep(None)
                    return
                if sent == b.pause_after:
                    while not self._resume.is_set():
                        if await self._sleep(0.01):
                            return
                if is_word and b.chunk_delay and await self._sleep(b.chunk_delay):
                    return
                yield event
            yield DONE
        finally:
            rec.finished_at = time.monotonic()

    async def _chat(self, request: Request) -> Response:
        return await self._text(request, chat=True)

    async def _completions(self, request: Request) -> Response:
        return await self._text(request, chat=False)

    async def _embeddings(self, request: Request) -> Response:
        rec, b, early = await self._begin(request)
        if early is not None:
            return self._done(rec, early)
        body: dict[str, Any] = rec.json
        usage = expected_usage(body, "embeddings") if b.usage else None
        return self._done(rec, JSONResponse(embeddings_body(body, usage)))

    async def _images(self, request: Request) -> Response:
        rec, _, early = await self._begin(request)
        if early is not None:
            return self._done(rec, early)
        body: dict[str, Any] = rec.json
        b64 = body.get("response_format") == "b64_json"
        data = [
            {"b64_json": base64.b64encode(PNG).decode()}
            if b64
            else {"url": f"{self.url}/files/image-{i}.png"}
            for i in range(int(body.get("n") or 1))
        ]
        return self._done(rec, JSONResponse({"created": int(time.time()), "data": data}))

    async def _transcribe(self, request: Request) -> Response:
        rec, b, early = await self._begin(request)
        if early is not None:
            return self._done(rec, early)
        if "file" not in rec.files:
            return self._done(
                rec,
                error_response(400, "Missing required parameter: 'file'.", "invalid_request_error"),
            )
        audio = rec.files["file"][1]
        task = "translate" if request.url.path.endswith("translations") else "transcribe"
        text = f"fake {task} of {len(audio)} bytes"
        fmt = rec.form.get("response_format", "json")
        if b.json_only and fmt not in ("json", "text"):
            message = f"response_format '{fmt}' is not compatible with this model"
            return self._done(rec, error_response(400, message, "invalid_request_error"))
        if fmt in ("text", "srt", "vtt"):
            return self._done(rec, PlainTextResponse(text))
        out: dict[str, Any] = {"text": text}
        if fmt == "verbose_json":
            out.update(
                task=task, language="english", duration=expected_duration(audio), segments=[]
            )
        if b.usage:
            seconds = math.ceil(expected_duration(audio))
            out["usage"] = {"type": "duration", "seconds": seconds}
        return self._done(rec, JSONResponse(out))

    async def _speech(self, request: Request) -> Response:
        rec, _, early = await self._begin(request)
        if early is not None:
            return self._done(rec, early)
        body: dict[str, Any] = rec.json
        text = str(body.get("input", ""))
        audio = speech_audio(text)
        ctype = SPEECH_TYPES.get(body.get("response_format") or "mp3", "audio/mpeg")
        return self._done(rec, Response(audio, media_type=ctype))

    async def _models(self, request: Request) -> Response:
        rec, _, early = await self._begin(request)
        listing = (
            {"object": "list", "data": self.model_list}
            if self.model_list is not None
            else models_list(self.models, "fake")
        )
        return self._done(rec, early or JSONResponse(listing))

    async def _file(self, request: Request) -> Response:
        return Response(PNG, media_type="image/png")
