"""The README's upstream recipes are whole [[upstreams]] tables the config loader accepts."""

from __future__ import annotations

import re
import tomllib
from decimal import Decimal
from pathlib import Path

from nodeprov.config_load import build_config

ROOT = Path(__file__).resolve().parents[2]


def recipes() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Real models in minutes", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```toml\n(.*?)```", section, re.S)


def test_every_upstream_recipe_loads() -> None:
    blocks = recipes()
    names = set()
    for block in blocks:
        raw = tomllib.loads(block, parse_float=Decimal)
        raw["wallet"] = {"mints": ["http://127.0.0.1:3338"]}
        config = build_config(raw, ROOT, {"OPENAI_API_KEY": "k", "OPENROUTER_API_KEY": "k"})
        (upstream,) = config.upstreams
        assert upstream.base_url.endswith("/v1")
        names.add(upstream.name)
    assert names == {"ollama", "llamacpp", "vllm", "lmstudio", "openai", "openrouter"}
