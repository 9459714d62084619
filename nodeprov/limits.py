"""Process limits the daemon needs: enough open files for its streams.

Each open stream holds two sockets (the client's and the upstream's), so 1,000 streams need
more than the soft ``RLIMIT_NOFILE`` of 1,024 many systems start a process with. The soft
limit is raised to the hard one (capped), which needs no privilege.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

WANTED_OPEN_FILES = 65_536


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raise the soft open-files limit towards ``wanted`` (never past the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)
            return soft
        log.info("open-files limit raised from %d to %d", soft, target)
        return target
    return soft
