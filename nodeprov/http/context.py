"""What every route needs, built once per app: the payment pipeline, upstreams, settings."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from nodeprov import __version__
from nodeprov.config import Config
from nodeprov.core.lightning_funding import LightningFunding
from nodeprov.core.lnurl import LnurlError, address_url
from nodeprov.core.payments import Payments
from nodeprov.core.pricing import Pricer
from nodeprov.errors import InvalidRequest
from nodeprov.observability import Metrics
from nodeprov.protocol import json_input, openai_body
from nodeprov.protocol.json_input import int_param
from nodeprov.upstream import Upstreams

# 9999-12-31T23:59:59Z: the latest time a client may name (expiry dates).
MAX_UNIX_TIME = 253_402_300_799


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


@dataclass
class HttpContext:
    """Shared, read-only wiring of the HTTP channel (no per-request setup)."""

    config: Config
    payments: Payments
    upstreams: Upstreams
    npub: str | None = None
    version: str = __version__
    metrics: Metrics | None = None
    # Lightning top-ups (``/v1/wallet/lightning``), built by whoever owns the wallet.
    funding: LightningFunding = field(kw_only=True)

    @property
    def pricer(self) -> Pricer:
        return self.payments.pricer

    @property
    def mints(self) -> tuple[str, ...]:
        return tuple(m.rstrip("/") for m in self.config.wallet.mints)


def context(request: Request) -> HttpContext:
    ctx: HttpContext = request.app.state.ctx
    return ctx


async def read_body(request: Request) -> bytes:
    """The whole body, however it was framed (Content-Length or chunked); size-capped upstream."""
    return await request.body()


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object under :mod:`nodeprov.protocol.json_input`'s limits, else 400."""
    try:
        body = json_input.loads(raw)
    except json_input.JsonRejected as exc:
        raise InvalidRequest(f"the request body is refused: {exc}") from None
    except ValueError:  # UnicodeDecodeError included
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _content_type(request: Request) -> str:
    kind = request.headers.get("content-type", "application/json").split(";")[0]
    kind = kind.strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise UnsupportedMediaType(f"expected Content-Type application/json, got {kind!r}")
    return kind


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or an OpenAI-shaped 400/415.

    The one reader of JSON bodies: strict parsing (nesting, integer range, finite numbers),
    chunked bodies read like any other, and the OpenAI shapes the node relies on checked
    for the route's path (``messages`` for chat) before anything is held.
    """
    _content_type(request)
    body = parse_json_object(await read_body(request))
    openai_body.check_body(request.url.path, body)
    return body


async def read_params(request: Request) -> dict[str, Any]:
    """Query parameters overlaid with the JSON body, if there is one (Routstr takes both).

    Whether a body exists is decided by reading it, never by ``Content-Length`` alone: a
    chunked body has none.
    """
    params: dict[str, Any] = dict(request.query_params)
    raw = await read_body(request)
    if raw.strip():
        _content_type(request)
        params.update(parse_json_object(raw))
    return params


def _encode(value: Any) -> str:
    """JSON with ``Decimal`` written as a number (exact digits, never through float)."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("non-finite Decimal")
        return str(value)
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(k))}:{_encode(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


class JSON(Response):
    """A JSON response that renders ``Decimal`` values as JSON numbers."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encode(content).encode("utf-8")


def new_key_options(params: dict[str, Any]) -> tuple[int | None, str | None]:
    """A new key's ``expires_at`` (future unix seconds) and ``refund_address`` (a Lightning
    address the refund can reach), checked before any money moves."""
    expires_at = int_param(params, "expires_at", maximum=MAX_UNIX_TIME)
    if expires_at is not None and expires_at <= time.time():
        raise InvalidRequest("'expires_at' must be a future unix time in seconds")
    address = params.get("refund_address")
    if address is not None:
        try:
            address_url(str(address))  # the refund must be able to reach it
        except LnurlError:
            raise InvalidRequest(
                "'refund_address' must be a Lightning address (user@domain)"
            ) from None
    return expires_at, address
