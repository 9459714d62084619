"""nodeprov.config: the example and dev files load, bad configs name their key, env overrides."""

from __future__ import annotations

import dataclasses
import re
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from nodeprov.config import Config, HttpSection, ModelPrice, RateSource, Upstream
from nodeprov.config_load import MODEL_KEYS, RANGES, SECTIONS, load_config
from nodeprov.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "nodeprov.example.toml"
DEV = ROOT / "config" / "dev.toml"
EXAMPLE_ENV = {"OPENAI_API_KEY": "sk-test"}

MINIMAL = """
[wallet]
mints = ["http://127.0.0.1:3338"]

[[upstreams]]
name = "demo"
base_url = "http://127.0.0.1:8088/v1"
models = ["demo-chat"]

[models."demo-chat"]
input_per_1m_msat = 1000
output_per_1m_msat = 2000
"""


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None, **kw: Any) -> Config:
    path = tmp_path / "nodeprov.toml"
    path.write_text(text)
    return load_config(path, env or {}, **kw)


def fails(tmp_path: Path, text: str, *needles: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, env)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


# --- the shipped files -----------------------------------------------------------------


def test_example_loads_and_validates() -> None:
    config = load_config(EXAMPLE, EXAMPLE_ENV)
    assert [u.name for u in config.upstreams] == ["openai", "local"]
    assert config.upstreams[0].api_key == "sk-test"
    assert config.upstreams[0].aliases == {"gpt-mini": "gpt-4o-mini"}
    usd = config.models["gpt-4o-mini"]
    assert usd.input_per_1m is not None and usd.input_per_1m.currency == "usd"
    assert usd.input_per_1m.amount == Fraction(15, 100)
    msat = config.models["llama-3.1-8b"]
    assert msat.output_per_1m is not None and msat.output_per_1m.currency == "msat"
    assert msat.image["1024x1024/hd"].amount == 40000
    assert config.pricing.fee_multiplier == Fraction(11, 10)
    assert config.pricing.btc_usd_sources[1] == RateSource(
        "https://api.coinbase.com/v2/prices/BTC-USD/spot", "data.amount"
    )


def _documented_keys() -> set[str]:
    keys = set(re.findall(r"^\s*#?\s*([a-z_0-9]+)\s*=", EXAMPLE.read_text(), re.MULTILINE))
    tables = set(re.findall(r"^\[+([a-z_.]+)\]+", EXAMPLE.read_text(), re.MULTILINE))
    return keys | tables | {t.rsplit(".", 1)[-1] for t in tables}


def test_example_documents_every_field() -> None:
    documented = _documented_keys()
    expected: set[str] = set(SECTIONS) | {"upstreams", "pricing.btc_usd_sources", "api_key_env"}
    for cls in (*SECTIONS.values(), Upstream, RateSource):
        expected |= {f.name for f in dataclasses.fields(cls)}
    expected |= set(MODEL_KEYS)
    assert {f.name for f in dataclasses.fields(Config)} <= expected | {"models"}
    assert expected - documented == set()


def test_configuration_doc_names_every_field() -> None:
    """docs/configuration.md has a row for every setting of every section."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    named = set(re.findall(r"`([a-z_0-9]+)`", doc))
    missing = {
        f.name
        for cls in (*SECTIONS.values(), Upstream)
        for f in dataclasses.fields(cls)
        if f.name not in named
    }
    assert missing == set()


def test_example_first_occurrence_has_comment() -> None:
    seen: set[str] = set()
    for line in EXAMPLE.read_text().splitlines():
        match = re.match(r"^([a-z_0-9]+)\s*=", line)
        if match and match.group(1) not in seen:
            seen.add(match.group(1))
            assert "#" in line, f"option without a comment: {line}"


def test_http_numbers_have_the_same_default_and_range_in_code_example_and_docs() -> None:
    """Each [http] number: config.py's default is the example's value and its "default N",
    the docs' default column, and both state the range config_load enforces."""
    example = EXAMPLE.read_text()
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for field in dataclasses.fields(HttpSection):
        if type(field.default) is not int or field.name == "port":  # port: a row with host
            continue
        name, default = field.name, field.default
        line = re.search(rf"^{name} = (\d+) +#(.*)$", example, re.MULTILINE)
        assert line is not None, f"{name} missing from the example"
        assert int(line.group(1)) == default, name
        assert f"default {default}" in line.group(2), name
        row = re.search(rf"^\| `{name}` \| (\d+) \|(.*)\|$", doc, re.MULTILINE)
        assert row is not None, f"{name} missing from docs/configuration.md"
        assert int(row.group(1)) == default, name
        lo, hi, _ = RANGES[(HttpSection, name)]
        if hi < 100_000:  # (sizes in bytes are written in KiB/MiB)
            assert f"({lo}..{hi})" in line.group(2) and f"({lo}..{hi})" in row.group(2), name


