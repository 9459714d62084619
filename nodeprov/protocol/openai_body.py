"""The parts of an OpenAI request body the node relies on, checked before anything is held.

A body that passes may still be refused by the upstream (with a 400 and a refund); these
checks catch the shapes that would otherwise reach the upstream as garbage and come back
as a 5xx: ``messages`` must be a non-empty array of objects, each with a string ``role``
and a ``content`` that is a string, null or an array of typed parts; ``stream`` must be a
boolean and ``stream_options`` an object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nodeprov.errors import InvalidRequest

CHAT_PATHS = frozenset({"/v1/chat/completions", "chat/completions"})
STREAMING_PATHS = CHAT_PATHS | {"/v1/completions", "completions"}


def _check_content(where: str, content: Any) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string, an array of parts or null")
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise InvalidRequest(f"{where}.content[{j}] must be an object with a string 'type'")


def check_messages(messages: Any) -> None:
    """Raise :class:`InvalidRequest` unless ``messages`` is a usable chat ``messages`` array."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"{where} must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"{where}.role must be a non-empty string")
        if "content" not in message and role != "assistant":
            # Only an assistant turn (with tool calls) may leave its content out.
            raise InvalidRequest(f"{where}.content is required for role {role!r}")
        _check_content(where, message.get("content"))
        for name in ("name", "tool_call_id"):
            if name in message and not isinstance(message[name], str):
                raise InvalidRequest(f"{where}.{name} must be a string")
        if "tool_calls" in message and not isinstance(message["tool_calls"], list | None):
            raise InvalidRequest(f"{where}.tool_calls must be an array")


def check_body(path: str, body: Mapping[str, Any]) -> None:
    """The shape checks for a request to ``path`` (``/v1/chat/completions`` or without ``/v1/``)."""
    if path in CHAT_PATHS:
        check_messages(body.get("messages"))
    if path in STREAMING_PATHS:
        check_stream_flags(body)


def check_stream_flags(body: Mapping[str, Any]) -> None:
    """``stream`` must be a boolean and ``stream_options`` an object (either may be null).

    A truthy non-boolean ``stream`` would be forwarded as is: the upstream streams while
    the node, reading ``stream is True``, waits for one JSON answer.
    """
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be true or false")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise InvalidRequest("'stream_options' must be an object")
