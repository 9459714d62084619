"""Streamed completions: each upstream SSE line goes to the client the moment it arrives.

The upstream's ``data: [DONE]`` is held back until the job is settled; then the client gets
an SSE comment ``: nodeprov {"cost_msat", "cost_input_msat", "cost_output_msat", "change"}``
(comments are ignored by SSE parsers, the openai SDK included), ``data: [DONE]``, and after
it a named event ``event: nodeprov`` with the same JSON (SDKs stop reading at ``[DONE]``).
The change of an ``X-Cashu`` payment also stays claimable at ``GET /v1/wallet/change``.
Settlement follows the charge lifecycle's rules (:mod:`nodeprov.core.charges`): each
chunk with output (any non-empty delta field but ``role``) is counted; a stream that
ended early (upstream error or drop, client gone) settles as incomplete:
``max(reported usage, produced so far)``, or nothing if nothing was produced. The job's
lease is renewed for as long as the stream runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

from nodeprov.core.charges import Job, Settled
from nodeprov.errors import NodeprovError, UpstreamError
from nodeprov.http.billing import cost_fields
from nodeprov.upstream import iter_stream
from nodeprov.upstream_http import Response

logger = logging.getLogger(__name__)

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def with_usage(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The body to forward: ``stream_options.include_usage`` forced on (``body`` itself if
    it asks for usage already, so it can be forwarded unchanged)."""
    options = body.get("stream_options")
    if isinstance(options, Mapping) and options.get("include_usage") is True:
        return body
    options = dict(options) if isinstance(options, Mapping) else {}
    options["include_usage"] = True
    return {**body, "stream_options": options}


class SSERelay:
    """ASGI response relaying an upstream SSE stream, then settling its charge."""

    def __init__(self, job: Job, response: Response, upstream: str) -> None:
        self.job = job
        self.response = response
        self.upstream = upstream
        self.usage: Any = None
        self.done = False
        self.finished = False  # a choice carried its finish_reason
        self.client_gone = False
        self.error: NodeprovError | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.client_gone = True
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                try:
                    await self._pump(send)
                except NodeprovError as exc:
                    self.error = exc
                except OSError:
                    self.client_gone = True
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.response.aclose()
                tail = await self._finish()
                if not self.client_gone:
                    with contextlib.suppress(OSError):
                        await send({"type": "http.response.body", "body": tail})

    async def _pump(self, send: Send) -> None:
        pending = b""
        async for chunk in iter_stream(self.response, self.upstream):
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if not cut:
                continue
            out = self._scan(pending[:cut])
            pending = pending[cut:]
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
            if self.done:
                return
        if pending:
            out = self._scan(pending + b"\n")
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})

    def _scan(self, lines: bytes) -> bytes:
        """Forwardable lines of ``lines``; notes usage, output chunks, errors and [DONE]."""
        out = bytearray()
        for line in lines.splitlines(keepends=True):
            if self.done:
                break
            text = line.rstrip(b"\r\n")
            if text.startswith(b"data:"):
                payload = text[5:].strip()
                if payload == b"[DONE]":
                    self.done = True
                    continue
                self._note(payload)
            out += line
        return bytes(out)

    def _note(self, payload: bytes) -> None:
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        if data.get("usage"):
            self.usage = data["usage"]
        if data.get("error") and self.error is None:
            self.error = UpstreamError("the upstream reported an error mid-stream")
        for choice in data.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason"):
                self.finished = True
            delta = choice.get("delta")
            delta = delta if isinstance(delta, dict) else {}
            # Output is output whatever the field is called (content, tool_calls,
            # function_call, reasoning, audio…): every non-empty delta field but the role.
            if choice.get("text") or any(v for k, v in delta.items() if k != "role"):
                self.job.output()

    @property
    def ended(self) -> bool:
        """Whether the upstream sent the whole answer ([DONE], or finish and then usage)."""
        return self.done or (self.finished and self.usage is not None)

    async def _finish(self) -> bytes:
        """Settle the job (see the module docstring); the bytes that end the stream."""
        settled: Settled | None = None
        try:
            complete = self.ended or (self.error is None and not self.client_gone)
            settled = await self.job.settle(self.usage, complete=complete)
        except Exception:
            logger.exception("settling a stream failed; its hold lapses and is swept")
            await self.job.cancel()
        info: dict[str, Any] = cost_fields(settled) if settled else {"cost_msat": 0}
        change = settled.change if settled else None
        info["change"] = change.token if change else None
        if settled is not None and settled.balance_msat is not None:
            info["balance_msat"] = settled.balance_msat
        note = json.dumps(info, separators=(",", ":")).encode()
        tail = b": nodeprov " + note + b"\n\n"
        if self.error is not None and not self.ended:
            err = json.dumps(self.error.to_openai(), separators=(",", ":")).encode()
            return tail + b"data: " + err + b"\n\n"
        return tail + b"data: [DONE]\n\nevent: nodeprov\ndata: " + note + b"\n\n"
