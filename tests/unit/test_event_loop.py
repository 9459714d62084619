"""The daemon and the CLI run on uvloop's loop without installing a global loop policy."""

from __future__ import annotations

import asyncio
import sys

import uvloop
from click.testing import CliRunner

from nodeprov.cli import main
from nodeprov.cli_common import guarded
from nodeprov.event_loop import run


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


async def _subprocess_output() -> bytes:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "print('child')", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return out


def test_commands_run_on_uvloop() -> None:
    assert guarded(_loop_type()) is uvloop.Loop


def test_running_on_uvloop_leaves_the_loop_policy_alone() -> None:
    before = asyncio.get_event_loop_policy()
    assert run(_loop_type()) is uvloop.Loop
    assert asyncio.get_event_loop_policy() is before
    assert not isinstance(before, uvloop.EventLoopPolicy)
    # What a leaked uvloop policy broke: asyncio subprocesses on a plain asyncio loop.
    assert asyncio.run(_subprocess_output()).strip() == b"child"


def test_the_asyncio_loop_can_be_chosen() -> None:
    assert guarded(_loop_type(), "asyncio") is not uvloop.Loop
    assert run(_subprocess_output(), "uvloop").strip() == b"child"


def test_the_asyncio_choice_holds_even_under_a_uvloop_policy() -> None:
    before = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # what a library might do
    try:
        assert run(_loop_type(), "asyncio") is not uvloop.Loop
    finally:
        asyncio.set_event_loop_policy(before)


def test_start_offers_the_loop_choice() -> None:
    result = CliRunner().invoke(main, ["start", "--help"])
    assert result.exit_code == 0
    assert "--loop [auto|uvloop|asyncio]" in result.output
