"""NIP-90 text generation (kind 5050): parse job requests, build feedback and results; sans I/O.

A request carries its prompt in ``i`` tags of type ``text`` or ``prompt`` (several are joined
as one user message), its options in ``param`` tags (``model``, ``max_tokens``, ``temperature``,
``top_p`` or ``top-p``, ``frequency_penalty``, ``presence_penalty``, ``seed``, ``system``), the
most the customer pays in ``bid`` (msat) and, optionally, a Cashu token in a ``cashu`` tag.
With an ``encrypted`` tag the ``i`` and ``param`` tags are NIP-04 encrypted in the content (to
the provider's key); the result is then encrypted to the customer too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from nodeprov.errors import InvalidJobMessage, NodeprovError
from nodeprov.protocol import json_input
from nodeprov.protocol.nostr_event import Event, EventTemplate, Tags

REQUEST_KIND = 5050
RESULT_KIND = 6050
FEEDBACK_KIND = 7000
Status = Literal["payment-required", "processing", "error", "success", "partial"]
# Sanity bounds: what a request may ask for before the pricer's own checks.
MAX_TOKENS_LIMIT = 10_000_000
MAX_PROMPT_CHARS = 1_000_000
MAX_BID_MSAT = 2**62
TEXT_INPUTS = ("text", "prompt")  # the 5050 kind's example marks its prompt "prompt"
MESSAGE_ROLES = ("system", "user", "assistant")
PASSED_PARAMS = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed")


class InvalidJobRequest(InvalidJobMessage):
    """A kind 5050 request the node cannot run (inputs, params, bid, encryption)."""

    code = "invalid_job_request"


@dataclass(frozen=True)
class JobRequest:
    """A parsed kind 5050 request: who asks, what to generate, and how it pays."""

    event: Event
    prompt: str
    model: str | None
    max_tokens: int | None
    options: dict[str, float | int] = field(default_factory=dict)
    system: str | None = None
    bid_msat: int | None = None
    cashu: str | None = None
    encrypted: bool = False
    relays: tuple[str, ...] = ()
    history: tuple[dict[str, str], ...] = ()  # an input marked "messages": the conversation

    @property
    def id(self) -> str:
        return self.event.id

    @property
    def customer(self) -> str:
        return self.event.pubkey

    def chat_body(self, default_model: str) -> dict[str, Any]:
        """The OpenAI chat body this job runs as."""
        messages: list[dict[str, str]] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages += [dict(m) for m in self.history]
        if self.prompt:
            messages.append({"role": "user", "content": self.prompt})
        body: dict[str, Any] = {"model": self.model or default_model, "messages": messages}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.options)
        return body


def _conversation(data: str) -> list[dict[str, str]]:
    """The chat messages of an input marked ``messages``: a JSON array of role and content."""
    try:
        value = json_input.loads(data)  # depth and string checks: the input is a stranger's
    except (ValueError, NodeprovError):
        value = None
    if not isinstance(value, list):
        raise InvalidJobRequest("a 'messages' input must be a JSON array of chat messages")
    found = []
    for message in value:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in MESSAGE_ROLES:
            raise InvalidJobRequest(f"each message needs a role of {', '.join(MESSAGE_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise InvalidJobRequest("each message needs its content as a string")
        found.append({"role": role, "content": message["content"]})
    return found


def _number(name: str, value: str, *, integer: bool, low: float, high: float) -> float | int:
    try:
        number: float | int = int(value) if integer else float(value)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise InvalidJobRequest(f"param {name!r} must be {kind}, got {value[:40]!r}") from None
    if not low <= number <= high:  # also refuses nan
        raise InvalidJobRequest(f"param {name!r} must be between {low:g} and {high:g}")
    return number


def _private_tags(event: Event, decrypt: Callable[[str], str] | None) -> Tags:
    """The ``i``/``param`` tags of an ``encrypted`` request (its content decrypted)."""
    if decrypt is None:
        raise InvalidJobRequest("encrypted params are not accepted here")
    try:
        plain = decrypt(event.content)
        tags = json.loads(plain)
    except NodeprovError:
        raise InvalidJobRequest("encrypted params do not decrypt with this node's key") from None
    except ValueError:
        raise InvalidJobRequest("encrypted params are not a JSON list of tags") from None
    if not isinstance(tags, list) or not all(
        isinstance(t, list) and t and all(isinstance(x, str) for x in t) for t in tags
    ):
        raise InvalidJobRequest("encrypted params are not a JSON list of tags")
    return tuple(tuple(t) for t in tags)


def parse_request(
    event: Event, node_pubkey: str, decrypt: Callable[[str], str] | None = None
) -> JobRequest:
    """A :class:`JobRequest` from a verified kind 5050 event p-tagging ``node_pubkey``.

    ``decrypt`` opens NIP-04 content from the customer (for ``encrypted`` requests).
    Raises :class:`InvalidJobRequest` with a message fit for an ``error`` feedback.
    """
    if event.kind != REQUEST_KIND:
        raise InvalidJobRequest(f"kind {event.kind} is not a text generation job ({REQUEST_KIND})")
    if node_pubkey not in event.tag_values("p"):
        raise InvalidJobRequest("the request does not name this node in a 'p' tag")
    encrypted = any(t and t[0] == "encrypted" for t in event.tags)
    tags: Tags = event.tags + (_private_tags(event, decrypt) if encrypted else ())
    texts: list[str] = []
    history: list[dict[str, str]] = []
    params: dict[str, str] = {}
    bid: int | None = None
    cashu: str | None = None
    relays: list[str] = []
    for tag in tags:
        name = tag[0]
        if name == "i":
            kind = tag[2] if len(tag) > 2 else "text"
            if kind not in TEXT_INPUTS:
                raise InvalidJobRequest(f"input type {kind!r} is not supported; send 'text'")
            if len(tag) > 4 and tag[4] == "messages":  # NIP-90's marker: how the input is used
                history += _conversation(tag[1])
            else:
                texts.append(tag[1] if len(tag) > 1 else "")
        elif name == "param" and len(tag) > 2:
            params[tag[1].replace("-", "_")] = tag[2]  # the kind's own example writes top-p
        elif name == "bid" and len(tag) > 1:
            bid = int(_number("bid", tag[1], integer=True, low=0, high=MAX_BID_MSAT))
        elif name == "cashu" and len(tag) > 1 and tag[1]:
            cashu = tag[1].strip()
        elif name == "relays":
            relays += [r for r in tag[1:] if r.startswith(("wss://", "ws://"))]
    prompt = "\n\n".join(t for t in texts if t.strip())
    if not prompt and not history:
        raise InvalidJobRequest("the request has no text input ('i' tag with a prompt)")
    if len(prompt) + sum(len(m["content"]) for m in history) > MAX_PROMPT_CHARS:
        raise InvalidJobRequest(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
    max_tokens = None
    if "max_tokens" in params:
        max_tokens = int(
            _number("max_tokens", params["max_tokens"], integer=True, low=1, high=MAX_TOKENS_LIMIT)
        )
    options: dict[str, float | int] = {}
    bounds = {"temperature": (0, 2), "top_p": (0, 1), "seed": (0, 2**63 - 1)}
    for name in PASSED_PARAMS:
        if name in params:
            low, high = bounds.get(name, (-2, 2))
            options[name] = _number(name, params[name], integer=name == "seed", low=low, high=high)
    model = params.get("model") or None
    return JobRequest(
        event, prompt, model, max_tokens, options, params.get("system") or None, bid, cashu,
        encrypted, tuple(relays), tuple(history),
    )  # fmt: skip


# --- what the node publishes ---------------------------------------------------------------


def _refs(event: Event) -> list[tuple[str, ...]]:
    return [("e", event.id), ("p", event.pubkey)]


def feedback(
    event: Event,
    status: Status,
    info: str = "",
    *,
    amount_msat: int | None = None,
    bolt11: str | None = None,
) -> EventTemplate:
    """A kind 7000 job feedback for request ``event`` (``amount`` with an optional invoice)."""
    tags: list[tuple[str, ...]] = [("status", status, info) if info else ("status", status)]
    if amount_msat is not None:
        tags.append(
            ("amount", str(amount_msat), bolt11) if bolt11 else ("amount", str(amount_msat))
        )
    tags += _refs(event)
    if any(t and t[0] == "encrypted" for t in event.tags):
        tags.append(("encrypted",))
    return EventTemplate(FEEDBACK_KIND, tuple(tags), "")


def result(
    event: Event, content: str, amount_msat: int, *, encrypt: Callable[[str], str] | None = None
) -> EventTemplate:
    """The kind 6050 result: the request as JSON, its inputs, the msat charged, the text.

    With ``encrypt`` (an encrypted request) the text is encrypted to the customer, the
    inputs are left out and the result is tagged ``encrypted``.
    """
    tags: list[tuple[str, ...]] = [("request", event.to_json()), *_refs(event)]
    if encrypt is None:
        tags += [tuple(t) for t in event.tags if t and t[0] == "i"]
    tags.append(("amount", str(amount_msat)))
    if encrypt is not None:
        tags.append(("encrypted",))
        content = encrypt(content)
    return EventTemplate(RESULT_KIND, tuple(tags), content)


def answer_text(data: dict[str, Any]) -> str:
    """The generated text of an OpenAI chat completion (empty if it has none)."""
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""
