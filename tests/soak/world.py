"""What every soak operation shares: the stack, the books, the faucet, the seeded randomness,
and the operations in flight (so a fault can say what it interrupted)."""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.soak.books import Books
from tests.soak.faucet import Faucet
from tests.soak.stack import INPUT_MSAT, MODELS, OUTPUT_MSAT, REQUEST_MSAT, Stack

WORDS = ("the", "node", "sells", "model", "access", "for", "ecash", "to", "anyone", "who", "pays")
# Only these models answer exactly as the advertised prices say (the others fail, drop the
# stream, or report usage early or never: their cost is bounded, not predicted).
EXACT_MODELS = frozenset({"soak-chat", "soak-chat+slow-0.5", "soak-chat+drip-0.05"})


class Lost(Exception):
    """The answer never came (the node died, the connection dropped): the outcome is unknown."""


@dataclass
class XCashuPayment:
    """A per-request token and what its answer said (the change is claimed at the end)."""

    token: str
    msat: int
    unit: str
    cost_msat: int | None = None  # None: the answer was lost or carried no cost


@dataclass
class World:
    stack: Stack
    books: Books
    faucet: Faucet
    rng: random.Random
    log_lines: list[str]
    http: httpx.AsyncClient = field(init=False)
    keys: list[str] = field(default_factory=list)  # API keys created
    token_keys: list[str] = field(default_factory=list)  # tokens used as keys
    xcashu: list[XCashuPayment] = field(default_factory=list)
    npubs: list[Any] = field(default_factory=list)  # DM clients
    in_flight: dict[int, str] = field(default_factory=dict)
    operations: int = 0
    faults: int = 0
    started: float = field(default_factory=time.monotonic)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=5.0), trust_env=False)

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {text}"
        self.log_lines.append(line)
        print(line, flush=True)

    def begin(self, name: str) -> int:
        op = next(self._ids)
        self.in_flight[op] = name
        return op

    def end(self, op: int) -> None:
        self.in_flight.pop(op, None)
        self.operations += 1

    async def token(self, amount: int, unit: str = "sat") -> str:
        """A fresh token from the faucet, counted as issued to the clients."""
        token = await self.faucet.token(amount, unit)
        self.books.issue(token, amount * (1000 if unit == "sat" else 1))
        return token

    # --- request bodies ------------------------------------------------------------------

    def chat_body(self, stream: bool | None = None) -> dict[str, Any]:
        rng = self.rng
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        body: dict[str, Any] = {
            "model": rng.choice(MODELS),
            "messages": [{"role": "user", "content": words}],
            "max_tokens": rng.randint(1, 16),
        }
        if stream if stream is not None else rng.random() < 0.4:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body


def max_cost(body: dict[str, Any]) -> int:
    """A generous bound on what the node may hold (and so charge) for ``body``, msat.

    Every message byte is counted as a token: no tokenizer counts more tokens than bytes.
    """
    prompt = len(json.dumps(body.get("messages", []))) + 16 * len(body.get("messages", []))
    return REQUEST_MSAT + INPUT_MSAT * prompt + OUTPUT_MSAT * int(body.get("max_tokens", 64))
