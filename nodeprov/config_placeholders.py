"""Values copied from the example config that were never replaced: refused before serving.

The example names reserved domains (RFC 2606 / RFC 6761: ``example.com``, ``example.net``,
``example.org``, ``*.example``, ``*.invalid``), which can never be a real mint or URL. A node
started with one would take no payments there, or announce a dead URL to public relays.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from nodeprov.config import Config

RESERVED_DOMAINS = ("example.com", "example.net", "example.org")
RESERVED_SUFFIXES = (".example", ".invalid")


def is_placeholder_host(host: str) -> bool:
    """Whether ``host`` is a reserved example domain (or under one)."""
    host = host.lower().rstrip(".")
    return (
        any(host == d or host.endswith("." + d) for d in RESERVED_DOMAINS)
        or host.endswith(RESERVED_SUFFIXES)
        or host in ("example", "invalid")
    )


def placeholders(config: Config) -> list[str]:
    """``key = value`` for every setting still holding an example placeholder."""
    found: list[str] = []

    def check_url(key: str, url: str) -> None:
        if url and is_placeholder_host(urlsplit(url).hostname or ""):
            found.append(f"{key} = {url!r}")

    for i, mint in enumerate(config.wallet.mints):
        check_url(f"wallet.mints[{i}]", mint)
    check_url("node.http_url", config.node.http_url)
    check_url("node.onion_url", config.node.onion_url)
    for up in config.upstreams:
        check_url(f"upstreams.{up.name}.base_url", up.base_url)
    address = config.payouts.lightning_address
    if address and is_placeholder_host(address.rpartition("@")[2]):
        found.append(f"payouts.lightning_address = {address!r}")
    return found