def test_keepalive_timeout_outlives_client_pools_and_is_configurable(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL).http.keepalive_timeout_seconds == 75
    config = load(tmp_path, MINIMAL + "\n[http]\nkeepalive_timeout_seconds = 120\n")
    assert config.http.keepalive_timeout_seconds == 120
    env = {"NODEPROV_HTTP__KEEPALIVE_TIMEOUT_SECONDS": "30"}
    assert load(tmp_path, MINIMAL, env).http.keepalive_timeout_seconds == 30
    fails(tmp_path, MINIMAL + "\n[http]\nkeepalive_timeout_seconds = 0\n", "keepalive")


def test_dev_config_loads() -> None:
    config = load_config(DEV, {})
    assert config.wallet.mints == ("http://127.0.0.1:3338",)
    assert config.nostr.relays == ("ws://127.0.0.1:7777",)
    assert config.upstreams[0].base_url == "http://127.0.0.1:8088/v1"
    price = config.models["demo-chat"]
    assert price.input_per_1m is not None and price.input_per_1m.currency == "msat"
    assert config.node.data_dir == (DEV.parent / "data" / "dev").resolve()


def test_minimal_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    assert config.http.port == 8000
    assert config.wallet.units == ("sat", "msat")
    assert config.admin.password_hash == ""
    assert config.payouts.lightning_address == ""
    assert config.ledger_path == tmp_path.resolve() / "data" / "ledger.sqlite3"
    assert config.nostr_key_path == tmp_path.resolve() / "data" / "nostr.key"


def test_no_float_in_rates_or_fees() -> None:
    config = load_config(EXAMPLE, EXAMPLE_ENV)
    for price in config.models.values():
        for rate in price.rates():
            assert type(rate.amount) is Fraction
    assert type(config.pricing.fee_multiplier) is Fraction
    assert type(config.pricing.btc_usd_fallback) is Decimal
    assert type(config.upstreams[0].timeout_seconds) is Decimal


def test_objects_are_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.http.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node = config.node  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.models["x"] = ModelPrice()  # type: ignore[index]
    assert isinstance(config.upstreams, tuple) and isinstance(config.wallet.mints, tuple)


def test_relative_data_dir_resolves_against_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    config = load(sub, MINIMAL + '\n[node]\ndata_dir = "../state"\n')
    assert config.node.data_dir == tmp_path.resolve() / "state"
    config = load(sub, MINIMAL + f'\n[node]\ndata_dir = "{tmp_path}/abs"\n')
    assert config.node.data_dir == tmp_path / "abs"


# --- bad configs: each names its key ---------------------------------------------------

