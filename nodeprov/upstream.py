"""Connection pools to OpenAI-compatible upstreams and model -> upstream routing.

One long-lived :class:`~nodeprov.upstream_http.HttpClient` per upstream carries its base URL,
key, pool limits and timeouts; :meth:`Upstreams.send` only builds and sends a request and maps
failures onto the :mod:`nodeprov.errors` tree, so both channels report upstream trouble alike.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from nodeprov import config
from nodeprov.errors import (
    InvalidRequest,
    NodeprovError,
    RequestTooLarge,
    UnknownModel,
    UpstreamBusy,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from nodeprov.upstream_http import HttpClient, Request, Response, Timeouts
from nodeprov.upstream_wire import (
    PoolTimeout,
    RemoteProtocolError,
    TimeoutException,
    TransportError,
)

log = logging.getLogger(__name__)

# An idle keep-alive connection is closed after this many seconds.
KEEPALIVE_EXPIRY = 30.0
CONNECT_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
HEALTH_TIMEOUT = 3.0
# Discovery runs at start; a slow /models must not hold the daemon up for a whole read timeout.
DISCOVERY_TIMEOUT = 10.0
# Error bodies are read to quote the upstream's message; cap them so a huge one costs nothing.
ERROR_BODY_LIMIT = 64 * 1024
REASON_LIMIT = 200
# Seconds a client is told to wait after an upstream 429 that named no time itself.
DEFAULT_RETRY_AFTER = 1.0
# Seconds a client is told to wait when every connection to the upstream stayed busy.
BUSY_RETRY_AFTER = 1.0
# Client headers that are safe and useful upstream; everything else (Authorization, X-Cashu,
# cookies, client fingerprints) stays here.
FORWARDED_HEADERS = frozenset({"accept", "openai-beta", "idempotency-key"})
JSON_TYPE = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Route:
    """Where a public model name goes: upstream name, the upstream's model name, its client."""

    upstream: str
    model: str
    client: HttpClient = field(compare=False, repr=False)


class Upstreams:
    """The upstream clients and the routing table built from ``[[upstreams]]``."""

    def __init__(
        self,
        upstreams: Sequence[config.Upstream],
        priced: Callable[[str], bool],
    ) -> None:
        self._configs = tuple(upstreams)
        self._priced = priced
        self._clients = {up.name: _make_client(up) for up in self._configs}
        self._routes: dict[str, Route] = {}
        # Listed models first (in config order), so a discovered name never steals a listed one.
        for up in self._configs:
            for model in up.models:
                self._add(up.name, model, model)
        for up in self._configs:
            for alias, target in up.aliases.items():
                self._add(up.name, alias, target)

    @classmethod
    def from_config(cls, cfg: config.Config) -> Upstreams:
        """Upstreams of ``cfg``; a model is routable only if ``cfg.models`` prices it."""
        return cls(cfg.upstreams, cfg.models.__contains__)

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
            async with asyncio.timeout(DISCOVERY_TIMEOUT):  # connecting included
                response = await self._clients[up.name].get("models")
            if not response.is_success:
                raise ValueError(f"GET models answered {response.status_code}")
            data = response.json()["data"]
            return [str(item["id"]) for item in data if isinstance(item, dict) and "id" in item]
        except (TransportError, TimeoutError, ValueError, KeyError, TypeError) as exc:
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
        raw_json: bytes | None = None,
        content: bytes | None = None,
        files: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        data: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Request:
        """The request :meth:`send` sends: upstream model name in the body, safe headers only.

        ``raw_json`` is a JSON body already encoded that names the upstream's model (see
        :func:`forwardable`): sent as is, never parsed or encoded again.
        """
        forwarded = _forwarded(headers, raw_body=content is not None)
        if raw_json is not None:
            content = raw_json
            forwarded.update(JSON_TYPE)
        elif json is not None:
            content = jsonlib.dumps({**json, "model": route.model}).encode()
            forwarded.update(JSON_TYPE)
        elif files is not None or data is not None:
            if data is not None and "model" in data:
                data = {**data, "model": route.model}
            # The multipart encoding of httpx, into bytes (uploads are bounded by the body cap).
            form = httpx.Request(method, "http://upstream/", data=data, files=files)
            content = form.read()
            forwarded["Content-Type"] = form.headers["content-type"]
        return route.client.build(method, path, forwarded, content or b"")

    async def send(
        self,
        route: Route,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        raw_json: bytes | None = None,
        content: bytes | None = None,
        files: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        data: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
    ) -> Response:
        """Send to ``route``'s upstream (``path`` relative to its base URL); 2xx or an error.

        With ``stream=True`` the body is not read: iterate it (:func:`iter_stream`), ``aclose()``.
        """
        request = self.build(
            route,
            method,
            path,
            json=json,
            raw_json=raw_json,
            content=content,
            files=files,
            data=data,
            headers=headers,
        )
        try:
            response = await route.client.send(request, stream=True)
            if response.is_success:
                if not stream:
                    await response.aread()
                return response
        except TransportError as exc:
            raise map_transport_error(exc, route.upstream) from exc
        try:
            body = await _read_capped(response)
        except TransportError:
            body = b""
        finally:
            await response.aclose()
        raise map_status_error(response, body, route.upstream)

    async def check(self) -> dict[str, dict[str, Any]]:
        """Per upstream: does ``GET models`` answer (any HTTP status means it is reachable)."""

        async def probe(name: str, client: HttpClient) -> dict[str, Any]:
            try:
                async with asyncio.timeout(HEALTH_TIMEOUT):  # connecting included
                    response = await client.get("models")
            except (TransportError, TimeoutError) as exc:
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


