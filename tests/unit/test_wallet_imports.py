"""Importing the wallet must not inherit the cashu package's import side effects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROBE = """
import os, sys
before = dict(os.environ)
import nodeprov.core.wallet, nodeprov.core.payments, nodeprov.core.melt
assert dict(os.environ) == before, set(os.environ) ^ set(before)
assert getattr(sys, "tracebacklimit", None) is None, sys.tracebacklimit
assert "cashu.core.settings" not in sys.modules
print("clean")
"""


def test_importing_the_wallet_reads_no_dotenv_and_keeps_tracebacks(tmp_path: Path) -> None:
    # A .env where the cashu package would look for one: the cwd and ~/.cashu.
    (tmp_path / ".env").write_text("NODEPROV_TEST_SENTINEL=leaked\nDEBUG=false\n")
    (tmp_path / ".cashu").mkdir()
    (tmp_path / ".cashu" / ".env").write_text("NODEPROV_TEST_SENTINEL2=leaked\n")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
