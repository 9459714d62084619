"""contrib/systemd: the unit file is valid for systemd, hardened, and runs the node right."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodeprov.cli import EXAMPLE_CONFIG, main
from nodeprov.cli_common import USAGE_EXIT
from nodeprov.config_load import load_config
from nodeprov.daemon import SHUTDOWN_GRACE_SECONDS
from tests.support.contrib import (
    CONTRIB,
    MINIMAL_CONFIG,
    ROOT,
    env_file_values,
    example_key_variables,
    tool,
    unit_entries,
)

UNIT = CONTRIB / "systemd" / "nodeprov.service"
ENV_EXAMPLE = CONTRIB / "systemd" / "nodeprov.env.example"
VENV_NODEPROV = Path(sys.executable).parent / "nodeprov"


def minimal_config(tmp_path: Path) -> Path:
    path = tmp_path / "nodeprov.toml"
    path.write_text(MINIMAL_CONFIG)
    return path


def service(key: str) -> list[str]:
    """Every value of ``key`` in the unit's [Service] section, in order."""
    return [v for s, k, v in unit_entries(UNIT.read_text()) if s == "Service" and k == key]


def exec_start() -> list[str]:
    (line,) = service("ExecStart")
    return line.split()


def local_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this venv's nodeprov (verify needs the binary)."""
    text = UNIT.read_text() if text is None else text
    copy = tmp_path / "nodeprov.service"
    copy.write_text(text.replace(exec_start()[0], str(VENV_NODEPROV)))
    return copy


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    analyze = tool("systemd-analyze", "systemd")
    return subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, cwd=path.parent
    )


def test_unit_passes_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    assert VENV_NODEPROV.is_file()
    result = verify(local_copy(tmp_path))
    # verify exits 0 on unknown keys and bad values too: only its silence means all is valid.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_verify_reports_a_misspelt_option_so_its_silence_means_something(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("LockPersonality=", "LockPersonalty=")
    result = verify(local_copy(tmp_path, broken))
    assert "Unknown key" in result.stderr and "LockPersonalty" in result.stderr


def test_systemd_analyze_security_rates_the_unit_as_the_readme_says(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze", "systemd")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(local_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    exposure, verdict = found.group(1), found.group(2)
    assert float(exposure) <= 2.0 and verdict == "OK"
    readme = (ROOT / "README.md").read_text()
    assert f"`systemd-analyze security` rates it {exposure} ({verdict})" in readme


def test_unit_execstart_is_a_command_line_nodeprov_accepts() -> None:
    argv = exec_start()
    assert Path(argv[0]).name == "nodeprov"
    assert argv[1:] == ["start", "-c", "/etc/nodeprov/nodeprov.toml"]
    # The same arguments, asking start for its help: parsed by the real CLI, nothing run.
    result = CliRunner().invoke(main, [*argv[1:], "--help"], prog_name="nodeprov")
    assert result.exit_code == 0, result.output
    assert "Usage: nodeprov start" in result.output


def test_unit_runs_as_its_own_user_with_the_data_dir_in_its_state_directory(
    tmp_path: Path,
) -> None:
    assert service("User") == ["nodeprov"] and service("Group") == ["nodeprov"]
    assert service("StateDirectory") == ["nodeprov"] and service("StateDirectoryMode") == ["0700"]
    env = dict(v.split("=", 1) for v in service("Environment"))
    assert env["NODEPROV_NODE__DATA_DIR"] == "/var/lib/nodeprov"
    # The override wins over whatever data_dir the operator's config names.
    secrets = env_file_values(ENV_EXAMPLE.read_text())
    config = load_config(minimal_config(tmp_path), {**secrets, **env})
    assert config.node.data_dir == Path("/var/lib/nodeprov")


def test_unit_reads_the_upstream_keys_the_config_names_from_an_environment_file(
    tmp_path: Path,
) -> None:
    (env_file,) = service("EnvironmentFile")
    assert env_file.lstrip("-") == "/etc/nodeprov/nodeprov.env"
    secrets = env_file_values(ENV_EXAMPLE.read_text())
    assert example_key_variables(EXAMPLE_CONFIG) <= set(secrets)
    config = load_config(minimal_config(tmp_path), secrets)  # fails on a variable not set
    assert config.upstreams[0].api_key == secrets["OPENAI_API_KEY"]


def test_unit_stops_gracefully_and_restarts_only_what_a_restart_can_fix() -> None:
    assert service("KillSignal") == ["SIGTERM"]
    (stop,) = service("TimeoutStopSec")
    # Streams get SHUTDOWN_GRACE_SECONDS, then holds are settled and the ledger closed.
    assert int(stop) >= 2 * SHUTDOWN_GRACE_SECONDS
    assert service("Restart") == ["on-failure"]
    # A bad config or a second daemon on the data dir exits USAGE_EXIT: no restart loop.
    assert service("RestartPreventExitStatus") == [str(USAGE_EXIT)]


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "UMask": "0077",
    "CapabilityBoundingSet": "",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
}


