"""End to end: ``nodeprov start`` as a subprocess, paid over HTTP and Nostr, stopped, restarted.

Real mint, real relay, the test upstream; the client side is the official openai SDK, plain
httpx and a nostr-sdk peer. SIGTERM arrives while a stream is running; after the restart the
balances are as they were and the books audit is clean.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from nodeprov.protocol.cashu_token import parse_token
from nodeprov.protocol.nostr_event import Keys
from tests.support.fake_upstream import FakeUpstream
from tests.support.nostr_client import SdkClient
from tests.support.services import MintHandle, RelayHandle, free_port

ROOT = Path(__file__).resolve().parents[2]
NODEPROV = [str(Path(sys.executable).parent / "nodeprov")]
MODELS = ("fake-chat", "fake-chat+drip-1.0")


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=MODELS, api_key="sk-upstream") as up:
        yield up


def write_config(
    tmp: Path, mint: MintHandle, relay: RelayHandle, upstream: str, port: int, name: str
) -> Path:
    models = ", ".join(f'"{m}"' for m in MODELS)
    prices = "\n".join(
        f'[models."{m}"]\nrequest_msat = 1000\ninput_per_1m_msat = 2000000\n'
        f"output_per_1m_msat = 5000000\ncontext_tokens = 8192\nmax_output_tokens = 1024\n"
        for m in MODELS
    )
    path = tmp / "nodeprov.toml"
    path.write_text(
        f"""
[node]
name = "{name}"
data_dir = "{tmp / "data"}"
http_url = "http://127.0.0.1:{port}"

[http]
host = "127.0.0.1"
port = {port}

[nostr]
relays = ["{relay.url}"]

[wallet]
mints = ["{mint.url}"]

[admin]
password_hash = ""

[[upstreams]]
name = "fake"
base_url = "{upstream}"
api_key = "sk-upstream"
models = [{models}]

{prices}
"""
    )
    return path


def common_soft_limit() -> None:
    """The soft open-files limit many systems give a process (1,024)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


def soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line")


class PortTaken(Exception):
    """The daemon exited because another process took its port first."""


class Daemon:
    """``nodeprov start`` on a free port; ready when /v1/info answers with this node's name
    (``name``: give each run a unique one; None accepts any node).

    The port is free when picked and bound by the daemon later; another process may take it in
    between (other test sessions run on the same machine). The name check keeps that process's
    answer from passing for ours, and :meth:`start` then retries on another port.
    """

    def __init__(self, config: Path, port: int, name: str | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.name = name
        log_path = config.parent / "daemon.log"
        started_at = log_path.stat().st_size if log_path.exists() else 0
        self.log = open(log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*NODEPROV, "-c", str(config), "start"],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=common_soft_limit,  # as many systems start a service
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + "/v1/info", timeout=1)
                if r.status_code == 200 and (name is None or r.json().get("name") == name):
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.1)
            if self.proc.poll() is not None:
                self.log.close()
                text = log_path.read_bytes()[started_at:].decode(errors="replace")
                if "address already in use" in text.lower():
                    raise PortTaken(text)
                raise AssertionError(f"the daemon exited:\n{text}")
        self.kill()
        raise AssertionError("the daemon did not come up")

    @classmethod
    def start(
        cls, write_config_for: Callable[[int, str], Path], prefix: str = "e2e-node"
    ) -> tuple[Daemon, Path]:
        """A daemon on a fresh free port with a unique name; ``write_config_for(port, name)``
        writes its config (rewritten on a retry) and returns the path."""
        name = f"{prefix}-{secrets.token_hex(4)}"
        for attempt in range(3):
            port = free_port()
            config = write_config_for(port, name)
            try:
                return cls(config, port, name), config
            except PortTaken:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


