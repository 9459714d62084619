"""``sats_pricing.max_cost`` (what ``/v1/models`` advertises) covers every in-limit hold.

In limits: one prompt and one output (``n`` 1), a prompt that passes the context check,
``max_tokens`` up to the model's ``max_output_tokens``, any offered image size. A client that
pays ``max_cost`` whole sats must never be refused such a request.
"""

from __future__ import annotations

from fractions import Fraction
from types import MappingProxyType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeprov.config import ModelPrice, Rate
from nodeprov.core.pricing import Endpoint, Pricer

CONTEXT, MAX_OUT = 4096, 512
PRICES = {
    "chat": ModelPrice(
        request=Rate(Fraction(7), "msat"),
        input_per_1m=Rate(Fraction(1_234_567), "msat"),
        output_per_1m=Rate(Fraction(3_000_001), "msat"),
        context_tokens=CONTEXT,
        max_output_tokens=MAX_OUT,
    ),
    # An image price larger than a full context and output: max_cost must be the image's.
    "mixed": ModelPrice(
        request=Rate(Fraction(1000), "msat"),
        input_per_1m=Rate(Fraction(2_000_000), "msat"),
        output_per_1m=Rate(Fraction(5_000_000), "msat"),
        image=MappingProxyType(
            {
                "default": Rate(Fraction(50_000), "msat"),
                "1024x1024/hd": Rate(Fraction(80_000), "msat"),
            }
        ),
        context_tokens=CONTEXT,
        max_output_tokens=MAX_OUT,
    ),
}
FEES = (Fraction(1), Fraction(3, 2), Fraction(1001, 1000))

text = st.text(min_size=1, max_size=CONTEXT * 4)
max_tokens = st.one_of(st.none(), st.integers(1, MAX_OUT))
part = st.one_of(
    text.map(lambda t: {"type": "text", "text": t}),
    st.just({"type": "image_url", "image_url": {"url": "https://x/y.png"}}),
    st.just({"type": "file", "file": {"file_id": "file-1"}}),
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": st.one_of(text, st.lists(part, min_size=1, max_size=3)),
    }
)


def _chat(messages: list[dict[str, Any]], limit: int | None, tools: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": messages}
    if limit is not None:
        body["max_tokens"] = limit
    if tools:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    return body


bodies: st.SearchStrategy[tuple[Endpoint, dict[str, Any]]] = st.one_of(
    st.builds(_chat, st.lists(message, min_size=1, max_size=4), max_tokens, st.booleans()).map(
        lambda b: ("chat", b)
    ),
    st.builds(
        lambda p, s, m: ("completions", {"prompt": p, "suffix": s, "max_tokens": m}),
        text,
        st.one_of(st.none(), text),
        max_tokens,
    ),
    text.map(lambda t: ("embeddings", {"input": t})),
)


def _in_limits(pricer: Pricer, model: str, endpoint: Endpoint, body: dict[str, Any]) -> int | None:
    try:
        return pricer.max_cost(model, body, endpoint).total_msat
    except Exception:  # refused as out of limits (e.g. the context check): not a hold
        return None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(PRICES)), st.sampled_from(FEES), bodies)
def test_every_in_limit_token_hold_fits_in_the_advertised_max_cost(
    model: str, fee: Fraction, case: tuple[Endpoint, dict[str, Any]]
) -> None:
    pricer = Pricer(PRICES, fee, None)
    endpoint, body = case
    hold = _in_limits(pricer, model, endpoint, {"model": model, **body})
    if hold is not None:
        assert hold <= pricer.sats_pricing(model)["max_cost"] * 1000


def test_the_largest_requests_fit_exactly_and_images_count() -> None:
    for fee in FEES:
        pricer = Pricer(PRICES, fee, None)
        for model in PRICES:
            advertised = int(pricer.sats_pricing(model)["max_cost"]) * 1000
            huge = {"model": model, "messages": [{"role": "user", "content": "x" * CONTEXT * 2}]}
            full = pricer.max_cost(model, {**huge, "max_tokens": MAX_OUT}).total_msat
            assert full <= advertised
            if model == "chat":  # no image dearer than a full context: nothing to spare
                assert advertised < full + 1000
        for size, quality in ((None, None), ("1024x1024", "hd"), (None, "hd")):
            body = {"model": "mixed", "prompt": "p", "size": size, "quality": quality}
            hold = pricer.max_cost("mixed", body, "images").total_msat
            assert hold <= int(pricer.sats_pricing("mixed")["max_cost"]) * 1000
