"""contrib/proxy and contrib/tor: the examples pass their own tools' checks, keep streams
unbuffered, and the onion script fills node.onion_url through the environment override."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import stat
import subprocess
import sys
from pathlib import Path

from nodeprov.config import HttpSection, Upstream
from nodeprov.config_load import RANGES, load_config
from tests.support.contrib import CONTRIB, MINIMAL_CONFIG, env_file_values, self_signed, tool

NGINX = CONTRIB / "proxy" / "nginx.conf"
CADDY = CONTRIB / "proxy" / "Caddyfile"
TORRC = CONTRIB / "tor" / "torrc"
ONION_SCRIPT = CONTRIB / "tor" / "nodeprov-onion-url"
LONGEST_UPSTREAM_SECONDS = RANGES[Upstream, "timeout_seconds"][1]


def nginx_test(tmp_path: Path, site: str) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` of the site inside a minimal main config whose paths are all in tmp."""
    nginx = tool("nginx", "nginx-light")
    cert, key = self_signed(tmp_path)
    site = re.sub(r"/etc/letsencrypt/\S+/fullchain\.pem", str(cert), site)
    site = re.sub(r"/etc/letsencrypt/\S+/privkey\.pem", str(key), site)
    (tmp_path / "site.conf").write_text(site)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    http = [f"access_log {tmp_path}/access.log;", f"include {tmp_path}/site.conf;"]
    http += [f"{kind}_temp_path {tmp_path}/{kind};" for kind in kinds]
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        + "http {\n"
        + "".join(f"  {line}\n" for line in http)
        + "}\n"
    )
    argv = [nginx, "-t", "-q", "-p", str(tmp_path), "-e", f"{tmp_path}/error.log", "-c", str(main)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_nginx_example_passes_nginx_t(tmp_path: Path) -> None:
    result = nginx_test(tmp_path, NGINX.read_text())
    assert result.returncode == 0, result.stderr


def test_nginx_t_rejects_a_misspelt_directive_so_its_pass_means_something(tmp_path: Path) -> None:
    result = nginx_test(tmp_path, NGINX.read_text().replace("proxy_buffering", "proxy_bufering"))
    assert result.returncode != 0 and "proxy_bufering" in result.stderr


def locations(text: str) -> list[str]:
    """The bodies of the nginx example's ``location`` blocks that proxy to the node."""
    code = "\n".join(line.split("#")[0] for line in text.splitlines())
    bodies = re.findall(r"location\s+[^{]+\{([^{}]*)\}", code)
    return [b for b in bodies if "proxy_pass" in b]


def test_nginx_example_streams_unbuffered_and_forwards_the_client_address() -> None:
    proxied = locations(NGINX.read_text())
    assert len(proxied) == 2  # the TLS site and the onion listener
    for body in proxied:
        directives = dict(
            (parts[0], " ".join(parts[1:]))
            for line in body.split(";")
            if (parts := line.split()) and parts[0] != "proxy_set_header"
        )
        assert directives["proxy_buffering"] == "off"
        assert directives["proxy_cache"] == "off"
        assert directives["proxy_http_version"] == "1.1"
        # Never cut a stream the node's longest upstream timeout still allows.
        assert int(directives["proxy_read_timeout"].rstrip("s")) >= LONGEST_UPSTREAM_SECONDS
        # Replaced with the address nginx saw, never appended to what the client sent.
        assert "proxy_set_header X-Forwarded-For $remote_addr" in " ".join(body.split())


def node_config_in(text: str) -> str:
    """The node config an example shows in its comments (the lines after the example note)."""
    lines = [line.removeprefix("#   ") for line in text.splitlines() if line.startswith("#   ")]
    return "\n".join(lines)


def test_proxy_examples_show_a_node_config_that_believes_exactly_the_proxy(tmp_path: Path) -> None:
    for example in (NGINX, CADDY):
        # The operator puts their own name in place of the example's.
        shown = node_config_in(example.read_text()).replace("llm.example.com", "llm.nodeprov.test")
        path = tmp_path / f"{example.name}.toml"
        path.write_text(shown + "\n" + MINIMAL_CONFIG)
        config = load_config(path, {"OPENAI_API_KEY": "sk-x"})
        assert config.http.forwarded_allow_ips == ("127.0.0.1",)
        assert config.http.host == "127.0.0.1", "the node must not be reachable around the proxy"
        node_address = f"{config.http.host}:{config.http.port}"
        assert node_address in example.read_text(), f"{example.name} proxies elsewhere"
        assert config.node.http_url.startswith("https://"), shown


def test_proxy_keepalive_closes_before_the_node_s_does() -> None:
    node_keepalive = HttpSection().keepalive_timeout_seconds
    nginx = re.search(r"^\s*keepalive_timeout (\d+)s;", NGINX.read_text(), re.M)
    caddy = re.search(r"^\s*keepalive (\d+)s$", CADDY.read_text(), re.M)
    assert nginx and caddy
    assert int(nginx.group(1)) < node_keepalive and int(caddy.group(1)) < node_keepalive


def test_caddyfile_passes_caddy_validate(tmp_path: Path) -> None:
    caddy = tool("caddy", "caddy")
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    result = subprocess.run(
        [caddy, "validate", "--config", str(CADDY), "--adapter", "caddyfile"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


def test_caddyfile_flushes_streams_at_once_and_never_compresses_them() -> None:
    code = [line.split("#")[0].split() for line in CADDY.read_text().splitlines()]
    directives = [words for words in code if words]
    assert ["flush_interval", "-1"] in directives
    assert not any(words[0] == "encode" for words in directives)


def tor_config(tmp_path: Path, torrc: str) -> Path:
    """A main torrc in tmp that includes the recipe with its directory moved into tmp."""
    service_dir, data_dir = tmp_path / "hs", tmp_path / "data"
    for folder in (service_dir, data_dir):
        folder.mkdir(mode=0o700)
    (tmp_path / "recipe.torrc").write_text(
        torrc.replace("/var/lib/tor/nodeprov/", f"{service_dir}/")
    )
    main = tmp_path / "torrc"
    main.write_text(f"DataDirectory {data_dir}\nSocksPort 0\n%include {tmp_path}/recipe.torrc\n")
    return main


def tor_verify(tmp_path: Path, torrc: str) -> subprocess.CompletedProcess[str]:
    tor = tool("tor", "tor")
    argv = [tor, "--verify-config", "--defaults-torrc", os.devnull, "-f"]
    argv.append(str(tor_config(tmp_path, torrc)))
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_torrc_passes_tor_verify_config(tmp_path: Path) -> None:
    result = tor_verify(tmp_path, TORRC.read_text())
    assert result.returncode == 0, result.stdout
    assert "Configuration was valid" in result.stdout


def test_tor_verify_config_rejects_a_misspelt_option(tmp_path: Path) -> None:
    broken = TORRC.read_text().replace("HiddenServicePort", "HiddenServicePortt")
    assert tor_verify(tmp_path, broken).returncode != 0


def test_torrc_sends_the_onion_port_to_the_node_s_default_address() -> None:
    found = re.search(r"^HiddenServicePort (\d+) (\S+)$", TORRC.read_text(), re.M)
    assert found and found.group(1) == "80"
    http = HttpSection()
    assert found.group(2) == f"{http.host}:{http.port}"


def v3_onion(pubkey: bytes) -> str:
    version = b"\x03"
    checksum = hashlib.sha3_256(b".onion checksum" + pubkey + version).digest()[:2]
    return base64.b32encode(pubkey + checksum + version).decode().lower() + ".onion"


def run_onion_script(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(ONION_SCRIPT), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_onion_script_sets_the_override_that_becomes_node_onion_url(tmp_path: Path) -> None:
    host = v3_onion(secrets.token_bytes(32))
    (tmp_path / "hostname").write_text(host + "\n")
    env_file = tmp_path / "nodeprov.env"
    env_file.write_text("OPENAI_API_KEY=sk-x\nNODEPROV_NODE__ONION_URL=http://old.onion\n")
    env_file.chmod(0o600)
    result = run_onion_script(
        "--hostname-file", str(tmp_path / "hostname"), "--env-file", str(env_file)
    )
    assert result.returncode == 0, result.stderr
    values = env_file_values(env_file.read_text())
    assert values == {"OPENAI_API_KEY": "sk-x", "NODEPROV_NODE__ONION_URL": f"http://{host}"}
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    config_path = tmp_path / "nodeprov.toml"
    config_path.write_text(MINIMAL_CONFIG)
    config = load_config(config_path, values)
    assert config.node.onion_url == f"http://{host}"


def test_onion_script_prints_the_line_with_a_port_other_than_80(tmp_path: Path) -> None:
    host = v3_onion(secrets.token_bytes(32))
    (tmp_path / "hostname").write_text(host)
    result = run_onion_script(
        "--hostname-file", str(tmp_path / "hostname"), "--env-file", "-", "--port", "8000"
    )
    assert result.returncode == 0
    assert result.stdout == f"NODEPROV_NODE__ONION_URL=http://{host}:8000\n"


def test_onion_script_refuses_a_corrupt_address_and_leaves_the_env_file_alone(
    tmp_path: Path,
) -> None:
    host = v3_onion(secrets.token_bytes(32))
    corrupt = ("b" if host[0] != "b" else "c") + host[1:]  # one character off: bad checksum
    (tmp_path / "hostname").write_text(corrupt)
    env_file = tmp_path / "nodeprov.env"
    env_file.write_text("OPENAI_API_KEY=sk-x\n")
    result = run_onion_script(
        "--hostname-file", str(tmp_path / "hostname"), "--env-file", str(env_file)
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "checksum" in result.stderr
    assert env_file.read_text() == "OPENAI_API_KEY=sk-x\n"
