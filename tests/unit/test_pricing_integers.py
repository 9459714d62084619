"""The integer price tables give exactly the costs of exact ``Fraction`` arithmetic.

The reference below is the pricing arithmetic as it was written with ``Fraction`` (fee applied
once to the exact sum, total rounded up, parts rounded down); the hot path must agree with it
for every price, fee, BTC/USD rate and usage, on every endpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeprov.config import ModelPrice, PricingSection, Rate
from nodeprov.core.money import MSAT_PER_BTC
from nodeprov.core.pricing import Cost, Endpoint, ExchangeRates, Pricer

CLIENT = httpx.AsyncClient()  # never used: no sources are configured here
PER_MILLION = 10**6


class SettableRates(ExchangeRates):
    """A BTC/USD rate the test moves between calls."""

    def __init__(self, btc_usd: Fraction) -> None:
        super().__init__(PricingSection(btc_usd_fallback=Decimal(1)), CLIENT)
        self.btc_usd_now = btc_usd

    def msat_per_usd(self) -> Fraction:
        return Fraction(MSAT_PER_BTC) / self.btc_usd_now


# --- the exact reference ------------------------------------------------------------------


def exact(rate: Rate | None, per_usd: Fraction) -> Fraction:
    if rate is None:
        return Fraction(0)
    return Fraction(rate.amount) * (per_usd if rate.currency == "usd" else 1)


def reference_cost(fee: Fraction, request: Fraction, input_: Fraction, output: Fraction) -> Cost:
    return Cost(
        total_msat=math.ceil(fee * (request + input_ + output)),
        request_msat=math.floor(fee * request),
        input_msat=math.floor(fee * input_),
        output_msat=math.floor(fee * output),
    )


def reference_image(price: ModelPrice, size: Any, quality: Any, per_usd: Fraction) -> Fraction:
    if isinstance(quality, str) and not isinstance(size, str):
        priced = [r for k, r in price.image.items() if k.endswith("/" + quality)]
        if priced:
            return max(exact(r, per_usd) for r in priced)
    for key in (f"{size}/{quality}", size, "default"):
        if isinstance(key, str) and key in price.image:
            return exact(price.image[key], per_usd)
    raise AssertionError("the strategies only ask for offered images")


def reference(
    price: ModelPrice, fee: Fraction, per_usd: Fraction, endpoint: Endpoint, q: Mapping[str, Any]
) -> Cost:
    request = exact(price.request, per_usd)
    if endpoint in ("chat", "completions", "embeddings"):
        input_ = exact(price.input_per_1m, per_usd) * q["prompt"] / PER_MILLION
        output = exact(price.output_per_1m, per_usd) * q["output"] / PER_MILLION
        return reference_cost(fee, request, input_, output)
    if endpoint == "speech":
        speech = exact(price.speech_per_1m_chars, per_usd) * q["chars"] / PER_MILLION
        return reference_cost(fee, request, speech, Fraction(0))
    if endpoint == "audio":
        audio = exact(price.audio_per_second, per_usd) * q["seconds"]
        return reference_cost(fee, request, audio, Fraction(0))
    each = reference_image(price, q["size"], q["quality"], per_usd)
    return reference_cost(fee, request, Fraction(0), each * q["n"])


# --- strategies ---------------------------------------------------------------------------

msat_amounts = st.one_of(
    st.integers(0, 10**12).map(Fraction),
    st.fractions(min_value=0, max_value=10**9, max_denominator=10**7),
    st.decimals(0, 10**9, places=3, allow_nan=False, allow_infinity=False).map(Fraction),
)
usd_amounts = st.one_of(
    st.decimals(0, 1000, places=6, allow_nan=False, allow_infinity=False).map(Fraction),
    st.fractions(min_value=0, max_value=1000, max_denominator=10**6),
)
rates = st.one_of(
    st.none(),
    msat_amounts.map(lambda a: Rate(a, "msat")),
    usd_amounts.map(lambda a: Rate(a, "usd")),
)
IMAGE_KEYS = ("default", "1024x1024", "1024x1024/hd", "512x512/hd", "256x256/standard")
images = st.dictionaries(
    st.sampled_from(IMAGE_KEYS), rates.filter(lambda r: r is not None), max_size=5
).map(lambda d: MappingProxyType({**d, "default": d.get("default", Rate(Fraction(7), "msat"))}))
prices = st.builds(
    ModelPrice,
    request=rates,
    input_per_1m=rates,
    output_per_1m=rates,
    image=images,
    audio_per_second=rates.filter(lambda r: r is not None),
    speech_per_1m_chars=rates,
)
fees = st.one_of(
    st.just(Fraction(1)),
    st.just(Fraction(0)),
    st.fractions(min_value=0, max_value=100, max_denominator=10**6),
)
btc_usd = st.one_of(
    st.decimals(1, 10**7, places=2, allow_nan=False, allow_infinity=False).map(Fraction),
    st.fractions(min_value=1, max_value=10**7, max_denominator=10**4),
)
counts = st.integers(0, 10**9)


def usage_for(endpoint: Endpoint, q: Mapping[str, Any]) -> dict[str, Any]:
    if endpoint in ("chat", "completions"):
        return {"prompt_tokens": q["prompt"], "completion_tokens": q["output"]}
    if endpoint == "embeddings":
        return {"prompt_tokens": q["prompt"]}
    if endpoint == "speech":
        return {"characters": q["chars"]}
    if endpoint == "audio":
        return {"seconds": q["seconds"]}
    return {"n": q["n"], "size": q["size"], "quality": q["quality"]}


quantities = st.fixed_dictionaries(
    {
        "prompt": counts,
        "output": counts,
        "chars": counts,
        "seconds": counts,
        "n": st.integers(0, 10),
        "size": st.one_of(st.none(), st.sampled_from(["1024x1024", "512x512", "2048x2048"])),
        "quality": st.one_of(st.none(), st.sampled_from(["hd", "standard", "low"])),
    }
)
endpoints = st.sampled_from(["chat", "completions", "embeddings", "images", "speech", "audio"])


@settings(max_examples=400, deadline=None)
@given(price=prices, fee=fees, btc=btc_usd, endpoint=endpoints, q=quantities)
def test_integer_costs_equal_the_exact_fraction_costs(
    price: ModelPrice, fee: Fraction, btc: Fraction, endpoint: Endpoint, q: dict[str, Any]
) -> None:
    if endpoint == "embeddings":
        q = {**q, "output": 0}
    rates_now = SettableRates(btc)
    pricer = Pricer({"m": price}, fee, rates_now)
    want = reference(price, fee, rates_now.msat_per_usd(), endpoint, q)
    assert pricer.actual_cost("m", usage_for(endpoint, q), endpoint) == want
    assert pricer.actual_cost("m", usage_for(endpoint, q), endpoint) == want  # kept table


@settings(max_examples=200, deadline=None)
@given(price=prices, fee=fees, btc=btc_usd, endpoint=endpoints, q=quantities)
def test_integer_holds_equal_the_exact_fraction_holds(
    price: ModelPrice, fee: Fraction, btc: Fraction, endpoint: Endpoint, q: dict[str, Any]
) -> None:
    rates_now = SettableRates(btc)
    pricer = Pricer({"m": price}, fee, rates_now)
    per_usd = rates_now.msat_per_usd()
    if endpoint == "images":
        body: dict[str, Any] = {"prompt": "a cat", "n": max(q["n"], 1)}
        body |= {k: q[k] for k in ("size", "quality") if q[k] is not None}
        want = reference(price, fee, per_usd, "images", {**q, "n": body["n"]})
    elif endpoint == "speech":
        body = {"input": "x" * (q["chars"] % 5000), "voice": "alloy"}
        want = reference(price, fee, per_usd, "speech", {"chars": len(body["input"])})
    elif endpoint == "audio":
        body = {"seconds": q["seconds"]}
        want = reference(price, fee, per_usd, "audio", q)
    else:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
        body = {"prompt": "hello", "max_tokens": 16} if endpoint == "completions" else body
        body = {"input": "hello"} if endpoint == "embeddings" else body
        bounds = pricer.token_bounds("m", body, endpoint)
        counted = {"prompt": bounds.prompt_tokens, "output": bounds.completion_tokens}
        want = reference(price, fee, per_usd, endpoint, counted)
    assert pricer.max_cost("m", body, endpoint) == want


@settings(max_examples=100, deadline=None)
@given(price=prices, fee=fees, moves=st.lists(btc_usd, min_size=2, max_size=5), q=quantities)
def test_a_new_btc_usd_rate_reprices_usd_rates_at_once(
    price: ModelPrice, fee: Fraction, moves: list[Fraction], q: dict[str, Any]
) -> None:
    rates_now = SettableRates(moves[0])
    pricer = Pricer({"m": price}, fee, rates_now)
    for btc in moves:
        rates_now.btc_usd_now = btc
        for endpoint in ("chat", "speech", "audio", "images"):
            want = reference(price, fee, rates_now.msat_per_usd(), endpoint, q)
            assert pricer.actual_cost("m", usage_for(endpoint, q), endpoint) == want
