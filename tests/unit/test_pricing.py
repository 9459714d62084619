"""Pricing: exact arithmetic, rounding up once, holds that bound settlements, clear errors."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeprov.config import ModelPrice, PricingSection, Rate, RateSource
from nodeprov.core.money import MSAT_PER_BTC
from nodeprov.core.pricing import Cost, ExchangeRates, Pricer, UsageUnavailable
from nodeprov.core.token_bounds import IMAGE_PART_TOKENS, MAX_N
from nodeprov.errors import ContextLengthExceeded, InvalidRequest, PriceUnavailable, UnknownModel

CLIENT = httpx.AsyncClient()  # never used: no sources are configured in these tests


def msat(amount: int | Fraction) -> Rate:
    return Rate(Fraction(amount), "msat")


def usd(amount: str) -> Rate:
    return Rate(Fraction(Decimal(amount)), "usd")


def fixed_rates(btc_usd: str = "100000") -> ExchangeRates:
    return ExchangeRates(PricingSection(btc_usd_fallback=Decimal(btc_usd)), CLIENT)


SMALL = ModelPrice(
    request=msat(7),
    input_per_1m=msat(1_500_001),
    output_per_1m=msat(3_333_333),
    context_tokens=4096,
    max_output_tokens=1024,
)
USD = ModelPrice(
    request=usd("0.0001"),
    input_per_1m=usd("1"),
    output_per_1m=usd("2.5"),
    speech_per_1m_chars=usd("15"),
    context_tokens=8192,
    max_output_tokens=2048,
)
IMAGES = ModelPrice(
    request=msat(0),
    image=MappingProxyType(
        {"1024x1024/hd": msat(80_000), "1024x1024": msat(40_000), "default": msat(50_000)}
    ),
)
ONLY_SQUARE = ModelPrice(image=MappingProxyType({"1024x1024": msat(40_000)}))
MODELS = {"small": SMALL, "usd": USD, "images": IMAGES, "square": ONLY_SQUARE}


def pricer(fee: Fraction = Fraction(1), rates: ExchangeRates | None = None) -> Pricer:
    return Pricer(MODELS, fee, rates or fixed_rates())


def chat(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "small", "messages": [{"role": "user", "content": text}], **extra}


def assert_ints(cost: Cost) -> None:
    for value in (cost.total_msat, cost.request_msat, cost.input_msat, cost.output_msat):
        assert type(value) is int
    assert 0 <= cost.request_msat + cost.input_msat + cost.output_msat <= cost.total_msat


# --- models and errors ------------------------------------------------------------------


def test_models_sorted_and_unknown_model() -> None:
    p = pricer()
    assert p.models() == ["images", "small", "square", "usd"]
    assert p.price("small") is SMALL
    with pytest.raises(UnknownModel, match="model 'gpt-9' is not offered here") as info:
        p.max_cost("gpt-9", chat())
    assert info.value.status == 404
    with pytest.raises(UnknownModel):
        p.actual_cost("gpt-9", {"prompt_tokens": 1, "completion_tokens": 1})


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [-1, 0, 1.5, 100.0, "100", True, False, [5], {"a": 1}, 1025])
def test_bad_max_tokens_is_invalid_request(key: str, value: Any) -> None:
    with pytest.raises(InvalidRequest, match=key) as info:
        pricer().max_cost("small", chat(**{key: value}))
    assert info.value.status == 400


def test_huge_max_tokens_names_the_limit() -> None:
    with pytest.raises(InvalidRequest, match="limit of 1024 output tokens"):
        pricer().max_cost("small", chat(max_tokens=10**30))


@pytest.mark.parametrize("value", [0, -2, "2", 2.0, True, MAX_N + 1])
def test_bad_n_is_invalid_request(value: Any) -> None:
    with pytest.raises(InvalidRequest, match="'n'"):
        pricer().max_cost("small", chat(n=value))


@pytest.mark.parametrize(
    "body", [None, [], "text", {"messages": []}, {"messages": "hi"}, {"model": "small"}]
)
def test_malformed_chat_body_is_invalid_request(body: Any) -> None:
    with pytest.raises(InvalidRequest):
        pricer().max_cost("small", body)


def test_float_never_becomes_money() -> None:
    with pytest.raises(TypeError):
        Pricer(MODELS, 1.5, None)  # type: ignore[arg-type]
    bad = ModelPrice(request=Rate(0.5, "msat"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Pricer({"bad": bad}, Fraction(1), None).max_cost("bad", chat())


# --- holds ------------------------------------------------------------------------------


def test_chat_hold_exact_value() -> None:
    p = pricer()
    body = chat("héllo", max_tokens=100)
    bounds = p.token_bounds("small", body)
    # content bytes (é is 2), keys and role, plus 8 per message and 8 for the reply
    assert bounds.prompt_tokens >= len("héllo".encode()) + 16
    assert bounds.completion_tokens == 100
    cost = p.max_cost("small", body)
    exact = 7 + Fraction(1_500_001 * bounds.prompt_tokens + 3_333_333 * 100, 1_000_000)
    assert cost.total_msat == math.ceil(exact)
    assert_ints(cost)


def test_output_bound_without_max_tokens_is_not_shrunk_by_the_prompt_bound() -> None:
    """Bytes overestimate a prompt's tokens: the room left for output is not bounded by them."""
    p = pricer()
    assert p.token_bounds("small", chat("x")).completion_tokens == 1024
    near = p.token_bounds("small", chat("x " * 2000))  # 4000 bytes, far fewer real tokens
    assert near.prompt_tokens <= 4096
    assert near.completion_tokens == 1024


