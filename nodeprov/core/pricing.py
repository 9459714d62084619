"""What a job costs, in integer msat: the hold before it runs and the settlement after.

Rounding rules (the only places money is rounded):

- All arithmetic is exact; USD rates are converted with one BTC/USD rate per call. Holds and
  settlements compute in integers over each model's common denominator
  (:mod:`nodeprov.core.price_tables`); the listings use ``Fraction``.
- ``Cost.total_msat = ceil(fee_multiplier * (request + input + output))``: rounded up, once.
- The parts are ``floor(fee_multiplier * part)``, so ``sum(parts) <= total_msat`` (for display
  and accounting breakdowns; the total is what is charged).
- :meth:`Pricer.prices_msat` rounds each listed price up on its own.
- :meth:`Pricer.sats_pricing` is display-only (``Decimal``, 12 significant digits, rounded up)
  and never feeds back into money.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, localcontext
from fractions import Fraction
from typing import Any, Literal

from nodeprov.config import ModelPrice, Rate
from nodeprov.core.money import MSAT_PER_SAT, ceil_div, ceil_msat
from nodeprov.core.price_tables import PriceTable, Term, build, exact_msat
from nodeprov.core.rates import ExchangeRates
from nodeprov.core.token_bounds import (
    TokenBounds,
    count,
    require_mapping,
    show,
    token_bounds,
)
from nodeprov.errors import (
    InvalidRequest,
    PriceUnavailable,
    UnknownModel,
    UpstreamError,
)

__all__ = [
    "ENDPOINTS",
    "Cost",
    "Endpoint",
    "ExchangeRates",
    "Pricer",
    "TokenBounds",
    "UsageUnavailable",
]

Endpoint = Literal["chat", "completions", "embeddings", "images", "speech", "audio"]
ENDPOINTS: tuple[Endpoint, ...] = (
    "chat",
    "completions",
    "embeddings",
    "images",
    "speech",
    "audio",
)

PER_MILLION = 1_000_000


class UsageUnavailable(UpstreamError):
    """The upstream's ``usage`` is missing or malformed, so the actual cost is unknown.

    The caller decides; the intended handling is to settle at the hold (:meth:`Pricer.max_cost`),
    the amount the client agreed to before the job ran.
    """

    code = "usage_unavailable"


@dataclass(frozen=True)
class Cost:
    """A cost in msat: ``total_msat`` is charged; the floored parts sum to at most the total."""

    total_msat: int
    request_msat: int = 0
    input_msat: int = 0
    output_msat: int = 0


class _Converter:
    """Rates to exact msat for one cost, reading the BTC/USD rate at most once (one rate)."""

    def __init__(self, rates: ExchangeRates | None) -> None:
        self._rates = rates
        self._per_usd: Fraction | None = None

    def per_usd(self) -> Fraction:
        if self._per_usd is None:
            if self._rates is None:
                raise PriceUnavailable("USD prices need exchange rates; none are configured")
            self._per_usd = self._rates.msat_per_usd()
        return self._per_usd

    def __call__(self, rate: Rate | None) -> Fraction:
        return exact_msat(rate, self.per_usd)


class Pricer:
    """Prices the configured models; USD rates are converted at call time.

    Holds and settlements use each model's :class:`PriceTable` (integers, built on first
    use); the listings below stay in exact ``Fraction`` arithmetic (not per request).
    """

    def __init__(
        self,
        models: Mapping[str, ModelPrice],
        fee_multiplier: Fraction,
        rates: ExchangeRates | None,
    ) -> None:
        if isinstance(fee_multiplier, float):
            raise TypeError("float never becomes money; give the fee multiplier as a Fraction")
        self._models = dict(models)
        self._fee = Fraction(fee_multiplier)
        self._rates = rates
        self._tables: dict[tuple[str, str], PriceTable] = {}

    def models(self) -> list[str]:
        """The offered model names, sorted."""
        return sorted(self._models)

    def price(self, model: str) -> ModelPrice:
        """The price table of ``model``, or :class:`UnknownModel`."""
        try:
            return self._models[model]
        except (KeyError, TypeError):
            raise UnknownModel(f"model {model!r} is not offered here") from None

    # --- holds and settlement ---------------------------------------------------------

    def token_bounds(self, model: str, body: Any, endpoint: Endpoint = "chat") -> TokenBounds:
        """The token bounds :meth:`max_cost` charges for (see :func:`token_bounds`)."""
        return token_bounds(self.price(model), body, endpoint)

    def max_cost(self, model: str, body: Any, endpoint: Endpoint = "chat") -> Cost:
        """The most ``body`` can cost on ``endpoint``: the amount to hold before the job runs."""
        price = self.price(model)
        body = require_mapping(body)
        convert = _Converter(self._rates)
        if endpoint == "images":
            n = count(body, "n")
            table = self._image_table(convert, model, price, body.get("size"), body.get("quality"))
            return _cost(table, output=n)
        if endpoint == "speech":
            text = body.get("input")
            if not isinstance(text, str):
                raise InvalidRequest("'input' must be a string")
            return self._speech(convert, model, price, len(text))
        if endpoint == "audio":
            return self._audio(convert, model, price, body.get("seconds"), InvalidRequest)
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}")
        bounds = self.token_bounds(model, body, endpoint)
        return self._tokens(convert, model, price, bounds.prompt_tokens, bounds.completion_tokens)

    def fitting_max_tokens(
        self, model: str, body: Any, endpoint: Endpoint, budget_msat: int
    ) -> int | None:
        """The largest ``max_tokens`` whose hold is at most ``budget_msat`` (the other output
        limit dropped), or None: not a chat or completion, or not even one token fits."""
        if endpoint not in ("chat", "completions"):
            return None
        body = require_mapping(body)
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        rest = {k: v for k, v in body.items() if k not in ("max_tokens", "max_completion_tokens")}

        def fits(limit: int) -> bool:
            return self.max_cost(model, {**rest, name: limit}, endpoint).total_msat <= budget_msat

        low, high = 1, self.price(model).max_output_tokens
        if high < 1 or not fits(low):
            return None
        while low < high:  # the hold grows with the limit: the largest that fits
            mid = (low + high + 1) // 2
            if fits(mid):
                low = mid
            else:
                high = mid - 1
        return low

    def actual_cost(self, model: str, usage: Any, endpoint: Endpoint = "chat") -> Cost:
        """The cost of a finished job from the upstream ``usage``, or :class:`UsageUnavailable`.

        Chat/completions: ``prompt_tokens``/``completion_tokens`` (or ``input_tokens``/
        ``output_tokens``); embeddings: the prompt count only; images: ``{"n", "size",
        "quality"}`` (images returned); speech: ``{"characters"}``; audio: ``{"seconds"}``.
        """
        price = self.price(model)
        if not isinstance(usage, Mapping):
            raise UsageUnavailable("the upstream reported no usage")
        convert = _Converter(self._rates)
        if endpoint in ("chat", "completions"):
            prompt = _usage_int(usage, "prompt_tokens", "input_tokens")
            output = _usage_int(usage, "completion_tokens", "output_tokens")
            return self._tokens(convert, model, price, prompt, output)
        if endpoint == "embeddings":
            prompt = _usage_int(usage, "prompt_tokens", "input_tokens")
            return self._tokens(convert, model, price, prompt, 0)
        if endpoint == "images":
            n = _usage_int(usage, "n")
            size, quality = usage.get("size"), usage.get("quality")
            return _cost(self._image_table(convert, model, price, size, quality), output=n)
        if endpoint == "speech":
            return self._speech(convert, model, price, _usage_int(usage, "characters"))
        if endpoint == "audio":
            return self._audio(convert, model, price, usage.get("seconds"), UsageUnavailable)
        raise ValueError(f"unknown endpoint {endpoint!r}")

    def _tokens(
        self, convert: _Converter, model: str, price: ModelPrice, prompt: int, output: int
    ) -> Cost:
        terms = (
            Term("input", price.input_per_1m, PER_MILLION),
            Term("output", price.output_per_1m, PER_MILLION),
            Term("request", price.request),
        )
        return _cost(self._table(convert, model, "tokens", terms), input_=prompt, output=output)

    def _speech(self, convert: _Converter, model: str, price: ModelPrice, chars: int) -> Cost:
        # Text-to-speech is billed on the input text, so it is an input cost.
        terms = (
            Term("input", price.speech_per_1m_chars, PER_MILLION),
            Term("request", price.request),
        )
        return _cost(self._table(convert, model, "speech", terms), input_=chars)

    def _audio(
        self,
        convert: _Converter,
        model: str,
        price: ModelPrice,
        seconds: Any,
        error: type[InvalidRequest] | type[UsageUnavailable],
    ) -> Cost:
        # Transcription and translation: per second of audio (whole seconds), an input cost.
        if type(seconds) is not int or seconds < 0:
            raise error(f"invalid audio duration {seconds!r}")
        if price.audio_per_second is None:
            raise InvalidRequest(f"model {model!r} does not take audio here")
        terms = (Term("input", price.audio_per_second), Term("request", price.request))
        return _cost(self._table(convert, model, "audio", terms), input_=seconds)

    def _image_table(
        self, convert: _Converter, model: str, price: ModelPrice, size: Any, quality: Any
    ) -> PriceTable:
        """The table of one image: ``size/quality``, else ``size``, else ``default``.

        A quality the operator priced for some sizes but asked for without a size (the
        upstream picks one) costs the dearest of those prices, never the plain size's or the
        default.
        """
        if not price.image:
            raise InvalidRequest(f"model {model!r} does not generate images here")

        def table(key: str) -> PriceTable:
            terms = (Term("output", price.image[key]), Term("request", price.request))
            return self._table(convert, model, "image:" + key, terms)

        if isinstance(quality, str) and not isinstance(size, str):
            priced = [key for key in price.image if key.endswith("/" + quality)]
            if priced:
                return max((table(key) for key in priced), key=lambda t: t.output_rate)
        keys = []
        if isinstance(size, str) and isinstance(quality, str):
            keys.append(f"{size}/{quality}")
        if isinstance(size, str):
            keys.append(size)
        keys.append("default")
        for key in keys:
            if key in price.image:
                return table(key)
        offered = ", ".join(sorted(price.image))
        raise InvalidRequest(f"image size {show(size)} is not offered for {model!r}; use {offered}")

    def _table(
        self, convert: _Converter, model: str, kind: str, terms: tuple[Term, ...]
    ) -> PriceTable:
        """The kept table of ``model``'s ``kind`` of job, (re)built when missing or when the
        BTC/USD rate it was built with is no longer the current one."""
        table = self._tables.get((model, kind))
        if table is not None and (table.per_usd is None or table.per_usd == convert.per_usd()):
            return table
        table = build(terms, self._fee, convert.per_usd)
        self._tables[(model, kind)] = table
        return table

    # --- listings ---------------------------------------------------------------------

    def prices_msat(self, model: str) -> dict[str, int]:
        """Current prices in msat with the fee, each rounded up: per request, per 1M tokens."""
        price = self.price(model)
        convert = _Converter(self._rates)

        def up(rate: Rate | None) -> int:
            return int(ceil_msat(self._fee * convert(rate)))

        listed = {
            "request": up(price.request),
            "input_per_1m": up(price.input_per_1m),
            "output_per_1m": up(price.output_per_1m),
        }
        if price.speech_per_1m_chars is not None:
            listed["speech_per_1m_chars"] = up(price.speech_per_1m_chars)
        for key, rate in sorted(price.image.items()):
            listed[f"image:{key}"] = up(rate)
        return listed

    def sats_pricing(self, model: str) -> dict[str, Decimal]:
        """Routstr's ``sats_pricing`` object (sats per token / request / image). Display only.

        Values are ``Decimal``; serialise them as JSON numbers (Routstr clients do arithmetic
        on them). ``max_cost`` is whole sats, at least the hold of any request with one prompt
        and one output within the model's limits: a chat, completion or embedding whose prompt
        fits ``context_tokens`` with at most ``max_output_tokens`` (prompt and output bounds
        at their limits together), or one image of any offered size. Speech and audio are
        priced per character and second and are not bounded by it; ``n``, ``best_of`` and
        batched inputs multiply the hold.
        """
        price = self.price(model)
        convert = _Converter(self._rates)
        fee = self._fee
        request = convert(price.request)
        per_input = convert(price.input_per_1m) / PER_MILLION
        per_output = convert(price.output_per_1m) / PER_MILLION
        images = [convert(rate) for rate in price.image.values()]
        max_prompt = price.context_tokens * per_input
        max_output = price.max_output_tokens * per_output
        # The dearest single job: a full context and output, or the dearest image.
        max_job = max(max_prompt + max_output, max(images, default=Fraction(0)))
        max_msat = ceil_msat(fee * (request + max_job))
        return {
            "prompt": _display_sats(fee * per_input),
            "completion": _display_sats(fee * per_output),
            "request": _display_sats(fee * request),
            "image": _display_sats(fee * max(images, default=Fraction(0))),
            "web_search": Decimal(0),
            "internal_reasoning": Decimal(0),
            "max_prompt_cost": _display_sats(fee * max_prompt),
            "max_completion_cost": _display_sats(fee * max_output),
            "max_cost": Decimal(ceil_div(max_msat, MSAT_PER_SAT)),
        }


# --- display only: never money ------------------------------------------------------------


def _display_sats(value_msat: Fraction) -> Decimal:
    """msat to sats as a ``Decimal`` with 12 significant digits, rounded up; for listings."""
    with localcontext() as ctx:
        ctx.prec = 12
        ctx.rounding = ROUND_CEILING
        sats = value_msat / MSAT_PER_SAT
        return Decimal(sats.numerator) / Decimal(sats.denominator)


def _cost(table: PriceTable, input_: int = 0, output: int = 0) -> Cost:
    """Apply ``table`` to the quantities: total rounded up once, parts down."""
    scale = table.scale
    request = table.request
    inputs = table.input * input_
    outputs = table.output * output
    return Cost(
        total_msat=-(-(request + inputs + outputs) // scale),
        request_msat=request // scale,
        input_msat=inputs // scale,
        output_msat=outputs // scale,
    )


def _usage_int(usage: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        value = usage.get(key)
        if value is None:
            continue
        if type(value) is not int or value < 0:
            raise UsageUnavailable(f"the upstream reported an invalid usage.{key}: {show(value)}")
        return value
    raise UsageUnavailable(f"the upstream's usage has no {' or '.join(keys)}")
