"""The node's Nostr identity: a secret key file (nsec), created on first start with mode 0600.

The file is written under a temporary name, synced, then linked into place, so a failed or
interrupted first write (disk full, kill -9) never leaves an empty or half-written key.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from nodeprov.core.datadir import FILE_MODE, private_dir
from nodeprov.errors import ConfigError, InvalidKey
from nodeprov.protocol.nostr_event import Keys

log = logging.getLogger(__name__)


def load_or_create_keys(path: Path) -> Keys:
    """Read the key file (nsec or hex); create it (0600, never overwriting) if it is missing."""
    path = path.expanduser()
    if not path.exists():
        private_dir(path.parent)
        keys = Keys.generate()
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(keys.nsec + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # atomic, and fails if another process created it first
                log.info("created Nostr key %s at %s", keys.npub, path)
            except FileExistsError:
                pass  # created concurrently: that one is the node's key
        finally:
            tmp.unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("Nostr key file %s had mode %o; setting 0600", path, mode)
        path.chmod(FILE_MODE)
    text = path.read_text().strip()
    if not text:
        # Older versions wrote the key in place; a crash then left the file empty.
        raise ConfigError(
            f"nostr key file {path} is empty (a first start that was interrupted); it holds no"
            " key: delete it and start again to create one"
        )
    try:
        return Keys.parse(text)
    except InvalidKey as exc:
        raise ConfigError(f"nostr key file {path} does not hold a valid key: {exc}") from None
