"""The daemon's :class:`~nodeprov.core.node.Core` for tests, with an optional mint transport."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import httpx

from nodeprov.config import Config
from nodeprov.config_load import load_config
from nodeprov.core.key_secret import load_or_create_secret
from nodeprov.core.ledger import open_ledger
from nodeprov.core.node import Core
from nodeprov.core.payments import Payments
from nodeprov.core.pricing import Pricer
from nodeprov.core.wallet import Wallet
from nodeprov.upstream import Upstreams
from tests.support.ledger_backends import ledger_target


async def make_core(config: Config, transport: httpx.AsyncBaseTransport | None = None) -> Core:
    """Like ``build_core`` (no rates, upstreams not started); ``transport`` fronts mints."""
    ledger = await open_ledger(config.ledger_url)
    client = httpx.AsyncClient(timeout=5.0, transport=transport)
    wallet = Wallet(ledger, config.wallet.mints, config.wallet.units, client)
    await wallet.start()
    pricer = Pricer(config.models, config.pricing.fee_multiplier, None)
    secret = load_or_create_secret(config.api_key_secret_path)
    payments = Payments(ledger, wallet, pricer, key_secret=secret)
    upstreams = Upstreams.from_config(config)
    return Core(config, ledger, wallet, pricer, payments, client, None, upstreams)


def write_config(
    tmp_path: Path, mints: str | Sequence[str], payouts: str = "", extra: str = ""
) -> Config:
    """A node config in ``tmp_path`` trusting ``mints``; ``payouts`` is the [payouts] body."""
    urls = [mints] if isinstance(mints, str) else list(mints)
    path = tmp_path / "nodeprov.toml"
    target = ledger_target(tmp_path / "data" / "ledger.sqlite3")
    ledger = f'[ledger]\nurl = "{target}"' if isinstance(target, str) else ""
    path.write_text(
        f"""
[node]
data_dir = "{tmp_path / "data"}"

[wallet]
mints = [{", ".join(f'"{u}"' for u in urls)}]
mint_timeout_seconds = 5

[[upstreams]]
name = "demo"
base_url = "http://127.0.0.1:9/v1"
models = ["demo-chat"]

[models."demo-chat"]
input_per_1m_msat = 1000

[payouts]
{payouts}
{ledger}
{extra}
"""
    )
    return load_config(path, {})