BAD = [
    ("[htpp]\nport = 1\n", ["unknown key 'htpp'", "did you mean 'http'"]),
    ("[http]\nprot = 1\n", ["unknown key 'http.prot'", "'http.port'"]),
    ('[http]\nport = "80"\n', ["http.port", "whole number"]),
    ("[http]\nport = 70000\n", ["http.port", "65535"]),
    ("[http]\nport = -1\n", ["http.port"]),
    ("[http]\nmax_body_bytes = 0\n", ["http.max_body_bytes"]),
    ("[http]\nheader_timeout_seconds = 0\n", ["http.header_timeout_seconds"]),
    ("[http]\nbody_idle_timeout_seconds = 0\n", ["http.body_idle_timeout_seconds"]),
    ("[http]\nbody_timeout_seconds = 0\n", ["http.body_timeout_seconds"]),
    ("[http]\nmax_header_bytes = 100\n", ["http.max_header_bytes"]),
    ('[http]\nforwarded_allow_ips = ["proxy.local"]\n', ["http.forwarded_allow_ips[0]"]),
    ('[node]\nhttp_url = "ftp://x"\n', ["node.http_url", "URL"]),
    ('[node]\nhttp_url = "not a url"\n', ["node.http_url"]),
    ('[nostr]\nrelays = ["https://relay"]\n', ["nostr.relays[0]", "ws"]),
    ("[pricing]\nfee_multiplier = 0\n", ["pricing.fee_multiplier"]),
    ("[pricing]\nfee_multiplier = 1000\n", ["pricing.fee_multiplier"]),
    ("[pricing]\nfee_multiplier = nan\n", ["pricing.fee_multiplier", "finite"]),
    ("[pricing]\nbtc_usd_fallback = -1\n", ["pricing.btc_usd_fallback"]),
    ("[pricing]\nbtc_usd_max_age_seconds = 0\n", ["pricing.btc_usd_max_age_seconds"]),
    ('[[pricing.btc_usd_sources]]\nurl = "https://x.example"\n', ["btc_usd_sources[0].path"]),
    ("[wallet]\nmint_timeout_seconds = 0\n", ["wallet.mint_timeout_seconds"]),
    ('[wallet]\nunits = ["usd"]\n', ["wallet.units[0]", "'sat'"]),
    ('[wallet]\nunits = ["sat", "sat"]\n', ["wallet.units[1]", "twice"]),
    ("[wallet]\nunits = []\n", ["wallet.units"]),
    ("[wallet]\nlightning_max_sat = 0\n", ["wallet.lightning_max_sat"]),
    ("[wallet]\nlightning_max_sat = 4611686018427387904\n", ["wallet.lightning_max_sat"]),
    ("[wallet]\nlightning_max_open_quotes = 0\n", ["wallet.lightning_max_open_quotes"]),
    ("[ledger]\nhold_timeout_seconds = -5\n", ["ledger.hold_timeout_seconds"]),
    ('[admin]\npassword_hash = "hunter2"\n', ["admin.password_hash"]),
    ('[payouts]\nlightning_address = "nobody"\n', ["payouts.lightning_address"]),
    ("[payouts]\nthreshold_msat = 0\n", ["payouts.threshold_msat"]),
    ('[nostr]\ndefault_model = "nope"\n', ["nostr.default_model"]),
    ("[nostr]\nmax_concurrent_jobs_per_sender = 0\n", ["max_concurrent_jobs_per_sender"]),
    ('[models."demo-chat"]\nrequest_msat = -1\n', ["models.demo-chat.request_msat", "negative"]),
    ('[models."demo-chat"]\nrequest_msat = 1.5\n', ["models.demo-chat.request_msat", "whole"]),
    ('[models."demo-chat"]\ninput_per_1m = 1\n', ["models.demo-chat.input_per_1m", "did you mean"]),
    ('[models."demo-chat"]\nrequest_msat = 1\nrequest_usd = 1\n', ["request_usd", "not both"]),
    ('[models."demo-chat"]\nrequest_usd = 0.01\n', ["btc_usd_sources", "models.demo-chat"]),
    ('[models."demo-chat"]\nrequest_usd = "1"\n', ["models.demo-chat.request_usd", "number"]),
    (
        '[models."demo-chat"]\ncontext_tokens = 100\nmax_output_tokens = 200\n',
        ["models.demo-chat.max_output_tokens", "context_tokens"],
    ),
    ('[models."demo-chat"]\ncontext_tokens = 0\n', ["models.demo-chat.context_tokens"]),
]


