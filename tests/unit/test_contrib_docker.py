"""contrib/docker: the Dockerfile and compose file, checked by parsing (no image is built here).

There is no Docker daemon and no registry for base images on the machines the tests run on,
so these tests read the files as Docker would and check what they refer to; the HEALTHCHECK
command itself is run against a local server.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from click.testing import CliRunner

from nodeprov.cli import main
from nodeprov.config import Config, LedgerSection
from nodeprov.config_load import load_config
from nodeprov.daemon import SHUTDOWN_GRACE_SECONDS
from tests.support.contrib import CONTRIB, MINIMAL_CONFIG, ROOT, env_file_values
from tests.support.services import free_port
from tests.support.tcp_proxy import dead_url

DOCKER = CONTRIB / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = CONTRIB / "systemd" / "nodeprov.env.example"
INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile: continuations joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, args = (pending + line).partition(" ")
        result.append((word.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def args_of(name: str) -> list[str]:
    return [args for word, args in instructions() if word == name]


def json_form(args: str) -> list[str]:
    """An exec-form (JSON array) argument list; Docker would run anything else through sh."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of("ENV"):
        for pair in shlex.split(args):
            key, sep, value = pair.partition("=")
            assert sep, f"ENV {args!r}: use KEY=value"
            env[key] = value
    return env


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def node_service() -> dict[str, Any]:
    service = compose()["services"]["node"]
    assert isinstance(service, dict)
    return service


def build_context() -> Path:
    return (DOCKER / node_service()["build"]["context"]).resolve()


def test_dockerfile_has_only_valid_instructions_from_python_3_11_slim() -> None:
    found = instructions()
    assert {word for word, _ in found} <= INSTRUCTIONS
    assert found[0] == ("FROM", "python:3.11-slim")
    for name in ("CMD", "ENTRYPOINT", "VOLUME"):
        for args in args_of(name):
            json_form(args)


def test_dockerfile_runs_the_node_as_a_user_that_is_not_root() -> None:
    found = instructions()
    users = [i for i, (word, _) in enumerate(found) if word == "USER"]
    assert users, "no USER: the container would run as root"
    user = found[users[-1]][1].split(":")[0]
    assert user not in ("root", "0")
    runs = [i for i, (word, _) in enumerate(found) if word == "RUN"]
    assert max(runs) < users[-1], "a RUN after USER: the image build needs root for it"
    assert any("--uid 10001" in args and user in args for args in args_of("RUN"))


def test_dockerfile_copies_paths_that_exist_and_all_the_package_build_reads() -> None:
    context = build_context()
    assert context == ROOT
    sources: set[str] = set()
    for args in args_of("COPY"):
        *srcs, _dest = shlex.split(args)
        for src in srcs:
            assert not src.startswith("--"), f"COPY {args}: no flags expected"
            assert (context / src).exists(), f"COPY {src}: not in the build context"
            sources.add(src.rstrip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"pyproject.toml", project["project"]["readme"], "nodeprov"} <= sources
    # The ignore file next to the Dockerfile must let every copied path through.
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore and all(f"!{s}" in ignore or f"!{s}/" in ignore for s in sources)


def test_dockerfile_environment_makes_any_config_use_the_volume_and_exposed_port(
    tmp_path: Path,
) -> None:
    env = image_env()
    (volume,) = json_form(args_of("VOLUME")[0])
    (exposed,) = args_of("EXPOSE")
    path = tmp_path / "nodeprov.toml"
    path.write_text(MINIMAL_CONFIG + '[http]\nhost = "127.0.0.1"\nport = 9999\n')
    secrets = env_file_values(ENV_EXAMPLE.read_text())
    config = load_config(path, {**secrets, **env})
    assert config.node.data_dir == Path(volume)
    assert config.http.port == int(exposed)
    assert config.http.host == "0.0.0.0"  # published ports reach only a process on all addresses


