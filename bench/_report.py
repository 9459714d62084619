"""The results file: the table, the machine, the versions, the commit and the command."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
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


def machine(cores: Cores, started: datetime, quick: bool, commit: str) -> list[str]:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        f"- date: {started:%Y-%m-%d %H:%M} UTC"
        + (" (quick: a few seconds a measure)" if quick else ""),
        f"- machine: {cpu_model()}, {os.cpu_count()} CPUs; load average at start {load}",
        f"- pinning: {cores.describe()}",
        f"- python {platform.python_version()}, uvloop {version('uvloop')}, "
        f"httpx {version('httpx')}, uvicorn {version('uvicorn')}, httptools {version('httptools')}",
        f"- commit: {commit}",
        f"- command: `{command()}`",
    ]


def write(
    rows: list[Row], notes: list[str], cores: Cores, started: datetime, quick: bool, commit: str
) -> Path:
    """Write ``bench/results/<date>[-quick].md`` and return its path."""
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{started:%Y-%m-%d}{'-quick' if quick else ''}.md"
    text = [
        f"# nodeprov benchmark, {started:%Y-%m-%d}",
        "",
        *machine(cores, started, quick, commit),
        "",
    ]
    text += [table(rows), ""]
    if notes:
        text += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    path.write_text("\n".join(text))
    return path


def now() -> datetime:
    return datetime.now(UTC)
