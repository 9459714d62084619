"""Where a load's CPU went: the node's processes, PostgreSQL's, and the rest of the machine.

Read from /proc (Linux): each process tree's user+system ticks and the machine's busy ticks,
before and after a load. Divided by the requests served, these say what one request costs
each part, and so how many requests/s the machine's cores could serve at most: on one
machine, a second worker can only add what the first one left idle.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, alive now."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, ()))
    return found


def _ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime


def _busy_ticks() -> int:
    """The machine's busy ticks: all but idle and iowait, summed over its CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values) - values[3] - values[4]


@dataclass
class Usage:
    """Cores in use (CPU seconds per second) over a load: the node, PostgreSQL, everything."""

    node: float
    postgres: float
    machine: float
    cores: int

    def per_request_ms(self, rate: float) -> tuple[float, float, float]:
        """CPU milliseconds one request cost the node, PostgreSQL and the rest of the machine."""
        if rate <= 0:
            return 0.0, 0.0, 0.0
        rest = max(self.machine - self.node - self.postgres, 0.0)
        return self.node / rate * 1000, self.postgres / rate * 1000, rest / rate * 1000

    def ceiling(self, rate: float) -> float:
        """The requests/s this machine's cores could serve at this CPU cost per request."""
        return rate * self.cores / self.machine if self.machine > 0 else 0.0


class CpuMeter:
    """Measures :class:`Usage` between :meth:`start` and :meth:`stop`."""

    def __init__(self, node_pid: int, postgres_pid: int | None) -> None:
        self.roots = (node_pid, postgres_pid)
        self._at = 0.0
        self._before: tuple[dict[int, int], dict[int, int], int] = ({}, {}, 0)

    def _read(self) -> tuple[dict[int, int], dict[int, int], int]:
        trees = [{pid: _ticks(pid) for pid in _tree(root)} if root else {} for root in self.roots]
        return trees[0], trees[1], _busy_ticks()

    def start(self) -> None:
        self._before, self._at = self._read(), time.monotonic()

    def stop(self) -> Usage:
        after, seconds = self._read(), time.monotonic() - self._at
        # A process that started meanwhile counts from zero; one that ended is not counted.
        node, postgres = (
            sum(ticks - before.get(pid, 0) for pid, ticks in now.items())
            for now, before in zip(after[:2], self._before[:2], strict=True)
        )
        busy = after[2] - self._before[2]
        return Usage(
            node=node / TICK / seconds,
            postgres=postgres / TICK / seconds,
            machine=busy / TICK / seconds,
            cores=os.cpu_count() or 1,
        )