def forwardable(route: Route, body: Mapping[str, Any], raw: bytes) -> bytes | None:
    """``raw`` (the client's JSON bytes, parsed as ``body``) if it can go upstream unchanged.

    Only when the client named the upstream's own model and every top-level key appears
    once, unescaped: a body naming a key twice could be read by the upstream's parser
    otherwise than it was priced here (first wins there, last here).
    """
    if body.get("model") != route.model or b"\\u00" in raw:
        return None
    for key in body:
        if raw.count(b'"' + key.encode() + b'"') != 1:
            return None
    return raw


async def iter_stream(response: Response, upstream: str = "upstream") -> AsyncIterator[bytes]:
    """The streamed body chunk by chunk as it arrives; transport failures become upstream errors."""
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except TransportError as exc:
        raise map_transport_error(exc, upstream) from exc


def map_transport_error(exc: TransportError, upstream: str) -> NodeprovError:
    """The nodeprov error for a failure talking to ``upstream`` below HTTP."""
    if isinstance(exc, PoolTimeout):
        return UpstreamBusy(
            f"upstream {upstream} is busy: every connection to it is in use ({exc}); "
            f"retry after {BUSY_RETRY_AFTER:g} s",
            retry_after=BUSY_RETRY_AFTER,
            upstream=upstream,
        )
    if isinstance(exc, TimeoutException):
        return UpstreamTimeout(f"upstream {upstream} timed out ({_describe(exc)})")
    if isinstance(exc, RemoteProtocolError):
        return UpstreamError(f"upstream {upstream} broke the connection ({_describe(exc)})")
    return UpstreamUnavailable(f"upstream {upstream} is unreachable ({_describe(exc)})")


def map_status_error(response: Response, body: bytes, upstream: str) -> NodeprovError:
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


def _make_client(up: config.Upstream) -> HttpClient:
    headers = {"Authorization": f"Bearer {up.api_key}"} if up.api_key else {}
    timeouts = Timeouts(
        connect=CONNECT_TIMEOUT,
        read=float(up.timeout_seconds),
        write=WRITE_TIMEOUT,
        pool=float(up.pool_wait_seconds),
    )
    return HttpClient(
        up.base_url,
        headers=headers,
        timeouts=timeouts,
        max_connections=up.max_connections,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )


def nodelay_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """A pooled httpx transport with TCP_NODELAY (for the node's other clients: the mints).

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


async def _read_capped(response: Response) -> bytes:
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
