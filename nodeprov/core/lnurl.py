"""LNURL-pay for Lightning addresses (LUD-16, LUD-06): parse, validate, build URLs.

Pure functions over URLs and decoded JSON, plus :func:`fetch_invoice`, the one coroutine
that does the two HTTP requests. Invoices are decoded (:mod:`nodeprov.core.invoices`) and
their amount compared with the one asked for; the ``description_hash`` is
not compared with the metadata (LUD-06 no longer requires it, and many servers differ).

Every request goes through :func:`_get_json`, the one guarded fetch: a Lightning address
(a refund address comes from a client) must not turn the node into a proxy into its own
network. A redirect is followed only on the host that sent it; a host other than the
address's own (a callback elsewhere) must resolve to public addresses only, and the
connection goes to the address that was checked (no second DNS answer in between).
A server chosen by a client must not hold the node either: each request (redirects
included) has one overall deadline, the client's timeout, and its body is read up to
:data:`MAX_BODY_BYTES`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import SplitResult, parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import httpx

from nodeprov.core.invoices import InvalidInvoice, decode_invoice
from nodeprov.errors import NodeprovError

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_REDIRECTS = 3
MAX_BODY_BYTES = 64 * 1024  # an LNURL answer is a small JSON object
DEFAULT_DEADLINE_SECONDS = 30.0  # for a client built without a timeout
_USER = re.compile(r"^[a-z0-9\-_.+]+$")  # LUD-16: the username's character set
_HOST = re.compile(r"^[a-z0-9.\-]+(:[0-9]{1,5})?$")


class LnurlError(NodeprovError):
    """A Lightning address or LNURL server that cannot be paid (bad answer, unreachable)."""

    status = 502
    type = "payout_error"
    code = "lnurl_error"
    retryable = True


@dataclass(frozen=True)
class PayRequest:
    """A validated LNURL-pay answer: where to ask for an invoice and the allowed range."""

    callback: str
    min_sendable_msat: int
    max_sendable_msat: int
    metadata: str
    home: str = ""  # the Lightning address's host ("": none is trusted without a check)


def _check_url(url: str, what: str) -> str:
    """``url`` if it is https, or http on a loopback host (tests, local dev)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and host in LOCAL_HOSTS:
        return url
    raise LnurlError(f"{what} {url!r} is not an https URL")


def address_url(address: str) -> str:
    """``user@domain`` -> ``https://domain/.well-known/lnurlp/user`` (http for localhost)."""
    user, sep, host = address.strip().partition("@")
    user, host = user.lower(), host.lower()
    if not sep or not _USER.match(user) or not _HOST.match(host):
        raise LnurlError(f"{address!r} is not a Lightning address (user@domain)")
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    local = name in LOCAL_HOSTS
    if not local and "." not in name:
        raise LnurlError(f"{address!r} is not a Lightning address (user@domain)")
    scheme = "http" if local else "https"
    return f"{scheme}://{host}/.well-known/lnurlp/{user}"


def _error_reason(data: Any) -> str | None:
    if isinstance(data, dict) and str(data.get("status", "")).upper() == "ERROR":
        return str(data.get("reason") or "no reason given")
    return None


