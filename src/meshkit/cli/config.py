"""Show the effective settings and where each value came from (default, meshkit.toml, environment, argument)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from meshkit._core.settings import load_settings

#: Settings whose values are secrets (API keys in export headers): shown as "***", keys kept.
_SECRET_MAPS = frozenset({"tracing.headers"})


def _shown(key: str, value: object) -> object:
    if key in _SECRET_MAPS and isinstance(value, dict):
        return dict.fromkeys(value, "***")
    return value


def show(
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="A meshkit.toml (default: $MESHKIT_CONFIG, else ./meshkit.toml if present)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    settings = load_settings(file)
    if as_json:
        payload = {
            key: {"value": _shown(key, value), "source": settings.source_of(key)}
            for key, value in settings.flat().items()
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    table = Table(title="meshkit settings")
    table.add_column("key")
    table.add_column("value")
    table.add_column("source", style="dim")
    for key, value in settings.flat().items():
        table.add_row(key, "" if value is None else str(_shown(key, value)), settings.source_of(key))
    Console(highlight=False).print(table)
