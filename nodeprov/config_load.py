"""Loading the settings: a TOML file plus ``NODEPROV_*`` environment overrides, validated.

Every problem is reported as :class:`~nodeprov.errors.ConfigError` naming the key and why.
Environment overrides use ``__`` between levels and TOML syntax for values, e.g.
``NODEPROV_HTTP__PORT=9000`` or ``NODEPROV_WALLET__MINTS='["http://127.0.0.1:3338"]'``;
a value that is not valid TOML is taken as a string (and so is any value for a string
key). ``NODEPROV_UPSTREAMS__0__API_KEY`` edits an upstream of the file by index, and
``NODEPROV_UPSTREAMS='[{name = "a", base_url = "..."}]'`` replaces the whole array.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import fields, replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from nodeprov.config import (
    CURRENCIES,
    DAY,
    ENV_PREFIX,
    MULTI,
    AdminSection,
    Config,
    Currency,
    HttpSection,
    LedgerSection,
    ModelPrice,
    NodeSection,
    NostrSection,
    PaymentsSection,
    PayoutsSection,
    PricingSection,
    Rate,
    RateSource,
    Upstream,
    WalletSection,
)
from nodeprov.core.db_base import POSTGRES_URL_PREFIXES, SQLITE_URL_PREFIX
from nodeprov.core.money import MSAT_PER_BTC
from nodeprov.errors import ConfigError

SECTIONS: dict[str, type[Any]] = {
    f.name: get_type_hints(Config)[f.name] for f in fields(Config) if f.name not in MULTI
}
RATE_KEYS = ("request", "input_per_1m", "output_per_1m", "audio_per_second", "speech_per_1m_chars")
MODEL_KEYS = (
    *(f"{k}_{c}" for k in RATE_KEYS for c in ("msat", "usd")),
    *("image_msat", "image_usd", "context_tokens", "max_output_tokens"),
)
SIMPLE: dict[Any, str] = {bool: "true or false", int: "a whole number", str: "a string"}
PASSWORD_SCHEMES = ("pbkdf2_sha256$", "scrypt$")
# Valid ranges (lo, hi, lo_excluded) of numeric settings; anything outside is a typo.
RANGES: dict[tuple[type[Any], str], tuple[Any, Any, bool]] = {
    (ModelPrice, "context_tokens"): (1, 100_000_000, False),
    (ModelPrice, "max_output_tokens"): (1, 100_000_000, False),
    (HttpSection, "port"): (0, 65535, False),
    (HttpSection, "max_body_bytes"): (1024, 1024**3, False),
    (HttpSection, "header_timeout_seconds"): (1, 3600, False),
    (HttpSection, "body_idle_timeout_seconds"): (1, 3600, False),
    (HttpSection, "body_timeout_seconds"): (1, 86400, False),
    (HttpSection, "max_header_bytes"): (1024, 16 * 1024**2, False),
    (HttpSection, "keepalive_timeout_seconds"): (1, 3600, False),
    (NostrSection, "chat_history_turns"): (0, 100, False),
    (NostrSection, "max_content_bytes"): (1024, 1024**2, False),
    (NostrSection, "rate_limit_per_minute"): (0, 10_000, False),
    (NostrSection, "max_concurrent_jobs_per_sender"): (1, 100, False),
    (WalletSection, "mint_timeout_seconds"): (0, 600, True),
    (WalletSection, "expiry_check_seconds"): (10, DAY, False),
    (WalletSection, "lightning_max_sat"): (1, 21_000_000 * 100_000_000, False),
    (WalletSection, "lightning_max_open_quotes"): (1, 1_000_000, False),
    (LedgerSection, "hold_timeout_seconds"): (1, 7 * DAY, False),
    (LedgerSection, "pool_size"): (1, 1000, False),
    (PaymentsSection, "overlap_per_client"): (1, 64, False),
    (PricingSection, "fee_multiplier"): (0, 100, True),
    (PricingSection, "btc_usd_fallback"): (0, 10**9, False),
    (PricingSection, "btc_usd_max_age_seconds"): (1, 30 * DAY, False),
    (PricingSection, "btc_usd_refresh_seconds"): (1, DAY, False),
    (AdminSection, "session_seconds"): (60, 30 * DAY, False),
    (PayoutsSection, "threshold_msat"): (1000, 21_000_000 * MSAT_PER_BTC, False),
    (PayoutsSection, "interval_seconds"): (60, 30 * DAY, False),
    (Upstream, "timeout_seconds"): (0, 3600, True),
    (Upstream, "max_connections"): (1, 100_000, False),
    (Upstream, "pool_wait_seconds"): (0, 600, True),
}


def load_config(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    require_upstream: bool = True,
) -> Config:
    """Read ``path`` (if given), apply ``NODEPROV_*`` overrides from ``env``, validate.

    ``require_upstream=False`` is for commands that do not serve: no upstream is needed, and
    an upstream's ``api_key_env`` variable may be unset (its key is then empty).
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as file:
                raw = tomllib.load(file, parse_float=Decimal)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    origins = _apply_env(raw, env)
    try:
        base = Path(path).parent if path else Path.cwd()
        config = build_config(raw, base, env, need_secrets=require_upstream)
        validate(config, require_upstream=require_upstream)
    except ConfigError as exc:  # point at the variable when the bad key came from env
        head = exc.message.split(":")[0].split()[-1].strip("'").replace("[", ".")
        for key, name in origins.items():
            if head and (key.startswith(head.replace("]", "")) or head.startswith(key)):
                raise ConfigError(f"{exc.message} (set by {name})") from None
        raise
    return config


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Merge overrides into ``raw``; returns dotted key -> variable name, for messages."""
    names = [n for n in env if n.startswith(ENV_PREFIX)]
    names = [n for n in names if "__" in n or n == f"{ENV_PREFIX}UPSTREAMS"]
    origins: dict[str, str] = {}
    # Shorter paths first, so a whole NODEPROV_UPSTREAMS array can then be edited by index.
    for name in sorted(names, key=lambda n: (n.count("__"), n)):
        keys = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        target: Any = raw
        for depth, key in enumerate(keys):
            where = ".".join(keys[:depth]) or "config"
            if isinstance(target, list) and key.isdigit() and int(key) < len(target):
                index: Any = int(key)
            elif isinstance(target, dict) and key:
                index = key
            else:
                raise ConfigError(
                    f"{name}: {where} has no entry {key!r} that can be set from the environment;"
                    f" set the whole value with {ENV_PREFIX}{where.upper().replace('.', '__')}"
                )
            if depth == len(keys) - 1:
                value = _parse_env_value(env[name])
                text = not isinstance(value, str) and _is_text_key(keys)
                target[index] = env[name] if text else value
            elif isinstance(target, dict):
                target = target.setdefault(key, [] if (depth, key) == (0, "upstreams") else {})
            else:
                target = target[index]
        origins[".".join(keys)] = name
    return origins


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}", parse_float=Decimal)["v"]
    except tomllib.TOMLDecodeError:
        return text


def _is_text_key(keys: list[str]) -> bool:
    """Whether ``keys`` names a string setting (so ``1234`` or a date stays text)."""
    hint: Any = None
    if len(keys) == 2 and keys[0] in SECTIONS:
        hint = get_type_hints(SECTIONS[keys[0]]).get(keys[1])
    elif len(keys) == 3 and keys[0] == "upstreams":
        hint = str if keys[2] == "api_key_env" else get_type_hints(Upstream).get(keys[2])
    return hint in (str, Path)


def build_config(
    raw: Mapping[str, Any],
    base_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    need_secrets: bool = True,
) -> Config:
    """Turn parsed TOML into a :class:`Config`, rejecting unknown keys and wrong types."""
    _reject_unknown(raw, [*SECTIONS, *MULTI], "")
    sections = {
        name: _build_section(cls, raw.get(name, {}), name) for name, cls in SECTIONS.items()
    }
    node: NodeSection = sections["node"]
    if not node.data_dir.is_absolute():
        sections["node"] = replace(node, data_dir=(base_dir / node.data_dir).resolve())
    upstreams = raw.get("upstreams", [])
    if not isinstance(upstreams, list):
        raise ConfigError("upstreams: must be an array of tables ([[upstreams]])")
    models = raw.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError('models: must be a table of model names ([models."name"])')
    env = os.environ if env is None else env
    return Config(
        **sections,
        upstreams=tuple(_build_upstream(u, i, env, need_secrets) for i, u in enumerate(upstreams)),
        models=MappingProxyType({m: _build_price(m, v) for m, v in models.items()}),
    )


def _reject_unknown(raw: Any, known: list[str], where: str) -> None:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: must be a table, got {raw!r}")
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean '{where}{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown key '{where}{key}'{suggestion}")


def _build_section(cls: type[Any], raw: Any, where: str) -> Any:
    hints = get_type_hints(cls)
    _reject_unknown(raw, [f.name for f in fields(cls)], f"{where}.")
    values: dict[str, Any] = {}
    for f in fields(cls):
        key = f"{where}.{f.name}"
        if f.name not in raw:
            if f.default is f.default_factory:  # both MISSING: required
                raise ConfigError(f"{key}: required")
            continue
        value = values[f.name] = _coerce(raw[f.name], hints[f.name], key)
        if (cls, f.name) in RANGES:
            lo, hi, above = RANGES[cls, f.name]
            if (value <= lo if above else value < lo) or value > hi:
                low = f"> {lo}" if above else f">= {lo}"
                raise ConfigError(f"{key}: must be {low} and <= {hi}, got {value}")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if hint in SIMPLE:
        if type(value) is not hint:
            raise ConfigError(f"{where}: expected {SIMPLE[hint]}, got {value!r}")
        return value
    if hint in (Decimal, Fraction):
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, Decimal) and not value.is_finite():
            raise ConfigError(f"{where}: expected a finite number, got {value}")
        return Decimal(value) if hint is Decimal else Fraction(value)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value).expanduser()
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array, got {value!r}")
        items = [_coerce(v, get_args(hint)[0], f"{where}[{i}]") for i, v in enumerate(value)]
        for i, item in enumerate(items):
            if item in items[:i]:
                raise ConfigError(f"{where}[{i}]: {item!r} is listed twice")
        return tuple(items)
    if hint is RateSource:
        return _build_section(RateSource, value, where)
    if origin is Literal:
        if value not in get_args(hint):
            choices = ", ".join(repr(a) for a in get_args(hint))
            raise ConfigError(f"{where}: must be one of {choices}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported value {value!r}")  # pragma: no cover


def _build_upstream(
    raw: Any, index: int, env: Mapping[str, str], need_secrets: bool = True
) -> Upstream:
    where = f"upstreams[{index}]"
    _reject_unknown(raw, [*(f.name for f in fields(Upstream)), "api_key_env"], f"{where}.")
    raw = dict(raw)
    key_env = raw.pop("api_key_env", None)
    if key_env is not None:
        if "api_key" in raw:
            raise ConfigError(f"{where}.api_key_env: give api_key or api_key_env, not both")
        if not isinstance(key_env, str):
            raise ConfigError(f"{where}.api_key_env: expected the name of a variable")
        if need_secrets and not env.get(key_env):
            raise ConfigError(f"{where}.api_key_env: environment variable {key_env!r} is not set")
        raw["api_key"] = env.get(key_env, "")
    aliases = raw.pop("aliases", {})
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise ConfigError(f'{where}.aliases: expected a table of alias = "model"')
    upstream: Upstream = _build_section(Upstream, raw, where)
    if not upstream.name:
        raise ConfigError(f"{where}.name: must not be empty")
    base_url = upstream.base_url.rstrip("/")
    return replace(upstream, base_url=base_url, aliases=MappingProxyType(aliases))


def _build_rate(value: Any, currency: Currency, where: str) -> Rate:
    amount: Fraction = _coerce(value, Fraction, where)
    if amount < 0:
        raise ConfigError(f"{where}: a price cannot be negative, got {value}")
    if currency == "msat" and amount.denominator != 1:
        raise ConfigError(f"{where}: msat prices are whole numbers, got {value}")
    return Rate(amount, currency)


def _build_price(model: str, raw: Any) -> ModelPrice:
    where = f"models.{model}"
    _reject_unknown(raw, list(MODEL_KEYS), f"{where}.")
    values: dict[str, Any] = {}
    for key in RATE_KEYS:
        if f"{key}_msat" in raw and f"{key}_usd" in raw:
            raise ConfigError(f"{where}.{key}_usd: give {key}_msat or {key}_usd, not both")
        for c in CURRENCIES:
            if f"{key}_{c}" in raw:
                values[key] = _build_rate(raw[f"{key}_{c}"], c, f"{where}.{key}_{c}")
    image: dict[str, Rate] = {}
    for c in CURRENCIES:
        table = raw.get(f"image_{c}", {})
        if not isinstance(table, dict):
            raise ConfigError(f'{where}.image_{c}: expected a table of "size" = price')
        for size, price in table.items():
            if size in image:
                raise ConfigError(f"{where}.image_{c}.{size}: priced in both msat and usd")
            image[size] = _build_rate(price, c, f"{where}.image_{c}.{size}")
    limits = {k: raw[k] for k in ("context_tokens", "max_output_tokens") if k in raw}
    limits_only: ModelPrice = _build_section(ModelPrice, limits, where)
    return replace(limits_only, image=MappingProxyType(image), **values)


def _check_url(url: str, where: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(f"{where}: {url!r} is not a valid {'/'.join(schemes)} URL")


def _validate_ledger_url(url: str) -> None:
    if not url or url.startswith(POSTGRES_URL_PREFIXES):
        if url and not urlsplit(url).path.strip("/"):
            raise ConfigError(f"ledger.url: {url!r} names no database (postgresql://host/DB)")
        return
    if not url.startswith(SQLITE_URL_PREFIX) or len(url) == len(SQLITE_URL_PREFIX):
        raise ConfigError(
            f"ledger.url: {url!r} is neither sqlite:///PATH nor postgresql://user@host:port/db"
        )


def validate(config: Config, *, require_upstream: bool = True) -> None:
    """Check cross-field rules; raises :class:`ConfigError` naming the first bad key."""
    if not config.node.name.strip():
        raise ConfigError("node.name: must not be empty")
    for key in ("http_url", "onion_url"):
        if url := getattr(config.node, key):
            _check_url(url, f"node.{key}", ("http", "https"))
    for key in ("relays", "dm_relays"):
        for i, relay in enumerate(getattr(config.nostr, key)):
            _check_url(relay, f"nostr.{key}[{i}]", ("ws", "wss"))
    for i, origin in enumerate(config.http.cors_origins):
        if origin != "*":
            _check_url(origin, f"http.cors_origins[{i}]", ("http", "https"))
    for i, proxy in enumerate(config.http.forwarded_allow_ips):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"http.forwarded_allow_ips[{i}]: {proxy!r} is not an IP address or network"
            ) from None
    _validate_ledger_url(config.ledger.url)
    if not config.wallet.mints:
        raise ConfigError("wallet.mints: at least one trusted mint is required")
    for i, mint in enumerate(config.wallet.mints):
        _check_url(mint, f"wallet.mints[{i}]", ("http", "https"))
        if mint.endswith("/"):
            raise ConfigError(f"wallet.mints[{i}]: write {mint.rstrip('/')!r} without the '/'")
    if not config.wallet.units:
        raise ConfigError("wallet.units: at least one unit ('sat', 'msat') is required")
    _validate_pricing(config)
    admin, payouts = config.admin, config.payouts
    if admin.password_hash and not admin.password_hash.startswith(PASSWORD_SCHEMES):
        raise ConfigError(
            "admin.password_hash: not a password hash (expected pbkdf2_sha256$… or scrypt$…;"
            " run `nodeprov admin set-password`), never put the password itself here"
        )
    if payouts.lightning_address:
        user, _, host = payouts.lightning_address.partition("@")
        if not user or "." not in host or any(c.isspace() for c in payouts.lightning_address):
            raise ConfigError(
                f"payouts.lightning_address: {payouts.lightning_address!r} is not user@domain"
            )
    _validate_upstreams(config, require_upstream)


def _validate_pricing(config: Config) -> None:
    pricing = config.pricing
    for i, source in enumerate(pricing.btc_usd_sources):
        _check_url(source.url, f"pricing.btc_usd_sources[{i}].url", ("http", "https"))
        if not source.path.strip():
            raise ConfigError(f"pricing.btc_usd_sources[{i}].path: must not be empty")
    if (
        pricing.btc_usd_sources
        and pricing.btc_usd_refresh_seconds >= pricing.btc_usd_max_age_seconds
    ):
        raise ConfigError(
            "pricing.btc_usd_refresh_seconds: must be smaller than btc_usd_max_age_seconds,"
            " or the rate goes stale between fetches"
        )
    usd_models = [
        m for m, p in config.models.items() if any(r.currency == "usd" for r in p.rates())
    ]
    if usd_models and not pricing.btc_usd_sources and pricing.btc_usd_fallback == 0:
        raise ConfigError(
            f"pricing.btc_usd_sources: models.{usd_models[0]} is priced in USD, which needs"
            " pricing.btc_usd_sources or pricing.btc_usd_fallback"
        )
    for model, price in config.models.items():
        if price.max_output_tokens > price.context_tokens:
            raise ConfigError(
                f"models.{model}.max_output_tokens: {price.max_output_tokens} is larger than"
                f" context_tokens {price.context_tokens}"
            )


def _validate_upstreams(config: Config, require_upstream: bool) -> None:
    if require_upstream and not config.upstreams:
        raise ConfigError("upstreams: at least one [[upstreams]] is required")
    names: set[str] = set()
    aliases: dict[str, str] = {}
    for i, up in enumerate(config.upstreams):
        where = f"upstreams[{i}]"
        _check_url(up.base_url, f"{where}.base_url", ("http", "https"))
        if up.name in names:
            raise ConfigError(f"{where}.name: {up.name!r} is used by two upstreams")
        names.add(up.name)
        if not up.models and not up.discover_models:
            raise ConfigError(f"{where}.models: list models or set discover_models = true")
        for model in up.models:
            if model not in config.models:
                raise ConfigError(f'{where}.models: {model!r} has no price; add [models."{model}"]')
        for alias, target in up.aliases.items():
            if target not in config.models:
                raise ConfigError(f"{where}.aliases.{alias}: target {target!r} has no price")
            if alias in config.models or aliases.get(alias, target) != target:
                raise ConfigError(f"{where}.aliases.{alias}: {alias!r} already names a model")
            aliases[alias] = target
    default = config.nostr.default_model
    if default and default not in config.models and default not in aliases:
        raise ConfigError(f"nostr.default_model: {default!r} is not a priced model or alias")