def audit(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NODEPROV, "-c", str(config), "wallet", "audit", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def balance_of(daemon: Daemon, key: str) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(
            daemon.url + "/v1/wallet/balance", headers={"Authorization": f"Bearer {key}"}
        )
    result: dict[str, int] = response.json()
    return result


def node_npub(config: Path) -> str:
    secret = (config.parent / "data" / "nostr.key").read_text().strip()
    return Keys.parse(secret).public_key


async def test_daemon_pays_over_both_channels_survives_sigterm_and_restart(
    tmp_path: Path,
    mint: MintHandle,
    relay: RelayHandle,
    upstream: FakeUpstream,
    make_token,
) -> None:
    def config_for(port: int, name: str) -> Path:
        return write_config(tmp_path, mint, relay, upstream.url, port, name)

    daemon, config = Daemon.start(config_for)
    try:
        # The banner says where everything is: the API, the dashboard, the Nostr identity.
        banner = (config.parent / "daemon.log").read_text()
        assert f"  API       {daemon.url}/v1   (public: {daemon.url}/v1)\n" in banner
        assert f"  admin     {daemon.url}/admin/\n" in banner
        npub = Keys.parse((config.parent / "data" / "nostr.key").read_text().strip()).npub
        assert f"  Nostr     {npub} on 1 relay(s)\n" in banner
        # Started with 1,024 open files at most, it raised that for 1,000 streams (2 sockets each).
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert soft_open_files(daemon.proc.pid) == min(65_536, hard)

        # HTTP: a key from a token, then a paid chat with the official SDK.
        async with httpx.AsyncClient(timeout=30) as http:
            created = (
                await http.post(
                    daemon.url + "/v1/wallet/create",
                    json={"cashu_token": await make_token(100, mint=mint)},
                )
            ).json()
        key = created["api_key"]
        client = openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key=key)
        reply = await client.chat.completions.create(
            model="fake-chat", messages=[{"role": "user", "content": "hello there"}], max_tokens=8
        )
        assert reply.choices[0].message.content
        info = await client.with_options(max_retries=0).models.list()
        assert {m.id for m in info.data} >= set(MODELS)

        # Nostr: a NIP-17 DM job paying with its own token, change in the reply.
        peer = await SdkClient([relay.url], node_npub(config)).connect()
        try:
            token = await make_token(20, mint=mint)
            job = {
                "type": "request",
                "id": "e2e-1",
                "endpoint": "/v1/chat/completions",
                "body": {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]},
                "cashu": token,
            }
            answer = (await peer.ask(json.dumps(job), within=30)).json
        finally:
            await peer.close()
        assert answer["type"] == "response" and answer["id"] == "e2e-1"
        change = parse_token(answer["change"]).amount
        assert change == 20 - -(-answer["cost_msat"] // 1000)
        assert await make_token.redeem(answer["change"]) == change

        balance = (await balance_of(daemon, key))["balance"]
        async with httpx.AsyncClient(timeout=10) as http:
            health = (await http.get(daemon.url + "/health")).json()
            metrics = (await http.get(daemon.url + "/metrics")).text
        assert health["ledger"]["ok"] and health["upstreams"]["fake"]["ok"]
        assert set(health["relays"]) == {relay.url} and health["mints"]
        assert 'nodeprov_requests_total{channel="http",model="fake-chat",status="200"}' in metrics

        # SIGTERM in the middle of a slow stream: the daemon stops, nothing is left half-done.
        stream = await client.chat.completions.create(
            model="fake-chat+drip-1.0",
            messages=[{"role": "user", "content": "tell me more"}],
            max_tokens=16,
            stream=True,
        )
        got = 0
        stopping: asyncio.Future[int] | None = None
        try:
            async for _ in stream:
                got += 1
                if got == 3:  # the stream outlives the server's 5 s grace: it is cut
                    stopping = asyncio.ensure_future(asyncio.to_thread(daemon.terminate))
        except (openai.APIError, httpx.HTTPError):
            pass
        assert stopping is not None and await stopping == 0
    finally:
        daemon.kill()

    report = audit(config)
    assert report.returncode == 0, report.stdout + report.stderr

    daemon, config = Daemon.start(config_for)  # a fresh port, the same data dir
    try:
        after = await balance_of(daemon, key)
        # The interrupted stream was settled (or released) before the daemon stopped.
        assert after["reserved"] == 0
        assert 0 < after["balance"] <= balance
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    report = audit(config)
    assert report.returncode == 0, report.stdout + report.stderr
