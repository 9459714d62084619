"""The OpenAI wire format shared by the demo upstream and the tests' fake upstream.

One token per whitespace-separated word. Chat prompt_tokens = sum over messages of
(3 + words of its text); completions: words of the prompt; embeddings: words per input (token
arrays: their length). A stream is a role chunk, one chunk per word, a finish chunk, an
optional usage chunk with empty choices, then ``data: [DONE]``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import JSONResponse

__all__ = [
    "AUDIO_BYTES_PER_SECOND",
    "DONE",
    "PNG",
    "SPEECH_TYPES",
    "completion_body",
    "completion_limit",
    "embedding",
    "embeddings_body",
    "error_response",
    "expected_duration",
    "models_list",
    "parse_multipart",
    "speech_audio",
    "sse",
    "stream_events",
    "usage_for",
    "words_of",
]

AUDIO_BYTES_PER_SECOND = 32_000
DONE = b"data: [DONE]\n\n"
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


def words_of(text: Any) -> int:
    """Tokens of a text, a list of content parts, or a token array."""
    if isinstance(text, str):
        return len(text.split())
    if isinstance(text, list):
        if text and all(isinstance(t, int) for t in text):
            return len(text)  # a token array
        return sum(words_of(t.get("text", "") if isinstance(t, dict) else t) for t in text)
    return 0


def completion_limit(body: Mapping[str, Any], default: int) -> int:
    """``max_completion_tokens`` or ``max_tokens`` of ``body``, else ``default``."""
    return int(body.get("max_completion_tokens") or body.get("max_tokens") or default)


def usage_for(body: Mapping[str, Any], kind: str, reply_words: int) -> dict[str, int]:
    """The ``usage`` for ``body``; kind: chat, completions, embeddings; reply capped by limit."""
    if kind == "embeddings":
        inputs = body.get("input", "")
        many = isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
        n = sum(words_of(i) for i in inputs) if many else words_of(inputs)
        return {"prompt_tokens": n, "total_tokens": n}
    if kind == "chat":
        prompt = sum(3 + words_of(m.get("content")) for m in body.get("messages", []))
    else:
        p = body.get("prompt", "")
        prompt = sum(words_of(x) for x in p) if isinstance(p, list) else words_of(p)
    completion = max(0, min(completion_limit(body, reply_words), reply_words))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def expected_duration(audio: bytes) -> float:
    """Seconds of audio reported for an uploaded file (16 kHz 16-bit mono PCM)."""
    return round(len(audio) / AUDIO_BYTES_PER_SECOND, 3)


def error_response(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    """An OpenAI error body with ``status`` (429 carries ``Retry-After``)."""
    headers = {"Retry-After": "1"} if status == 429 else None
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Form fields and files (name -> (filename, bytes)) of a multipart body."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    form: dict[str, str] = {}
    files: dict[str, Any] = {}
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
    """One SSE ``data:`` event with compact JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def stream_events(
    head: Mapping[str, Any],
    chat: bool,
    words: Sequence[str],
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


def completion_body(
    head: Mapping[str, Any], chat: bool, text: str, finish: str, usage: dict[str, int] | None
) -> dict[str, Any]:
    """A non-streamed chat.completion or text_completion object."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "refusal": None}
    else:
        choice["text"] = text
    out = {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice]}
    if usage is not None:
        out["usage"] = usage
    return out


def embedding(item: Any, dims: int) -> list[float]:
    """A deterministic vector for one input."""
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    return [round(digest[j % 32] / 255 - 0.5, 6) for j in range(dims)]


def embeddings_body(body: Mapping[str, Any], usage: dict[str, int] | None) -> dict[str, Any]:
    """The embeddings list object for ``body`` (``dimensions`` defaults to 8)."""
    inputs = body.get("input", "")
    many = isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
    dims = int(body.get("dimensions") or 8)
    data = [
        {"object": "embedding", "index": i, "embedding": embedding(item, dims)}
        for i, item in enumerate(inputs if many else [inputs])
    ]
    out: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model", "")}
    if usage is not None:
        out["usage"] = usage
    return out


def models_list(models: Sequence[str], owned_by: str) -> dict[str, Any]:
    """The ``GET /v1/models`` list object."""
    data = [
        {"id": m, "object": "model", "created": 1700000000, "owned_by": owned_by} for m in models
    ]
    return {"object": "list", "data": data}


def speech_audio(text: str) -> bytes:
    """Deterministic "mp3" bytes for ``text`` (an ID3 header, then filler)."""
    return b"ID3\x04" + hashlib.sha256(text.encode()).digest() * (1 + len(text) // 8)
