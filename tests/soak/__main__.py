"""``make soak``: a seeded fault-injection soak of a real node (see ``tests/soak/runner.py``).

``SOAK_SECONDS`` (default 120) is how long the workload and the faults run; ``SOAK_SEED``
(default random) seeds every choice; ``SOAK_DIR`` keeps the run's logs and data there. The
last line is ``soak: N operations, F faults, V violations (seed S)``; the exit code is 0 only
if V is 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from pathlib import Path

from tests.soak.runner import run


def main() -> int:
    # The test upstream writing to a node that was just killed is expected, not news.
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    seconds = float(os.environ.get("SOAK_SECONDS") or 120)
    seed = int(os.environ.get("SOAK_SEED") or secrets.randbelow(2**32))
    print(f"soak: {seconds:.0f} s, seed {seed}", flush=True)
    keep = os.environ.get("SOAK_DIR")  # keep the logs and data there (default: removed)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(seconds, seed, Path(keep) if keep else None))
    for violation in result.violations:
        print(f"VIOLATION {violation}", flush=True)
    if result.violations:
        print(f"replay: SOAK_SEED={seed} SOAK_SECONDS={seconds:.0f} make soak", flush=True)
    print(result.summary, flush=True)
    return 0 if not result.violations else 1


if __name__ == "__main__":
    sys.exit(main())
