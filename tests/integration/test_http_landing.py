"""``GET /`` (a page for people: name, models, prices, links) and ``GET /favicon.ico``."""

from __future__ import annotations

import httpx

from tests.support.http_node import Node, node_fixture, upstream_fixture  # noqa: F401  (fixtures)


async def test_the_root_is_a_page_with_the_nodes_name_models_prices_and_links(
    node: Node,
) -> None:
    async with httpx.AsyncClient(base_url=node.url) as http:
        r = await http.get("/")
        models = (await http.get("/v1/models")).json()["data"]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert '<h1 id="node-name">test-node</h1>' in page
    # The API base is the configured public URL; the dashboard and the model list are linked.
    assert '<code id="api-base">http://127.0.0.1/v1</code>' in page
    assert 'href="/admin/"' in page and 'href="/v1/models"' in page
    assert 'rel="icon" href="/favicon.ico"' in page
    for model in models:
        assert f"<code>{model['id']}</code>" in page
        request_msat = model["pricing_msat"]["request"]
        assert f"{request_msat // 1000:,}.{request_msat % 1000:03d} sat" in page
    for mint in node.core.wallet.mints:
        assert mint.rstrip("/") in page


async def test_favicon_is_a_small_cached_icon(node: Node) -> None:
    async with httpx.AsyncClient(base_url=node.url) as http:
        r = await http.get("/favicon.ico")
        unknown = await http.get("/nothing-here")
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
    assert r.headers["cache-control"] == "public, max-age=86400"
    assert r.content[:4] == b"\x00\x00\x01\x00" and 0 < len(r.content) < 4096  # an ICO file
    # Other paths outside the API are still the OpenAI-shaped 404.
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
