"""``nodeprov keys`` shows child keys: which parent, limit, spent; and revokes one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from nodeprov.core.account_moves import mask_key
from tests.integration.test_cli_ops import cli, one_error_line, runner  # noqa: F401  (fixture)
from tests.support.daemon_core import make_core, write_config
from tests.support.services import MintHandle


async def test_keys_show_children_of_a_parent_and_the_parent_of_a_child(
    runner: CliRunner,  # noqa: F811
    tmp_path: Path,
    mint: MintHandle,
    make_token: Any,
) -> None:
    config = write_config(tmp_path, mint.url)
    core = await make_core(config)
    try:
        parent_key, parent = await core.payments.create_key(await make_token(40, mint=mint))
        child_key, child = await core.payments.children.create(
            parent.id, limit_msat=5000, label="build bot"
        )
        _, other = await core.payments.children.create(parent.id)
        held = await core.ledger.hold(child.key_account, 1200, "job")
        await core.ledger.settle(held, 1200)
    finally:
        await core.close()

    listed = await cli(runner, tmp_path, "keys", "children", "--json")
    assert listed.exit_code == 0, listed.output
    rows = {r["id"]: r for r in json.loads(listed.stdout)["children"]}
    assert set(rows) == {child.id, other.id}
    assert rows[child.id]["parent_id"] == parent.id and rows[child.id]["label"] == "build bot"
    assert rows[child.id]["balance_limit"] == 5000 and rows[child.id]["total_spent"] == 1200
    assert rows[other.id]["balance_limit"] is None and rows[other.id]["total_spent"] == 0
    table = await cli(runner, tmp_path, "keys", "children", mask_key(parent_key))
    print(table.stdout)
    print((await cli(runner, tmp_path, "keys", "show", parent_key)).stdout)
    print((await cli(runner, tmp_path, "keys", "show", child.id)).stdout)
    assert child.id in table.stdout and "build bot" in table.stdout and "1200" in table.stdout
    assert parent.id[:22] in table.stdout

    shown = json.loads((await cli(runner, tmp_path, "keys", "show", parent_key, "--json")).stdout)
    assert {c["id"] for c in shown["children"]} == {child.id, other.id}
    text = await cli(runner, tmp_path, "keys", "show", parent.id[:12])
    assert f"child {child.id}" in text.stdout

    for name in (child.id, child_key, mask_key(child_key)):
        as_child = await cli(runner, tmp_path, "keys", "show", name, "--json")
        assert as_child.exit_code == 0, as_child.output
        view = json.loads(as_child.stdout)
        assert view["id"] == child.id and view["parent_id"] == parent.id
        assert view["total_spent"] == 1200 and view["balance_limit"] == 5000
    text = await cli(runner, tmp_path, "keys", "show", child.id)
    assert f"{'parent:':<22}{parent.id}" in text.stdout

    revoked = await cli(runner, tmp_path, "keys", "revoke", child.id)
    assert revoked.exit_code == 0, revoked.output
    assert revoked.stdout == f"child key {child.id} of {parent.id} revoked\n"
    after = json.loads((await cli(runner, tmp_path, "keys", "show", child.id, "--json")).stdout)
    assert after["revoked"] is True
    assert "no child key" in one_error_line(
        await cli(runner, tmp_path, "keys", "show", "ck_0000000000000000")
    )


async def test_keys_children_of_an_unknown_parent_is_one_error_line(
    runner: CliRunner,  # noqa: F811
    tmp_path: Path,
    mint: MintHandle,
) -> None:
    write_config(tmp_path, mint.url)
    refused = await cli(runner, tmp_path, "keys", "children", "zzzzzz")
    assert "no account id starts with" in one_error_line(refused)
