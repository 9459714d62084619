"""The admin dashboard served by uvicorn on 127.0.0.1 (free port) over a real test core.

Mounted at ``/admin`` exactly as the main app mounts it. Shared by the admin integration
tests and the browser test.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from nodeprov.admin_password import hash_password
from nodeprov.config import AdminSection, Config, HttpSection, NodeSection, WalletSection
from nodeprov.core.metrics import Metrics
from nodeprov.core.payments import Payer
from nodeprov.http.admin import build_admin_app
from nodeprov.http.app import bind, serve
from tests.support.core import TEST_MODEL, Core, build_core
from tests.support.services import MintHandle

PASSWORD = "correct horse battery staple"
_HASH = hash_password(PASSWORD)  # one scrypt run for the whole session
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
TOKEN = re.compile(r'<textarea id="token"[^>]*>([^<]+)</textarea>')
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
USAGE = {"prompt_tokens": 5, "completion_tokens": 10}
CHAT_COST = 1000 + 2 * 5 + 5 * 10  # msat, at TEST_PRICE


@dataclass
class AdminNode:
    url: str  # the server root; the dashboard is at url + "/admin"
    core: Core
    config: Config
    _stop: asyncio.Event
    _task: asyncio.Task[None]
    metrics: Metrics

    @property
    def admin(self) -> str:
        return self.url + "/admin"

    async def stop(self) -> None:
        self._stop.set()
        await self._task
        await self.core.close()

    async def funded_key(
        self, sats: int, make_token: Callable[[int], Awaitable[str]], charges: int = 0
    ) -> str:
        """A new API key funded with ``sats`` that has paid for ``charges`` chat requests."""
        api_key, _ = await self.core.payments.create_key(await make_token(sats))
        for _ in range(charges):
            async with self.core.payments.job(Payer("api_key", api_key), TEST_MODEL, CHAT) as job:
                await job.settle(USAGE)
        return api_key


async def start_admin_node(tmp_path: Path, mints: list[str]) -> AdminNode:
    core = await build_core(tmp_path / "ledger.sqlite3", mints)
    config = Config(
        node=NodeSection(name="test-node", data_dir=tmp_path),
        wallet=WalletSection(mints=tuple(mints)),
        admin=AdminSection(password_hash=_HASH, session_seconds=600),
        # As if behind a TLS-terminating proxy on this host (tests send X-Forwarded-Proto).
        http=HttpSection(forwarded_allow_ips=("127.0.0.1",)),
    )
    metrics = Metrics(models=[TEST_MODEL])
    admin = build_admin_app(core, config, metrics=metrics)
    app = Starlette(routes=[Mount("/admin", app=admin)])
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop = asyncio.Event()
    task = asyncio.create_task(serve(app, sock, stop, config.http))
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                await client.get(url + "/admin/login")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.01)
    return AdminNode(url, core, config, stop, task, metrics)


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF field on the page"
    return match.group(1)


async def login(http: httpx.AsyncClient, password: str = PASSWORD) -> httpx.Response:
    """Log ``http`` in (it keeps the cookies); returns the POST's response."""
    page = await http.get("/admin/login")
    return await http.post("/admin/login", data={"csrf": csrf_of(page.text), "password": password})


@pytest.fixture(name="node")
async def admin_node_fixture(tmp_path: Path, mint: MintHandle) -> AsyncIterator[AdminNode]:
    """An admin node trusting ``mint``; its books must balance at the end."""
    started = await start_admin_node(tmp_path, [mint.url])
    try:
        yield started
        await started.core.assert_books_balance()
    finally:
        await started.stop()