def test_prompt_larger_than_the_context_is_refused() -> None:
    p = pricer()
    for body in (chat("word " * 4_000), chat("x" * 16_400, max_tokens=5)):
        with pytest.raises(ContextLengthExceeded) as info:
            p.max_cost("small", body)
        assert info.value.status == 400
        assert info.value.to_openai()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(ContextLengthExceeded):
        p.max_cost("small", {"prompt": ["ok", "y" * 16_500]}, "completions")
    with pytest.raises(ContextLengthExceeded):
        p.max_cost("small", {"input": "z" * 16_500}, "embeddings")
    # a token-id array counts exactly its length, not its digits
    ids = {"prompt": [12345] * 2000, "max_tokens": 5}
    assert p.token_bounds("small", ids, "completions").prompt_tokens == 2000 + 8


def test_a_prompt_that_fits_in_tokens_is_not_refused_for_its_bytes() -> None:
    """About 3,000 tokens of English (12,000 bytes) fit a 4,096-token context: no refusal,
    and the hold's prompt bound stays capped at the context."""
    p = pricer()
    bounds = p.token_bounds("small", chat("word " * 2_400))
    assert bounds.prompt_tokens == 4096


def test_n_multiplies_output_not_prompt() -> None:
    p = pricer()
    one = p.token_bounds("small", chat(max_tokens=50))
    three = p.token_bounds("small", chat(max_tokens=50, n=3))
    assert three.prompt_tokens == one.prompt_tokens
    assert three.completion_tokens == 150


def test_both_limits_take_the_larger() -> None:
    bounds = pricer().token_bounds("small", chat(max_tokens=10, max_completion_tokens=20))
    assert bounds.completion_tokens == 20


def test_tools_and_parts_are_counted() -> None:
    p = pricer()
    plain = p.token_bounds("small", chat("hi", max_tokens=1)).prompt_tokens
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"x": "y" * 200}}}
    with_tools = p.token_bounds("small", chat("hi", max_tokens=1, tools=[tool])).prompt_tokens
    assert with_tools >= plain + 200 + 1024
    parts = [{"type": "text", "text": "a" * 300}, {"type": "text", "text": "b" * 300}]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 1}
    assert p.token_bounds("small", body).prompt_tokens >= 600


