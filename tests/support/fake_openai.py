"""The OpenAI wire format as the fake upstream speaks it: usage rule, payloads, switches.

See :mod:`tests.support.fake_upstream` for the server and the rules in prose.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from starlette.responses import JSONResponse

REPLY_WORDS = (
    *("This", "is", "a", "deterministic", "reply", "from", "the", "fake"),
    *("upstream", "that", "counts", "exactly", "one", "token", "per", "word"),
)
MAX_COMPLETION = len(REPLY_WORDS)  # 16
AUDIO_BYTES_PER_SECOND = 32_000
# A valid 1x1 PNG, for image answers.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
SPEECH_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
_SWITCH = re.compile(
    r"(fail)-(\d{3})|(slow|drip)-(\d+(?:\.\d+)?)|(drop|stall)-(\d+)|(hang|nousage)"
)


@dataclass
class Behaviour:
    """How the server answers; fields mirror the model-name switches."""

    fail: int | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    hang: bool = False
    drop_after: int | None = None
    stall_after: int | None = None
    usage: bool = True

    def with_switches(self, model: str) -> Behaviour:
        """This behaviour overridden by the switches in ``model``."""
        b = replace(self)
        for part in model.split("+"):
            m = _SWITCH.fullmatch(part)
            if m is None:
                continue
            if m[1]:
                b.fail = int(m[2])
            elif m[3]:
                setattr(b, "delay" if m[3] == "slow" else "chunk_delay", float(m[4]))
            elif m[5]:
                setattr(b, f"{m[5]}_after", int(m[6]))
            elif m[7] == "hang":
                b.hang = True
            else:
                b.usage = False
        return b


# ------------------------------------------------------------------------- usage rule


def _words(text: Any) -> int:
    if isinstance(text, str):
        return len(text.split())
    if isinstance(text, list):
        if text and all(isinstance(t, int) for t in text):
            return len(text)  # a token array
        return sum(_words(t.get("text", "") if isinstance(t, dict) else t) for t in text)
    return 0


def completion_limit(body: Mapping[str, Any]) -> int:
    return int(body.get("max_completion_tokens") or body.get("max_tokens") or MAX_COMPLETION)


def expected_usage(body: Mapping[str, Any], kind: str = "chat") -> dict[str, int]:
    """The exact ``usage`` the server reports for ``body``; kind: chat, completions, embeddings."""
    if kind == "embeddings":
        inputs = body.get("input", "")
        many = isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
        n = sum(_words(i) for i in inputs) if many else _words(inputs)
        return {"prompt_tokens": n, "total_tokens": n}
    if kind == "chat":
        prompt = sum(3 + _words(m.get("content")) for m in body.get("messages", []))
    else:
        p = body.get("prompt", "")
        prompt = sum(_words(x) for x in p) if isinstance(p, list) else _words(p)
    completion = max(0, min(completion_limit(body), MAX_COMPLETION))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def expected_text(body: Mapping[str, Any]) -> str:
    """The reply text for a chat or completions ``body``."""
    return " ".join(REPLY_WORDS[: max(0, min(completion_limit(body), MAX_COMPLETION))])


def expected_duration(audio: bytes) -> float:
    """Seconds of audio the server reports for an uploaded file."""
    return round(len(audio) / AUDIO_BYTES_PER_SECOND, 3)


# ---------------------------------------------------------------------------- helpers


class DropConnection(Exception):
    """Raised inside a stream to make uvicorn cut the connection (its "mid-stream" failure)."""


class _QuietDrop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DropConnection))


logging.getLogger("uvicorn.error").addFilter(_QuietDrop())


def error_response(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 429 else None
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def fail_response(status: int) -> JSONResponse:
    if status == 429:
        return error_response(
            429, "Rate limit reached (fake upstream)", "requests", "rate_limit_exceeded"
        )
    if status >= 500:
        return error_response(
            status, "The server had an error while processing your request.", "server_error"
        )
    return error_response(
        status,
        f"Invalid request (fake upstream, fail-{status})",
        "invalid_request_error",
        "invalid_request",
    )


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, Any]]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    form: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    if m is None:
        return form, files
    for section in body.split(b"--" + m[1].encode())[1:-1]:
        head, _, content = section[2:].partition(b"\r\n\r\n")
        content = content[:-2]  # the CRLF before the next boundary
        name = re.search(rb'\bname="([^"]*)"', head)
        filename = re.search(rb'filename="([^"]*)"', head)
        if name is None:
            continue
        if filename is not None:
            files[name[1].decode()] = (filename[1].decode(), content)
        else:
            form[name[1].decode()] = content.decode()
    return form, files


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def stream_events(
    head: Mapping[str, Any],
    chat: bool,
    words: tuple[str, ...],
    finish: str,
    usage: dict[str, int] | None,
) -> list[tuple[bool, bytes]]:
    """(is_word_chunk, SSE event) in order, like OpenAI: role, words, finish, usage."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if usage is not None else {}

    def chunk(delta: dict[str, Any] | str, reason: str | None = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice["delta" if chat else "text"] = delta
        return sse({**head, "object": obj, "choices": [choice], **extra})

    events = [(False, chunk({"role": "assistant", "content": ""} if chat else ""))]
    for i, word in enumerate(words):
        piece = word if i == 0 else " " + word
        events.append((True, chunk({"content": piece} if chat else piece)))
    events.append((False, chunk({} if chat else "", finish)))
    if usage is not None:
        events.append((False, sse({**head, "object": obj, "choices": [], "usage": usage})))
    return events


def embedding(item: Any, dims: int) -> list[float]:
    """A deterministic vector for one input."""
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    return [round(digest[j % 32] / 255 - 0.5, 6) for j in range(dims)]


def speech_audio(text: str) -> bytes:
    """Deterministic "mp3" bytes for ``text`` (an ID3 header, then filler)."""
    return b"ID3\x04" + hashlib.sha256(text.encode()).digest() * (1 + len(text) // 8)
