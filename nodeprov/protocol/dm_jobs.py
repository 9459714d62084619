"""The ``nodeprov/1`` DM job protocol: JSON messages inside NIP-17/NIP-04 DMs; sans I/O.

:func:`parse_client_message` turns DM text into a typed job message or :class:`PlainText`;
reply builders return compact JSON; :func:`split_parts`/:func:`join_parts` carry large replies.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any

from nodeprov.errors import InvalidJobMessage, InvalidRequest, NodeprovError
from nodeprov.protocol import json_input, openai_body

PROTOCOL = "nodeprov/1"
MAX_ID_CHARS = 128
MAX_MESSAGE_CHARS = 1_000_000
ALLOWED_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
CLIENT_TYPES = frozenset({"request", "deposit", "balance", "withdraw", "info"})


@dataclass(frozen=True, slots=True)
class PlainText:
    """A DM that is not a job message: chat text for the default model."""

    text: str


@dataclass(frozen=True, slots=True)
class JobRequest:
    """``request``: run ``body`` on ``endpoint``; paid by ``cashu`` if given, else the account."""

    id: str
    endpoint: str
    body: Mapping[str, Any]
    cashu: str | None = None


@dataclass(frozen=True, slots=True)
class Deposit:
    """``deposit``: credit the sender's npub account with ``cashu``."""

    id: str
    cashu: str


@dataclass(frozen=True, slots=True)
class BalanceQuery:
    """``balance``: report the sender's account balance."""

    id: str


@dataclass(frozen=True, slots=True)
class Withdraw:
    """``withdraw``: pay out ``amount_msat`` (everything when None) as a token."""

    id: str
    amount_msat: int | None = None


@dataclass(frozen=True, slots=True)
class InfoQuery:
    """``info``: models, prices, mints and units."""

    id: str


ClientMessage = JobRequest | Deposit | BalanceQuery | Withdraw | InfoQuery


