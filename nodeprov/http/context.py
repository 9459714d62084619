"""What every route needs, built once per app: the payment pipeline, upstreams, settings."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from nodeprov import __version__
from nodeprov.config import Config
from nodeprov.core.payments import Payments
from nodeprov.core.pricing import Pricer
from nodeprov.errors import InvalidRequest
from nodeprov.observability import Metrics
from nodeprov.upstream import Upstreams


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

    @property
    def pricer(self) -> Pricer:
        return self.payments.pricer

    @property
    def mints(self) -> tuple[str, ...]:
        return tuple(m.rstrip("/") for m in self.config.wallet.mints)


def context(request: Request) -> HttpContext:
    ctx: HttpContext = request.app.state.ctx
    return ctx


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or an OpenAI-shaped 400/415."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise UnsupportedMediaType(f"expected Content-Type application/json, got {kind!r}")
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


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
