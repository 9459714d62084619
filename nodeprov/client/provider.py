"""A provider as the client sees it: base URL, mints, units, relays and per-model prices.

``resolve`` takes an HTTP URL or a Nostr key (npub, nprofile, hex); a key is looked up in
its kind 38421 (else 31990) announcement on the given relays. Prices come from the
provider's ``/v1/models`` (``pricing_msat``) and feed the node's own :class:`Pricer`, so
the client sizes a payment with exactly the rules the node holds by.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import httpx

from nodeprov.config import ModelPrice, Rate
from nodeprov.core.pricing import Pricer
from nodeprov.errors import NodeprovError, UpstreamError
from nodeprov.nostr.relay_pool import RelayPool
from nodeprov.protocol.announcements import HANDLER_KIND, LISTING_KIND, NodeListing, parse_listing
from nodeprov.protocol.nip19 import decode_pubkey, nprofile_decode, npub_encode
from nodeprov.protocol.nostr_event import Event, verify_event

DEFAULT_RELAYS = ("wss://relay.damus.io", "wss://nos.lol", "wss://relay.nostr.band")


class ProviderError(UpstreamError):
    """The provider misbehaved: a bad answer, an overcharge, missing or spent change."""

    code = "provider_error"


class ProviderDown(ProviderError):
    status = 503
    code = "provider_unavailable"
    retryable = True


class Overcharged(ProviderError):
    status = 402
    code = "provider_overcharged"


@dataclass(frozen=True)
class Provider:
    """A provider's endpoint and terms, read from its ``/v1/info`` and ``/v1/models``."""

    base_url: str
    name: str = ""
    npub: str | None = None
    mints: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    relays: tuple[str, ...] = ()
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    listed: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    models: tuple[str, ...] = ()

    @property
    def api(self) -> str:
        return self.base_url + "/v1"

    def pricer(self) -> Pricer:
        """The node's pricing rules over the listed msat prices (fee already included)."""
        return Pricer(MappingProxyType(dict(self.prices)), Fraction(1), None)

    def price_of(self, model: str) -> Mapping[str, int] | None:
        return self.listed.get(model)


def base_url(url: str) -> str:
    """``http://h:p/v1/`` -> ``http://h:p``."""
    url = url.strip().rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def _msat(value: Any) -> Rate | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return Rate(Fraction(value), "msat")


def _positive(value: Any, default: int) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return int(value) if ok else default


def model_price(entry: Mapping[str, Any]) -> tuple[ModelPrice, dict[str, int]] | None:
    """A ModelPrice from one ``/v1/models`` entry (None when it carries no msat prices)."""
    listed = entry.get("pricing_msat")
    if not isinstance(listed, Mapping):
        return None
    prices = {k: v for k, v in listed.items() if isinstance(v, int) and not isinstance(v, bool)}
    images = {k[6:]: r for k, v in prices.items() if k.startswith("image:") and (r := _msat(v))}
    price = ModelPrice(
        request=_msat(prices.get("request")),
        input_per_1m=_msat(prices.get("input_per_1m")),
        output_per_1m=_msat(prices.get("output_per_1m")),
        speech_per_1m_chars=_msat(prices.get("speech_per_1m_chars")),
        image=MappingProxyType(images),
        context_tokens=_positive(entry.get("context_length"), 128_000),
        max_output_tokens=_positive(entry.get("max_output_tokens"), 16_384),
    )
    return price, prices


async def fetch_provider(
    url: str, client: httpx.AsyncClient, *, npub: str | None = None
) -> Provider:
    """Read ``/v1/info`` and ``/v1/models`` of the provider at ``url``."""
    base = base_url(url)
    info = await _get_json(client, base + "/v1/info")
    listing = await _get_json(client, base + "/v1/models")
    data = listing.get("data") if isinstance(listing, Mapping) else None
    if not isinstance(info, Mapping) or not isinstance(data, list):
        raise ProviderError(f"the provider at {base} sent an unexpected /v1/info or /v1/models")
    prices: dict[str, ModelPrice] = {}
    listed: dict[str, Mapping[str, int]] = {}
    models: list[str] = []
    for entry in data:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
            continue
        models.append(entry["id"])
        priced = model_price(entry)
        if priced is not None:
            prices[entry["id"]], listed[entry["id"]] = priced
    claimed = info.get("npub") if isinstance(info.get("npub"), str) else None
    if npub is not None and claimed is not None and claimed != npub:
        raise ProviderError(f"the endpoint {base} belongs to {claimed}, not {npub}")
    return Provider(
        base_url=base,
        name=str(info.get("name") or ""),
        npub=claimed or npub,
        mints=_strs(info.get("mints")),
        units=_strs(info.get("units")),
        relays=_strs(info.get("relays")),
        prices=MappingProxyType(prices),
        listed=MappingProxyType(listed),
        models=tuple(models),
    )


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


