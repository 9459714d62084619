"""The daemon raises its soft open-files limit so that 1,000 streams fit."""

from __future__ import annotations

import resource
import subprocess
import sys

CHECK = """
import resource
from nodeprov.limits import raise_open_files_limit
got = raise_open_files_limit(4096)
print(got, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _limited(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def run_with(soft: int, hard: int) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", CHECK],
        preexec_fn=lambda: _limited(soft, hard),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [int(n) for n in out.stdout.split()]


def test_a_low_soft_limit_is_raised_up_to_the_hard_one() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert run_with(256, 2048 if hard >= 2048 else hard) == [min(2048, hard)] * 2
    if hard >= 4096 or hard == resource.RLIM_INFINITY:
        assert run_with(256, hard) == [4096, 4096]


def test_a_high_enough_soft_limit_is_left_alone() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 8192:
        return
    assert run_with(8192, hard) == [8192, 8192]
