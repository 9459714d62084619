"""The event loop the daemon and the CLI run on: uvloop's when it is installed.

uvloop's loop does the same work as asyncio's in a fraction of the CPU (accepting, reading and
writing sockets, timers, call_soon), which the HTTP channel spends on every request. The loop is
made for one run and handed to :class:`asyncio.Runner`; no event loop *policy* is installed,
so nothing outside that run (a library, a test process, a thread with its own loop) changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

LoopChoice = Literal["auto", "uvloop", "asyncio"]
LOOP_CHOICES: tuple[LoopChoice, ...] = ("auto", "uvloop", "asyncio")


def python_loop() -> asyncio.AbstractEventLoop:
    """Python's own event loop, whatever loop policy something else set in the process."""
    return asyncio.DefaultEventLoopPolicy().new_event_loop()


def loop_factory(choice: LoopChoice = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of new loops: uvloop's for ``auto`` when importable, else asyncio's.

    ``uvloop`` insists (ImportError when it is not installed); ``asyncio`` never uses it.
    """
    if choice == "asyncio":
        return python_loop
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return python_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(coro: Coroutine[Any, Any, T], choice: LoopChoice = "auto") -> T:
    """``asyncio.run(coro)`` on a loop from :func:`loop_factory` (no global policy is set)."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(coro)