def test_dockerfile_entrypoint_is_a_command_line_nodeprov_accepts() -> None:
    (entrypoint,) = args_of("ENTRYPOINT")
    (cmd,) = args_of("CMD")
    argv = json_form(entrypoint) + json_form(cmd)
    assert argv == ["nodeprov", "start"]
    assert image_env()["NODEPROV_CONFIG"] == "/etc/nodeprov/nodeprov.toml"
    result = CliRunner().invoke(main, [*argv[1:], "--help"], prog_name="nodeprov")
    assert result.exit_code == 0 and "Usage: nodeprov start" in result.output


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_healthcheck(port: int) -> int:
    (args,) = args_of("HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    assert "--timeout" in options and "--interval" in options
    argv = json_form(command)
    assert argv[0] == "python"
    env = {**os.environ, "NODEPROV_HTTP__PORT": str(port)}
    return subprocess.run([sys.executable, *argv[1:]], env=env, timeout=60).returncode


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_passes_only_when_health_answers_200(
    health_server: http.server.HTTPServer, status: int, healthy: bool
) -> None:
    _Health.status = status
    try:
        code = run_healthcheck(health_server.server_address[1])
    finally:
        _Health.status = 200
    assert (code == 0) is healthy


def test_healthcheck_fails_when_nothing_answers() -> None:
    assert run_healthcheck(free_port()) != 0


def test_compose_builds_this_dockerfile_and_mounts_what_the_image_expects() -> None:
    service = node_service()
    assert (build_context() / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    env = image_env()
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert mounts[env["NODEPROV_CONFIG"]] == "./nodeprov.toml"
    (volume,) = json_form(args_of("VOLUME")[0])
    assert mounts[volume] in compose()["volumes"], "the data volume must be a named volume"
    (exposed,) = args_of("EXPOSE")
    (published,) = service["ports"]
    host, _, container_port = published.split(":")
    assert container_port == exposed and host == "127.0.0.1"  # the TLS proxy is the way in
    assert service["env_file"][0]["path"] == "./nodeprov.env"


def test_compose_gives_streams_time_to_finish_before_the_container_is_killed() -> None:
    grace = node_service()["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) >= 2 * SHUTDOWN_GRACE_SECONDS
    assert args_of("STOPSIGNAL") == ["SIGTERM"]


def test_compose_runs_the_node_on_its_postgres_with_two_workers() -> None:
    services = compose()["services"]
    assert set(services) == {"node", "db"}
    node, db = services["node"], services["db"]
    url = node["environment"]["NODEPROV_LEDGER__URL"]
    assert Config(ledger=LedgerSection(url=url)).ledger_on_postgres
    parts, env = urlsplit(url), db["environment"]
    assert (parts.hostname, parts.username) == ("db", env["POSTGRES_USER"])
    assert parts.path == "/" + env["POSTGRES_DB"]
    assert node["command"][:3] == ["start", "--workers", "2"]
    assert node["depends_on"]["db"]["condition"] == "service_healthy"
    assert "ports" not in db  # only the node reaches the database
    assert any(m.endswith(":/var/lib/postgresql/data") for m in db["volumes"])
    # One password for both: the server's POSTGRES_PASSWORD, the client's PGPASSWORD.
    values = env_file_values((COMPOSE.parent / "db.env.example").read_text())
    assert values["POSTGRES_PASSWORD"] == values["PGPASSWORD"]
    assert [e["path"] for e in db["env_file"]] == ["./db.env"]
    assert "./db.env" in [e["path"] for e in node["env_file"]]


def test_the_image_command_serves_a_node_the_healthcheck_passes_and_sigterm_stops(
    tmp_path: Path,
) -> None:
    """The image's ENTRYPOINT + CMD with its ENV, run here (outside a container): only the
    data dir, the port and the address move into the test's own."""
    config = tmp_path / "nodeprov.toml"
    text = MINIMAL_CONFIG.replace("https://mint.nodeprov.test", dead_url())
    config.write_text(text.replace("https://api.openai.com/v1", dead_url() + "/v1"))
    port = free_port()
    env = {**os.environ, **image_env(), **env_file_values(ENV_EXAMPLE.read_text())}
    env.update(
        NODEPROV_CONFIG=str(config),
        NODEPROV_NODE__DATA_DIR=str(tmp_path / "data"),
        NODEPROV_HTTP__HOST="127.0.0.1",
        NODEPROV_HTTP__PORT=str(port),
    )
    (entrypoint,) = args_of("ENTRYPOINT")
    (cmd,) = args_of("CMD")
    argv = json_form(entrypoint) + json_form(cmd)
    argv[0] = str(Path(sys.executable).parent / argv[0])
    node = subprocess.Popen(
        argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    try:
        assert node.stdout is not None
        for line in node.stdout:  # until it serves (or ends: then the assert below says why)
            output.append(line)
            if "Stop with Ctrl+C" in line:
                break
        assert node.poll() is None, "".join(output)
        assert run_healthcheck(port) == 0
        node.send_signal(signal.SIGTERM)
        rest, _ = node.communicate(timeout=120)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    assert node.returncode == 0, "".join(output) + rest
    assert "nodeprov stopped." in rest
    assert (tmp_path / "data" / "ledger.sqlite3").is_file()
