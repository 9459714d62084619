"""The ``nodeprov`` CLI: help everywhere, one-line config errors, wallet views, init, run()."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from nodeprov.cli import EXAMPLE_CONFIG, main
from nodeprov.config_load import load_config
from nodeprov.core.node import Core
from nodeprov.daemon import run
from tests.support.tcp_proxy import dead_port

ROOT = Path(__file__).resolve().parents[2]
DEV_AND_CONFIG = (
    "give --dev or --config, not both: --dev runs the dev stack on config/dev.toml; change it"
    " with NODEPROV_* overrides (e.g. NODEPROV_HTTP__PORT=9000 nodeprov start --dev), or run"
    " your own config without --dev"
)


def closed_port() -> int:
    """A port nothing listens on, so mint calls fail fast. It stays bound (never listening)
    for the session: a port released at once could be taken by another server meanwhile."""
    return dead_port()


def write_config(tmp_path: Path, extra: str = "", mint: str | None = None) -> Path:
    mint = mint or f"http://127.0.0.1:{closed_port()}"
    path = tmp_path / "nodeprov.toml"
    path.write_text(
        f"""
[node]
data_dir = "{tmp_path / "data"}"

[wallet]
mints = ["{mint}"]

[[upstreams]]
name = "demo"
base_url = "http://127.0.0.1:8088/v1"
models = ["demo-chat"]

