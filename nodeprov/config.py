"""Typed, frozen settings: a TOML file plus ``NODEPROV_*`` environment overrides.

Built once by the CLI (:func:`load_config`) and passed down; nothing reads settings
globally. Every problem is reported as :class:`~nodeprov.errors.ConfigError` naming the
key and why. Numbers with a fraction are read as ``Decimal`` so no float reaches money.

Environment overrides use ``__`` between levels and TOML syntax for values, e.g.
``NODEPROV_HTTP__PORT=9000`` or ``NODEPROV_WALLET__MINTS='["http://127.0.0.1:3338"]'``;
a value that is not valid TOML is taken as a string.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from nodeprov.core.money import Unit
from nodeprov.errors import ConfigError

ENV_PREFIX = "NODEPROV_"


@dataclass(frozen=True)
class Rate:
    """A price in msat or in USD; exact (``Fraction``), converted at pricing time."""

    amount: Fraction
    currency: str  # "msat" or "usd"


@dataclass(frozen=True)
class ModelPrice:
    """What one model costs; every rate is optional and defaults to free."""

    request: Rate | None = None
    input_per_1m: Rate | None = None
    output_per_1m: Rate | None = None
    image: Mapping[str, Rate] = field(default_factory=lambda: MappingProxyType({}))
    audio_per_second: Rate | None = None
    speech_per_1m_chars: Rate | None = None
    context_tokens: int = 128_000
    max_output_tokens: int = 16_384


@dataclass(frozen=True)
class NodeSection:
    name: str = "nodeprov"
    description: str = "LLM access paid with Cashu eCash"
    data_dir: Path = Path("./data")
    http_url: str = ""
    onion_url: str = ""


@dataclass(frozen=True)
class HttpSection:
    host: str = "127.0.0.1"
    port: int = 8000
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True)
class NostrSection:
    relays: tuple[str, ...] = ()
    key_file: str = "nostr.key"


@dataclass(frozen=True)
class WalletSection:
    mints: tuple[str, ...] = ()
    units: tuple[Unit, ...] = ("sat", "msat")
    mint_timeout_seconds: Decimal = Decimal(10)


@dataclass(frozen=True)
class LedgerSection:
    hold_timeout_seconds: int = 900


@dataclass(frozen=True)
class RateSource:
    """An HTTP JSON endpoint and the dotted path to the BTC/USD number in it."""

    url: str
    path: str


@dataclass(frozen=True)
class PricingSection:
    fee_multiplier: Fraction = Fraction(1)
    btc_usd_sources: tuple[RateSource, ...] = ()
    btc_usd_fallback: Decimal = Decimal(0)
    btc_usd_max_age_seconds: int = 3600
    btc_usd_refresh_seconds: int = 300


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    api_key: str = ""
    models: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    discover_models: bool = False
    timeout_seconds: Decimal = Decimal(120)


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    http: HttpSection = field(default_factory=HttpSection)
    nostr: NostrSection = field(default_factory=NostrSection)
    wallet: WalletSection = field(default_factory=WalletSection)
    ledger: LedgerSection = field(default_factory=LedgerSection)
    pricing: PricingSection = field(default_factory=PricingSection)
    upstreams: tuple[Upstream, ...] = ()
    models: Mapping[str, ModelPrice] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def ledger_path(self) -> Path:
        return self.node.data_dir / "ledger.sqlite3"


_SECTIONS: dict[str, type[Any]] = {
    "node": NodeSection,
    "http": HttpSection,
    "nostr": NostrSection,
    "wallet": WalletSection,
    "ledger": LedgerSection,
    "pricing": PricingSection,
}
_RATE_KEYS = ("request", "input_per_1m", "output_per_1m", "audio_per_second", "speech_per_1m_chars")


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    require_upstream: bool = True,
) -> Config:
    """Read ``path`` (if given), apply ``NODEPROV_*`` overrides from ``env``, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(), parse_float=Decimal)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    _apply_env(raw, os.environ if env is None else env)
    config = build_config(raw, base_dir=Path(path).parent if path else Path.cwd())
    validate(config, require_upstream=require_upstream)
    return config


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        target = raw
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{name}: '{key}' is not a table in the config")
        target[keys[-1]] = _parse_env_value(text)


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}", parse_float=Decimal)["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_config(raw: Mapping[str, Any], base_dir: Path) -> Config:
    """Turn parsed TOML into a :class:`Config`, rejecting unknown keys and wrong types."""
    known = [*_SECTIONS, "upstreams", "models"]
    _reject_unknown(raw, known, "")
    sections = {
        name: _build_section(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()
    }
    node: NodeSection = sections["node"]
    if not node.data_dir.is_absolute():
        sections["node"] = NodeSection(
            **{**_as_dict(node), "data_dir": (base_dir / node.data_dir).resolve()}
        )
    upstreams = raw.get("upstreams", [])
    if not isinstance(upstreams, list):
        raise ConfigError("upstreams: must be an array of tables ([[upstreams]])")
    models = raw.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError("models: must be a table of model names ([models.\"name\"])")
    return Config(
        **sections,
        upstreams=tuple(_build_upstream(u, i) for i, u in enumerate(upstreams)),
        models=MappingProxyType({m: _build_price(m, v) for m, v in models.items()}),
    )


def _as_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _reject_unknown(raw: Mapping[str, Any], known: list[str], where: str) -> None:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: must be a table")
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown key '{where}{key}'{suggestion}")


def _build_section(cls: type[Any], raw: Any, where: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    _reject_unknown(raw, names, f"{where}.")
    values = {}
    for key, value in raw.items():
        values[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if hint is Decimal:
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return Decimal(value)
    if hint is Fraction:
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return Fraction(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value).expanduser()
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array, got {value!r}")
        item = get_args(hint)[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint == RateSource:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table {{url = ..., path = ...}}")
        return _build_section(RateSource, value, where)
    if origin is Literal:
        if value not in get_args(hint):
            choices = ", ".join(repr(a) for a in get_args(hint))
            raise ConfigError(f"{where}: must be one of {choices}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported value {value!r}")  # pragma: no cover


def _build_upstream(raw: Any, index: int) -> Upstream:
    where = f"upstreams[{index}]"
    names = [f.name for f in fields(Upstream)] + ["api_key_env"]
    _reject_unknown(raw, names, f"{where}.")
    raw = dict(raw)
    for required in ("name", "base_url"):
        if required not in raw:
            raise ConfigError(f"{where}.{required}: required")
    key_env = raw.pop("api_key_env", None)
    if key_env is not None:
        if not isinstance(key_env, str) or key_env not in os.environ:
            raise ConfigError(f"{where}.api_key_env: environment variable {key_env!r} is not set")
        raw["api_key"] = os.environ[key_env]
    aliases = raw.pop("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise ConfigError(f"{where}.aliases: expected a table of alias = \"model\"")
    hints = get_type_hints(Upstream)
    values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    return Upstream(**values, aliases=MappingProxyType(dict(aliases)))


def _build_rate(value: Any, currency: str, where: str) -> Rate:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        amount = Fraction(Decimal(value))
    except ArithmeticError:
        raise ConfigError(f"{where}: not a number: {value!r}") from None
    if amount < 0:
        raise ConfigError(f"{where}: a price cannot be negative, got {value}")
    if currency == "msat" and amount.denominator != 1:
        raise ConfigError(f"{where}: msat prices are whole numbers, got {value}")
    return Rate(amount, currency)


def _build_price(model: str, raw: Any) -> ModelPrice:
    where = f"models.{model}"
    rate_keys = [f"{k}_{c}" for k in _RATE_KEYS for c in ("msat", "usd")]
    _reject_unknown(raw, [*rate_keys, "image_msat", "image_usd", "context_tokens", "max_output_tokens"], f"{where}.")
    values: dict[str, Any] = {}
    for key in _RATE_KEYS:
        given = [c for c in ("msat", "usd") if f"{key}_{c}" in raw]
        if len(given) > 1:
            raise ConfigError(f"{where}: give {key}_msat or {key}_usd, not both")
        if given:
            c = given[0]
            values[key] = _build_rate(raw[f"{key}_{c}"], c, f"{where}.{key}_{c}")
    image: dict[str, Rate] = {}
    for c in ("msat", "usd"):
        table = raw.get(f"image_{c}", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}.image_{c}: expected a table of \"size/quality\" = price")
        for size, price in table.items():
            image[size] = _build_rate(price, c, f"{where}.image_{c}.{size}")
    values["image"] = MappingProxyType(image)
    for key in ("context_tokens", "max_output_tokens"):
        if key in raw:
            number = _coerce(raw[key], int, f"{where}.{key}")
            if number <= 0:
                raise ConfigError(f"{where}.{key}: must be positive, got {number}")
            values[key] = number
    return ModelPrice(**values)


def _check_url(url: str, where: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.netloc:
        raise ConfigError(f"{where}: {url!r} is not a valid {'/'.join(schemes)} URL")


def validate(config: Config, *, require_upstream: bool = True) -> None:
    """Check cross-field rules; raises :class:`ConfigError` naming the first bad key."""
    if not 0 < config.http.port < 65536 and config.http.port != 0:
        raise ConfigError(f"http.port: must be 0..65535, got {config.http.port}")
    if config.http.max_body_bytes <= 0:
        raise ConfigError("http.max_body_bytes: must be positive")
    for key, url in (("node.http_url", config.node.http_url), ("node.onion_url", config.node.onion_url)):
        if url:
            _check_url(url, key, ("http", "https"))
    for i, relay in enumerate(config.nostr.relays):
        _check_url(relay, f"nostr.relays[{i}]", ("ws", "wss"))
    if not config.wallet.mints:
        raise ConfigError("wallet.mints: at least one trusted mint is required")
    for i, mint in enumerate(config.wallet.mints):
        _check_url(mint, f"wallet.mints[{i}]", ("http", "https"))
    if not config.wallet.units:
        raise ConfigError("wallet.units: at least one unit is required")
    if config.wallet.mint_timeout_seconds <= 0:
        raise ConfigError("wallet.mint_timeout_seconds: must be positive")
    if config.ledger.hold_timeout_seconds <= 0:
        raise ConfigError("ledger.hold_timeout_seconds: must be positive")
    pricing = config.pricing
    if not 0 < pricing.fee_multiplier <= 100:
        raise ConfigError(f"pricing.fee_multiplier: must be in (0, 100], got {pricing.fee_multiplier}")
    if pricing.btc_usd_fallback < 0:
        raise ConfigError("pricing.btc_usd_fallback: cannot be negative")
    if pricing.btc_usd_max_age_seconds <= 0 or pricing.btc_usd_refresh_seconds <= 0:
        raise ConfigError("pricing.btc_usd_max_age_seconds and btc_usd_refresh_seconds: must be positive")
    for i, source in enumerate(pricing.btc_usd_sources):
        _check_url(source.url, f"pricing.btc_usd_sources[{i}].url", ("http", "https"))
    if require_upstream and not config.upstreams:
        raise ConfigError("upstreams: at least one [[upstreams]] is required")
    seen: set[str] = set()
    for i, up in enumerate(config.upstreams):
        _check_url(up.base_url, f"upstreams[{i}].base_url", ("http", "https"))
        if up.name in seen:
            raise ConfigError(f"upstreams[{i}].name: {up.name!r} is used twice")
        seen.add(up.name)
        if up.timeout_seconds <= 0:
            raise ConfigError(f"upstreams[{i}].timeout_seconds: must be positive")
        for model in up.models:
            if model not in config.models:
                raise ConfigError(
                    f"upstreams[{i}].models: {model!r} has no price; add [models.\"{model}\"]"
                )
    uses_usd = any(
        rate is not None and rate.currency == "usd"
        for price in config.models.values()
        for rate in (price.request, price.input_per_1m, price.output_per_1m,
                     price.audio_per_second, price.speech_per_1m_chars, *price.image.values())
    )
    if uses_usd and not pricing.btc_usd_sources and pricing.btc_usd_fallback == 0:
        raise ConfigError(
            "pricing: USD prices need pricing.btc_usd_sources or pricing.btc_usd_fallback"
        )
    for model, price in config.models.items():
        if price.max_output_tokens > price.context_tokens:
            raise ConfigError(f"models.{model}.max_output_tokens: larger than context_tokens")
