"""Priced ``[models."…"]`` tables from an upstream's ``GET /models`` list (pure functions).

Upstreams that publish prices (OpenRouter-style ``pricing`` in USD per token, as decimal
strings) get ``*_usd`` rates per 1,000,000 tokens times the markup; upstreams that publish
none (Ollama, llama.cpp, vLLM, LM Studio) get the msat rates the operator gives, or are
reported as unpriced. The numbers stay :class:`~decimal.Decimal` until written as TOML text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

PER_MILLION = Decimal(1_000_000)
DEFAULT_MAX_OUTPUT = 16_384
# OpenRouter-style pricing fields (USD per token) and the config keys (USD per 1M tokens).
USD_PER_TOKEN_KEYS = (("prompt", "input_per_1m_usd"), ("completion", "output_per_1m_usd"))


@dataclass(frozen=True)
class ImportedModel:
    """One model's price table: rates by config key (``input_per_1m_usd`` …), and limits."""

    id: str
    rates: Mapping[str, Decimal | int]
    context_tokens: int | None = None
    max_output_tokens: int | None = None


@dataclass(frozen=True)
class FlatRates:
    """The operator's msat rates for models listed without prices (None: leave unpriced)."""

    request_msat: int | None = None
    input_per_1m_msat: int | None = None
    output_per_1m_msat: int | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.request_msat, self.input_per_1m_msat,
                                          self.output_per_1m_msat))  # fmt: skip


@dataclass(frozen=True)
class ImportResult:
    """The priced models, and the ids skipped with why."""

    priced: list[ImportedModel]
    skipped: dict[str, str]


def _usd_per_token(value: Any) -> Decimal | None:
    try:
        price = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return price if price.is_finite() and price >= 0 else None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _limits(item: Mapping[str, Any]) -> tuple[int | None, int | None]:
    context = _positive_int(item.get("context_length")) or _positive_int(item.get("max_model_len"))
    top = item.get("top_provider")
    output = _positive_int(top.get("max_completion_tokens")) if isinstance(top, dict) else None
    if context is not None:
        output = min(output or min(DEFAULT_MAX_OUTPUT, context), context)
    return context, output


def price_models(
    listing: Any,
    *,
    markup: Decimal = Decimal(1),
    flat: FlatRates = FlatRates(),
    skip: Iterable[str] = (),
) -> ImportResult:
    """Price every model of a ``/models`` answer; ids in ``skip`` (already priced) are left."""
    data = listing.get("data") if isinstance(listing, dict) else listing
    if not isinstance(data, list):
        raise ValueError("the upstream's /models answer has no 'data' list")
    known = set(skip)
    priced: list[ImportedModel] = []
    skipped: dict[str, str] = {}
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
            continue
        model_id: str = item["id"]
        if model_id in known:
            skipped[model_id] = "already priced in the config"
            continue
        known.add(model_id)
        context, output = _limits(item)
        pricing = item.get("pricing")
        rates: dict[str, Decimal | int] = {}
        if isinstance(pricing, dict):
            for source, key in (
                ("prompt", "input_per_1m_usd"),
                ("completion", "output_per_1m_usd"),
            ):
                per_token = _usd_per_token(pricing.get(source, 0))
                if per_token is None:
                    break
                rates[key] = (per_token * PER_MILLION * markup).normalize()
            else:
                request = _usd_per_token(pricing.get("request", 0))
                if request:
                    rates["request_usd"] = (request * markup).normalize()
            if len(rates) < 2:
                skipped[model_id] = "its price is variable or unreadable"
                continue
        elif flat.any():
            for key, value in (("request_msat", flat.request_msat),
                               ("input_per_1m_msat", flat.input_per_1m_msat),
                               ("output_per_1m_msat", flat.output_per_1m_msat)):  # fmt: skip
                if value is not None:
                    rates[key] = value
        else:
            skipped[model_id] = "the upstream lists no price (give --input-per-1m-msat etc.)"
            continue
        priced.append(ImportedModel(model_id, rates, context, output))
    return ImportResult(priced, skipped)


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if ord(c) >= 0x20 and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def _number(value: Decimal | int) -> str:
    if isinstance(value, int):
        return str(value)
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def as_toml(models: Iterable[ImportedModel], comment: str = "") -> str:
    """The ``[models."…"]`` tables for ``models``, ready to append to a config file."""
    out: list[str] = [f"# {comment}"] if comment else []
    for model in models:
        out.append(f"[models.{toml_string(model.id)}]")
        out.extend(f"{key} = {_number(value)}" for key, value in model.rates.items())
        if model.context_tokens is not None:
            out.append(f"context_tokens = {model.context_tokens}")
        if model.max_output_tokens is not None:
            out.append(f"max_output_tokens = {model.max_output_tokens}")
        out.append("")
    return "\n".join(out)
