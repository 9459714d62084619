"""The daemon answers NIP-90 kind 5050 jobs: ``nodeprov start`` as a subprocess, the real relay
and mint, a nostr-sdk customer that pays only over Lightning (the FakeWallet mint pays the
invoice); the capability is listed in ``/v1/info`` and the books audit clean afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_daemon_e2e import MODELS, Daemon, audit, node_npub, write_config
from tests.support.fake_upstream import FakeUpstream
from tests.support.nip90_node import Customer, status, tag
from tests.support.services import MintHandle, RelayHandle

pytestmark = pytest.mark.integration


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(models=MODELS, api_key="sk-upstream") as up:
        yield up


async def test_daemon_answers_a_job_paid_by_invoice(
    tmp_path: Path, mint: MintHandle, relay: RelayHandle, upstream: FakeUpstream
) -> None:
    def config_for(port: int, name: str) -> Path:
        return write_config(tmp_path, mint, relay, upstream.url, port, name)

    daemon, config = Daemon.start(config_for, prefix="nip90-node")
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            info = (await http.get(daemon.url + "/v1/info")).json()
        assert "nip90:5050" in info["capabilities"]
        peer = await Customer([relay.url], node_npub(config)).connect()
        try:
            job = await peer.job(
                ["i", "hello from a lightning wallet", "text"],
                ["param", "model", "fake-chat"],
                ["param", "max_tokens", "8"],
            )
            offer = await peer.wait(job, "payment-required")
            assert tag(offer, "amount")[1].startswith("lnbc")  # type: ignore[index]
            result = await peer.wait(job, "result")  # the FakeWallet mint paid it
            assert result["content"] and int(tag(result, "amount")[0]) > 0  # type: ignore[index]
            assert "success" in [status(e) for e in await peer.answers(job)]
        finally:
            await peer.close()
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
    checked = audit(config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["ok"]
