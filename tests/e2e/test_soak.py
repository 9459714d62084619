"""``make soak`` in short: a minute of the seeded fault-injection soak against ``nodeprov start``.

The seed is random and printed (in the output shown on failure), so every run shakes the
node a little differently; ``SOAK_SEED=S SOAK_SECONDS=T make soak`` replays a failure's seed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = re.compile(r"soak: (\d+) operations, (\d+) faults, (\d+) violations \(seed (\d+)\)")


@pytest.mark.timeout(900)
def test_a_short_soak_finds_no_violation(tmp_path: Path) -> None:
    seconds = os.environ.get("SOAK_CI_SECONDS", "60")
    env = {**os.environ, "SOAK_SECONDS": seconds, "SOAK_DIR": str(tmp_path / "soak")}
    env.pop("SOAK_SEED", None)
    run = subprocess.run(
        [sys.executable, "-m", "tests.soak"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=800,
    )  # fmt: skip
    lines = run.stdout.strip().splitlines()
    found = SUMMARY.fullmatch(lines[-1]) if lines else None
    assert found is not None, run.stdout[-3000:] + run.stderr[-3000:]
    operations, faults, violations, seed = map(int, found.groups())
    assert violations == 0 and run.returncode == 0, run.stdout[-6000:]
    assert operations > 100 and faults > 0, run.stdout[-3000:]
    print(f"soak seed {seed}: {operations} operations, {faults} faults")
