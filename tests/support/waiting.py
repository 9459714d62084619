"""Wait for a condition instead of sleeping and hoping it happened.

    await until(lambda: node.listener.stats["dropped"] == 2, what="the stale DM was dropped")
    await until(lambda: store.get(event_id), what="...")   # async conditions are awaited
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

__all__ = ["until", "until_past"]

_T = TypeVar("_T")
POLL_SECONDS = 0.02


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
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {within:.0f} s")
        await asyncio.sleep(POLL_SECONDS)


async def until_past(unix_time: float) -> None:
    """Return once ``time.time()`` is past ``unix_time`` (e.g. an expiry the node checks)."""
    await until(lambda: time.time() > unix_time, within=unix_time - time.time() + 30.0,
                what=f"the clock passing {unix_time}")  # fmt: skip
