"""Helpers for the tests of the deployment recipes in ``contrib/``.

The checkers (systemd-analyze, nginx, caddy, tor) are system tools: without one, its test
skips saying which package brings it, unless ``NODEPROV_REQUIRE_CONTRIB_TOOLS=1`` (CI sets it
once ``.ci/install-contrib-tools`` succeeded): there a missing checker fails the test.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
CONTRIB = ROOT / "contrib"


def tools_required() -> bool:
    """True where the checkers must run (CI), so a missing one fails instead of skipping."""
    return os.environ.get("NODEPROV_REQUIRE_CONTRIB_TOOLS", "") not in ("", "0")


def tool(name: str, package: str) -> str:
    """The path of the command ``name``; skip (or fail, see above) naming ``package``."""
    path = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)), None
    )
    if path is None:
        why = f"{name} is not installed (Debian: apt-get install {package}); the check needs it"
        if tools_required():
            pytest.fail(why)
        pytest.skip(why)
    return path


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """A systemd unit file as (section, key, value) in order; repeated keys stay repeated."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def env_file_values(text: str) -> dict[str, str]:
    """The ``KEY=value`` lines of an environment file (comments and blanks skipped)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


# A small valid node config. Not the example config: its placeholder addresses
# (example.com) are what an operator must replace, and a node may refuse them at start.
MINIMAL_CONFIG = """
[wallet]
mints = ["https://mint.nodeprov.test"]

[[upstreams]]
name = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
models = ["m"]

[models.m]
request_msat = 1
"""


def example_key_variables(example: Path) -> set[str]:
    """The ``api_key_env`` names the example config's upstreams read their keys from."""
    raw = tomllib.loads(example.read_text())
    return {u["api_key_env"] for u in raw.get("upstreams", []) if "api_key_env" in u}


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for llm.example.com, as PEM files in ``tmp_path``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llm.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
