"""The ``client`` commands end to end: the real mint, the node's HTTP app, the relay."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nodeprov.cli_client import client
from tests.support.fake_upstream import expected_text, expected_usage
from tests.support.http_node import Node, chat_cost, node_fixture, upstream_fixture  # noqa: F401
from tests.support.services import MintHandle
from tests.support.tcp_proxy import dead_url

pytestmark = pytest.mark.integration


async def cli(*args: str) -> Result:
    """Run the command in a thread: it has its own event loop, the node keeps serving on ours."""
    return await asyncio.to_thread(CliRunner().invoke, client, list(args))


async def test_wallet_fund_send_receive_and_ask_over_http(
    tmp_path: Path, node: Node, mint: MintHandle
) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    funded = await cli("wallet", "fund", "--amount", "40", "--mint", mint.url,
                       "--data-dir", a, "--json")  # fmt: skip
    assert funded.exit_code == 0, funded.output
    assert json.loads(funded.output)["balance_msat"] == 40_000

    sent = await cli("wallet", "send", "7", "--data-dir", a)
    assert sent.exit_code == 0, sent.output
    token = sent.output.strip()
    got = await cli("wallet", "receive", token, "--data-dir", b, "--json")
    assert got.exit_code == 0 and json.loads(got.output)["credited_msat"] == 7000
    again = await cli("wallet", "receive", token, "--data-dir", b)
    assert again.exit_code == 1 and "already received" in again.output

    asked = await cli("ask", "hello cli", "--provider", node.url, "--model", "fake-chat",
                      "--max-tokens", "4", "--data-dir", a, "--json")  # fmt: skip
    assert asked.exit_code == 0, asked.output
    out = json.loads(asked.output)
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": "hello cli"}],
            "max_tokens": 4}  # fmt: skip
    assert out["answer"] == expected_text(body) and out["problems"] == []
    cost = chat_cost(expected_usage(body))
    assert out["cost_msat"] == cost
    # A sat wallet pays ceil(cost / 1000) sat; the rest of the token came back as change.
    assert out["balance_msat"] == 33_000 - -(-cost // 1000) * 1000

    # Without --json: what was paid, what came back as change, and the cost, in one line.
    plain = await cli("ask", "hello cli", "--provider", node.url, "--model", "fake-chat",
                      "--max-tokens", "4", "--data-dir", a)  # fmt: skip
    assert plain.exit_code == 0, plain.output
    note = plain.output.strip().splitlines()[-1]
    paid = re.search(r"paid (\d+) msat, (\d+) msat back as change, cost (\d+) msat", note)
    assert paid is not None, note
    assert int(paid[1]) - int(paid[2]) >= int(paid[3]) == cost  # the node rounds change down
    out = {**out, "balance_msat": out["balance_msat"] - (int(paid[1]) - int(paid[2]))}

    balance = await cli("wallet", "balance", "--data-dir", a, "--json")
    data = json.loads(balance.output)
    assert data["balance_msat"] == out["balance_msat"] and data["audit_ok"] is True
    assert data["pools"] == [
        {
            "mint": mint.url,
            "unit": "sat",
            "amount": out["balance_msat"] // 1000,
            "msat": out["balance_msat"],
        }
    ]


async def test_ask_a_down_provider_is_one_line(tmp_path: Path) -> None:
    down = dead_url()  # reserved for the session: nothing can start listening there
    result = await cli("ask", "hi", "--provider", down, "--data-dir", str(tmp_path))
    assert result.exit_code == 1
    assert result.output.startswith(f"error: the provider at {down}")
    assert len(result.output.strip().splitlines()) == 1
