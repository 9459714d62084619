"""The README's curl and Python samples, run as written against a dev node (`nodeprov start --dev`).

Each sample gets a fresh 1000-sat token as ``$TOKEN`` (what the dev node prints), the dev node's
fixed ports rewritten to the free ones this run uses. A numeric header a sample's comment shows
(``# x-cost-msat: 144``) must be what the node answers: the README's numbers are the dev node's.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cashu_client import TokenFactory
from tests.support.devnode import DevNode, dev_node

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DEV_PORTS = {"http": 8000, "mint": 3338, "relay": 7777, "upstream": 8088}


def samples() -> list[tuple[str, str]]:
    """(language, code) of every README sample that talks to the dev node's HTTP API."""
    readme = (ROOT / "README.md").read_text()
    found = re.findall(r"```(sh|python)\n(.*?)```", readme, re.S)
    return [(lang, code) for lang, code in found if "127.0.0.1:8000" in code]


def on_ports(code: str, node: DevNode) -> str:
    for name, port in DEV_PORTS.items():
        code = code.replace(f"127.0.0.1:{port}", f"127.0.0.1:{node.ports[name]}")
    return code


def promised_headers(code: str) -> dict[str, str]:
    """``# header: 123`` comments: the numbers the README promises."""
    return dict(re.findall(r"^# (x-[a-z-]+): (\d+)\s*$", code, re.M))


async def fresh_token(node: DevNode, wallet: Path) -> str:
    factory = TokenFactory(node.mint_url, "sat", wallet)
    try:
        return await factory.token(1000)
    finally:
        await factory.aclose()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevNode]:
    with dev_node(tmp_path_factory.mktemp("readme-dev")) as running:
        yield running


def test_the_readme_has_samples_for_each_payment_mode() -> None:
    code = "".join(c for _, c in samples())
    assert len(samples()) >= 7
    for needle in (
        "Bearer $KEY",
        "Bearer $TOKEN",
        "X-Cashu: $TOKEN",
        '"X-Cashu": token',
        '"Nostr "',
    ):
        assert needle in code


@pytest.mark.parametrize(
    ("lang", "code"), samples(), ids=[f"{lang}-{i}" for i, (lang, _) in enumerate(samples())]
)
def test_readme_sample_runs_against_the_dev_node(
    lang: str, code: str, node: DevNode, tmp_path: Path
) -> None:
    factory = TokenFactory(node.mint_url, "sat", tmp_path / "wallet")
    token = asyncio.run(factory.token(1000))
    env = {
        **node.env,
        "TOKEN": token,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    script = on_ports(code, node)
    if lang == "sh":
        command = ["bash", "-euo", "pipefail", "-c", script]
    else:
        command = [sys.executable, "-c", script]
    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"error"' not in done.stdout, done.stdout
    headers = {k.lower(): v.strip() for k, v in re.findall(r"^([\w-]+): (.*)$", done.stdout, re.M)}
    for name, value in promised_headers(code).items():
        assert headers.get(name) == value, (name, done.stdout)