def test_inline_image_gets_an_allowance_not_its_base64_size() -> None:
    big = ModelPrice(context_tokens=1_000_000, max_output_tokens=10)
    p = Pricer({"vision": big}, Fraction(1), None)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 500_000}}
    body = {"messages": [{"role": "user", "content": [image]}], "max_tokens": 1}
    prompt = p.token_bounds("vision", body).prompt_tokens
    assert IMAGE_PART_TOKENS <= prompt < IMAGE_PART_TOKENS + 100


def test_file_by_id_holds_the_whole_context() -> None:
    part = {"type": "file", "file": {"file_id": "file-abc"}}
    body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 1}
    assert pricer().token_bounds("small", body).prompt_tokens == 4096


def test_deep_nesting_is_not_a_crash() -> None:
    nested: Any = "x"
    for _ in range(5000):
        nested = [nested]
    body = {"messages": [{"role": "user", "content": nested}], "max_tokens": 1}
    assert pricer().token_bounds("small", body).prompt_tokens > 0


def test_completions_batch_and_best_of() -> None:
    p = pricer()
    one = p.token_bounds("small", {"prompt": "abc", "max_tokens": 10}, "completions")
    assert one.completion_tokens == 10
    batch = p.token_bounds("small", {"prompt": ["abc", "de"], "max_tokens": 10}, "completions")
    assert batch.completion_tokens == 20
    ids = p.token_bounds("small", {"prompt": [1, 2, 3], "max_tokens": 10}, "completions")
    assert ids.completion_tokens == 10 and ids.prompt_tokens >= 3
    best = {"prompt": "abc", "max_tokens": 10, "n": 2, "best_of": 5}
    assert p.token_bounds("small", best, "completions").completion_tokens == 50
    for bad in (None, 5, [], [1, "a"], {"a": 1}):
        with pytest.raises(InvalidRequest, match="'prompt'"):
            p.max_cost("small", {"prompt": bad}, "completions")


def test_embeddings_are_input_only() -> None:
    p = pricer()
    cost = p.max_cost("small", {"input": ["abc", "defg"]}, "embeddings")
    assert cost.output_msat == 0
    bounds = p.token_bounds("small", {"input": ["abc", "defg"]}, "embeddings")
    assert bounds == type(bounds)(3 + 4 + 16, 0)
    actual = p.actual_cost("small", {"prompt_tokens": 5, "total_tokens": 5}, "embeddings")
    assert actual.total_msat == math.ceil(7 + Fraction(1_500_001 * 5, 10**6))


def test_a_priced_quality_without_a_size_costs_its_dearest_price() -> None:
    """The upstream picks the size: an hd image asked for without one is never priced below
    hd (here only 1024x1024/hd is priced), on the hold and on settlement alike."""
    p = pricer()
    body = {"quality": "hd"}
    assert p.max_cost("images", body, "images").total_msat == 80_000
    usage = {"n": 1, "size": None, "quality": "hd"}
    assert p.actual_cost("images", usage, "images").total_msat == 80_000
    # A quality priced nowhere falls back to the size, then the default, as before.
    assert p.max_cost("images", {"quality": "standard"}, "images").total_msat == 50_000


def test_images() -> None:
    p = pricer()
    hd = p.max_cost("images", {"n": 2, "size": "1024x1024", "quality": "hd"}, "images")
    assert hd.total_msat == 160_000 and hd.output_msat == 160_000
    std = p.max_cost("images", {"size": "1024x1024", "quality": "standard"}, "images")
    assert std.total_msat == 40_000
    assert p.max_cost("images", {"size": "512x512"}, "images").total_msat == 50_000
    assert p.max_cost("images", {}, "images").total_msat == 50_000
    with pytest.raises(InvalidRequest, match="not offered"):
        p.max_cost("square", {"size": "256x256"}, "images")
    with pytest.raises(InvalidRequest, match="does not generate images"):
        p.max_cost("small", {"size": "256x256"}, "images")
    with pytest.raises(InvalidRequest, match="'n'"):
        p.max_cost("images", {"n": 0}, "images")
    usage = {"n": 1, "size": "1024x1024", "quality": "hd"}
    assert p.actual_cost("images", usage, "images").total_msat == 80_000


