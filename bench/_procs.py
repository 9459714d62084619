"""The benchmark's processes: pinning to cores, the upstream, the node, and their cleanup.

Every child runs in its own process group and is stopped (SIGTERM to the group, SIGKILL after
a grace period) by :class:`Procs`, also when the run fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]
NODEPROV = Path(sys.executable).parent / "nodeprov"
MODELS = ("bench-chat", "bench-slow")


@dataclass(frozen=True)
class Cores:
    """Where things run: the node on ``node``, everything else on ``load`` (None: unpinned)."""

    node: int | None
    load: int | None

    @classmethod
    def pick(cls) -> Cores:
        """The first two CPUs this process may use; unpinned on a one-core machine."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None)
        return cls(cpus[0], cpus[1])

    def describe(self) -> str:
        if self.node is None:
            return "unpinned (fewer than 2 CPUs)"
        return (
            f"node on CPU {self.node}; mint, relay, upstream, load and harness on CPU {self.load}"
        )


def pin(pid: int, cpu: int | None) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (no-op for None)."""
    if cpu is None:
        return
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), {cpu})


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class Procs:
    """The children of one run; :meth:`stop_all` ends them all, newest first."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        argv: list[str],
        *,
        cpu: int | None = None,
        stdout: int | IO[bytes] | None = subprocess.PIPE,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        stderr: int | IO[bytes] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own process group, pinned to ``cpu`` (through taskset)."""
        if cpu is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(cpu), *argv]
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=stdin, stdout=stdout, stderr=stderr, env=env,
            process_group=0,
        )  # fmt: skip
        self.children.append(proc)
        if cpu is not None and not shutil.which("taskset"):
            pin(proc.pid, cpu)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """SIGTERM the child's group, SIGKILL after ``grace`` seconds."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(ValueError):
            self.children.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.children)):
            self.stop(proc)


def start_upstream(
    procs: Procs, cpu: int | None, *args: str
) -> tuple[str, subprocess.Popen[bytes]]:
    """The fast upstream in its own process; returns its base URL (``.../v1``) and process."""
    proc = procs.spawn([sys.executable, "-m", "bench._upstream", *args], cpu=cpu)
    assert proc.stdout is not None
    url = proc.stdout.readline().decode().strip()
    if not url.startswith("http"):
        raise RuntimeError(f"the bench upstream did not start (exit {proc.poll()})")
    return url, proc


def node_config(
    workdir: Path,
    port: int,
    name: str,
    mint: str,
    upstream: str,
    relay: str | None,
    ledger_url: str = "",
) -> str:
    """The node's TOML: the bench models, cheap prices, Nostr only if a relay is given."""
    nostr = (
        f'[nostr]\nrelays = ["{relay}"]\ndefault_model = "bench-chat"\n'
        "rate_limit_per_minute = 0\nmax_concurrent_jobs_per_sender = 100\n"
        if relay
        else ""
    )
    models = ", ".join(f'"{m}"' for m in MODELS)
    # Cheap prices: a funded key pays for millions of requests; the token of an X-Cashu request
    # is 1 sat, which pays a request's whole maximum cost and leaves no change to issue.
    prices = "".join(
        f'[models."{m}"]\nrequest_msat = 10\ninput_per_1m_msat = 1000\n'
        "output_per_1m_msat = 1000\ncontext_tokens = 8192\nmax_output_tokens = 1024\n\n"
        for m in MODELS
    )
    return f"""[node]
name = "{name}"
data_dir = "{workdir / "data"}"
http_url = "http://127.0.0.1:{port}"

[http]
host = "127.0.0.1"
port = {port}

{nostr}
[wallet]
mints = ["{mint}"]

[admin]
password_hash = ""

[ledger]
url = "{ledger_url}"

[[upstreams]]
name = "bench"
base_url = "{upstream}"
models = [{models}]

{prices}"""


class Node:
    """``nodeprov -c CONFIG start`` as a subprocess pinned to one core (``cpu``, unless None).

    ``ledger_url`` puts the books elsewhere (PostgreSQL); ``workers`` > 1 runs that many
    worker processes behind one port (``start --workers``).
    """

    def __init__(
        self, procs: Procs, workdir: Path, cpu: int | None, mint: str, upstream: str,
        relay: str | None, *, ledger_url: str = "", workers: int = 1,
    ) -> None:  # fmt: skip
        self.ledger_url = ledger_url
        self.workers = workers
        self.mint = mint
        self.upstream = upstream
        self.relay = relay
        self.procs = procs
        self.workdir = workdir
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.info: dict[str, object] = {}
        self.log_path = workdir / "node.log"

    def start(self, free_port: Callable[[], int]) -> None:
        """Start on a free port (another on a lost race for it); return once it answers."""
        for attempt in range(3):
            try:
                return self._start(free_port())
            except RuntimeError:
                if attempt == 2 or "address already in use" not in self.log_tail().lower():
                    raise

    def restart(self, free_port: Callable[[], int]) -> None:
        """Stop and start again on the same data dir (a fresh process, fresh memory)."""
        self.stop()
        self.start(free_port)

    def _start(self, port: int) -> None:
        name = f"bench-node-{secrets.token_hex(4)}"
        config = self.workdir / "nodeprov.toml"
        config.write_text(
            node_config(
                self.workdir, port, name, self.mint, self.upstream, self.relay, self.ledger_url
            )
        )
        workers = ["--workers", str(self.workers)] if self.workers > 1 else []
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log_path, "ab") as log:
            self.proc = self.procs.spawn(
                [str(NODEPROV), "-c", str(config), "start", *workers], cpu=self.cpu, stdout=log,
                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError, ValueError):
                info = httpx.get(self.url + "/v1/info", timeout=1, trust_env=False)
                if info.status_code == 200 and info.json().get("name") == name:
                    self.info = info.json()
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the node did not come up:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "<no log>"

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, grace=10)
            self.proc = None
