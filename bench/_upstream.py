"""The test upstream in a process of its own, so it never competes for the node's GIL."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.fake_upstream import FakeUpstream
from tests.support.http_node import MODELS, UPSTREAM_KEY

if __name__ == "__main__":
    with FakeUpstream(models=MODELS, api_key=UPSTREAM_KEY) as upstream:
        print(upstream.url, flush=True)
        sys.stdin.readline()  # runs until the benchmark closes our stdin
