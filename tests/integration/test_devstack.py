"""The embedded dev stack: real mint, real relay, demo upstream on free ports; clean stops.

Also ``nodeprov start --dev`` as a subprocess (ports moved by NODEPROV_* overrides): it comes
up, prints its banner and a demo token, and exits cleanly on SIGTERM with no child left.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from nodeprov.cli import DEV_CONFIG
from nodeprov.config_load import load_config
from nodeprov.core.ledger import open_ledger
from nodeprov.core.node import Core
from nodeprov.core.wallet import Wallet
from nodeprov.devstack.processes import DevStack, StackError, StackPlan
from nodeprov.devstack.runner import run_dev
from nodeprov.devstack.tokens import mint_token
from nodeprov.protocol.cashu_token import parse_token
from tests.support.cashu_client import TokenFactory
from tests.support.devnode import dev_node, dev_overrides, free_ports
from tests.support.services import free_port

pytestmark = pytest.mark.integration
NODEPROV = Path(sys.executable).parent / "nodeprov"


def plan_on_free_ports(data_dir: Path) -> StackPlan:
    return StackPlan(
        data_dir=data_dir,
        mint_url=f"http://127.0.0.1:{free_port()}",
        relay_url=f"ws://127.0.0.1:{free_port()}",
        upstream_url=f"http://127.0.0.1:{free_port()}/v1",
        models=("demo-chat",),
    )


def gone(pid: int) -> bool:
    """True once ``pid`` no longer exists (or is a zombie nobody waits for)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _port(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


def listening(url: str) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", _port(url))) == 0


def listening_in(pids: set[int], url: str) -> bool:
    """Whether one of ``pids`` has a listening socket on ``url``'s port.

    "Nothing left behind" must not be judged by connecting: the port is free once the stack
    stops, and another process on the machine may take it at any moment. This asks the kernel
    which of our processes hold a listening socket there.
    """
    port = _port(url)
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as file:
            for line in file.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError):
            continue  # gone (or not ours)
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return True
            except OSError:
                continue
    return False


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[DevStack]:
    lines: list[str] = []
    started = DevStack(plan_on_free_ports(tmp_path / "devstack"), say=lines.append)
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


async def test_stack_answers_and_a_demo_token_redeems(stack: DevStack, tmp_path: Path) -> None:
    plan = stack.plan
    assert plan.mint_url and plan.relay_url and plan.upstream_url
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        keysets = (await client.get(f"{plan.mint_url}/v1/keysets")).json()["keysets"]
        assert {k["unit"] for k in keysets if k["active"]} >= {"sat", "msat"}
        nip11 = await client.get(
            plan.relay_url.replace("ws://", "http://"),
            headers={"Accept": "application/nostr+json"},
        )
        assert nip11.json()["name"] == "nodeprov dev relay"

        base = plan.upstream_url
        chat = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi there"}]}
        reply = await client.post(f"{base}/chat/completions", json=chat)
        assert reply.headers["x-demo-upstream"] == "1"
        body = reply.json()
        assert body["choices"][0]["message"]["content"].startswith("[demo]")
        assert body["usage"]["prompt_tokens"] == 5  # 3 per message + 2 words
        assert body["system_fingerprint"] == "nodeprov-demo"
        again = await client.post(f"{base}/chat/completions", json=chat)
        assert again.json()["choices"] == body["choices"]  # deterministic

        stream = await client.post(
            f"{base}/chat/completions",
            json={**chat, "stream": True, "stream_options": {"include_usage": True}},
        )
        events = [e for e in stream.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == body["choices"][0]["message"]["content"]
        assert chunks[-1]["usage"] == body["usage"]

        limited = await client.post(f"{base}/completions", json={"prompt": "a b", "max_tokens": 3})
        assert limited.json()["choices"][0]["finish_reason"] == "length"
        assert limited.json()["usage"]["completion_tokens"] == 3
        embeddings = await client.post(f"{base}/embeddings", json={"input": ["a b", "c"]})
        assert [len(d["embedding"]) for d in embeddings.json()["data"]] == [8, 8]
        models = (await client.get(f"{base}/models")).json()["data"]
        assert {m["id"] for m in models} == {"demo-chat", "demo-embed"}
        assert {m["owned_by"] for m in models} == {"nodeprov-demo"}

    ledger = await open_ledger(tmp_path / "ledger.sqlite3")
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        wallet = Wallet(ledger, [plan.mint_url], ["sat", "msat"], client)
        await wallet.start()
        token = await mint_token(wallet, plan.mint_url, 1000, "sat")
        msat_token = await mint_token(wallet, plan.mint_url, 1500, "msat")
    await ledger.db.close()
    assert parse_token(token).amount == 1000
    factory = TokenFactory(plan.mint_url, "sat", tmp_path / "wallet")
    msat_factory = TokenFactory(plan.mint_url, "msat", tmp_path / "wallet-msat")
    try:
        assert await factory.redeem(token) == 1000
        assert await msat_factory.redeem(msat_token) == 1500
    finally:
        await factory.aclose()
        await msat_factory.aclose()


async def test_stop_leaves_nothing_running(tmp_path: Path) -> None:
    lines: list[str] = []
    stack = DevStack(plan_on_free_ports(tmp_path / "devstack"), say=lines.append)
    await stack.start()
    pids = [child.pid for child in stack.children]
    assert len(pids) == 2
    plan = stack.plan
    assert plan.mint_url and plan.relay_url and plan.upstream_url
    urls = (plan.mint_url, plan.relay_url, plan.upstream_url)
    assert all(listening(url) for url in urls)
    await stack.stop()
    await stack.stop()  # idempotent
    assert all(gone(pid) for pid in pids)
    ours = {os.getpid(), *pids}
    assert not any(listening_in(ours, url) for url in urls)
    assert any("mint ready" in line for line in lines)
    assert any("mint stopped" in line for line in lines)
    # The mint keeps its key and database: a restart gives the same keysets.
    assert (plan.data_dir / "mint" / "mint.key").stat().st_mode & 0o777 == 0o600


async def test_a_compatible_service_is_reused(stack: DevStack) -> None:
    lines: list[str] = []
    second = DevStack(stack.plan, say=lines.append)
    await second.start()
    assert second.reused == ["Cashu mint", "Nostr relay", "OpenAI-compatible server"]
    assert second.children == [] and second.demo is None
    assert any("already running" in line and "reusing it" in line for line in lines)
    await second.stop()
    stack.check()  # the first stack's children still run
    assert stack.plan.mint_url and listening(stack.plan.mint_url)


async def test_an_incompatible_port_is_refused(tmp_path: Path) -> None:
    plan = plan_on_free_ports(tmp_path / "devstack")
    assert plan.mint_url
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(plan.mint_url.rsplit(":", 1)[1])))
        squatter.listen()
        stack = DevStack(plan, say=lambda _: None)
        with pytest.raises(StackError, match="in use by something that is not a Cashu mint"):
            await stack.start()
    assert stack.children == []


