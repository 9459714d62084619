"""The results file: the table, the machine, the versions, the commit and the command."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench._measures import Row
from bench._procs import ROOT, Cores


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def command() -> str:
    env = " ".join(
        f"{k}={v}"
        for k, v in sorted(os.environ.items())
        if k.startswith("BENCH_") and k != "BENCH_NOTE"
    )
    args = " ".join(sys.argv[1:])
    return " ".join(
        part
        for part in (env, "make bench" if not args else f"make bench BENCH_ARGS='{args}'")
        if part
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| measure | direct | node | added / ratio | target | met? |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.measure} | {r.direct} | {r.node} | {r.added} | {r.target} | {met} |")
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass(frozen=True)
class RunInfo:
    """What is noted at the start of a run: when, which commit, how busy the machine was."""

    started: datetime
    commit: str
    load: str
    cores: Cores
    quick: bool
    partial: bool = False  # only some measures: never overwrites a full run's results

    @classmethod
    def now(cls, cores: Cores, quick: bool, partial: bool = False) -> RunInfo:
        return cls(datetime.now(UTC), git_commit(), load_average(), cores, quick, partial)

    def machine(self) -> list[str]:
        quick = " (quick: a few seconds a measure)" if self.quick else ""
        return [
            f"- date: {self.started:%Y-%m-%d %H:%M} UTC{quick}",
            f"- machine: {cpu_model()}, {os.cpu_count()} CPUs; "
            f"load average at the start {self.load}, at the end {load_average()}",
            f"- pinning: {self.cores.describe()}",
            f"- python {platform.python_version()}, uvloop {version('uvloop')}, "
            f"httpx {version('httpx')}, uvicorn {version('uvicorn')}, "
            f"httptools {version('httptools')}",
            f"- commit: {self.commit}",
            f"- command: `{command()}`",
        ]


def write(rows: list[Row], notes: list[str], info: RunInfo) -> Path:
    """Write ``bench/results/<date>[-quick|-partial].md`` and return its path."""
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if info.quick else "-partial" if info.partial else ""
    path = out / f"{info.started:%Y-%m-%d}{suffix}.md"
    text = [f"# nodeprov benchmark, {info.started:%Y-%m-%d}", "", *info.machine(), ""]
    text += [table(rows), ""]
    if notes:
        text += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    path.write_text("\n".join(text))
    return path
