"""The measures: each runs the same load against the upstream directly and through the node."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench._common import percentile
from bench._procs import Cores, Node, Procs, rss_kib

T = TypeVar("T")
CHAT = '{"model": "bench-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}'
STREAM = (
    '{"model": "bench-chat", "messages": [{"role": "user", "content": "hi"}], '
    '"max_tokens": 64, "stream": true}'
)
SLOW_STREAM = (
    '{"model": "bench-slow", "messages": [{"role": "user", "content": "hi"}], '
    '"max_tokens": 1024, "stream": true}'
)


@dataclass(frozen=True)
class Plan:
    """How long each measure runs (``quick``: a few seconds each, to check the harness)."""

    quick: bool
    seconds: float
    warmup: float
    xcashu_tokens: int
    swaps: int
    stream_requests: int
    chunks: int
    gap_ms: float
    clients: tuple[int, ...]
    streams: tuple[int, ...]
    ledger_requests: int
    dm_jobs: int

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 1.5, 0.3, 12, 6, 40, 16, 1.0, (1, 8, 32, 128), (50, 100), 400, 3)
        return cls(False, 10.0, 2.0, 200, 60, 500, 16, 1.0, (1, 8, 32, 128),
                   (100, 500, 1000), 5000, 20)  # fmt: skip


@dataclass
class Load:
    """The merged result of one load run."""

    ok: int
    errors: Counter[str]
    seconds: float
    lat_ms: list[float]
    ttft_ms: list[float]
    tail_ms: list[float]

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def p(self, q: float, what: str = "lat") -> float:
        return percentile(getattr(self, f"{what}_ms"), q)

    def error_text(self) -> str:
        if not self.errors:
            return "0 errors"
        return (
            f"{sum(self.errors.values())} errors ("
            + ", ".join(f"{k}: {v}" for k, v in sorted(self.errors.items()))
            + ")"
        )


@dataclass
class Row:
    """One line of the results table."""

    measure: str
    direct: str
    node: str
    added: str
    target: str = "-"
    met: bool | None = None


@dataclass
class Bench:
    """What a run shares: its processes, cores, node, upstream and the async runner."""

    procs: Procs
    cores: Cores
    plan: Plan
    workdir: Path
    upstream: str
    node: Node
    arun: Callable[[Coroutine[Any, Any, Any]], Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def load(
        self,
        url: str,
        *,
        clients: int = 1,
        headers: tuple[str, ...] = (),
        body: str = CHAT,
        requests: int = 0,
        tokens: list[str] | None = None,
        warmup: float | None = None,
        keys: list[str] | None = None,
    ) -> Load:
        """Run the load generator (on the load core) against ``url``; its merged result."""
        argv = [sys.executable, "-m", "bench._load", url, "--clients", str(clients),
                "--seconds", str(self.plan.seconds), "--body", body]  # fmt: skip
        argv += ["--warmup", str(self.plan.warmup if warmup is None else warmup)]
        if requests:
            argv += ["--requests", str(requests)]
        for header in headers:
            argv += ["--header", header]
        if tokens is not None:
            file = self.workdir / f"tokens-{time.monotonic_ns()}.txt"
            file.write_text("\n".join(tokens) + "\n")
            argv += ["--tokens", str(file)]
        if keys is not None:
            file = self.workdir / f"keys-{time.monotonic_ns()}.txt"
            file.write_text("\n".join(keys) + "\n")
            argv += ["--keys", str(file)]
        proc = self.procs.spawn(argv, cpu=self.cores.load)
        try:
            out, _ = proc.communicate(timeout=600)
        finally:
            self.procs.stop(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"the load generator failed (exit {proc.returncode})")
        data = json.loads(out.decode().strip().splitlines()[-1])
        return Load(
            ok=data["ok"],
            errors=Counter(data["errors"]),
            seconds=data["seconds"],
            lat_ms=sorted(v / 1000 for v in data["lat_us"]),
            ttft_ms=sorted(v / 1000 for v in data["ttft_us"]),
            tail_ms=sorted(v / 1000 for v in data["tail_us"]),
        )

    @property
    def direct_chat(self) -> str:
        return self.upstream + "/chat/completions"

    @property
    def node_chat(self) -> str:
        return self.node.url + "/v1/chat/completions"


def ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def signed(value: float) -> str:
    return ("+" if value >= 0 else "-") + ms(abs(value))


def pair(load: Load, what: str = "lat") -> str:
    return f"{ms(load.p(0.5, what))} / {ms(load.p(0.99, what))} ms"


def added(node: Load, direct: Load, what: str = "lat") -> tuple[float, float]:
    return (node.p(0.5, what) - direct.p(0.5, what), node.p(0.99, what) - direct.p(0.99, what))


def latency(b: Bench, api_key: str, token_key: str, tokens: list[str], swaps: list[float]) -> None:
    """(1) Added latency at one client: API key, token as key, X-Cashu (beside a bare swap)."""
    direct = b.load(b.direct_chat)
    for name, credential in (("API key", api_key), ("token as key", token_key)):
        node = b.load(b.node_chat, headers=(f"Authorization: Bearer {credential}",))
        a50, a99 = added(node, direct)
        b.rows.append(Row(
            f"added latency, 1 client, {name}, p50 / p99", pair(direct),
            pair(node) + ("" if not node.errors else f", {node.error_text()}"),
            f"{signed(a50)} / {signed(a99)} ms", "<= +1 / +3 ms",
            a50 <= 1 and a99 <= 3 and not node.errors,
        ))  # fmt: skip
    swap = percentile(sorted(swaps), 0.5) * 1000
    node = b.load(b.node_chat, tokens=tokens, warmup=2)
    a50 = node.p(0.5) - direct.p(0.5)
    b.rows.append(Row(
        "X-Cashu per request (fresh 1-sat token each), p50 / p99",
        f"bare swap {ms(swap)} / {ms(percentile(sorted(swaps), 0.99) * 1000)} ms",
        pair(node) + ("" if not node.errors else f", {node.error_text()}"),
        f"{signed(a50)} ms (swap {signed(a50 - swap)} ms)", "<= swap + 2 ms",
        a50 <= swap + 2 and not node.errors,
    ))  # fmt: skip


def throughput(b: Bench, api_key: str) -> None:
    """(2) Closed-loop requests/s and p99 at each client count, direct and through the node."""
    for clients in b.plan.clients:
        direct = b.load(b.direct_chat, clients=clients)
        node = b.load(b.node_chat, clients=clients, headers=(f"Authorization: Bearer {api_key}",))
        target, met = "-", None
        if clients == 32:
            target = ">= 1,000/s, p99 <= 50 ms, 0 errors"
            met = node.rate >= 1000 and node.p(0.99) <= 50 and not node.errors
        b.rows.append(Row(
            f"paid requests/s, {clients} client{'s' if clients > 1 else ''} (API key), p99",
            f"{direct.rate:,.0f}/s, p99 {ms(direct.p(0.99))} ms, {direct.error_text()}",
            f"{node.rate:,.0f}/s, p99 {ms(node.p(0.99))} ms, {node.error_text()}",
            f"{node.rate / direct.rate:.2f}x" if direct.rate else "-", target, met,
        ))  # fmt: skip


def streaming(b: Bench, api_key: str) -> None:
    """(3) Added time to first token and mean inter-chunk gap of a stream."""
    n = b.plan.stream_requests
    direct = b.load(b.direct_chat, body=STREAM, requests=n, warmup=5)
    node = b.load(b.node_chat, body=STREAM, requests=n, warmup=5,
                  headers=(f"Authorization: Bearer {api_key}",))  # fmt: skip
    a50, a99 = added(node, direct, "ttft")
    b.rows.append(Row(
        "streaming: time to first token, p50 / p99", pair(direct, "ttft"),
        pair(node, "ttft") + ("" if not node.errors else f", {node.error_text()}"),
        f"{signed(a50)} / {signed(a99)} ms", "<= +1 / +3 ms",
        a50 <= 1 and a99 <= 3 and not node.errors,
    ))  # fmt: skip
    chunks = b.plan.chunks

    def gap(load: Load) -> float:
        return sum(load.tail_ms) / len(load.tail_ms) / chunks if load.tail_ms else float("nan")

    b.rows.append(Row(
        f"streaming: mean inter-chunk gap ({chunks} chunks, {b.plan.gap_ms:g} ms apart upstream)",
        f"{gap(direct):.3f} ms", f"{gap(node):.3f} ms", f"{gap(node) - gap(direct):+.3f} ms",
    ))  # fmt: skip


def open_streams(b: Bench, api_key: str, restart: Callable[[], None]) -> None:
    """(4) RSS of the node with N streams open against the slow upstream, and the failures.

    On a freshly restarted node, so that the memory earlier measures left allocated does not
    hide what the streams take; per stream is (RSS with them open - idle) / streams open.
    """
    restart()
    auth = (f"Authorization: Bearer {api_key}",)
    b.load(b.node_chat, headers=auth, requests=50, warmup=0)
    b.load(b.node_chat, headers=auth, body=STREAM, requests=10, warmup=0)
    time.sleep(1)
    idle = rss_kib(b.node.pid)
    b.rows.append(Row("node RSS idle (after warm-up)", "-", f"{idle / 1024:.1f} MiB", "-"))
    for n in b.plan.streams:
        time.sleep(2)  # let the previous streams' connections close
        argv = [sys.executable, "-m", "bench._load", b.node_chat, "--hold", "--clients", str(n),
                "--body", SLOW_STREAM, "--header", f"Authorization: Bearer {api_key}"]  # fmt: skip
        proc = b.procs.spawn(argv, cpu=b.cores.load, stdin=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the stream holder exited ({proc.poll()})")
            report = json.loads(line)
            time.sleep(1)
            during = rss_kib(b.node.pid)
            proc.stdin.close()
            proc.wait(timeout=60)
        finally:
            b.procs.stop(proc)
        opened = report["open"]
        failed = sum(report["errors"].values())
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(report["errors"].items()))
        per = (during - idle) / opened if opened else float("nan")
        # Failed requests held memory too while they waited: say what each stream asked cost.
        asked = "" if opened == n else f" ({(during - idle) / n:.1f} KiB per stream asked)"
        b.rows.append(Row(
            f"open streams: {n} (slow upstream)", "-",
            f"{opened} open, {failed} failed{f' ({errors})' if errors else ''}; "
            f"RSS {during / 1024:.1f} MiB",
            f"{per:.1f} KiB per open stream{asked}", "0 errors, <= 64 KiB each",
            failed == 0 and per <= 64,
        ))  # fmt: skip


def ledger(b: Bench) -> None:
    """(5) The ledger's hold+settle pairs/s against two bare SQLite write transactions."""
    for concurrency in (1, 32):
        argv = [sys.executable, "-m", "bench._ledger", "--requests",
                str(b.plan.ledger_requests), "--concurrency", str(concurrency)]  # fmt: skip
        proc = b.procs.spawn(argv, cpu=b.cores.node)  # the node's core: the node is idle now
        try:
            out, _ = proc.communicate(timeout=600)
        finally:
            b.procs.stop(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"the ledger measure failed (exit {proc.returncode})")
        data = json.loads(out.decode().strip().splitlines()[-1])
        base, led = data["baseline"], data["ledger"]
        b.rows.append(Row(
            f"ledger hold+settle pairs/s, {concurrency} concurrent (p50)",
            f"bare SQLite 2 writes: {base['per_s']:,.0f}/s ({base['p50_us'] / 1000:.2f} ms)",
            f"{led['per_s']:,.0f}/s ({led['p50_us'] / 1000:.2f} ms)",
            f"{led['per_s'] / base['per_s']:.2f}x",
        ))  # fmt: skip


def dm(b: Bench, relay: str, token: str) -> None:
    """(6) NIP-17 and NIP-04 job round trips minus the upstream time, beside 2 relay hops."""
    from bench._dm import round_trips

    upstream = b.load(b.direct_chat)
    up_ms = upstream.p(0.5)
    trips = b.arun(round_trips(relay, str(b.node.info["npub"]), token, b.plan.dm_jobs))
    for nip, got in trips.items():
        job = sorted(t * 1000 - up_ms for t in got["job"])
        hops = sorted(2 * t * 1000 for t in got["echo"])
        j50, j99 = percentile(job, 0.5), percentile(job, 0.99)
        h50 = percentile(hops, 0.5)
        b.rows.append(Row(
            f"{nip.upper().replace('NIP', 'NIP-')} DM job round trip minus upstream, p50 / p99",
            f"2 relay hops {ms(h50)} / {ms(percentile(hops, 0.99))} ms",
            f"{ms(j50)} / {ms(j99)} ms", f"{signed(j50 - h50)} ms over 2 hops",
        ))  # fmt: skip
