"""Announcement event templates (kinds 0, 10050, 38421, 31990) and their parsing; sans I/O.

Builders return unsigned :class:`EventTemplate` objects; the announcer signs and publishes
them, and republishes when :func:`content_hash` changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from nodeprov.errors import InvalidEvent
from nodeprov.protocol.nostr_event import Event, EventTemplate

PROFILE_KIND = 0
DM_RELAYS_KIND = 10050
LISTING_KIND = 38421
HANDLER_KIND = 31990
HANDLED_KINDS = (14, 4, 5050)  # NIP-17 chat rumors, NIP-04 DMs, NIP-90 text generation
MAX_CONTENT_CHARS = 500_000


def _url(value: object, schemes: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str):
        raise InvalidEvent(f"{what} must be a string URL")
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        raise InvalidEvent(f"{what} must be a {'/'.join(schemes)} URL, got {value!r}")
    return value


def _strs(values: object, what: str) -> tuple[str, ...]:
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        raise InvalidEvent(f"{what} must be a list of strings")
    return tuple(values)


@dataclass(frozen=True, slots=True)
class ModelListing:
    """A model id, its msat prices (e.g. ``request``, ``input_per_1m``) and extra display fields."""

    id: str
    prices: Mapping[str, int]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InvalidEvent("model id must be a non-empty string")
        if not isinstance(self.prices, Mapping):
            raise InvalidEvent(f"model {self.id!r} pricing must be an object")
        for key, value in self.prices.items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int):
                raise InvalidEvent(f"model {self.id!r} prices must be integer msat amounts")
            if value < 0:
                raise InvalidEvent(f"model {self.id!r} price {key!r} is negative")
        if not isinstance(self.extra, Mapping) or {"id", "pricing"} & set(self.extra):
            raise InvalidEvent("model extra fields must be an object without 'id'/'pricing'")

    def to_json_obj(self) -> dict[str, Any]:
        """``{"id", "pricing": {name: msat}, **extra}``."""
        return {"id": self.id, "pricing": dict(self.prices), **self.extra}


@dataclass(frozen=True, slots=True)
class NodeListing:
    """What a node announces: identity, endpoints, relays, mints, units and priced models."""

    name: str
    about: str
    version: str
    http_url: str | None = None
    onion_url: str | None = None
    relays: tuple[str, ...] = ()
    mints: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    models: tuple[ModelListing, ...] = ()
    identifier: str = ""
    capabilities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("name", "about", "version", "identifier"):
            if not isinstance(getattr(self, name), str):
                raise InvalidEvent(f"listing {name} must be a string")
        if not self.name:
            raise InvalidEvent("listing name must not be empty")
        if self.http_url is not None:
            _url(self.http_url, ("http", "https"), "http_url")
        if self.onion_url is not None:
            _url(self.onion_url, ("http", "https"), "onion_url")
        for relay in _strs(self.relays, "relays"):
            _url(relay, ("ws", "wss"), "relay")
        for mint in _strs(self.mints, "mints"):
            _url(mint, ("http", "https"), "mint")
        _strs(self.units, "units")
        _strs(self.capabilities, "capabilities")
        object.__setattr__(self, "capabilities", tuple(self.capabilities))
        object.__setattr__(self, "relays", tuple(self.relays))
        object.__setattr__(self, "mints", tuple(self.mints))
        object.__setattr__(self, "units", tuple(self.units))
        object.__setattr__(self, "models", tuple(self.models))
        if not all(isinstance(m, ModelListing) for m in self.models):
            raise InvalidEvent("listing models must be ModelListing objects")

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The HTTP endpoints, clearnet first."""
        return tuple(u for u in (self.http_url, self.onion_url) if u)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _listing_content(listing: NodeListing) -> dict[str, Any]:
    return {
        "name": listing.name,
        "about": listing.about,
        "models": [m.to_json_obj() for m in listing.models],
        "units": list(listing.units),
        "capabilities": list(listing.capabilities),
    }


