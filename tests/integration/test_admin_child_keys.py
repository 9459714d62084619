"""The admin pages show a key's child keys, and a child key's page shows its parent."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from nodeprov.core.payments import api_key_account
from tests.browser.admin_node import (
    AdminNode,
    admin_node_fixture,  # noqa: F401  (fixture)
    csrf_of,
    login,
)


async def test_a_keys_page_lists_its_children_and_a_childs_page_links_its_parent(
    node: AdminNode, make_token: Any
) -> None:
    parent_key = await node.funded_key(50, make_token)
    parent_id = api_key_account(parent_key)
    children = node.core.payments.children
    child_key, child = await children.create(parent_id, limit_msat=7000, label="nightly <job>")
    held = await node.core.ledger.hold(child.key_account, 2500, "job")
    await node.core.ledger.settle(held, 2500)
    async with httpx.AsyncClient(base_url=node.url, follow_redirects=False) as http:
        await login(http)
        page = (await http.get(f"/admin/keys/{quote(parent_id)}")).text
        assert 'id="children"' in page and child.id in page
        assert "nightly &lt;job&gt;" in page and "7.000 sat" in page and "2.500 sat" in page
        assert f"/admin/children/{child.id}" in page
        for query in (child.id, child_key, child.key_hint):
            found = await http.get("/admin/keys", params={"q": query})
            assert found.status_code == 303, (query, found.text)
            assert found.headers["location"] == f"/admin/children/{child.id}"
        view = await http.get(f"/admin/children/{child.id}")
        assert view.status_code == 200
        assert f"/admin/keys/{quote(parent_id, safe='')}" in view.text and parent_id in view.text
        assert 'id="status">active<' in view.text and "7.000 sat" in view.text
        revoked = await http.post(
            f"/admin/children/{child.id}/revoke", data={"csrf": csrf_of(view.text)}
        )
        assert revoked.status_code == 303
        after = (await http.get(f"/admin/children/{child.id}")).text
        assert 'id="status">revoked<' in after
        assert (await http.get("/admin/children/ck_nothing")).status_code == 404
        assert (await http.post("/admin/children/ck_nothing/revoke")).status_code in (403, 404)
    now = await children.get(child.id)
    assert now is not None and now.revoked and now.spent_msat == 2500
