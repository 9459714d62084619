"""Who pays for a request, from its headers: ``X-Cashu`` wins over ``Authorization``.

- ``X-Cashu: cashuB…`` pays for this one request (change comes back in ``X-Cashu``);
- ``Authorization: Bearer sk-…`` is an API key;
- ``Authorization: Bearer cashuA…|cashuB…`` is a token used as a key.
"""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers

from nodeprov.core.payments import Payer
from nodeprov.errors import InvalidToken, Unauthorized


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
        raise Unauthorized("Authorization must be 'Bearer sk-…' or 'Bearer cashuB…'")
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
