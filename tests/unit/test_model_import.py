"""Priced model tables from /models lists: OpenRouter USD prices, unpriced local servers."""

from __future__ import annotations

import tomllib
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from nodeprov.config import Rate
from nodeprov.config_load import build_config
from nodeprov.model_import import FlatRates, as_toml, price_models, toml_string

OPENROUTER = {
    "data": [
        {
            "id": "anthropic/claude-sonnet-4",
            "context_length": 200000,
            "pricing": {"prompt": "0.000003", "completion": "0.000015", "request": "0"},
            "top_provider": {"max_completion_tokens": 64000},
        },
        {
            "id": "meta-llama/llama-3.1-8b-instruct:free",
            "context_length": 131072,
            "pricing": {"prompt": "0", "completion": "0"},
            "top_provider": {"max_completion_tokens": None},
        },
        {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
        {
            "id": "per-request",
            "pricing": {"prompt": "0.000001", "completion": "0.000002", "request": "0.005"},
        },
        {"no": "id"},
    ]
}


def test_openrouter_usd_per_token_becomes_usd_per_million_times_markup() -> None:
    result = price_models(OPENROUTER, markup=Decimal("1.2"))
    by_id = {m.id: m for m in result.priced}
    sonnet = by_id["anthropic/claude-sonnet-4"]
    assert sonnet.rates == {"input_per_1m_usd": Decimal("3.6"), "output_per_1m_usd": Decimal("18")}
    assert (sonnet.context_tokens, sonnet.max_output_tokens) == (200000, 64000)
    free = by_id["meta-llama/llama-3.1-8b-instruct:free"]
    assert free.rates == {"input_per_1m_usd": 0, "output_per_1m_usd": 0}
    assert free.max_output_tokens == 16384  # none listed: the default, within the context
    assert by_id["per-request"].rates["request_usd"] == Decimal("0.006")
    assert result.skipped == {"openrouter/auto": "its price is variable or unreadable"}


def test_unpriced_models_take_the_flat_msat_rates_or_are_skipped() -> None:
    local = {"object": "list", "data": [{"id": "llama3.2:3b"}, {"id": "qwen2.5:7b"}]}
    assert price_models(local).priced == []
    assert set(price_models(local).skipped) == {"llama3.2:3b", "qwen2.5:7b"}
    flat = FlatRates(input_per_1m_msat=50_000, output_per_1m_msat=150_000)
    priced = price_models(local, flat=flat).priced
    assert [m.rates for m in priced] == [{"input_per_1m_msat": 50_000,
                                          "output_per_1m_msat": 150_000}] * 2  # fmt: skip


def test_models_already_priced_are_left_alone() -> None:
    result = price_models(OPENROUTER, skip=["anthropic/claude-sonnet-4"])
    assert "anthropic/claude-sonnet-4" not in {m.id for m in result.priced}
    assert result.skipped["anthropic/claude-sonnet-4"] == "already priced in the config"


def test_the_tables_are_toml_the_config_loader_accepts() -> None:
    text = as_toml(price_models(OPENROUTER, markup=Decimal("1.25")).priced, "imported")
    raw = tomllib.loads(text, parse_float=Decimal)
    assert set(raw["models"]) == {
        "anthropic/claude-sonnet-4",
        "meta-llama/llama-3.1-8b-instruct:free",
        "per-request",
    }
    raw["upstreams"] = [{"name": "or", "base_url": "https://openrouter.ai/api/v1",
                         "discover_models": True}]  # fmt: skip
    config = build_config(raw, base_dir=Path("."))
    assert config.models["anthropic/claude-sonnet-4"].input_per_1m == Rate(Fraction("3.75"), "usd")


@pytest.mark.parametrize("name", ['a"b', "back\\slash", "tab\there", "ünïcode/model:tag"])
def test_model_ids_quoted_as_toml_strings(name: str) -> None:
    assert tomllib.loads(f"x = {toml_string(name)}")["x"] == name


def test_a_listing_without_data_is_an_error() -> None:
    with pytest.raises(ValueError, match="no 'data' list"):
        price_models({"error": "nope"})
