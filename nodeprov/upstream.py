"""Connection pool to OpenAI-compatible upstreams and model -> upstream routing.

One long-lived ``httpx.AsyncClient`` per upstream carries its base URL, key, pool limits
and timeouts; :meth:`Upstreams.send` only builds and sends a request and maps failures
onto the :mod:`nodeprov.errors` tree, so both channels report upstream trouble alike.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import logging
import socket
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from nodeprov import config
from nodeprov.errors import (
    InvalidRequest,
    NodeprovError,
    RequestTooLarge,
    UnknownModel,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)

log = logging.getLogger(__name__)

# Sized for many concurrent long streams to one upstream; keep-alive saves the TLS handshake.
POOL_LIMITS = httpx.Limits(
    max_connections=200, max_keepalive_connections=100, keepalive_expiry=30.0
)
CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
POOL_TIMEOUT = 10.0
HEALTH_TIMEOUT = 3.0
# Discovery runs at start; a slow /models must not hold the daemon up for a whole read timeout.
DISCOVERY_TIMEOUT = httpx.Timeout(10.0)
# Error bodies are read to quote the upstream's message; cap them so a huge one costs nothing.
ERROR_BODY_LIMIT = 64 * 1024
REASON_LIMIT = 200
# Seconds a client is told to wait after an upstream 429 that named no time itself.
DEFAULT_RETRY_AFTER = 1.0
# Client headers that are safe and useful upstream; everything else (Authorization, X-Cashu,
# cookies, client fingerprints) stays here.
FORWARDED_HEADERS = frozenset({"accept", "openai-beta", "idempotency-key"})


@dataclass(frozen=True)
class Route:
    """Where a public model name goes: upstream name, the upstream's model name, its client."""

    upstream: str
    model: str
    client: httpx.AsyncClient = field(compare=False, repr=False)


