"""Upper bounds on a request's tokens, for the hold: prompt and output, before the job runs.

A prompt is measured by its text's UTF-8 bytes (byte-level BPE never yields more tokens than
bytes) plus allowances for what text cannot measure (images, files by id, chat templates,
tool prompts). The output bound is what the client asked for (``max_tokens``) or the model's
``max_output_tokens``. A prompt clearly larger than the context is refused here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodeprov.config import ModelPrice
from nodeprov.errors import ContextLengthExceeded, InvalidRequest

# Chat templates wrap each message (and the reply) in a few special tokens; 8 is generous.
MESSAGE_OVERHEAD_TOKENS = 8
# Some upstreams inject a tool-use system prompt (several hundred tokens) when tools are given.
TOOLS_OVERHEAD_TOKENS = 1024
# An image costs a model-dependent number of tokens unrelated to its URL or base64 size; this
# allowance is above what common vision models charge per image.
IMAGE_PART_TOKENS = 8192
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
# A prompt's text is refused when it exceeds the context at this many bytes a token.
BYTES_PER_TOKEN_ESTIMATE = 4
# Content we cannot size (a file by id): the bound is the whole context window.
_UNBOUNDED = 1 << 62
# OpenAI's own limit for n; also keeps a hold from being multiplied without bound.
MAX_N = 128


@dataclass(frozen=True)
class TokenBounds:
    """Upper bounds behind a hold: prompt tokens, and output tokens over all choices."""

    prompt_tokens: int
    completion_tokens: int


def token_bounds(price: ModelPrice, body: Any, endpoint: str) -> TokenBounds:
    """The token bounds of a hold on chat, completions or embeddings (module docstring).

    The output bound is not shrunk by the prompt's bound, which overestimates.
    """
    body = require_mapping(body)
    ctx = price.context_tokens
    if endpoint == "embeddings":
        items = _prompt_items(body.get("input"), "input")
        sizes = [_item_sizes(i, MESSAGE_OVERHEAD_TOKENS) for i in items]
        _check_context(sizes, ctx)
        return TokenBounds(sum(min(ctx, text + extra) for text, extra in sizes), 0)
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array")
        text, extra = _sizes(messages, MESSAGE_OVERHEAD_TOKENS * (len(messages) + 1))
        for key in ("tools", "functions", "tool_choice", "response_format"):
            more_text, more_extra = _sizes(body.get(key))
            text, extra = text + more_text, extra + more_extra
        if body.get("tools") or body.get("functions"):
            extra += TOOLS_OVERHEAD_TOKENS
        sizes = [(text, extra)]
        copies = count(body, "n")
    elif endpoint == "completions":
        suffix = _text_bound(body.get("suffix"))
        items = _prompt_items(body.get("prompt"), "prompt")
        sizes = [_item_sizes(i, MESSAGE_OVERHEAD_TOKENS + suffix) for i in items]
        # best_of completions are generated (and billed) server-side, n of them returned.
        copies = max(count(body, "n"), count(body, "best_of"))
    else:
        raise ValueError(f"endpoint {endpoint!r} is not priced by tokens")
    _check_context(sizes, ctx)
    limit = _max_tokens(price, body)
    output = limit if limit is not None else price.max_output_tokens
    prompt_total = sum(min(text + extra, ctx) for text, extra in sizes)
    return TokenBounds(prompt_total, max(1, output) * copies * len(sizes))


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def require_mapping(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def count(body: Mapping[str, Any], key: str) -> int:
    """A positive count such as ``n``; absent or null means 1."""
    value = body.get(key)
    if value is None:
        return 1
    if type(value) is not int or not 1 <= value <= MAX_N:
        raise InvalidRequest(f"'{key}' must be an integer from 1 to {MAX_N}, got {show(value)}")
    return value


def _max_tokens(price: ModelPrice, body: Mapping[str, Any]) -> int | None:
    """The output limit the client asked for (the larger if both keys are given), checked."""
    given: list[int] = []
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise InvalidRequest(f"'{key}' must be a positive integer, got {show(value)}")
        if value > price.max_output_tokens:
            raise InvalidRequest(
                f"'{key}' is {value}, more than this model's limit of "
                f"{price.max_output_tokens} output tokens"
            )
        given.append(value)
    return max(given) if given else None


def _prompt_items(value: Any, key: str) -> list[Any]:
    """The separate inputs of a prompt/input field: a string, token array, or a batch of them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(type(v) is int for v in value):
            return [value]
        if all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value):
            return list(value)
    raise InvalidRequest(f"'{key}' must be a string, an array of strings or of token ids")


def _text_bound(value: Any) -> int:
    """An upper bound on the tokens of ``value``: its text plus its allowances (:func:`_sizes`)."""
    text, extra = _sizes(value)
    return text + extra


def _sizes(value: Any, text: int = 0) -> tuple[int, int]:
    """(text, allowances) of ``value``, bounding its tokens: text is UTF-8 bytes of its strings.

    Byte-level BPE never yields more tokens than bytes; keys and numbers are counted too
    (a token id has at least one digit). Allowances: :data:`IMAGE_PART_TOKENS` per image,
    the whole context for a file we cannot size. ``text`` starts the text count.
    """
    extra = 0
    stack = [value]
    while stack:  # iterative, so deeply nested input cannot exhaust the recursion limit
        item = stack.pop()
        if isinstance(item, str):
            text += len(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, Mapping):
            kind = item.get("type")
            if kind in IMAGE_PART_TYPES:
                extra += IMAGE_PART_TOKENS
            elif kind in ("file", "input_file") and not _has_file_data(item):
                extra += _UNBOUNDED
            else:
                for key, inner in item.items():
                    stack.extend((key, inner))
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif item is not None:
            text += len(str(item))
    return text, extra


def _item_sizes(item: Any, overhead: int) -> tuple[int, int]:
    """:func:`_sizes` of one prompt item; an array of token ids counts exactly its length."""
    if isinstance(item, list) and all(type(v) is int for v in item):
        return overhead + len(item), 0
    return _sizes(item, overhead)


def _check_context(sizes: list[tuple[int, int]], context: int) -> None:
    """Refuse a prompt whose text is clearly larger than the model's context window.

    Clearly: its text at :data:`BYTES_PER_TOKEN_ESTIMATE` bytes a token, a rate that English
    reaches and most other text stays under (so the estimate errs low). Refusing by the
    byte bound itself would leave a user a quarter of the context; a prompt that passes this
    check but does not fit is refused by the upstream, which charges nothing.
    """
    largest = max(text for text, _ in sizes)
    estimate = -(-largest // BYTES_PER_TOKEN_ESTIMATE)
    if estimate > context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens; the prompt is about "
            f"{estimate} tokens ({largest} bytes of text). Shorten the prompt."
        )


def _has_file_data(part: Mapping[str, Any]) -> bool:
    inner = part.get("file")
    holder = inner if isinstance(inner, Mapping) else part
    return isinstance(holder.get("file_data"), str)
