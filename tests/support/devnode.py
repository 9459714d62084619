"""``nodeprov start --dev`` as a subprocess on free ports (moved by NODEPROV_* overrides)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nodeprov.devstack.runner import READY
from tests.support.services import free_port

NODEPROV = Path(sys.executable).parent / "nodeprov"


def dev_overrides(tmp_path: Path, ports: dict[str, int]) -> dict[str, str]:
    """NODEPROV_* overrides that move every address of config/dev.toml to ``ports``."""
    return {
        "NODEPROV_WALLET__MINTS": f'["http://127.0.0.1:{ports["mint"]}"]',
        "NODEPROV_NOSTR__RELAYS": f'["ws://127.0.0.1:{ports["relay"]}"]',
        "NODEPROV_UPSTREAMS__0__BASE_URL": f"http://127.0.0.1:{ports['upstream']}/v1",
        "NODEPROV_HTTP__PORT": str(ports["http"]),
        "NODEPROV_NODE__HTTP_URL": f"http://127.0.0.1:{ports['http']}",
        "NODEPROV_NODE__DATA_DIR": str(tmp_path / "data"),
    }


def free_ports() -> dict[str, int]:
    return {name: free_port() for name in ("mint", "relay", "upstream", "http")}


@dataclass
class DevNode:
    """A running dev node: its ports, environment (overrides included) and banner."""

    ports: dict[str, int]
    env: dict[str, str]
    banner: str
    pid: int
    rest: str = ""  # what it printed after the banner, until it stopped
    returncode: int | None = None

    @property
    def mint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mint']}"


@contextmanager
def dev_node(tmp_path: Path, within: float = 90.0, path: str | None = None) -> Iterator[DevNode]:
    """Start ``nodeprov start --dev`` and yield once its banner says it is ready; SIGTERM after
    (then ``rest`` and ``returncode`` are filled in). ``path``: its PATH, if not ours."""
    ports = free_ports()
    env = {**os.environ, **dev_overrides(tmp_path, ports), "PYTHONUNBUFFERED": "1"}
    env.pop("NODEPROV_CONFIG", None)
    if path is not None:
        env["PATH"] = path
    proc = subprocess.Popen(
        [str(NODEPROV), "start", "--dev"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    node: DevNode | None = None
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(READY):
                break
        banner = "".join(lines)
        assert any(line.startswith(READY) for line in lines), banner
        node = DevNode(ports, env, banner, proc.pid)
        yield node
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        node.rest, node.returncode = rest, proc.returncode
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