[models."demo-chat"]
input_per_1m_msat = 1000
{extra}
"""
    )
    return path


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.chdir(tmp_path)  # no ./nodeprov.toml of the developer's leaks in
    return CliRunner(env={"NODEPROV_CONFIG": None})


def invoke(runner: CliRunner, *args: str | Path) -> Result:
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def commands(group: click.Group = main, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every leaf command as its argument path, e.g. ("wallet", "audit")."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


# --- help --------------------------------------------------------------------------------


def test_every_command_has_help(runner: CliRunner) -> None:
    paths = [(), ("wallet",), *commands()]
    assert ("wallet", "audit") in paths and ("start",) in paths
    for path in paths:
        result = invoke(runner, *path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "Usage: " in result.output
        help_text = result.output.split("\n\n", 2)[1].strip()
        assert len(help_text) > 20, (path, result.output)


def test_readme_command_list_matches_help(runner: CliRunner) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `nodeprov ([a-z][a-z-]*(?: [a-z][a-z-]*)*)([^`]*)`", section, re.M)
    assert {tuple(name.split()) for name, _ in rows} == set(commands())
    for name, usage in rows:  # every option the README shows exists
        help_text = invoke(runner, *name.split(), "--help").output
        for option in re.findall(r"--[a-z-]+", usage):
            assert option in help_text, (name, option)


def test_init_help_names_the_nostr_key(runner: CliRunner) -> None:
    assert "Nostr key" in invoke(runner, "init", "--help").output


# --- configuration errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mint", "extra", "needle"),
    [
        (None, "[http]\nprot = 1", "unknown key 'http.prot' (did you mean 'http.port'?)"),
        ("ftp://mint", "", "wallet.mints[0]: 'ftp://mint' is not a valid http/https URL"),
    ],
)
@pytest.mark.parametrize("command", [("status",), ("wallet", "audit"), ("start",)])
def test_bad_config_is_one_line_exit_2(
    runner: CliRunner,
    tmp_path: Path,
    mint: str | None,
    extra: str,
    needle: str,
    command: tuple[str, ...],
) -> None:
    path = write_config(tmp_path, extra, mint=mint)
    result = invoke(runner, "--config", path, *command)
    assert result.exit_code == 2, result.output
    assert result.stderr == f"error: {needle}\n"
    assert result.stdout == ""


def test_missing_config_file(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "-c", tmp_path / "nope.toml", "status")
    assert result.exit_code == 2
    assert result.stderr == f"error: config file {tmp_path / 'nope.toml'} does not exist\n"


def test_no_config_at_all(runner: CliRunner) -> None:
    result = invoke(runner, "wallet", "balance")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no configuration") and result.stderr.count("\n") == 1


def test_config_from_env_variable(runner: CliRunner, tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = runner.invoke(main, ["status", "--json"], env={"NODEPROV_CONFIG": str(path)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["models"] == ["demo-chat"]


def test_config_accepted_after_the_subcommand(runner: CliRunner, tmp_path: Path) -> None:
    path = write_config(tmp_path)
    for args in (
        ("status", "-c", path, "--json"),
        ("status", "--config", path, "--json"),
        ("wallet", "-c", path, "balance", "--json"),
        ("wallet", "balance", "--json", "-c", path),
    ):
        result = invoke(runner, *args)
        assert result.exit_code == 0, (args, result.output)
        json.loads(result.stdout)
    missing = invoke(runner, "status", "-c", tmp_path / "nope.toml")
    assert missing.exit_code == 2
    assert missing.stderr == f"error: config file {tmp_path / 'nope.toml'} does not exist\n"


def test_every_node_command_takes_config_after_it(runner: CliRunner) -> None:
    for path in commands():
        if path[0] == "client":
            continue  # the user's side keeps its own wallet and reads no node config
        result = invoke(runner, *path, "--help")
        assert "-c, --config FILE" in result.stdout, path


def test_dev_and_config_together_refused(runner: CliRunner, tmp_path: Path) -> None:
    for args in (
        ("-c", write_config(tmp_path), "start", "--dev"),
        ("start", "--dev", "-c", write_config(tmp_path)),
    ):
        result = invoke(runner, *args)
        assert result.exit_code == 2
        assert result.stderr == f"error: {DEV_AND_CONFIG}\n"


# --- wallet and status on a fresh data_dir -------------------------------------------------


def test_fresh_node_audit_balance_status(runner: CliRunner, tmp_path: Path) -> None:
    mint = f"http://127.0.0.1:{closed_port()}"
    path = write_config(tmp_path, mint=mint)

    status = invoke(runner, "-c", path, "status", "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["ledger"] is None  # status does not create the ledger

    audit = invoke(runner, "-c", path, "wallet", "audit")
    assert audit.exit_code == 0, audit.output
    assert "books balance" in audit.stdout

    balance = invoke(runner, "-c", path, "wallet", "balance", "--json")
    assert balance.exit_code == 0, balance.output
    data = json.loads(balance.stdout)
    assert {(p["mint"], p["unit"], p["amount"]) for p in data["proofs"]} == {
        (mint, "sat", 0),
        (mint, "msat", 0),
    }
    assert data["books"] == {
        "accounts": {},
        "users_msat": 0,
        "held_msat": 0,
        "holds": 0,
        "operator_msat": 0,
        "pending_ops": 0,
        "failed_ops": 0,
        "failures": [],
    }
    ledger = json.loads(invoke(runner, "-c", path, "status", "--json").stdout)["ledger"]
    assert ledger["audit_ok"] is True and ledger["users_msat"] == 0


def test_audit_reports_unbalanced_books(runner: CliRunner, tmp_path: Path) -> None:
    path = write_config(tmp_path)
    assert invoke(runner, "-c", path, "wallet", "audit").exit_code == 0
    # Money that appears without a deposit: owed to a user, backed by no proofs, not logged.
    db = sqlite3.connect(load_config(path).ledger_path)
    with db:
        db.execute(
            "INSERT INTO accounts (id, kind, balance_msat, created_at) "
            "VALUES ('key:x', 'api_key', 5000, 0)"
        )
    db.close()
    result = invoke(runner, "-c", path, "wallet", "audit")
    assert result.exit_code == 1
    assert "MISMATCH" in result.stdout and "books do NOT balance" in result.stdout
    assert "assets 0 msat, owed 5000 msat" in result.stdout
    report = json.loads(invoke(runner, "-c", path, "wallet", "audit", "--json").stdout)
    assert report["ok"] is False and report["log_mismatches"] == ["balance != log for key:x"]


# --- init --------------------------------------------------------------------------------


def test_init_writes_and_refuses_to_overwrite(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "conf" / "node.toml"
    target.parent.mkdir()
    result = invoke(runner, "init", target)
    assert result.exit_code == 0, result.output
    assert target.read_bytes() == EXAMPLE_CONFIG.read_bytes()
    assert target.stat().st_mode & 0o077 == 0  # may hold API keys
    key = target.parent / "data" / "nostr.key"  # the example's data_dir, next to the config
    assert key.stat().st_mode & 0o777 == 0o600
    assert "Nostr identity npub1" in result.stdout

    target.write_text("# mine\n")
    again = invoke(runner, "init", target)
    assert again.exit_code == 1
    assert again.stderr == f"error: {target} already exists; not overwriting it\n"
    assert target.read_text() == "# mine\n"


def test_init_default_path(runner: CliRunner, tmp_path: Path) -> None:
    assert invoke(runner, "init").exit_code == 0
    assert (tmp_path / "nodeprov.toml").is_file()


# --- the daemon ----------------------------------------------------------------------------


async def test_run_builds_core_and_stops(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path), {})
    stop = asyncio.Event()
    seen: list[Core] = []

    def ready(core: Core) -> None:
        seen.append(core)
        stop.set()

    await asyncio.wait_for(run(config, stop, on_ready=ready, handle_signals=False), 10)
    assert seen and seen[0].rates is None  # msat prices need no exchange rates
    assert config.ledger_path.is_file()


async def test_crashing_service_stops_daemon_with_its_error(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path), {})

    async def broken(core: Core, stop: asyncio.Event) -> None:
        raise RuntimeError("boom")

    async def polite(core: Core, stop: asyncio.Event) -> None:
        await stop.wait()

    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.wait_for(
            run(config, asyncio.Event(), services=(broken, polite), handle_signals=False), 10
        )


def test_port_in_use_is_one_line_naming_the_address(runner: CliRunner, tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        path = write_config(tmp_path, extra=f"\n[http]\nport = {port}\n")
        result = invoke(runner, "start", "-c", path)
    finally:
        taken.close()
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert "address already in use" in result.stderr and "http.port" in result.stderr
    assert "running" not in result.stdout  # refused before the banner, the ledger, a password
    assert not (tmp_path / "data" / "ledger.sqlite3").exists()


def test_example_placeholders_refused_before_serving_or_announcing(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = write_config(tmp_path, mint="https://mint.example.com")
    for command in ("start", "announce"):
        result = invoke(runner, command, "-c", path)
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            "error: wallet.mints[0] = 'https://mint.example.com' is a placeholder from the"
            " example config; put your own value there (or remove it)\n"
        )
        assert not (tmp_path / "data" / "ledger.sqlite3").exists()
    assert invoke(runner, "status", "-c", path).exit_code == 0  # read-only views still work


def test_init_config_refused_until_its_placeholders_are_replaced(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = tmp_path / "fresh.toml"
    assert invoke(runner, "init", path).exit_code == 0
    result = runner.invoke(main, ["start", "-c", str(path)], env={"OPENAI_API_KEY": "sk-test"})
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert "wallet.mints[0] = 'https://mint.example.com'" in result.stderr
    assert "node.http_url = 'https://llm.example.com'" in result.stderr


def test_read_only_commands_need_no_upstream_secrets(runner: CliRunner, tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        extra=(
            '\n[[upstreams]]\nname = "paid"\nbase_url = "https://api.openai.com/v1"\n'
            'api_key_env = "NODEPROV_TEST_UNSET_KEY"\nmodels = ["demo-chat"]\n'
        ),
    )
    for args in (("status",), ("wallet", "balance"), ("wallet", "audit"), ("keys", "list")):
        result = invoke(runner, *args, "-c", path)
        assert result.exit_code == 0, (args, result.output)
    served = invoke(runner, "start", "-c", path)
    assert served.exit_code == 2
    assert "environment variable 'NODEPROV_TEST_UNSET_KEY' is not set" in served.stderr


def test_in_the_repo_operator_commands_find_the_dev_config(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    result = invoke(runner, "status", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == load_config(ROOT / "config" / "dev.toml").node.name
    assert result.stderr == "note: using the dev node's config/dev.toml (-c FILE for another)\n"
    start = invoke(runner, "start")  # serving is never guessed
    assert start.exit_code == 2
    assert "no configuration" in start.stderr and "nodeprov start --dev" in start.stderr


def test_outside_the_repo_no_config_is_still_an_error(runner: CliRunner) -> None:
    result = invoke(runner, "status")
    assert result.exit_code == 2 and result.stderr.startswith("error: no configuration")


def test_every_model_the_dev_upstream_lists_is_priced_in_dev_toml() -> None:
    from nodeprov.devstack.demo_upstream import DemoUpstream

    config = load_config(ROOT / "config" / "dev.toml")
    (upstream,) = config.upstreams
    assert set(DemoUpstream(upstream.models).models) == set(upstream.models) == set(config.models)


def test_the_example_config_ships_inside_the_package() -> None:
    import tomllib

    package = ROOT / "nodeprov"
    assert package / "nodeprov.example.toml" == EXAMPLE_CONFIG and EXAMPLE_CONFIG.is_file()
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "nodeprov.example.toml" in data["package-data"]["nodeprov"]
    # The checkout's config/ shows the same file.
    assert (ROOT / "config" / "nodeprov.example.toml").resolve() == EXAMPLE_CONFIG