@pytest.mark.parametrize(("extra", "needles"), BAD, ids=[n[0] for _, n in BAD])
def test_bad_config_names_key(tmp_path: Path, extra: str, needles: list[str]) -> None:
    fails(tmp_path, _merge(MINIMAL, extra), *needles)


def _merge(base: str, extra: str) -> str:
    """Append ``extra``; a table already in ``base`` gets its keys added instead."""
    header = extra.splitlines()[0]
    if header.startswith("[[") or header not in base:
        return base + "\n" + extra
    return base.replace(header + "\n", extra, 1)


def test_no_upstream(tmp_path: Path) -> None:
    text = '[wallet]\nmints = ["http://127.0.0.1:3338"]\n'
    fails(tmp_path, text, "upstreams", "required")
    assert load(tmp_path, text, require_upstream=False).upstreams == ()


def test_no_mint(tmp_path: Path) -> None:
    fails(tmp_path, MINIMAL.replace('mints = ["http://127.0.0.1:3338"]', ""), "wallet.mints")


def test_bad_mint_url(tmp_path: Path) -> None:
    fails(tmp_path, MINIMAL.replace("http://127.0.0.1:3338", "127.0.0.1:3338"), "wallet.mints[0]")
    fails(tmp_path, MINIMAL.replace("3338", "3338/"), "wallet.mints[0]")


def test_duplicate_upstream_name(tmp_path: Path) -> None:
    second = '[[upstreams]]\nname = "demo"\nbase_url = "http://127.0.0.1:9/v1"\nmodels = []\n'
    second += "discover_models = true\n"
    fails(tmp_path, MINIMAL + second, "upstreams[1].name", "'demo'")


def test_upstream_model_without_price(tmp_path: Path) -> None:
    text = MINIMAL.replace('models = ["demo-chat"]', 'models = ["demo-chat", "gpt-9"]')
    fails(tmp_path, text, "upstreams[0].models", "'gpt-9'", "no price")


def test_upstream_bad_url_missing_name_and_timeout(tmp_path: Path) -> None:
    fails(tmp_path, MINIMAL.replace("http://127.0.0.1:8088/v1", "localhost"), "base_url")
    fails(tmp_path, MINIMAL.replace('name = "demo"\n', ""), "upstreams[0].name", "required")
    text = MINIMAL.replace('models = ["demo-chat"]', 'models = ["demo-chat"]\ntimeout_seconds = 0')
    fails(tmp_path, text, "upstreams[0].timeout_seconds")
    fails(tmp_path, MINIMAL.replace("models = [", "modles = ["), "upstreams[0].modles", "models")


def test_upstream_alias_checks(tmp_path: Path) -> None:
    text = MINIMAL.replace('models = ["demo-chat"]', 'models = ["demo-chat"]\naliases = {a = "b"}')
    fails(tmp_path, text, "upstreams[0].aliases.a", "no price")
    text = MINIMAL.replace('models = ["demo-chat"]', 'models = ["demo-chat"]\naliases = {a = 1}')
    fails(tmp_path, text, "upstreams[0].aliases")


def test_api_key_env(tmp_path: Path) -> None:
    text = MINIMAL.replace('name = "demo"', 'name = "demo"\napi_key_env = "DEMO_KEY"')
    fails(tmp_path, text, "upstreams[0].api_key_env", "DEMO_KEY")
    assert load(tmp_path, text, {"DEMO_KEY": "sk-1"}).upstreams[0].api_key == "sk-1"