def content_hash(listing: NodeListing) -> str:
    """SHA-256 (hex) of a canonical JSON of every announced field; changes iff they change."""
    canonical = {
        **_listing_content(listing),
        "version": listing.version,
        "http_url": listing.http_url,
        "onion_url": listing.onion_url,
        "relays": list(listing.relays),
        "mints": list(listing.mints),
        "identifier": listing.identifier,
    }
    raw = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def profile_event(listing: NodeListing) -> EventTemplate:
    """Kind 0 metadata: ``{"name", "about", "website"}`` (website = http_url when set)."""
    meta: dict[str, str] = {"name": listing.name, "about": listing.about}
    if listing.http_url:
        meta["website"] = listing.http_url
    return EventTemplate(PROFILE_KIND, (), _dumps(meta))


def dm_relays_event(relays: tuple[str, ...] | list[str]) -> EventTemplate:
    """Kind 10050 (NIP-17 DM inbox relays): one ``relay`` tag per URL, empty content."""
    urls = [_url(r, ("ws", "wss"), "relay") for r in relays]
    return EventTemplate(DM_RELAYS_KIND, tuple(("relay", u) for u in dict.fromkeys(urls)), "")


def _d(listing: NodeListing, identifier: str | None) -> str:
    ident = identifier or listing.identifier
    if not ident:
        raise ValueError("an addressable event needs a 'd' identifier (e.g. the npub)")
    return ident


def listing_event(listing: NodeListing, identifier: str | None = None) -> EventTemplate:
    """Kind 38421 (Routstr-style listing): tags d, u (each endpoint), mint (each), version."""
    tags: list[tuple[str, ...]] = [("d", _d(listing, identifier))]
    tags += [("u", u) for u in listing.endpoints]
    tags += [("mint", m) for m in listing.mints]
    tags.append(("version", listing.version))
    return EventTemplate(LISTING_KIND, tuple(tags), _dumps(_listing_content(listing)))


def handler_event(listing: NodeListing, identifier: str | None = None) -> EventTemplate:
    """Kind 31990 (NIP-89 handler): tags d, k (14, 4, 5050); kind-0-style content, the models."""
    content = _listing_content(listing)
    if listing.http_url:
        content["website"] = listing.http_url
    tags: list[tuple[str, ...]] = [("d", _d(listing, identifier))]
    tags += [("k", str(k)) for k in HANDLED_KINDS]
    return EventTemplate(HANDLER_KIND, tuple(tags), _dumps(content))


def _parse_models(raw: object) -> tuple[ModelListing, ...]:
    if not isinstance(raw, list):
        raise InvalidEvent("listing 'models' must be a list")
    models: list[ModelListing] = []
    for item in raw:
        if not isinstance(item, dict):
            raise InvalidEvent("each listed model must be an object")
        extra = {k: v for k, v in item.items() if k not in ("id", "pricing")}
        models.append(ModelListing(item.get("id"), item.get("pricing", {}), extra))  # type: ignore[arg-type]
    return tuple(models)


def parse_listing(event: Event) -> NodeListing:
    """A NodeListing from a kind 38421 (or 31990) event; relays are not carried by these."""
    if event.kind not in (LISTING_KIND, HANDLER_KIND):
        raise InvalidEvent(f"expected a kind {LISTING_KIND} or {HANDLER_KIND} event")
    if len(event.content) > MAX_CONTENT_CHARS:
        raise InvalidEvent("listing content is too large")
    try:
        content = json.loads(event.content)
    except (ValueError, RecursionError):
        raise InvalidEvent("listing content is not valid JSON") from None
    if not isinstance(content, dict):
        raise InvalidEvent("listing content must be a JSON object")
    http_url = onion_url = None
    for url in event.tag_values("u"):
        host = urlsplit(url).hostname or ""
        if host.endswith(".onion"):
            onion_url = onion_url or url
        else:
            http_url = http_url or url
    if event.kind == HANDLER_KIND and http_url is None and isinstance(content.get("website"), str):
        http_url = content["website"]
    versions = event.tag_values("version")
    identifiers = event.tag_values("d")
    return NodeListing(
        name=content.get("name", ""),
        about=content.get("about", ""),
        version=versions[0] if versions else "",
        http_url=http_url,
        onion_url=onion_url,
        mints=tuple(event.tag_values("mint")),
        units=_strs(content.get("units", []), "listing units"),
        models=_parse_models(content.get("models", [])),
        identifier=identifiers[0] if identifiers else "",
        capabilities=_strs(content.get("capabilities", []), "listing capabilities"),
    )