def test_speech_per_character() -> None:
    p = pricer()  # $100k/BTC: 1 USD = 1_000_000 msat
    cost = p.max_cost("usd", {"input": "a" * 1000}, "speech")
    # request $0.0001 = 100 msat; $15 per 1M chars = 15 msat per char
    assert cost.total_msat == 100 + 15_000
    assert p.actual_cost("usd", {"characters": 1000}, "speech") == cost
    with pytest.raises(InvalidRequest, match="'input'"):
        p.max_cost("usd", {"input": 5}, "speech")


# --- settlement -------------------------------------------------------------------------


def test_actual_cost_usage_shapes() -> None:
    p = pricer()
    a = p.actual_cost("small", {"prompt_tokens": 10, "completion_tokens": 20})
    b = p.actual_cost("small", {"input_tokens": 10, "output_tokens": 20})
    assert a == b
    assert a.total_msat == math.ceil(7 + Fraction(1_500_001 * 10 + 3_333_333 * 20, 10**6))


@pytest.mark.parametrize(
    "usage",
    [
        None,
        [],
        {},
        {"prompt_tokens": 10},
        {"completion_tokens": 10},
        {"prompt_tokens": -1, "completion_tokens": 1},
        {"prompt_tokens": 1.0, "completion_tokens": 1},
        {"prompt_tokens": "1", "completion_tokens": 1},
        {"prompt_tokens": True, "completion_tokens": 1},
    ],
)
def test_missing_or_bad_usage_is_typed(usage: Any) -> None:
    with pytest.raises(UsageUnavailable) as info:
        pricer().actual_cost("small", usage)
    assert info.value.code == "usage_unavailable"


# --- USD and the fee --------------------------------------------------------------------


def test_usd_pricing_with_fixed_fallback() -> None:
    rates = fixed_rates("100000")
    assert rates.msat_per_usd() == Fraction(MSAT_PER_BTC, 100_000) == 1_000_000
    p = pricer(rates=rates)
    cost = p.actual_cost("usd", {"prompt_tokens": 1000, "completion_tokens": 1000})
    # $1/1M in = 1 msat per token, $2.5/1M out = 2.5 msat per token, request 100 msat
    assert cost == Cost(total_msat=3600, request_msat=100, input_msat=1000, output_msat=2500)
    assert p.prices_msat("usd") == {
        "request": 100,
        "input_per_1m": 1_000_000,
        "output_per_1m": 2_500_000,
        "speech_per_1m_chars": 15_000_000,
    }


def test_usd_rate_that_does_not_divide_evenly_rounds_up() -> None:
    p = pricer(rates=fixed_rates("30000"))  # 1 USD = 10^11/30000 = 3333333.33… msat
    cost = p.actual_cost("usd", {"prompt_tokens": 1, "completion_tokens": 0})
    exact = Fraction(MSAT_PER_BTC, 30000) * (Fraction(1, 10_000) + Fraction(1, 10**6))
    assert cost.total_msat == math.ceil(exact)
    assert cost.total_msat - exact < 1


def test_usd_without_rates_is_refused() -> None:
    p = Pricer(MODELS, Fraction(1), None)
    with pytest.raises(PriceUnavailable):
        p.max_cost("usd", chat(max_tokens=1))
    # msat prices need no rates object
    assert p.max_cost("small", chat(max_tokens=1)).total_msat > 0
    # sources configured but never fetched, and no fallback: refuse
    waiting = PricingSection(btc_usd_sources=(RateSource("http://127.0.0.1:9/", "usd"),))
    q = Pricer(MODELS, Fraction(1), ExchangeRates(waiting, CLIENT))
    with pytest.raises(PriceUnavailable):
        q.prices_msat("usd")