def test_usd_prices_with_fallback_or_source(tmp_path: Path) -> None:
    text = _merge(MINIMAL, '[models."demo-chat"]\nrequest_usd = 0.01\n')
    fails(tmp_path, text, "btc_usd")
    config = load(tmp_path, text + "\n[pricing]\nbtc_usd_fallback = 65000.5\n")
    assert config.pricing.btc_usd_fallback == Decimal("65000.5")
    source = '[[pricing.btc_usd_sources]]\nurl = "https://x.example/p"\npath = "price"\n'
    assert load(tmp_path, text + source).pricing.btc_usd_sources[0].path == "price"
    slow = "[pricing]\nbtc_usd_refresh_seconds = 4000\n" + source
    fails(tmp_path, text + slow, "pricing.btc_usd_refresh_seconds")


def test_missing_and_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", {})
    fails(tmp_path, "[http\nport = 1", "not valid TOML")


# --- environment overrides -------------------------------------------------------------


def test_env_overrides(tmp_path: Path) -> None:
    env = {
        "NODEPROV_HTTP__PORT": "9000",
        "NODEPROV_WALLET__MINTS": '["https://a.example", "https://b.example"]',
        "NODEPROV_NODE__NAME": "my node",
        "NODEPROV_PRICING__FEE_MULTIPLIER": "1.25",
        "NODEPROV_PRICING__BTC_USD_FALLBACK": "70000.5",
        "NODEPROV_NOSTR__ACCEPT_NIP04": "false",
        "NODEPROV_UPSTREAMS__0__API_KEY": "12345",  # digits, yet a string key: stays text
        "NODEPROV_MODELS__DEMO-CHAT__REQUEST_MSAT": "7",
        "NODEPROV_CONFIG": "ignored.toml",
        "OTHER": "x",
    }
    config = load(tmp_path, MINIMAL, env)
    assert config.http.port == 9000
    assert config.wallet.mints == ("https://a.example", "https://b.example")
    assert config.node.name == "my node"
    assert config.pricing.fee_multiplier == Fraction(5, 4)
    assert type(config.pricing.fee_multiplier) is Fraction
    assert config.pricing.btc_usd_fallback == Decimal("70000.5")
    assert config.nostr.accept_nip04 is False
    assert config.upstreams[0].api_key == "12345"
    request = config.models["demo-chat"].request
    assert request is not None and request.amount == 7


def test_env_without_file() -> None:
    env = {
        "NODEPROV_WALLET__MINTS": '["http://127.0.0.1:3338"]',
        "NODEPROV_UPSTREAMS": '[{name = "x", base_url = "http://127.0.0.1:1/v1", models = ["m"]}]',
        "NODEPROV_UPSTREAMS__0__API_KEY": "sk-env",
        "NODEPROV_MODELS__M__REQUEST_MSAT": "5",
    }
    config = load_config(None, env)
    assert config.upstreams[0].name == "x" and config.upstreams[0].api_key == "sk-env"
    assert config.node.data_dir == (Path.cwd() / "data").resolve()


def test_env_errors_name_variable(tmp_path: Path) -> None:
    message = fails(tmp_path, MINIMAL, "http.port", env={"NODEPROV_HTTP__PORT": "abc"})
    assert "NODEPROV_HTTP__PORT" in message
    fails(tmp_path, MINIMAL, "unknown key 'htp'", env={"NODEPROV_HTP__PORT": "1"})
    env = {"NODEPROV_UPSTREAMS__3__API_KEY": "x"}
    fails(tmp_path, MINIMAL, "NODEPROV_UPSTREAMS__3__API_KEY", env=env)
    fails(tmp_path, MINIMAL, "NODEPROV_HTTP__PORT__X", env={"NODEPROV_HTTP__PORT__X": "1"})


def test_a_lease_shorter_than_the_upstream_timeout_is_accepted(tmp_path: Path) -> None:
    """Running jobs renew their hold's lease, so the lease need not outlast an upstream call."""
    assert load(tmp_path, MINIMAL).ledger.hold_timeout_seconds == 120
    config = load(tmp_path, _merge(MINIMAL, "[ledger]\nhold_timeout_seconds = 30\n"))
    assert config.ledger.hold_timeout_seconds == 30
    assert all(up.timeout_seconds > 30 for up in config.upstreams)
