"""``nodeprov models import``: priced model tables from an upstream's ``/models`` list."""

from __future__ import annotations

import os
import tempfile
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import click
import httpx

from nodeprov.cli_common import DEFAULT_CONFIG, USAGE_EXIT, Options, fail, guarded, load
from nodeprov.config import Upstream
from nodeprov.config_load import load_config
from nodeprov.errors import ConfigError
from nodeprov.model_import import FlatRates, ImportResult, as_toml, price_models

FETCH_TIMEOUT = 30.0


@click.group()
def models() -> None:
    """The models the node sells: import them, priced, from an upstream."""


def _markup(_ctx: click.Context, _param: click.Parameter, value: str) -> Decimal:
    try:
        markup = Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"{value!r} is not a number") from None
    if not markup.is_finite() or markup <= 0:
        raise click.BadParameter("must be a number above 0 (1.2 = 20 % over the upstream)")
    return markup


@models.command(name="import")
@click.option("--upstream", "name", required=True, help="The [[upstreams]] entry to read.")
@click.option("--markup", default="1", show_default=True, callback=_markup,
              help="Multiply the upstream's USD prices by this (1.2: 20 % over cost).")  # fmt: skip
@click.option("--input-per-1m-msat", type=click.IntRange(min=0),
              help="Price per 1M prompt tokens for models listed without prices.")  # fmt: skip
@click.option("--output-per-1m-msat", type=click.IntRange(min=0),
              help="Price per 1M completion tokens for models listed without prices.")  # fmt: skip
@click.option("--request-msat", type=click.IntRange(min=0),
              help="Flat price per request for models listed without prices.")  # fmt: skip
@click.option("--write", is_flag=True,
              help="Append the tables to the config file (else print them).")  # fmt: skip
@click.pass_context
def import_models(
    ctx: click.Context, name: str, markup: Decimal, input_per_1m_msat: int | None,
    output_per_1m_msat: int | None, request_msat: int | None, write: bool,
) -> None:  # fmt: skip
    """Price every model NAME's GET /models lists, as [models."…"] tables.

    USD prices per token (as OpenRouter lists them) become *_usd rates per 1M tokens times
    --markup; models listed without prices (Ollama, llama.cpp, vLLM, LM Studio) get the msat
    rates given, or are skipped. Models the config already prices are left alone. Prints the
    tables, or with --write appends them to the config file (checked before it is replaced).
    """
    config = load(ctx)
    upstream = next((u for u in config.upstreams if u.name == name), None)
    if upstream is None:
        names = ", ".join(u.name for u in config.upstreams) or "none"
        fail(f"no upstream named {name!r} (the config has: {names})", USAGE_EXIT)
    listing = guarded(_fetch(upstream))
    flat = FlatRates(request_msat, input_per_1m_msat, output_per_1m_msat)
    try:
        result = price_models(listing, markup=markup, flat=flat, skip=config.models)
    except ValueError as exc:
        fail(f"upstream {name}: {exc}")
    comment = f"imported from upstream {name!r} with markup {markup}"
    text = as_toml(result.priced, comment)
    if not write:
        click.echo(text, nl=False)
    else:
        path = _config_path(ctx)
        _append(path, text)
        click.echo(f"wrote {len(result.priced)} model(s) to {path}", err=True)
    _report(result, upstream)


async def _fetch(upstream: Upstream) -> Any:
    headers = {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
    async with httpx.AsyncClient(timeout=FETCH_TIMEOUT) as http:
        try:
            response = await http.get(upstream.base_url + "/models", headers=headers)
        except httpx.HTTPError as exc:
            fail(f"upstream {upstream.name} is unreachable: {type(exc).__name__}: {exc}")
        if response.status_code != 200:
            fail(f"upstream {upstream.name} answered GET /models with {response.status_code}")
        try:
            return response.json()
        except ValueError:
            fail(f"upstream {upstream.name} answered GET /models with something not JSON")


def _config_path(ctx: click.Context) -> Path:
    options = ctx.find_object(Options)
    path = options.config_path if options else None
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    if path is None:
        fail("--write needs a config file (-c FILE); without --write the tables are printed")
    return path


def _append(path: Path, text: str) -> None:
    """Append ``text`` to the config at ``path``: checked first, replaced atomically, same mode."""
    old = path.read_text()
    new = old + ("" if old.endswith("\n") or not old else "\n") + "\n" + text
    mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".nodeprov-", suffix=".toml")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(new)
        os.chmod(tmp, mode)
        load_config(tmp, require_upstream=False)  # never leave a config that does not load
        os.replace(tmp, path)
    except ConfigError as exc:
        Path(tmp).unlink(missing_ok=True)
        fail(f"not written: {path} would not load with the tables ({exc.message})")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _report(result: ImportResult, upstream: Upstream) -> None:
    free = [m.id for m in result.priced if not any(m.rates.values())]
    if free:
        click.echo(f"note: {len(free)} model(s) are free at the upstream and priced 0", err=True)
    reasons: dict[str, list[str]] = {}
    for model_id, why in result.skipped.items():
        reasons.setdefault(why, []).append(model_id)
    for why, ids in reasons.items():
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        click.echo(f"skipped {len(ids)}: {why}: {shown}", err=True)
    if result.priced and not upstream.discover_models:
        click.echo(
            f"note: upstream {upstream.name} routes only the models it lists: set"
            " discover_models = true in its [[upstreams]] table to sell every priced model",
            err=True,
        )
