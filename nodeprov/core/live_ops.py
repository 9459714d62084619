"""Wallet operations this process is working on right now.

Recovery finishes or undoes ``pending`` journal rows that nobody is waiting for. Age alone
cannot tell such an orphan from a swap a live request is still awaiting at a slow mint, so
every receive, send, melt and Lightning mint registers its op id here from the moment it
is journalled until its outcome is written; recovery in this process leaves those alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class LiveOps:
    """A set of op ids, entered with :meth:`track` for as long as a caller owns the op."""

    def __init__(self) -> None:
        self._ids: dict[int, int] = {}

    @contextmanager
    def track(self, op_id: int) -> Iterator[None]:
        """Mark ``op_id`` live while the block runs (nested tracking of one op is fine)."""
        self._ids[op_id] = self._ids.get(op_id, 0) + 1
        try:
            yield
        finally:
            left = self._ids[op_id] - 1
            if left:
                self._ids[op_id] = left
            else:
                del self._ids[op_id]

    def __contains__(self, op_id: object) -> bool:
        return op_id in self._ids
