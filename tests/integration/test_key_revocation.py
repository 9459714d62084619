"""A revoked key or token-as-key is refused at its very next request, whoever revoked it.

The paid path caches nothing about an account's state: revocation, expiry and balance are
read by the hold's own conditional UPDATE, so a revocation by another process sharing the
ledger file (the CLI, the admin page of another worker) takes effect at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from nodeprov.core import accounts_admin
from nodeprov.core import payments as payments_module
from nodeprov.core.ledger import open_ledger
from nodeprov.core.payments import Payer
from tests.support.http_node import (  # noqa: F401  (fixtures)
    Node,
    node_fixture,
    upstream_fixture,
)
from tests.support.services import MintHandle

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def chat(client: httpx.AsyncClient, credential: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {credential}"}
    return await client.post("/chat/completions", json=CHAT, headers=headers)


async def revoke_from_another_process(ledger_file: Path, account_id: str) -> None:
    """What ``nodeprov keys revoke`` does, on its own connection to the same ledger file."""
    other = await open_ledger(ledger_file)
    try:
        _, changed = await accounts_admin.revoke(other, account_id)
        assert changed
    finally:
        await other.db.close()


async def test_a_key_revoked_by_another_process_is_refused_at_its_next_request(
    node: Node, mint: MintHandle, make_token: Any, tmp_path: Path
) -> None:
    key, account = await node.core.payments.create_key(await make_token(100, mint=mint))
    async with httpx.AsyncClient(base_url=node.base) as client:
        for _ in range(3):  # warm: whatever the paid path keeps, it has kept it by now
            assert (await chat(client, key)).status_code == 200
        before = await node.account(key)
        await revoke_from_another_process(tmp_path / "ledger.sqlite3", account.id)
        refused = await chat(client, key)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == "Unknown or revoked API key"
    after = await node.account(key)
    assert (after.balance_msat, after.reserved_msat) == (before.balance_msat, 0)


async def test_a_token_used_as_a_key_is_refused_once_its_account_is_revoked(
    node: Node, mint: MintHandle, make_token: Any, tmp_path: Path
) -> None:
    token = await make_token(100, mint=mint)
    async with httpx.AsyncClient(base_url=node.base) as client:
        for _ in range(3):  # the first use redeems the token; later uses pay from its account
            assert (await chat(client, token)).status_code == 200
        account_id = await node.core.payments.account_for(Payer("token_key", token))
        await revoke_from_another_process(tmp_path / "ledger.sqlite3", account_id)
        refused = await chat(client, token)
    assert refused.status_code == 401
    account = await node.core.ledger.account(account_id)
    assert account is not None and account.revoked and account.reserved_msat == 0


async def test_a_token_key_whose_account_id_was_forgotten_still_pays_from_its_account(
    node: Node, mint: MintHandle, make_token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(payments_module, "REDEEMED_KEPT", 1)
    first, second = await make_token(100, mint=mint), await make_token(100, mint=mint)
    async with httpx.AsyncClient(base_url=node.base) as client:
        for token in (first, second, first, second):  # each use forgets the other token
            assert (await chat(client, token)).status_code == 200
    for token in (first, second):
        account_id = await node.core.payments.account_for(Payer("token_key", token))
        account = await node.core.ledger.account(account_id)
        assert account is not None and account.total_deposited_msat == 100_000
        assert account.balance_msat < 100_000  # both uses were paid from the one account