def test_fee_multiplier_applied_once_and_rounded_once() -> None:
    # 500_000 tokens at 1 msat per 1M = 0.5 msat exactly
    model = ModelPrice(input_per_1m=msat(1))
    usage = {"prompt_tokens": 500_000, "completion_tokens": 0}
    one = Pricer({"m": model}, Fraction(1), None).actual_cost("m", usage)
    two = Pricer({"m": model}, Fraction(2), None).actual_cost("m", usage)
    assert one.total_msat == 1  # ceil(0.5)
    assert two.total_msat == 1  # ceil(2 * 0.5), not 2 * ceil(0.5)
    three_halves = Pricer({"m": model}, Fraction(3, 2), None).actual_cost("m", usage)
    assert three_halves.total_msat == 1  # ceil(0.75)
    assert three_halves.input_msat == 0  # floor(0.75)


def test_listings_are_ints_and_decimals() -> None:
    p = pricer(fee=Fraction(11, 10))
    listed = p.prices_msat("small")
    assert listed == {"request": 8, "input_per_1m": 1_650_002, "output_per_1m": 3_666_667}
    assert all(type(v) is int for v in listed.values())
    assert p.prices_msat("images")["image:1024x1024/hd"] == 88_000
    sats = p.sats_pricing("small")
    assert all(type(v) is Decimal for v in sats.values())
    assert sats["prompt"] == Decimal("0.0016500011")
    assert sats["request"] == Decimal("0.0077")
    worst = Fraction(11, 10) * (7 + Fraction(1_500_001 * 4096 + 3_333_333 * 1024, 10**6))
    assert sats["max_cost"] == math.ceil(worst / 1000)
    # max_cost covers the largest possible hold of one chat request
    unsized = [{"type": "file", "file": {"file_id": "file-abc"}}]  # bounded by the context
    hold = p.max_cost("small", {"messages": [{"role": "user", "content": unsized}]})
    assert hold == p.max_cost(
        "small", {**chat(), "messages": [{"role": "user", "content": unsized}], "max_tokens": 1024}
    )
    assert hold.total_msat <= sats["max_cost"] * 1000


# --- properties -------------------------------------------------------------------------

msat_rates = st.integers(min_value=0, max_value=10**9).map(msat)
usd_rates = st.decimals(
    min_value=Decimal(0), max_value=Decimal(1000), places=6, allow_nan=False, allow_infinity=False
).map(lambda d: Rate(Fraction(d), "usd"))
rates_st = st.one_of(st.none(), msat_rates, usd_rates)
fees = st.fractions(min_value=Fraction(1, 100), max_value=100, max_denominator=10_000)
btc_usd = st.decimals(
    min_value=Decimal(1), max_value=Decimal(10**7), places=2, allow_nan=False, allow_infinity=False
)
prices = st.builds(
    ModelPrice,
    request=rates_st,
    input_per_1m=rates_st,
    output_per_1m=rates_st,
    context_tokens=st.integers(min_value=2048, max_value=200_000),
    max_output_tokens=st.integers(min_value=1, max_value=2048),
)


def exact_msat(rate: Rate | None, per_usd: Fraction) -> Fraction:
    if rate is None:
        return Fraction(0)
    return rate.amount * (per_usd if rate.currency == "usd" else 1)


@settings(max_examples=300, deadline=None)
@given(
    price=prices,
    fee=fees,
    rate=btc_usd,
    prompt=st.integers(0, 10**7),
    output=st.integers(0, 10**6),
)
def test_costs_are_ints_rounded_up_once(
    price: ModelPrice, fee: Fraction, rate: Decimal, prompt: int, output: int
) -> None:
    rates = ExchangeRates(PricingSection(btc_usd_fallback=rate), CLIENT)
    p = Pricer({"m": price}, fee, rates)
    cost = p.actual_cost("m", {"prompt_tokens": prompt, "completion_tokens": output})
    assert_ints(cost)
    per_usd = Fraction(MSAT_PER_BTC) / Fraction(rate)
    exact = fee * (
        exact_msat(price.request, per_usd)
        + exact_msat(price.input_per_1m, per_usd) * prompt / 10**6
        + exact_msat(price.output_per_1m, per_usd) * output / 10**6
    )
    assert cost.total_msat >= exact
    assert cost.total_msat - exact < 1
    assert all(type(v) is int for v in p.prices_msat("m").values())


