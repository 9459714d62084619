"""A DM job paid with a token and resumed more than once replies with change it can spend.

Each resume of a token-paid job whose token an earlier run took pays with the change that
run left; the change the client finally gets is the end of that chain, never a token the
node itself spent on a resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nodeprov.core.payments import Payer
from nodeprov.nostr.dm_handlers import DmContext
from tests.support.core import Core
from tests.support.crash_worker import dm_context, dm_reply
from tests.support.fake_upstream import FakeUpstream
from tests.support.services import MintHandle

pytestmark = pytest.mark.usefixtures("ledger_backend")

SENDER, EVENT = "ab" * 32, "cd" * 32
BODY = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def request(token: str) -> str:
    return json.dumps(
        {"type": "request", "id": "1", "endpoint": "/v1/chat/completions", "body": BODY,
         "cashu": token}
    )  # fmt: skip


async def interrupted_run(core: Core, token: str) -> None:
    """A run that took ``token`` and holds for the job when its process dies."""
    await core.payments.begin(
        Payer("request_token", token), "fake-chat", BODY, "chat", "dm:" + EVENT
    )


async def unspent(make_token: Any, token: str) -> bool:
    states = await make_token.proof_states(token)
    return states == ["UNSPENT"] * len(states)


async def resume(ctx: DmContext, token: str) -> dict[str, Any]:
    return json.loads(await dm_reply(ctx, SENDER, request(token), EVENT, resumed=True))


async def test_a_job_resumed_twice_replies_with_change_the_node_has_not_spent(
    tmp_path: Path, mint: MintHandle, make_token: Any
) -> None:
    with FakeUpstream() as upstream:
        core, ctx = await dm_context(tmp_path / "ledger.sqlite3", mint.url, upstream.url)
        try:
            token = await make_token(50, mint=mint)
            await ctx.store.accept(EVENT, SENDER, "nip17", "")
            await interrupted_run(core, token)
            first = await resume(ctx, token)  # settles; its reply is lost with the process
            second = await resume(ctx, token)  # replies from the recorded outcome
            assert first["type"] == second["type"] == "response", (first, second)
            assert second["change"] == first["change"] and second["cost_msat"] == first["cost_msat"]
            assert await unspent(make_token, second["change"])
            await core.assert_books_balance()
        finally:
            await ctx.upstreams.aclose()
            await core.close()


async def test_a_job_interrupted_on_its_first_resume_still_pays_and_replies_on_the_next(
    tmp_path: Path, mint: MintHandle, make_token: Any
) -> None:
    with FakeUpstream() as upstream:
        core, ctx = await dm_context(tmp_path / "ledger.sqlite3", mint.url, upstream.url)
        try:
            token = await make_token(50, mint=mint)
            await ctx.store.accept(EVENT, SENDER, "nip17", "")
            await interrupted_run(core, token)
            # The first resume releases the dead run's hold, pays with the change that
            # leaves, and dies holding for the job too.
            await core.ledger.release_ref("dm:" + EVENT)
            [change] = await core.payments.claim_change(token)
            await interrupted_run(core, change)
            reply = await resume(ctx, token)
            assert reply["type"] == "response", reply
            assert reply["change"] is not None and await unspent(make_token, reply["change"])
            await core.assert_books_balance()
        finally:
            await ctx.upstreams.aclose()
            await core.close()