async def test_a_crashing_daemon_still_stops_the_stack(tmp_path: Path) -> None:
    ports = free_ports()
    config = load_config(DEV_CONFIG, dev_overrides(tmp_path, ports))
    started: list[int] = []

    async def crash(core: Core, stop: asyncio.Event) -> None:
        started.extend(int(p) for p in re.findall(r"\(pid (\d+)", "\n".join(lines)))
        raise RuntimeError("boom")

    lines: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        await run_dev(config, say=lines.append, services=[crash])
    assert len(started) == 2
    assert all(gone(pid) for pid in started)
    ours = {os.getpid(), *started}
    assert not any(listening_in(ours, f"http://127.0.0.1:{p}") for p in ports.values())


def test_start_dev_subprocess_comes_up_and_stops_on_sigterm(tmp_path: Path) -> None:
    # As after `make run`: the venv's bin is not on PATH.
    with dev_node(tmp_path, path="/usr/bin:/bin") as node:
        text, ports, env = node.banner, node.ports, node.env
        assert "mint ready" in text and "relay ready" in text and "demo upstream at" in text
        token = re.search(r"export TOKEN=(cashuB\S+)", text)
        assert token is not None, text
        assert parse_token(token[1]).amount == 1000
        assert f"http://127.0.0.1:{ports['http']}/v1" in text
        activate = NODEPROV.parent / "activate"
        assert f"`source {activate}` puts `nodeprov` on your PATH" in text, text
        pids = [int(p) for p in re.findall(r"ready in [\d.]+ s \(pid (\d+)", text)]
        assert len(pids) == 2
        if "HTTP channel not wired" not in text:  # the tour needs the HTTP channel
            demo = subprocess.run(
                [str(NODEPROV), "demo", "--amount", "400"],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert demo.returncode == 0, demo.stdout + demo.stderr
            assert "0 step(s) failed" in demo.stdout
            assert "books balance" in demo.stdout
    rest = node.rest
    assert node.returncode == 0, text + rest
    assert "Traceback" not in text + rest
    assert "nodeprov stopped." in rest
    assert all(gone(pid) for pid in pids)
    ours = {os.getpid(), node.pid, *pids}
    assert not any(listening_in(ours, f"http://127.0.0.1:{p}") for p in ports.values())