def _int_field(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise LnurlError(f"the LNURL server sent no valid {key}")


def parse_pay_request(data: Any) -> PayRequest:
    """Validate the JSON of an LNURL-pay endpoint (``tag: payRequest``)."""
    if (reason := _error_reason(data)) is not None:
        raise LnurlError(f"the LNURL server refused: {reason}")
    if not isinstance(data, dict) or data.get("tag") != "payRequest":
        raise LnurlError("the LNURL server's answer is not a payRequest")
    callback = data.get("callback")
    if not isinstance(callback, str):
        raise LnurlError("the LNURL server sent no callback")
    low, high = _int_field(data, "minSendable"), _int_field(data, "maxSendable")
    if low < 1 or high < low:
        raise LnurlError(f"the LNURL server's range {low}..{high} msat is not valid")
    metadata = data.get("metadata", "")
    return PayRequest(
        _check_url(callback, "callback"), low, high, metadata if isinstance(metadata, str) else ""
    )


def callback_url(request: PayRequest, amount_msat: int) -> str:
    """The callback URL asking for an invoice of ``amount_msat`` (kept query params intact)."""
    if not request.min_sendable_msat <= amount_msat <= request.max_sendable_msat:
        raise LnurlError(
            f"{amount_msat} msat is outside what the address accepts"
            f" ({request.min_sendable_msat}..{request.max_sendable_msat} msat)"
        )
    parts = urlsplit(request.callback)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "amount"]
    query.append(("amount", str(amount_msat)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def parse_invoice_response(data: Any, amount_msat: int) -> str:
    """The ``pr`` invoice of a callback answer, checked to be for exactly ``amount_msat``."""
    if (reason := _error_reason(data)) is not None:
        raise LnurlError(f"the LNURL server refused the invoice request: {reason}")
    invoice = data.get("pr") if isinstance(data, dict) else None
    if not isinstance(invoice, str) or not invoice:
        raise LnurlError("the LNURL server sent no invoice")
    got = invoice_amount_msat(invoice)
    if got != amount_msat:
        shown = "no amount" if got is None else f"{got} msat"
        raise LnurlError(f"the invoice is for {shown}, not the {amount_msat} msat requested")
    return invoice


# --- BOLT11 amount --------------------------------------------------------------------


def invoice_amount_msat(invoice: str) -> int | None:
    """The amount of a BOLT11 invoice in msat (None for an invoice without amount)."""
    try:
        return decode_invoice(invoice).amount_msat
    except InvalidInvoice as exc:
        raise LnurlError(exc.message) from None


# --- the two requests, through one guarded fetch ----------------------------------------


def lnurl_client(timeout: float) -> httpx.AsyncClient:
    """An HTTP client for LNURL requests (redirects are followed by :func:`_get_json` only)."""
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False)


async def public_address(host: str, port: int) -> str:
    """An address ``host`` resolves to, if every one it resolves to is public."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise LnurlError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    found = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            raise LnurlError(f"{host} resolves to {ip}, not a public address; not contacted")
        found.append(str(ip))
    if not found:
        raise LnurlError(f"cannot resolve {host}")
    return found[0]


def _same_host(a: SplitResult, b: SplitResult) -> bool:
    """Same host and port (or an upgrade from http to https on the default port)."""
    if (a.hostname or "").lower() != (b.hostname or "").lower():
        return False
    upgrade = a.scheme == "http" and b.scheme == "https" and b.port is None
    return upgrade or (a.scheme, a.port) == (b.scheme, b.port)


async def _get_once(client: httpx.AsyncClient, url: str, home: str) -> tuple[httpx.Response, bytes]:
    """One GET, not following redirects; its body read up to :data:`MAX_BODY_BYTES`."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    headers = {"Accept": "application/json"}
    if host == home:  # the address's own host: what the operator or client named
        request = client.build_request("GET", url, headers=headers)
    else:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        ip = await public_address(host, port)
        pinned = f"[{ip}]" if ":" in ip else ip
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        target = urlunsplit(
            parts._replace(netloc=pinned if parts.port is None else f"{pinned}:{port}")
        )
        request = client.build_request(
            "GET",
            target,
            headers={**headers, "Host": netloc},
            extensions={"sni_hostname": host},  # TLS checks the certificate against the name
        )
    response = await client.send(request, stream=True, follow_redirects=False)
    try:
        body = b"" if response.has_redirect_location else await _read_capped(response, url)
    finally:
        await response.aclose()
    return response, body


async def _read_capped(response: httpx.Response, url: str) -> bytes:
    """The body, refused once it passes :data:`MAX_BODY_BYTES` (announced or as it streams)."""
    announced = response.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > MAX_BODY_BYTES:
        raise LnurlError(f"{url} announced {announced} bytes; an LNURL answer is far smaller")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise LnurlError(f"{url} sent more than {MAX_BODY_BYTES} bytes; not read further")
    return bytes(body)


def _deadline(client: httpx.AsyncClient) -> float:
    """Seconds one request may take in all: the client's longest timeout."""
    limits = client.timeout
    values = [v for v in (limits.connect, limits.read, limits.write, limits.pool) if v]
    return max(values) if values else DEFAULT_DEADLINE_SECONDS


async def _get_json(client: httpx.AsyncClient, url: str, what: str, home: str) -> Any:
    # Per-read timeouts alone let a server drip its answer for ever: one deadline in all.
    deadline = _deadline(client)
    try:
        async with asyncio.timeout(deadline):
            return await _fetch_json(client, url, what, home)
    except TimeoutError:
        raise LnurlError(f"{what} {url} did not answer within {deadline:g} s") from None


async def _fetch_json(client: httpx.AsyncClient, url: str, what: str, home: str) -> Any:
    try:
        response, body = await _get_once(client, url, home)
        for _ in range(MAX_REDIRECTS):
            if not response.has_redirect_location:
                break
            here = urlsplit(url)
            url = urljoin(url, response.headers["location"])
            there = urlsplit(url)
            if not _same_host(here, there):
                raise LnurlError(
                    f"{what} {urlunsplit(here)} redirected to another host"
                    f" ({there.hostname or url!r}); not followed"
                )
            _check_url(url, what)
            response, body = await _get_once(client, url, home)
        if response.has_redirect_location:
            raise LnurlError(f"{what} {url} redirected more than {MAX_REDIRECTS} times")
    except httpx.HTTPError as exc:
        raise LnurlError(f"{what} {url} is unreachable: {exc.__class__.__name__}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise LnurlError(f"{what} {url} answered {response.status_code}, not JSON") from None
    if response.status_code >= 400 and _error_reason(data) is None:
        raise LnurlError(f"{what} {url} answered {response.status_code}")
    return data


async def resolve(
    client: httpx.AsyncClient, address: str, *, trust_host: bool = True
) -> PayRequest:
    """Fetch and validate the LNURL-pay parameters of a Lightning address.

    ``trust_host``: contact the address's own host as written (the operator named it). A
    client-chosen address is not trusted: its host, like every other, must resolve to public
    addresses only, so a client cannot make the node call its loopback or private network.
    """
    url = address_url(address)
    named = (urlsplit(url).hostname or "").lower()
    home = named if trust_host else ""
    request = parse_pay_request(await _get_json(client, url, "the address", home))
    return replace(request, home=home)


async def request_invoice(client: httpx.AsyncClient, request: PayRequest, amount_msat: int) -> str:
    """Ask the callback for an invoice of ``amount_msat``; returns it, amount verified."""
    url = callback_url(request, amount_msat)
    data = await _get_json(client, url, "the callback", request.home)
    return parse_invoice_response(data, amount_msat)


async def fetch_invoice(client: httpx.AsyncClient, address: str, amount_msat: int) -> str:
    """Resolve ``address`` and get an invoice for exactly ``amount_msat``."""
    return await request_invoice(client, await resolve(client, address), amount_msat)