@pytest.mark.parametrize(("key", "value"), sorted(HARDENING.items()))
def test_unit_sets_the_hardening_option(key: str, value: str) -> None:
    assert service(key) == [value]


def test_unit_filters_system_calls_to_a_service_s_set() -> None:
    assert service("SystemCallFilter") == ["@system-service", "~@privileged @resources"]


MDWE_PROBE = textwrap.dedent(
    """
    import asyncio, ctypes, importlib, mmap, pkgutil, secrets, sqlite3, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(77)
    try:  # the restriction holds: a writable executable mapping is refused
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        sys.exit("a W+X mapping was allowed: the restriction is not in force")
    except OSError:
        pass
    import nodeprov
    for info in pkgutil.walk_packages(nodeprov.__path__, "nodeprov."):
        importlib.import_module(info.name)
    from nodeprov.core import bdhke
    from nodeprov.protocol import nip44
    from nodeprov.protocol.nostr_event import public_key_of
    a, b = secrets.token_hex(32), secrets.token_hex(32)
    key = nip44.get_conversation_key(a, public_key_of(b))
    assert nip44.decrypt(nip44.encrypt("hello", key), key) == "hello"
    bdhke.blind(secrets.token_hex(16))
    sqlite3.connect(":memory:").execute("SELECT 1").fetchone()
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from nodeprov.http.server import bind, serve

    async def main():
        app = Starlette(routes=[Route("/", lambda r: PlainTextResponse("ok"))])
        sock = bind("127.0.0.1", 0)
        stop = asyncio.Event()
        server = asyncio.create_task(serve(app, sock, stop))
        port = sock.getsockname()[1]
        async with httpx.AsyncClient() as client:
            for _ in range(200):  # until the server is up; each try fails at once when not
                try:
                    answer = await client.get(f"http://127.0.0.1:{port}/")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
        stop.set()
        await server
        assert answer.text == "ok"

    asyncio.run(main())
    print("mdwe ok")
    """
)


def test_python_and_nodeprov_s_c_extensions_run_under_memory_deny_write_execute(
    tmp_path: Path,
) -> None:
    """The kernel's own W^X switch (prctl PR_SET_MDWE, what MemoryDenyWriteExecute= enforces),
    then every nodeprov module imported, the crypto, SQLite and the HTTP server used."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_MDWE is Linux only")
    probe = tmp_path / "probe.py"
    probe.write_text(MDWE_PROBE)
    result = subprocess.run(
        [sys.executable, str(probe)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    if result.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3 needed)")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mdwe ok" in result.stdout


def test_the_env_example_holds_placeholders_not_keys() -> None:
    values = env_file_values(ENV_EXAMPLE.read_text())
    keys = {k: v for k, v in values.items() if k.endswith("_API_KEY")}
    assert keys and all("replace-me" in v for v in keys.values())
