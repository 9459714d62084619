"""Wait for a condition instead of sleeping and hoping it happened.

    await until(lambda: node.listener.stats["dropped"] == 2, what="the stale DM was dropped")
    await until(lambda: store.get(event_id), what="...")   # async conditions are awaited
    expires_at = expires_soon()                            # a unix time a few seconds ahead
    await until_past(expires_at)                           # the wall clock passed a unix time

The bound only turns a hang into a failure with a message; it is generous on purpose (a busy
machine must not fail a test that would pass), so nothing here asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["expires_soon", "until", "until_past"]

_T = TypeVar("_T")
POLL_SECONDS = 0.02
# How far ahead a "soon" expiry lies: the request that sets it must reach the node before it
# passes (``int(time.time()) + 1`` is between 0 and 1 s ahead, often less than a round trip).
EXPIRY_MARGIN_SECONDS = 4


async def until(
    condition: Callable[[], _T | Awaitable[_T]], *, within: float = 30.0, what: str = "condition"
) -> _T:
    """Poll ``condition`` until it returns something truthy; return that value."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {within:.0f} s")
        await asyncio.sleep(POLL_SECONDS)


async def until_past(unix_time: float) -> None:
    """Return once ``time.time()`` is past ``unix_time`` (e.g. an expiry the node checks)."""
    await until(lambda: time.time() > unix_time, within=unix_time - time.time() + 30.0,
                what=f"the clock passing {unix_time}")  # fmt: skip


def expires_soon(margin: int = EXPIRY_MARGIN_SECONDS) -> int:
    """A whole unix time ``margin`` to ``margin + 1`` seconds ahead: a future ``expires_at``."""
    return int(time.time()) + margin
