"""What every ``nodeprov`` subcommand shares: loading the config, error lines, JSON output.

Its own module so that the command modules (:mod:`nodeprov.cli_ops`, :mod:`nodeprov.cli_node`)
and the group in :mod:`nodeprov.cli` that registers them all import it, not each other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from nodeprov.config import ENV_PREFIX, Config
from nodeprov.config_load import load_config
from nodeprov.config_placeholders import placeholders
from nodeprov.core.datadir import DataDirBusy, DataDirLock
from nodeprov.core.db import DATABASE_ERRORS
from nodeprov.errors import ConfigError, NodeprovError
from nodeprov.event_loop import LoopChoice, run

T = TypeVar("T")

DEFAULT_CONFIG = Path("nodeprov.toml")
# config/ lives next to the package in a source checkout (and in editable installs).
REPO = Path(__file__).resolve().parent.parent
DEV_CONFIG = REPO / "config" / "dev.toml"
USAGE_EXIT = 2


@dataclass(frozen=True)
class Options:
    config_path: Path | None
    config_on_command_line: bool


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


def guarded(coro: Coroutine[Any, Any, T], loop: LoopChoice = "auto") -> T:
    """Run ``coro`` (on uvloop when installed, see :mod:`nodeprov.event_loop`); expected
    failures become one error line instead of a traceback."""
    try:
        return run(coro, loop)
    except ConfigError as exc:
        fail(exc.message, USAGE_EXIT)
    except NodeprovError as exc:
        fail(exc.message)
    except OSError as exc:
        fail(str(exc))
    except DATABASE_ERRORS as exc:
        fail(str(exc))
    except KeyboardInterrupt:  # Ctrl+C before the daemon's own handler is installed
        raise click.exceptions.Exit(130) from None


def load(ctx: click.Context, path: Path | None = None, *, require_upstream: bool = True) -> Config:
    """The validated config from ``path``, --config / $NODEPROV_CONFIG, or ./nodeprov.toml.

    Commands that do not serve (``require_upstream=False``), run inside the source checkout
    with no config named, use the dev node's ``config/dev.toml`` and say so on stderr.
    """
    options = ctx.find_object(Options)
    path = path or (options.config_path if options else None)
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    if path is None and not any(k.startswith(ENV_PREFIX) and "__" in k for k in os.environ):
        if (
            not require_upstream
            and DEV_CONFIG.is_file()
            and Path.cwd().resolve().is_relative_to(REPO)
        ):
            click.echo("note: using the dev node's config/dev.toml (-c FILE for another)", err=True)
            path = DEV_CONFIG
        else:
            dev = " (the dev node: `nodeprov start --dev`)" if DEV_CONFIG.is_file() else ""
            fail(
                "no configuration: pass --config FILE, set NODEPROV_CONFIG, or create"
                f" ./nodeprov.toml (`nodeprov init`){dev}",
                USAGE_EXIT,
            )
    try:
        return load_config(path, require_upstream=require_upstream)
    except ConfigError as exc:
        fail(exc.message, USAGE_EXIT)


def refuse_placeholders(config: Config) -> None:
    """Exit 2 naming every setting still holding a placeholder from the example config."""
    found = placeholders(config)
    if found:
        fail(
            "; ".join(found)
            + (" is a placeholder" if len(found) == 1 else " are placeholders")
            + " from the example config; put your own value there (or remove it)",
            USAGE_EXIT,
        )


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def own_data_dir(config: Config, command: str) -> DataDirLock:
    """Become the data dir's one owner, or exit 2 naming the process that owns it."""
    try:
        return DataDirLock.acquire(config.node.data_dir, command)
    except DataDirBusy as exc:
        if command == "start":
            fail(exc.message, USAGE_EXIT)
        if exc.command == "start":
            fail(
                f"the node is running (pid {exc.pid or '?'}, data dir {exc.data_dir});"
                f" stop it first, or use the admin page (/admin/) while it runs",
                USAGE_EXIT,
            )
        fail(f"{exc.message}: `nodeprov {exc.command}`; try again when it ends", USAGE_EXIT)
    except OSError as exc:
        fail(f"cannot use the data dir {config.node.data_dir}: {exc.strerror}", USAGE_EXIT)


def _config_here(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is not None:
        ctx.obj = Options(value, True)  # the subcommands below this one find it first


def accept_config_after(command: click.Command) -> None:
    """Give ``command`` and every command under it the group's ``-c/--config`` option."""
    command.params.append(
        click.Option(
            ["-c", "--config"],
            type=click.Path(dir_okay=False, path_type=Path),
            expose_value=False,
            is_eager=True,
            callback=_config_here,
            help="Config file (TOML); the same as `nodeprov -c FILE` before the command.",
        )
    )
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            accept_config_after(sub)