class Upstreams:
    """The upstream clients and the routing table built from ``[[upstreams]]``."""

    def __init__(
        self,
        upstreams: Sequence[config.Upstream],
        priced: Callable[[str], bool],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._configs = tuple(upstreams)
        self._priced = priced
        self._clients = {up.name: _make_client(up, transport) for up in self._configs}
        self._routes: dict[str, Route] = {}
        # Listed models first (in config order), so a discovered name never steals a listed one.
        for up in self._configs:
            for model in up.models:
                self._add(up.name, model, model)
        for up in self._configs:
            for alias, target in up.aliases.items():
                self._add(up.name, alias, target)

    @classmethod
    def from_config(
        cls, cfg: config.Config, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> Upstreams:
        """Upstreams of ``cfg``; a model is routable only if ``cfg.models`` prices it."""
        return cls(cfg.upstreams, cfg.models.__contains__, transport=transport)

    def _add(self, upstream: str, public: str, model: str) -> bool:
        if public in self._routes or not self._priced(model):
            return False
        self._routes[public] = Route(upstream, model, self._clients[upstream])
        return True

    async def start(self) -> None:
        """Discover models of upstreams with ``discover_models``; failures are only logged."""
        wanted = [up for up in self._configs if up.discover_models]
        found = await asyncio.gather(*(self._discover(up) for up in wanted))
        for up, ids in zip(wanted, found, strict=True):
            added = [model for model in ids if self._add(up.name, model, model)]
            log.info(
                "upstream %s: discovered %d models, %d newly routable",
                up.name,
                len(ids),
                len(added),
            )

    async def _discover(self, up: config.Upstream) -> list[str]:
        try:
            response = await self._clients[up.name].get("models", timeout=DISCOVERY_TIMEOUT)
            response.raise_for_status()
            data = response.json()["data"]
            return [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("upstream %s: model discovery failed: %s", up.name, _describe(exc))
            return []

    def route(self, model: str) -> Route:
        """The route for a public model name or alias, or :class:`UnknownModel`."""
        found = self._routes.get(model)
        if found is None:
            raise UnknownModel(f"model {model!r} is not offered here")
        return found

    def models(self) -> list[str]:
        """Every routable public name (models and aliases), sorted."""
        return sorted(self._routes)

    def build(
        self,
        route: Route,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
        files: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        data: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Request:
        """The request :meth:`send` sends: upstream model name in the body, safe headers only."""
        if json is not None:
            json = {**json, "model": route.model}
        if data is not None and "model" in data:
            data = {**data, "model": route.model}
        return route.client.build_request(
            method,
            path.lstrip("/"),
            json=json,
            content=content,
            files=files,
            data=data,
            headers=_forwarded(headers, raw_body=content is not None),
        )

    async def send(
        self,
        route: Route,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
        files: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        data: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Send to ``route``'s upstream (``path`` relative to its base URL); 2xx or an error.

        With ``stream=True`` the body is not read: iterate it (:func:`iter_stream`), ``aclose()``.
        """
        request = self.build(
            route,
            method,
            path,
            json=json,
            content=content,
            files=files,
            data=data,
            headers=headers,
        )
        try:
            response = await route.client.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise map_transport_error(exc, route.upstream) from exc
        if response.is_success:
            return response
        try:
            body = await _read_capped(response) if stream else response.content
        except httpx.HTTPError:
            body = b""
        finally:
            await response.aclose()
        raise map_status_error(response, body, route.upstream)

    async def check(self) -> dict[str, dict[str, Any]]:
        """Per upstream: does ``GET models`` answer (any HTTP status means it is reachable)."""

        async def probe(name: str, client: httpx.AsyncClient) -> dict[str, Any]:
            try:
                response = await client.get("models", timeout=HEALTH_TIMEOUT)
            except httpx.HTTPError as exc:
                return {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:200]}
            return {"ok": response.status_code < 500, "status": response.status_code}

        names = list(self._clients)
        results = await asyncio.gather(*(probe(n, self._clients[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def aclose(self) -> None:
        """Close every upstream client (idempotent)."""
        await asyncio.gather(*(client.aclose() for client in self._clients.values()))

    async def __aenter__(self) -> Upstreams:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def iter_stream(response: httpx.Response, upstream: str = "upstream") -> AsyncIterator[bytes]:
    """The streamed body chunk by chunk as it arrives; transport failures become upstream errors."""
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.HTTPError as exc:
        raise map_transport_error(exc, upstream) from exc


def map_transport_error(exc: httpx.HTTPError, upstream: str) -> NodeprovError:
    """The nodeprov error for an httpx failure talking to ``upstream``."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"upstream {upstream} timed out ({_describe(exc)})")
    if isinstance(exc, httpx.RemoteProtocolError):
        return UpstreamError(f"upstream {upstream} broke the connection ({_describe(exc)})")
    return UpstreamUnavailable(f"upstream {upstream} is unreachable ({_describe(exc)})")


def map_status_error(response: httpx.Response, body: bytes, upstream: str) -> NodeprovError:
    """The nodeprov error for a non-2xx upstream answer with (up to a cap of) its ``body``."""
    status = response.status_code
    message = _error_message(body) or response.reason_phrase or "no reason given"
    details: dict[str, Any] = {"upstream": upstream, "upstream_status": status}
    if status == 429:
        # Always with a Retry-After: a client that gets none may retry at once, or not at all.
        given = _retry_after(response.headers.get("retry-after"))
        wait = given if given is not None else DEFAULT_RETRY_AFTER
        return UpstreamRateLimited(
            f"upstream {upstream} is rate limited (429); retry after {wait:g} s",
            retry_after=wait,
            **details,
        )
    if status == 503:
        retry_after = _retry_after(response.headers.get("retry-after"))
        hint = f"; retry after {retry_after:g} s" if retry_after is not None else "; retry later"
        return UpstreamUnavailable(
            f"upstream {upstream} is overloaded (503){hint}", retry_after=retry_after, **details
        )
    if status >= 500:
        return UpstreamError(f"upstream {upstream} failed ({status}): {message}", **details)
    if status in (401, 403, 407):
        # The node's own credentials were refused: the operator's problem, and the upstream's
        # message may quote part of the key, so it is not passed on.
        return UpstreamError(
            f"upstream {upstream} refused the node's credentials ({status})", **details
        )
    if status == 408:
        return UpstreamTimeout(f"upstream {upstream} timed out ({status})", **details)
    if status == 413:
        return RequestTooLarge(message, **details)
    return InvalidRequest(message, **details)


def _make_client(
    up: config.Upstream, transport: httpx.AsyncBaseTransport | None
) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {up.api_key}"} if up.api_key else {}
    timeout = httpx.Timeout(
        connect=CONNECT_TIMEOUT,
        read=float(up.timeout_seconds),
        write=WRITE_TIMEOUT,
        pool=POOL_TIMEOUT,
    )
    return httpx.AsyncClient(
        base_url=up.base_url.rstrip("/") + "/",
        headers=headers,
        timeout=timeout,
        transport=transport or nodelay_transport(POOL_LIMITS),
    )


def nodelay_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """A pooled transport with TCP_NODELAY: a request's headers and body leave at once.

    Without it Nagle's algorithm holds the body until the server acknowledges the headers,
    and delayed ACKs turn that into ~40 ms on every request.
    """
    return httpx.AsyncHTTPTransport(
        limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    )


def _forwarded(headers: Mapping[str, str] | None, *, raw_body: bool) -> dict[str, str]:
    if not headers:
        return {}
    # A raw body (e.g. a multipart upload passed through) is meaningless without its type.
    allowed = FORWARDED_HEADERS | {"content-type"} if raw_body else FORWARDED_HEADERS
    return {k: v for k, v in headers.items() if k.lower() in allowed}


async def _read_capped(response: httpx.Response) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= ERROR_BODY_LIMIT:
            break
    return bytes(body[:ERROR_BODY_LIMIT])


def _error_message(body: bytes) -> str:
    """The upstream's error text: OpenAI's ``error.message`` and common variants, else raw."""
    text = body.decode("utf-8", "replace").strip()
    try:
        doc = jsonlib.loads(text)
    except ValueError:
        return _short(text)
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        for candidate in (
            err.get("message") if isinstance(err, dict) else err,
            doc.get("detail"),
            doc.get("message"),
        ):
            if isinstance(candidate, str) and candidate:
                return _short(candidate)
    return _short(text)


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None  # an HTTP date: rare from APIs, and "retry later" says enough
    return seconds if seconds is not None and seconds >= 0 else None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 1] + "…"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