def _id(obj: Mapping[str, Any]) -> str:
    value = obj.get("id")
    if value is None:
        raise InvalidJobMessage("job message has no 'id'")
    if not isinstance(value, str) or not value:
        raise InvalidJobMessage("job message 'id' must be a non-empty string")
    if len(value) > MAX_ID_CHARS:
        raise InvalidJobMessage(f"job message 'id' is longer than {MAX_ID_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidJobMessage("job message 'id' contains control characters")
    return value


def _cashu(obj: Mapping[str, Any], required: bool) -> str | None:
    value = obj.get("cashu")
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidJobMessage("'cashu' must be a token string (cashuA…/cashuB…)")
    return value.strip()


def message_id(text: str) -> str | None:
    """The ``id`` of a job message, if one can be read, for error replies to invalid ones."""
    try:
        obj = json.loads(text)
        value = obj.get("id") if isinstance(obj, dict) else None
    except (ValueError, RecursionError):
        return None
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
        return value
    return None


def parse_client_message(text: str) -> ClientMessage | PlainText:
    """Parse DM text: a job message, or PlainText (not JSON, or JSON without a ``type``).

    An object with a ``type`` is a job message and must be valid: raises InvalidJobMessage.
    """
    if not isinstance(text, str):
        raise InvalidJobMessage("DM content must be a string")
    stripped = text.strip()
    if not stripped.startswith("{"):
        return PlainText(text)
    if len(stripped) > MAX_MESSAGE_CHARS:
        raise InvalidJobMessage(f"job message is larger than {MAX_MESSAGE_CHARS} characters")
    try:
        obj = json_input.loads(stripped)
    except json_input.JsonRejected as exc:
        raise InvalidJobMessage(f"job message refused: {exc}") from None
    except ValueError:
        return PlainText(text)
    if not isinstance(obj, dict) or "type" not in obj:
        return PlainText(text)
    kind = obj["type"]
    if not isinstance(kind, str) or kind not in CLIENT_TYPES:
        allowed = ", ".join(sorted(CLIENT_TYPES))
        raise InvalidJobMessage(f"unknown job message type {kind!r} (expected one of: {allowed})")
    ident = _id(obj)
    if kind == "request":
        endpoint = obj.get("endpoint")
        if not isinstance(endpoint, str) or endpoint not in ALLOWED_ENDPOINTS:
            allowed = ", ".join(sorted(ALLOWED_ENDPOINTS))
            raise InvalidJobMessage(f"endpoint {endpoint!r} is not allowed (use one of: {allowed})")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise InvalidJobMessage("request 'body' must be a JSON object (the OpenAI body)")
        try:
            openai_body.check_body(endpoint, body)
        except InvalidRequest as exc:
            raise InvalidJobMessage(exc.message) from None
        return JobRequest(ident, endpoint, body, _cashu(obj, required=False))
    if kind == "deposit":
        cashu = _cashu(obj, required=True)
        assert cashu is not None
        return Deposit(ident, cashu)
    if kind == "withdraw":
        amount = obj.get("amount_msat")
        if amount is not None and (
            isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0
        ):
            raise InvalidJobMessage("'amount_msat' must be a positive integer")
        return Withdraw(ident, amount)
    return BalanceQuery(ident) if kind == "balance" else InfoQuery(ident)


# --- provider replies -------------------------------------------------------------------


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def response_reply(
    id: str,
    body: Mapping[str, Any],
    cost_msat: int,
    *,
    status: int = 200,
    change: str | None = None,
    balance_msat: int | None = None,
) -> str:
    """``response``: the upstream body, its cost, change token (or null) and balance (or null)."""
    return _dumps(
        {
            "type": "response",
            "id": id,
            "status": status,
            "body": body,
            "cost_msat": cost_msat,
            "change": change,
            "balance_msat": balance_msat,
        }
    )


def error_reply(
    id: str | None,
    error: NodeprovError | Mapping[str, Any],
    *,
    refund: str | None = None,
    payment_request: str | None = None,
) -> str:
    """``error``: ``{type, code, message}``, plus a refund token and/or NUT-18 payment request."""
    err = error.to_dm() if isinstance(error, NodeprovError) else dict(error)
    return _dumps(
        {
            "type": "error",
            "id": id,
            "error": err,
            "refund": refund,
            "payment_request": payment_request,
        }
    )


def balance_reply(id: str, balance_msat: int) -> str:
    """``balance``: the sender's account balance."""
    return _dumps({"type": "balance", "id": id, "balance_msat": balance_msat})


def withdrawal_reply(id: str, cashu: str, amount_msat: int) -> str:
    """``withdrawal``: the token paid out and its value."""
    return _dumps({"type": "withdrawal", "id": id, "cashu": cashu, "amount_msat": amount_msat})


def info_reply(
    id: str, models: Sequence[Mapping[str, Any]], mints: Sequence[str], units: Sequence[str]
) -> str:
    """``info``: models (with prices), accepted mints and units."""
    return _dumps(
        {
            "type": "info",
            "id": id,
            "models": list(models),
            "mints": list(mints),
            "units": list(units),
        }
    )


# --- parts -------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _escaped_len(ch: str) -> int:
    return len(json.dumps(ch, ensure_ascii=False).encode("utf-8")) - 2


def _part(id: str, k: int, n: int, data: str) -> str:
    return _dumps({"type": "part", "id": id, "part": k, "of": n, "data": data})


def split_parts(reply_json: str, max_bytes: int) -> list[str]:
    """Split a reply into ``part`` messages (1-based ``part`` of ``of``), each <= max_bytes UTF-8.

    A reply that already fits is returned unchanged as the only element.
    """
    if len(reply_json.encode("utf-8")) <= max_bytes:
        return [reply_json]
    ident = message_id(reply_json) or ""
    costs = list(accumulate(_escaped_len(c) for c in reply_json))
    digits = 1
    while True:
        big = 10**digits - 1
        budget = max_bytes - len(_part(ident, big, big, "").encode("utf-8"))
        if budget < 6:  # one escaped character can take 6 bytes (\u00XX)
            raise ValueError(f"max_bytes={max_bytes} is too small to carry any data")
        bounds: list[int] = []
        start, used = 0, 0
        while start < len(reply_json):
            end = bisect_right(costs, used + budget, lo=start)
            bounds.append(end)
            used = costs[end - 1]
            start = end
        if len(bounds) <= big:
            break
        digits = math.floor(math.log10(len(bounds))) + 1
    n, start, parts = len(bounds), 0, []
    for k, end in enumerate(bounds, 1):
        parts.append(_part(ident, k, n, reply_json[start:end]))
        start = end
    return parts


@dataclass(frozen=True, slots=True)
class Part:
    """One ``part`` message: piece ``part`` (1-based) of ``of`` for reply ``id``."""

    id: str
    part: int
    of: int
    data: str


def parse_part(text: str) -> Part | None:
    """A ``part`` message, or None when the text is some other message."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError, TypeError):
        return None
    if not isinstance(obj, dict) or obj.get("type") != "part":
        return None
    k, n, data, ident = obj.get("part"), obj.get("of"), obj.get("data"), obj.get("id")
    for value in (k, n):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidJobMessage("part 'part' and 'of' must be integers")
    assert isinstance(k, int) and isinstance(n, int)
    if not 1 <= k <= n or not isinstance(data, str) or not isinstance(ident, str):
        raise InvalidJobMessage("part message is malformed")
    return Part(ident, k, n, data)


def join_parts(parts: Sequence[str | Part]) -> str:
    """Join all parts of one reply (any order) into the reply JSON; raise if any are missing."""
    parsed = [p if isinstance(p, Part) else parse_part(p) for p in parts]
    if not parsed or any(p is None for p in parsed):
        raise InvalidJobMessage("join_parts needs part messages")
    items = [p for p in parsed if p is not None]
    first = items[0]
    if any(p.id != first.id or p.of != first.of for p in items):
        raise InvalidJobMessage("parts belong to different replies")
    by_index = {p.part: p.data for p in items}
    if sorted(by_index) != list(range(1, first.of + 1)):
        raise InvalidJobMessage(f"have {len(by_index)} of {first.of} parts")
    return "".join(by_index[k] for k in range(1, first.of + 1))
