"""``nodeprov models import`` against a real HTTP upstream serving an OpenRouter-shaped list."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodeprov.cli import main
from nodeprov.config_load import load_config
from tests.support.fake_upstream import FakeUpstream

LISTING = [
    {
        "id": "anthropic/claude-sonnet-4",
        "context_length": 200000,
        "pricing": {"prompt": "0.000003", "completion": "0.000015"},
        "top_provider": {"max_completion_tokens": 64000},
    },
    {
        "id": "openai/gpt-4o-mini",
        "context_length": 128000,
        "pricing": {"prompt": "0.00000015", "completion": "0.0000006"},
    },
    {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
]


@pytest.fixture(scope="module")
def openrouter() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key="sk-or-test", model_list=LISTING) as upstream:
        yield upstream


def write_config(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "nodeprov.toml"
    path.write_text(
        f"""[node]
data_dir = "{tmp_path / "data"}"

[wallet]
mints = ["http://127.0.0.1:1"]

[pricing]
btc_usd_fallback = 100000

[[upstreams]]
name = "openrouter"
base_url = "{base_url}"
api_key_env = "OPENROUTER_API_KEY"
models = ["openai/gpt-4o-mini"]

[models."openai/gpt-4o-mini"]
input_per_1m_msat = 1000
"""
    )
    os.chmod(path, 0o600)
    return path


def run(*args: str) -> tuple[int, str, str]:
    runner = CliRunner(env={"OPENROUTER_API_KEY": "sk-or-test", "NODEPROV_CONFIG": None})
    result = runner.invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_import_prints_priced_tables_with_markup(tmp_path: Path, openrouter: FakeUpstream) -> None:
    path = write_config(tmp_path, openrouter.url)
    code, out, err = run("models", "import", "--upstream", "openrouter", "--markup", "1.2",
                         "-c", str(path))  # fmt: skip
    assert code == 0, err
    assert '[models."anthropic/claude-sonnet-4"]\ninput_per_1m_usd = 3.6\n' in out
    assert "output_per_1m_usd = 18\ncontext_tokens = 200000\nmax_output_tokens = 64000\n" in out
    assert "gpt-4o-mini" not in out  # already priced: left alone
    assert "skipped 1: already priced in the config: openai/gpt-4o-mini" in err
    assert "skipped 1: its price is variable or unreadable: openrouter/auto" in err
    assert "set discover_models = true" in err
    assert openrouter.requests[-1].path == "/v1/models"  # with the node's key, or a 401


def test_import_write_appends_tables_that_load(tmp_path: Path, openrouter: FakeUpstream) -> None:
    path = write_config(tmp_path, openrouter.url)
    before = path.read_text()
    code, out, err = run("models", "import", "--upstream", "openrouter", "--write",
                         "-c", str(path))  # fmt: skip
    assert code == 0, err
    assert out == "" and f"wrote 1 model(s) to {path}" in err
    text = path.read_text()
    assert text.startswith(before)  # appended: the operator's own lines and comments kept
    assert path.stat().st_mode & 0o777 == 0o600
    config = load_config(path, {"OPENROUTER_API_KEY": "k"})
    assert set(config.models) == {"openai/gpt-4o-mini", "anthropic/claude-sonnet-4"}
    again = run("models", "import", "--upstream", "openrouter", "--write", "-c", str(path))
    assert again[0] == 0 and "wrote 0 model(s)" in again[2]  # nothing twice


def test_unknown_upstream_and_unreachable_upstream_are_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "http://127.0.0.1:1/v1")
    code, _, err = run("models", "import", "--upstream", "nope", "-c", str(path))
    assert code == 2 and err == "error: no upstream named 'nope' (the config has: openrouter)\n"
    code, _, err = run("models", "import", "--upstream", "openrouter", "-c", str(path))
    assert code == 1 and err.startswith("error: upstream openrouter is unreachable")
    assert err.count("\n") == 1