async def _get_json(client: httpx.AsyncClient, url: str) -> Any:
    try:
        response = await client.get(url)
    except httpx.TransportError as exc:
        raise ProviderDown(
            f"the provider at {url} is unreachable: {exc or type(exc).__name__}"
        ) from None
    if response.status_code >= 400:
        raise ProviderDown(f"the provider answered {response.status_code} at {url}")
    try:
        return response.json()
    except ValueError:
        raise ProviderError(f"the provider sent a non-JSON answer at {url}") from None


# --- Nostr look-ups -------------------------------------------------------------------


def _verified(raw: dict[str, Any]) -> bool:
    try:
        return verify_event(Event.from_dict(raw))
    except NodeprovError:
        return False


async def query_events(
    relays: Sequence[str], filters: Sequence[Mapping[str, Any]], wait: float = 5.0
) -> list[Event]:
    """Stored events matching ``filters`` on ``relays`` (signature-checked, each once)."""
    events: list[Event] = []
    pool = RelayPool(relays, connect_timeout=wait, backoff_cap=wait)
    try:
        sub = pool.subscribe(filters, verify=_verified)
        await sub.wait_eose(wait)
        while len(sub):
            _, raw = await anext(sub)
            with contextlib.suppress(NodeprovError):
                events.append(Event.from_dict(raw))
    finally:
        await pool.close()
    return events


def newest_listings(events: Sequence[Event]) -> dict[str, tuple[Event, NodeListing]]:
    """Per author, the newest valid 38421 listing (31990 only when there is no 38421)."""
    best: dict[str, tuple[Event, NodeListing]] = {}
    for event in sorted(events, key=lambda e: (e.kind == LISTING_KIND, e.created_at)):
        try:
            listing = parse_listing(event)
        except NodeprovError:
            continue
        best[event.pubkey] = (event, listing)
    return best


def key_and_relays(target: str) -> tuple[str, tuple[str, ...]]:
    """A hex pubkey and relay hints (from an nprofile) for a Nostr provider reference."""
    text = target.strip().removeprefix("nostr:")
    if text.lower().startswith("nprofile1"):
        profile = nprofile_decode(text)
        return profile.pubkey, profile.relays
    return decode_pubkey(text), ()


def from_listing(pubkey: str, listing: NodeListing, relays: Sequence[str]) -> Provider:
    """A provider as announced (prices from the listing; no HTTP check)."""
    prices: dict[str, ModelPrice] = {}
    listed: dict[str, Mapping[str, int]] = {}
    for model in listing.models:
        priced = model_price({**model.extra, "pricing_msat": dict(model.prices)})
        if priced is not None:
            prices[model.id], listed[model.id] = priced
    return Provider(
        base_url=base_url(listing.http_url) if listing.http_url else "",
        name=listing.name,
        npub=npub_encode(pubkey),
        mints=tuple(m.rstrip("/") for m in listing.mints),
        units=listing.units,
        relays=tuple(relays),
        prices=MappingProxyType(prices),
        listed=MappingProxyType(listed),
        models=tuple(m.id for m in listing.models),
    )


async def announced(target: str, relays: Sequence[str], wait: float = 5.0) -> Provider:
    """The provider a Nostr key announces (kind 38421, else 31990) on ``relays``."""
    pubkey, hints = key_and_relays(target)
    use = tuple(dict.fromkeys([*relays, *hints])) or DEFAULT_RELAYS
    filters = [{"kinds": [LISTING_KIND, HANDLER_KIND], "authors": [pubkey]}]
    found = newest_listings(await query_events(use, filters, wait))
    if pubkey not in found:
        npub = npub_encode(pubkey)
        raise ProviderDown(f"no provider announcement (kind {LISTING_KIND}) of {npub} on {use}")
    return from_listing(pubkey, found[pubkey][1], use)


def is_url(target: str) -> bool:
    return target.strip().lower().startswith(("http://", "https://"))


async def resolve(
    target: str,
    client: httpx.AsyncClient,
    relays: Sequence[str] = (),
    *,
    wait: float = 5.0,
) -> Provider:
    """The provider behind a URL or a Nostr key (through its announcement on ``relays``)."""
    if is_url(target):
        return await fetch_provider(target, client)
    listed = await announced(target, relays, wait)
    npub = listed.npub
    endpoints = [listed.base_url] if listed.base_url else []
    if not endpoints:
        raise ProviderError(f"{npub} announces no HTTP endpoint")
    errors = []
    for endpoint in endpoints:
        try:
            provider = await fetch_provider(endpoint, client, npub=npub)
        except ProviderError as exc:
            errors.append(exc.message)
            continue
        merged = tuple(dict.fromkeys([*provider.relays, *listed.relays]))
        return dataclasses.replace(provider, relays=merged)
    raise ProviderDown("; ".join(errors))
