"""One owner per data dir: a second ``nodeprov start`` (with or without --dev) refuses at once.

The daemon runs as a subprocess with a job in flight (a stream stalled by the upstream, so
its hold is live). A second start on the same data dir must exit 2 with one error line,
before it opens the ledger (the live hold stays), spawns a dev-stack child or prints a
banner. Read-only commands (and a key revoke, one ledger transaction) keep working;
money-moving CLI commands (wallet withdraw, payout) refuse clearly. A lock left by a
daemon killed with SIGKILL does not block the next start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nodeprov.cli import DEV_CONFIG
from nodeprov.core.payments import api_key_account
from tests.e2e.test_daemon_e2e import Daemon
from tests.support.fake_upstream import FakeUpstream
from tests.support.services import MintHandle, RelayHandle, free_port

ROOT = Path(__file__).resolve().parents[2]
NODEPROV = str(Path(sys.executable).parent / "nodeprov")
STALLED = "fake-chat+stall-2"  # two stream events, then silence: the job (and its hold) lives


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=("fake-chat", STALLED)) as up:
        yield up


def write_config(
    tmp: Path, mint: MintHandle, relay: RelayHandle, upstream: str, port: int, name: str
) -> Path:
    prices = "".join(
        f'[models."{m}"]\nrequest_msat = 1000\noutput_per_1m_msat = 5000000\n'
        "context_tokens = 8192\nmax_output_tokens = 64\n"
        for m in ("fake-chat", STALLED)
    )
    path = tmp / "nodeprov.toml"
    path.write_text(
        f'[node]\nname = "{name}"\ndata_dir = "{tmp / "data"}"\n'
        f'[http]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[nostr]\nrelays = ["{relay.url}"]\n'
        f'[wallet]\nmints = ["{mint.url}"]\n'
        f'[[upstreams]]\nname = "fake"\nbase_url = "{upstream}"\n'
        f'models = ["fake-chat", "{STALLED}"]\n{prices}'
    )
    return path


def nodeprov(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NODEPROV, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def books(config: Path) -> dict[str, int]:
    done = nodeprov("-c", str(config), "wallet", "balance", "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, int] = json.loads(done.stdout)["books"]
    return result


@pytest.fixture
def node(
    tmp_path: Path, mint: MintHandle, relay: RelayHandle, upstream: FakeUpstream
) -> Iterator[tuple[Daemon, Path]]:
    # A unique name and a fresh port on a retry: the readiness check accepts only this daemon,
    # not another process that took the port (picked free, bound by the daemon later).
    daemon, config = Daemon.start(
        lambda port, name: write_config(tmp_path, mint, relay, upstream.url, port, name),
        prefix="owner-node",
    )
    try:
        yield daemon, config
    finally:
        daemon.kill()


async def test_second_start_refuses_and_leaves_the_running_jobs_hold_alone(
    node: tuple[Daemon, Path], mint: MintHandle, make_token
) -> None:
    daemon, config = node
    data_dir = (config.parent / "data").resolve()
    async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as http:
        key = (
            await http.post(
                "/v1/wallet/create", json={"cashu_token": await make_token(50, mint=mint)}
            )
        ).json()["api_key"]
        body = {"model": STALLED, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        headers = {"Authorization": f"Bearer {key}"}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status_code == 200
            await anext(resp.aiter_lines())  # the job runs: its hold is in the ledger
            assert books(config)["holds"] == 1

            second = nodeprov("-c", str(config), "start")
            assert second.returncode == 2
            assert (
                second.stderr
                == f"error: already running (pid {daemon.proc.pid}, data dir {data_dir})\n"
            )
            assert second.stdout == ""  # no "running" line, nothing else
            assert books(config)["holds"] == 1  # the live hold was not released

            # Read-only commands work beside the daemon.
            for command in (["status", "--json"], ["keys", "list"], ["wallet", "audit"]):
                done = nodeprov("-c", str(config), *command)
                assert done.returncode == 0, (command, done.stdout, done.stderr)
            # Money-moving commands refuse clearly instead of racing the daemon's wallet.
            withdraw = nodeprov("-c", str(config), "wallet", "withdraw")
            assert withdraw.returncode == 2
            assert withdraw.stderr.startswith(
                f"error: the node is running (pid {daemon.proc.pid}, data dir {data_dir});"
            )
            assert "admin page" in withdraw.stderr and withdraw.stdout == ""
        # The daemon still serves (the second start did not take its port or its books).
        assert (await http.get("/v1/info")).status_code == 200
        # A revoke is one ledger transaction, safe beside the daemon, which honours it at once.
        revoked = nodeprov("-c", str(config), "keys", "revoke", api_key_account(key))
        assert revoked.returncode == 0, revoked.stderr
        chat = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}]}
        assert (
            await http.post("/v1/chat/completions", json=chat, headers=headers)
        ).status_code == 401
    assert daemon.terminate() == 0


def test_second_start_dev_spawns_nothing_and_prints_no_banner(
    node: tuple[Daemon, Path], tmp_path: Path
) -> None:
    daemon, config = node
    data_dir = (config.parent / "data").resolve()
    ports = {name: free_port() for name in ("mint", "relay", "upstream", "http")}
    env = {
        **os.environ,
        "NODEPROV_WALLET__MINTS": f'["http://127.0.0.1:{ports["mint"]}"]',
        "NODEPROV_NOSTR__RELAYS": f'["ws://127.0.0.1:{ports["relay"]}"]',
        "NODEPROV_UPSTREAMS__0__BASE_URL": f"http://127.0.0.1:{ports['upstream']}/v1",
        "NODEPROV_HTTP__PORT": str(ports["http"]),
        "NODEPROV_NODE__DATA_DIR": str(data_dir),
    }
    env.pop("NODEPROV_CONFIG", None)
    assert DEV_CONFIG.is_file()
    second = nodeprov("start", "--dev", env=env, cwd=tmp_path)
    assert second.returncode == 2
    assert second.stderr == f"error: already running (pid {daemon.proc.pid}, data dir {data_dir})\n"
    assert second.stdout == ""  # no "dev stack: starting ..." line, no banner
    assert not (data_dir / "devstack").exists()  # no child got a work dir
    assert not any(listening(port) for port in ports.values())
    assert daemon.terminate() == 0


def test_a_lock_left_by_a_killed_daemon_does_not_block_the_next_start(
    node: tuple[Daemon, Path],
) -> None:
    daemon, config = node
    lock = config.parent / "data" / "nodeprov.lock"
    assert lock.read_text().split()[0] == str(daemon.proc.pid)
    daemon.kill()  # SIGKILL: no clean-up ran, the lock file and its old pid stay
    assert lock.read_text().split()[0] == str(daemon.proc.pid)

    port = int(daemon.url.rsplit(":", 1)[1])
    again = Daemon(config, port, daemon.name)  # waits until /v1/info answers with our name
    try:
        assert lock.read_text().split()[0] == str(again.proc.pid)
        assert again.terminate() == 0
    finally:
        again.kill()
