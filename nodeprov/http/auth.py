"""Who pays for a request, from its headers: ``X-Cashu`` wins over ``Authorization``.

- ``X-Cashu: cashuB…`` pays for this one request (change comes back in ``X-Cashu``);
- ``Authorization: Bearer sk-…`` is an API key;
- ``Authorization: Bearer cashuA…|cashuB…`` is a token used as a key;
- ``Authorization: Nostr <base64 event>`` (NIP-98) is the signer's npub account, the one
  its DM deposits fund (checks: :mod:`nodeprov.protocol.nip98`; each event pays once).
"""

from __future__ import annotations

import ipaddress
import time

from starlette.datastructures import Headers
from starlette.requests import Request

from nodeprov.core.payments import Payer
from nodeprov.errors import InvalidToken, Unauthorized
from nodeprov.http.context import context, read_body
from nodeprov.protocol import nip98


def _is_token(text: str) -> bool:
    return text.startswith(("cashuA", "cashuB", "cashu:"))


def bearer(headers: Headers) -> str | None:
    """The bearer credential of ``Authorization``, None when absent; 401 when malformed."""
    value = headers.get("authorization")
    if value is None or not value.strip():
        return None
    scheme, _, credential = value.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise Unauthorized(
            "Authorization must be 'Bearer sk-…', 'Bearer cashuB…' or 'Nostr <NIP-98 event>'"
        )
    return credential


def key_payer(headers: Headers) -> Payer | None:
    """An account-holding payer from ``Authorization`` (API key or token-as-key), or None."""
    credential = bearer(headers)
    if credential is None:
        return None
    if credential.startswith("sk-"):
        return Payer("api_key", credential)
    if _is_token(credential):
        return Payer("token_key", credential)
    raise Unauthorized("Unknown API key: expected 'sk-…' or a Cashu token")


def request_payer(headers: Headers) -> Payer | None:
    """The payer of a paid route: ``X-Cashu`` if present, else ``Authorization``, else None."""
    cashu = headers.get("x-cashu")
    if cashu is not None and cashu.strip():
        token = cashu.strip()
        if not _is_token(token):
            raise InvalidToken("X-Cashu must carry a Cashu token (cashuA… or cashuB…)")
        return Payer("request_token", token)
    return key_payer(headers)


def _nostr_credential(headers: Headers) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, credential = value.strip().partition(" ")
    return credential if scheme.lower() == nip98.SCHEME.lower() else None


async def nostr_payer(request: Request) -> Payer | None:
    """The npub payer of a NIP-98 ``Authorization: Nostr …`` header, None for other schemes.

    The event is checked against this request (URL, method, body, time) and recorded as used
    in the ledger, once per request however often a handler asks; any failure,
    a replay included, is a 401 that names the check.
    """
    known: Payer | None = getattr(request.state, "nip98_payer", None)
    if known is not None:
        return known
    credential = _nostr_credential(request.headers)
    if credential is None:
        return None
    ctx = context(request)
    node = ctx.config.node
    urls = nip98.request_urls(
        str(request.url),
        (node.http_url, node.onion_url),
        request.url.path,
        request.url.query,
        listen_host=ctx.config.http.host,
    )
    now = int(time.time())
    body = await read_body(request)
    signed = nip98.verify(credential, method=request.method, urls=urls, body=body, now=now)
    used = (signed.sig, signed.event_id, signed.pubkey, signed.created_at, now)
    if not await ctx.payments.first_auth_use(*used):
        raise nip98.Nip98Rejected("replayed", "this event was used before; sign one per request")
    payer = Payer("npub", signed.pubkey, "http")
    request.state.nip98_payer = payer
    request.state.nip98_event_id = signed.event_id
    return payer


async def paying(request: Request) -> Payer | None:
    """The payer of a paid route: ``X-Cashu``, else NIP-98, else a key, else None."""
    cashu = request.headers.get("x-cashu")
    if cashu is None or not cashu.strip():
        payer = await nostr_payer(request)
        if payer is not None:
            return payer
    return request_payer(request.headers)


async def account_holder(request: Request) -> Payer | None:
    """Who holds the account of a wallet route: a NIP-98 signer, else a key, else None."""
    return await nostr_payer(request) or key_payer(request.headers)


def address_key(host: str) -> str:
    """The unit an address is throttled by: an IPv4 address, an IPv6 /64 (one site's LAN)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
