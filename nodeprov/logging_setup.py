"""Logging to stderr: plain lines for people, or JSON lines (``--log-json``) for collectors."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# Marks the handler we install so a second setup replaces it without touching others
# (pytest's capture handler, an embedding application's handlers).
_MARK = "_nodeprov_handler"
PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(*, json_lines: bool = False, level: str = "info") -> None:
    """Send nodeprov's (and its libraries') log records to stderr in the chosen format."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(PLAIN_FORMAT))
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request at INFO: mint and rate polling would drown the useful lines.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