texts = st.text(max_size=200)
contents = st.one_of(
    texts,
    st.lists(st.builds(lambda t: {"type": "text", "text": t}, texts), min_size=1, max_size=3),
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user"]), "content": contents}),
    min_size=1,
    max_size=5,
)


def message_texts(message: dict[str, Any]) -> list[str]:
    content = message["content"]
    return [content] if isinstance(content, str) else [part["text"] for part in content]


@settings(max_examples=300, deadline=None)
@given(
    price=prices,
    fee=fees,
    msgs=messages,
    max_tokens=st.one_of(st.none(), st.integers(1, 2048)),
    n=st.one_of(st.none(), st.integers(1, 4)),
    data=st.data(),
)
def test_actual_never_exceeds_hold_within_bounds(
    price: ModelPrice,
    fee: Fraction,
    msgs: list[dict[str, Any]],
    max_tokens: int | None,
    n: int | None,
    data: st.DataObject,
) -> None:
    p = Pricer({"m": price}, fee, fixed_rates("65000.5"))
    body: dict[str, Any] = {"messages": msgs, "n": n}
    if max_tokens is not None and max_tokens > price.max_output_tokens:
        with pytest.raises(InvalidRequest):
            p.max_cost("m", {**body, "max_tokens": max_tokens})
        return
    body["max_tokens"] = max_tokens
    texts_bytes = sum(len(text.encode()) for m in msgs for text in message_texts(m))
    try:
        hold = p.max_cost("m", body)
    except ContextLengthExceeded:
        # refused only when the text really is that big (JSON holds every string it counts)
        json_bytes = len(json.dumps(msgs, ensure_ascii=False).encode())
        assert json_bytes + 8 * (len(msgs) + 1) > price.context_tokens
        return
    bounds = p.token_bounds("m", body)
    assert bounds.prompt_tokens >= min(texts_bytes, price.context_tokens)
    assert bounds.prompt_tokens <= price.context_tokens
    if max_tokens is not None:
        assert bounds.completion_tokens == max_tokens * (n or 1)
    prompt = data.draw(st.integers(0, bounds.prompt_tokens))
    output = data.draw(st.integers(0, bounds.completion_tokens))
    settled = p.actual_cost("m", {"prompt_tokens": prompt, "completion_tokens": output})
    assert_ints(hold)
    assert_ints(settled)
    assert settled.total_msat <= hold.total_msat


# --- what would fit ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens", None])
@pytest.mark.parametrize("budget", [7, 1_000, 2_345, 10_000, 10**9])
def test_fitting_max_tokens_is_the_largest_whose_hold_fits(key: str | None, budget: int) -> None:
    p = pricer()
    body = chat("a longer prompt to count", **({key: 1000} if key else {}))
    fits = p.fitting_max_tokens("small", body, "chat", budget)
    name = key or "max_tokens"

    def hold(m: int) -> int:
        trial = {k: v for k, v in body.items() if k != "max_completion_tokens"}
        return p.max_cost("small", {**trial, name: m}, "chat").total_msat

    if hold(1) > budget:
        assert fits is None
    else:
        assert fits is not None and 1 <= fits <= SMALL.max_output_tokens
        assert hold(fits) <= budget
        assert fits == SMALL.max_output_tokens or hold(fits + 1) > budget


def test_fitting_max_tokens_only_for_token_priced_outputs() -> None:
    p = pricer()
    assert p.fitting_max_tokens("small", {"input": "x"}, "embeddings", 10**9) is None
    assert p.fitting_max_tokens("images", {"prompt": "x"}, "images", 10**9) is None
