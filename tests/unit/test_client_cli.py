"""The ``client`` command group without services: help everywhere, one-line errors, pricing."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodeprov.cli_client import client
from nodeprov.client.discover import reference_msat
from nodeprov.client.provider import base_url, model_price
from nodeprov.config import ModelPrice, Rate
from nodeprov.core.pricing import Pricer

COMMANDS = [
    [], ["wallet"], ["wallet", "fund"], ["wallet", "balance"], ["wallet", "send"],
    ["wallet", "receive"], ["proxy"], ["ask"], ["discover"],
]  # fmt: skip


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "client")
def test_every_command_has_help(args: list[str]) -> None:
    result = CliRunner().invoke(client, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_fund_needs_a_token_or_an_amount(tmp_path: Path) -> None:
    result = CliRunner().invoke(client, ["wallet", "fund", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == "error: give a TOKEN or --amount N --mint URL"


def test_bad_token_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(client, ["wallet", "receive", "cashuBnotatoken",
                                         "--data-dir", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1


def test_empty_wallet_balance_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODEPROV_CLIENT_DIR", str(tmp_path / "w"))
    result = CliRunner().invoke(client, ["wallet", "balance", "--json"])
    assert result.exit_code == 0, result.output
    assert '"balance_msat": 0' in result.output and (tmp_path / "w" / "wallet.sqlite3").exists()


def test_send_more_than_held_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(client, ["wallet", "send", "5", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "holds 0 msat, 5000 msat are needed" in result.output


def test_ask_via_nostr_needs_an_npub(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        client,
        ["ask", "hi", "--provider", "http://x", "--via", "nostr", "--data-dir", str(tmp_path)],
    )
    assert result.exit_code == 1 and "needs an npub" in result.output


def test_listed_prices_quote_like_the_node() -> None:
    """The client's quote from /v1/models prices equals the node's hold for integer msat rates."""
    node_price = ModelPrice(
        request=Rate(Fraction(1000), "msat"), input_per_1m=Rate(Fraction(2_000_000), "msat"),
        output_per_1m=Rate(Fraction(5_000_000), "msat"), context_tokens=8192,
        max_output_tokens=1024,
    )  # fmt: skip
    node = Pricer({"m": node_price}, Fraction(3, 2), None)
    entry = {"pricing_msat": node.prices_msat("m"), "context_length": 8192,
             "max_output_tokens": 1024}  # fmt: skip
    priced = model_price(entry)
    assert priced is not None
    mine = Pricer({"m": priced[0]}, Fraction(1), None)
    for body in (
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi " * 50}], "max_tokens": 7},
    ):
        assert mine.max_cost("m", body).total_msat >= node.max_cost("m", body).total_msat
        assert mine.max_cost("m", body).total_msat == node.max_cost("m", body).total_msat
    assert model_price({"pricing_msat": None}) is None


def test_reference_cost_and_base_url() -> None:
    assert reference_msat({"request": 5, "input_per_1m": 1_000_000, "output_per_1m": 1}) == 1006
    assert base_url("http://h:1/v1/") == base_url("http://h:1") == "http://h:1"
