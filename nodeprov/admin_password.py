"""The admin dashboard's password: hashing, verification and the first-start password.

Hash formats (fields separated by ``$``, salt and key in unpadded URL-safe base64):

- ``scrypt$<log2 n>$<r>$<p>$<salt>$<key>`` (the default: ``scrypt$14$8$1$…``)
- ``pbkdf2_sha256$<iterations>$<salt>$<key>``

The hash comes from ``admin.password_hash`` in the config, else from the file
``<data_dir>/admin_password`` (mode 0600, one hash line). When neither exists a password
is generated on first start, its hash stored in that file and the plaintext shown once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from nodeprov.config import Config
from nodeprov.errors import ConfigError

PASSWORD_FILE = "admin_password"
SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P = 14, 8, 1
PBKDF2_ITERATIONS = 600_000
KEY_BYTES = 32
MIN_PASSWORD_LENGTH = 8
_MAXMEM = 64 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, scheme: str = "scrypt") -> str:
    """A new salted hash of ``password`` in ``scheme`` (``scrypt`` or ``pbkdf2_sha256``)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"the admin password needs at least {MIN_PASSWORD_LENGTH} characters")
    salt = secrets.token_bytes(16)
    secret = password.encode()
    if scheme == "scrypt":
        key = hashlib.scrypt(
            secret, salt=salt, n=2**SCRYPT_LOG2_N, r=SCRYPT_R, p=SCRYPT_P,
            maxmem=_MAXMEM, dklen=KEY_BYTES,
        )  # fmt: skip
        return f"scrypt${SCRYPT_LOG2_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"
    if scheme == "pbkdf2_sha256":
        key = hashlib.pbkdf2_hmac("sha256", secret, salt, PBKDF2_ITERATIONS, KEY_BYTES)
        return f"pbkdf2_sha256${PBKDF2_ITERATIONS}${_b64(salt)}${_b64(key)}"
    raise ValueError(f"unknown password scheme {scheme!r}; use 'scrypt' or 'pbkdf2_sha256'")


def check_hash(encoded: str) -> None:
    """Raise ``ValueError`` unless ``encoded`` is a well-formed hash this module can verify."""
    parts = encoded.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            log2_n, r, p = (int(x) for x in parts[1:4])
            if not (1 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
                raise ValueError("scrypt parameters out of range")
            if 128 * r * 2**log2_n * 2 > _MAXMEM:
                raise ValueError("scrypt parameters need too much memory")
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            if not 1000 <= int(parts[1]) <= 10_000_000:
                raise ValueError("pbkdf2 iterations out of range")
        else:
            raise ValueError("expected scrypt$… or pbkdf2_sha256$…")
        if len(_unb64(parts[-2])) < 8 or len(_unb64(parts[-1])) < 16:
            raise ValueError("salt or key too short")
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"not a valid admin password hash: {exc}") from None


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time compare; False if malformed)."""
    try:
        check_hash(encoded)
    except ValueError:
        return False
    parts = encoded.split("$")
    salt, expected = _unb64(parts[-2]), _unb64(parts[-1])
    secret = password.encode()
    if parts[0] == "scrypt":
        n, r, p = 2 ** int(parts[1]), int(parts[2]), int(parts[3])
        key = hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=len(expected))
    else:
        key = hashlib.pbkdf2_hmac("sha256", secret, salt, int(parts[1]), len(expected))
    return hmac.compare_digest(key, expected)


def password_file(config: Config) -> Path:
    return config.node.data_dir / PASSWORD_FILE


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the start (atomic replace)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def set_password(config: Config, password: str, scheme: str = "scrypt") -> str:
    """What ``nodeprov admin set-password`` does: store a new hash in the data dir file.

    Returns the hash (it may also go into ``admin.password_hash``, which takes precedence).
    """
    encoded = hash_password(password, scheme)
    _write_private(password_file(config), encoded + "\n")
    return encoded


def load_or_create(config: Config) -> tuple[str, str | None]:
    """The admin password hash, and the plaintext if one was just generated (show it once)."""
    if config.admin.password_hash:
        try:
            check_hash(config.admin.password_hash)
        except ValueError as exc:
            raise ConfigError(f"admin.password_hash: {exc}") from None
        return config.admin.password_hash, None
    path = password_file(config)
    if path.exists():
        encoded = path.read_text().strip()
        try:
            check_hash(encoded)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}; run `nodeprov admin set-password`") from None
        return encoded, None
    generated = secrets.token_urlsafe(18)
    return set_password(config, generated), generated
