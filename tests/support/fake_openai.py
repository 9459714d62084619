"""The OpenAI wire format as the fake upstream speaks it: usage rule, payloads, switches.

The wire format itself lives in :mod:`nodeprov.devstack.openai_wire` (shared with the demo
upstream); this module adds the fake's reply words and its failure switches. See
:mod:`tests.support.fake_upstream` for the server and the rules in prose.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from starlette.responses import JSONResponse

import nodeprov.devstack.openai_wire as openai_wire
from nodeprov.devstack.openai_wire import (
    AUDIO_BYTES_PER_SECOND,
    PNG,
    SPEECH_TYPES,
    embedding,
    error_response,
    expected_duration,
    parse_multipart,
    speech_audio,
    sse,
    stream_events,
)

__all__ = [
    "AUDIO_BYTES_PER_SECOND",
    "MAX_COMPLETION",
    "PNG",
    "REPLY_WORDS",
    "SPEECH_TYPES",
    "Behaviour",
    "DropConnection",
    "completion_limit",
    "embedding",
    "error_response",
    "expected_duration",
    "expected_text",
    "expected_usage",
    "fail_response",
    "parse_multipart",
    "speech_audio",
    "sse",
    "stream_events",
]

REPLY_WORDS = (
    *("This", "is", "a", "deterministic", "reply", "from", "the", "fake"),
    *("upstream", "that", "counts", "exactly", "one", "token", "per", "word"),
)
MAX_COMPLETION = len(REPLY_WORDS)  # 16
_SWITCH = re.compile(
    r"(fail)-(\d{3})|(slow|drip)-(\d+(?:\.\d+)?)|(drop|stall|pause)-(\d+)"
    r"|(hang|held|nousage|earlyusage|jsononly)"
)


@dataclass
class Behaviour:
    """How the server answers; fields mirror the model-name switches."""

    fail: int | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    hang: bool = False
    held: bool = False
    drop_after: int | None = None
    stall_after: int | None = None
    pause_after: int | None = None
    usage: bool = True
    early_usage: bool = False
    json_only: bool = False

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
            elif m[7] == "earlyusage":
                b.early_usage = True
            elif m[7] == "held":
                b.held = True
            elif m[7] == "jsononly":
                b.json_only = True
            else:
                b.usage = False
        return b


# ------------------------------------------------------------------------- usage rule


def completion_limit(body: Mapping[str, Any]) -> int:
    return openai_wire.completion_limit(body, MAX_COMPLETION)


def expected_usage(body: Mapping[str, Any], kind: str = "chat") -> dict[str, int]:
    """The exact ``usage`` the server reports for ``body``; kind: chat, completions, embeddings."""
    return openai_wire.usage_for(body, kind, MAX_COMPLETION)


def expected_text(body: Mapping[str, Any]) -> str:
    """The reply text for a chat or completions ``body``."""
    return " ".join(REPLY_WORDS[: max(0, min(completion_limit(body), MAX_COMPLETION))])


# ---------------------------------------------------------------------------- helpers


class DropConnection(Exception):
    """Raised inside a stream to make uvicorn cut the connection (its "mid-stream" failure)."""


class _QuietDrop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DropConnection))


logging.getLogger("uvicorn.error").addFilter(_QuietDrop())


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
